/**
 * Opens a layer blob as a stream of uncompressed tar bytes. The compression is decided by the
 * blob's magic bytes (media types lie in the wild: Docker labels uncompressed layers `tar.gzip`);
 * the media type only has to name a layer.
 */
import { createReadStream } from "node:fs";
import { open } from "node:fs/promises";
import type { Readable } from "node:stream";
import zlib from "node:zlib";
import { SupermachineError } from "../errors.ts";

export type LayerCompression = "gzip" | "zstd" | "none";

export interface OpenedLayer {
  /** Uncompressed tar bytes. */
  readonly stream: Readable;
  readonly compression: LayerCompression;
  /** Compressed bytes read from the blob so far. */
  readonly bytesRead: () => number;
}

const CHUNK = 256 * 1024;

const LAYER_MEDIA_TYPE =
  /^application\/vnd\.(oci\.image\.layer(\.nondistributable)?\.v1\.tar|docker\.image\.rootfs\.(foreign\.)?diff\.tar)(\.gzip|\+gzip|\+zstd)?$/;

/** True when `mediaType` names a layer we can apply (any compression; magic bytes decide). */
export function isLayerMediaType(mediaType: string): boolean {
  return LAYER_MEDIA_TYPE.test(mediaType) || mediaType === "application/x-tar" || mediaType === "";
}

export function sniffCompression(head: Uint8Array): LayerCompression | "bzip2" | "xz" {
  if (head[0] === 0x1f && head[1] === 0x8b) return "gzip";
  if (head[0] === 0x28 && head[1] === 0xb5 && head[2] === 0x2f && head[3] === 0xfd) return "zstd";
  if (head[0] === 0x42 && head[1] === 0x5a && head[2] === 0x68) return "bzip2";
  if (head[0] === 0xfd && head[1] === 0x37 && head[2] === 0x7a && head[3] === 0x58 && head[4] === 0x5a)
    return "xz";
  return "none";
}

export async function openLayer(path: string, mediaType: string, signal?: AbortSignal): Promise<OpenedLayer> {
  if (!isLayerMediaType(mediaType)) {
    throw new SupermachineError("UNSUPPORTED_MEDIA_TYPE", `not a layer media type: ${mediaType} (${path})`);
  }
  const head = Buffer.alloc(8);
  const fh = await open(path, "r");
  try {
    await fh.read(head, 0, head.length, 0);
  } finally {
    await fh.close();
  }
  const compression = sniffCompression(head);
  if (compression === "bzip2" || compression === "xz") {
    throw new SupermachineError(
      "UNSUPPORTED_MEDIA_TYPE",
      `${compression} layers are not supported (${path}, ${mediaType}); use gzip, zstd or uncompressed`,
    );
  }
  const raw = createReadStream(path, { highWaterMark: CHUNK, signal });
  let read = 0;
  raw.on("data", (chunk: Buffer | string) => {
    read += chunk.length;
  });
  if (compression === "none") return { stream: raw, compression, bytesRead: () => read };
  const inflate =
    compression === "gzip"
      ? zlib.createGunzip({ chunkSize: CHUNK })
      : zlib.createZstdDecompress({ chunkSize: CHUNK });
  raw.on("error", (err) => inflate.destroy(err));
  inflate.on("close", () => raw.destroy());
  raw.pipe(inflate);
  return { stream: inflate, compression, bytesRead: () => read };
}
