/**
 * Opens a layer blob as a stream of uncompressed tar bytes. The compression is decided by the
 * blob's magic bytes (media types lie in the wild: Docker labels uncompressed layers `tar.gzip`);
 * the media type only has to name a layer.
 */
import { closeSync, createReadStream, fstatSync, openSync, readSync } from "node:fs";
import { open } from "node:fs/promises";
import type { Readable } from "node:stream";
import { SupermachineError } from "../errors.ts";
import { nodeZlib } from "../internal/index.ts";

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
      ? nodeZlib().createGunzip({ chunkSize: CHUNK })
      : nodeZlib().createZstdDecompress({ chunkSize: CHUNK });
  raw.on("error", (err) => inflate.destroy(err));
  inflate.on("close", () => raw.destroy());
  raw.pipe(inflate);
  return { stream: inflate, compression, bytesRead: () => read };
}

/**
 * What a zstd blob declares it decompresses to: the sum of its frames' `Frame_Content_Size`
 * (RFC 8878), found by walking frame and block headers without decompressing anything. Undefined
 * when a frame does not declare its size or the blob is not well-formed zstd (decompressing it
 * will say so). Stops as soon as the sum passes `stopAbove`.
 */
export function zstdDeclaredSize(path: string, stopAbove: number): number | undefined {
  const fd = openSync(path, "r");
  const window = Buffer.alloc(1024 * 1024);
  let windowStart = 0;
  let windowLength = 0;
  try {
    const size = fstatSync(fd).size;
    /** Offset in `window` of `n` (≤ 18) bytes at `pos`, or -1 past the end of the blob. */
    const at = (pos: number, n: number): number => {
      if (pos + n > size) return -1;
      if (pos < windowStart || pos + n > windowStart + windowLength) {
        windowStart = pos;
        windowLength = readSync(fd, window, 0, window.length, pos);
        if (windowLength < n) return -1;
      }
      return pos - windowStart;
    };
    let total = 0;
    let pos = 0;
    while (pos < size) {
      let o = at(pos, 8);
      if (o < 0) return undefined;
      const magic = window.readUInt32LE(o);
      if ((magic & 0xfffffff0) === 0x184d2a50) {
        pos += 8 + window.readUInt32LE(o + 4); // skippable frame
        continue;
      }
      if (magic !== 0xfd2fb528) return undefined;
      const fhd = window[o + 4]!;
      if (fhd & 0x08) return undefined;
      const singleSegment = (fhd >> 5) & 1;
      const fcsBytes = [singleSegment ? 1 : 0, 2, 4, 8][fhd >> 6]!;
      if (fcsBytes === 0) return undefined;
      let p = pos + 5 + (singleSegment ? 0 : 1) + [0, 1, 2, 4][fhd & 3]!;
      o = at(p, fcsBytes);
      if (o < 0) return undefined;
      total +=
        fcsBytes === 1
          ? window[o]!
          : fcsBytes === 2
            ? window.readUInt16LE(o) + 256
            : fcsBytes === 4
              ? window.readUInt32LE(o)
              : Number(window.readBigUInt64LE(o));
      if (total > stopAbove) return total;
      p += fcsBytes;
      for (;;) {
        o = at(p, 3);
        if (o < 0) return undefined;
        const header = window[o]! | (window[o + 1]! << 8) | (window[o + 2]! << 16);
        const type = (header >> 1) & 3;
        if (type === 3) return undefined;
        p += 3 + (type === 1 ? 1 : header >>> 3);
        if (header & 1) break;
      }
      pos = p + ((fhd >> 2) & 1 ? 4 : 0);
    }
    return total;
  } finally {
    closeSync(fd);
  }
}
