/**
 * `docker-archive:FILE[:NAME:TAG]` — a `docker save` tarball (`manifest.json` listing the config
 * and layer files; layers plain or compressed tars; the archive itself optionally gzipped).
 * Members are streamed straight out of the tar; digests are computed, a matching OCI manifest is
 * synthesised, and the result is stored like a pulled image.
 */

import { createReadStream, createWriteStream } from "node:fs";
import { open, stat, unlink } from "node:fs/promises";
import { join, resolve } from "node:path";
import { pipeline } from "node:stream/promises";
import { AbortError, SupermachineError } from "../errors.ts";
import { nodeCrypto, nodeZlib } from "../internal/index.ts";
import type { BlobWriter } from "./content-store.ts";
import { digestOf } from "./digest.ts";
import { IMAGE_CONFIG_MAX_BYTES } from "./image-config.ts";
import type { BlobFetcher, ResolvedImage } from "./image-source.ts";
import { type Descriptor, parseManifestDocument } from "./manifest.ts";
import { MediaType, ociLayerMediaType, sniffCompression } from "./media-types.ts";
import { parseReference } from "./reference.ts";
import { TarFormatError, TarIndex, type TarMember } from "./tar-index.ts";

async function isFile(path: string): Promise<boolean> {
  return stat(path).then(
    (s) => s.isFile(),
    () => false,
  );
}

/**
 * Split `FILE[:NAME:TAG]` (what follows `docker-archive:`). The longest prefix that is an existing
 * file is the archive, so both file names and image names may contain `:`.
 */
export async function parseDockerArchiveSpec(
  spec: string,
): Promise<{ file: string; name: string | undefined }> {
  if (spec === "") {
    throw new SupermachineError(
      "INVALID_REFERENCE",
      `invalid source "docker-archive:": expected docker-archive:FILE[:NAME:TAG]`,
    );
  }
  if (await isFile(spec)) return { file: resolve(spec), name: undefined };
  for (let i = spec.lastIndexOf(":"); i > 0; i = spec.lastIndexOf(":", i - 1)) {
    if (await isFile(spec.slice(0, i))) {
      const name = spec.slice(i + 1);
      return { file: resolve(spec.slice(0, i)), name: name === "" ? undefined : name };
    }
  }
  throw new SupermachineError("IMAGE_NOT_FOUND", `docker archive ${JSON.stringify(spec)} does not exist`);
}

export function dockerArchiveReference(file: string, name: string | undefined): string {
  return `docker-archive:${file}${name !== undefined ? `:${name}` : ""}`;
}

interface ArchiveManifestEntry {
  readonly Config: string;
  readonly RepoTags: readonly string[];
  readonly Layers: readonly string[];
}

function normalizeTag(tag: string): string {
  try {
    return parseReference(tag).toString();
  } catch {
    return tag;
  }
}

async function readMember(path: string, member: TarMember, max: number, what: string): Promise<Buffer> {
  if (member.size > max) throw new Error(`${what} is ${member.size} bytes (at most ${max})`);
  const fh = await open(path, "r");
  try {
    const buf = Buffer.alloc(member.size);
    let done = 0;
    while (done < member.size) {
      const { bytesRead } = await fh.read(buf, done, member.size - done, member.offset + done);
      if (bytesRead === 0) throw new Error(`${what} is truncated`);
      done += bytesRead;
    }
    return buf;
  } finally {
    await fh.close();
  }
}

function memberStream(path: string, member: TarMember, signal?: AbortSignal) {
  return createReadStream(path, {
    start: member.offset,
    end: member.offset + member.size - 1,
    highWaterMark: 1024 * 1024,
    signal,
  });
}

class ArchiveBlobFetcher implements BlobFetcher {
  readonly #path: string;
  readonly #members: ReadonlyMap<string, TarMember>;

  constructor(path: string, members: ReadonlyMap<string, TarMember>) {
    this.#path = path;
    this.#members = members;
  }

  async fetch(
    descriptor: Descriptor,
    writer: BlobWriter,
    options: { signal: AbortSignal; onBytes: (bytesDone: number) => void },
  ): Promise<void> {
    const member = this.#members.get(descriptor.digest);
    if (member === undefined) throw new Error(`no archive member for ${descriptor.digest}`);
    if (member.size === 0) return;
    try {
      for await (const chunk of memberStream(this.#path, member, options.signal)) {
        await writer.write(chunk as Buffer);
        options.onBytes(writer.bytesWritten);
      }
    } catch (err) {
      if (options.signal.aborted) throw new AbortError("import aborted", { cause: options.signal.reason });
      throw err;
    }
  }
}

/** Resolve an image of a `docker save` archive (optionally selected by NAME:TAG). */
export async function resolveDockerArchive(
  file: string,
  name: string | undefined,
  tmpDir: string,
  signal?: AbortSignal,
): Promise<ResolvedImage> {
  const malformed = (message: string) =>
    new SupermachineError("INVALID_ARGUMENT", `docker archive ${file} is malformed: ${message}`);
  let tarPath = file;
  let tempCopy: string | undefined;
  const cleanup = async () => {
    if (tempCopy !== undefined) await unlink(tempCopy).catch(() => {});
  };
  try {
    // `docker save | gzip` archives: decompress once into the store's temp dir for random access.
    const head = Buffer.alloc(4);
    const fh = await open(file, "r");
    try {
      await fh.read(head, 0, 4, 0);
    } finally {
      await fh.close();
    }
    if (sniffCompression(head) === "gzip") {
      tempCopy = join(tmpDir, `archive.${process.pid}.${nodeCrypto().randomBytes(6).toString("hex")}.tar`);
      try {
        await pipeline(createReadStream(file), nodeZlib().createGunzip(), createWriteStream(tempCopy), {
          signal,
        });
      } catch (err) {
        if (signal?.aborted) throw new AbortError("import aborted", { cause: signal.reason });
        throw malformed(`cannot decompress (${(err as Error).message})`);
      }
      tarPath = tempCopy;
    } else if (sniffCompression(head) === "zstd") {
      throw malformed("zstd-compressed archives are not supported; decompress it first (zstd -d)");
    }

    let index: TarIndex;
    try {
      index = await TarIndex.open(tarPath);
    } catch (err) {
      if (err instanceof TarFormatError) throw malformed(err.message);
      throw err;
    }
    const read = async (member: string, max: number, what: string): Promise<Buffer> => {
      const m = index.resolve(member);
      if (m === undefined) throw malformed(`${what} (${member}) is missing`);
      try {
        return await readMember(tarPath, m, max, what);
      } catch (err) {
        throw malformed((err as Error).message);
      }
    };

    let entries: ArchiveManifestEntry[];
    try {
      const parsed: unknown = JSON.parse(
        (await read("manifest.json", 16 * 1024 * 1024, "manifest.json")).toString("utf8"),
      );
      if (!Array.isArray(parsed)) throw new Error("not a list");
      entries = parsed.map((e: unknown, i) => {
        const r = e as Record<string, unknown>;
        if (
          typeof r?.Config !== "string" ||
          !Array.isArray(r.Layers) ||
          !r.Layers.every((l) => typeof l === "string")
        ) {
          throw new Error(`entry ${i} lacks Config or Layers`);
        }
        const tags = Array.isArray(r.RepoTags)
          ? r.RepoTags.filter((t): t is string => typeof t === "string")
          : [];
        return { Config: r.Config, RepoTags: tags, Layers: r.Layers as string[] };
      });
    } catch (err) {
      if (err instanceof SupermachineError) throw err;
      throw malformed(`manifest.json is invalid (${(err as Error).message})`);
    }
    if (entries.length === 0)
      throw new SupermachineError("IMAGE_NOT_FOUND", `docker archive ${file} contains no images`);
    const allTags = entries.flatMap((e) => e.RepoTags);
    let entry: ArchiveManifestEntry;
    if (name !== undefined) {
      const want = normalizeTag(name);
      const found = entries.find((e) => e.RepoTags.some((t) => t === name || normalizeTag(t) === want));
      if (found === undefined) {
        throw new SupermachineError(
          "IMAGE_NOT_FOUND",
          `docker archive ${file} has no image named ${name}; it has: ${allTags.length > 0 ? allTags.join(", ") : "untagged images only"}`,
        );
      }
      entry = found;
    } else if (entries.length === 1) entry = entries[0]!;
    else {
      throw new SupermachineError(
        "INVALID_REFERENCE",
        `docker archive ${file} holds ${entries.length} images: name one with docker-archive:${file}:NAME:TAG (${allTags.join(", ")})`,
      );
    }

    const configBytes = await read(entry.Config, IMAGE_CONFIG_MAX_BYTES, "image config");
    const configDigest = digestOf(configBytes);
    const members = new Map<string, TarMember>();
    const layers: Descriptor[] = [];
    for (const layerPath of entry.Layers) {
      const member = index.resolve(layerPath);
      if (member === undefined) throw malformed(`layer ${layerPath} is missing`);
      const hash = nodeCrypto().createHash("sha256");
      const headBytes: Buffer[] = [];
      let headLength = 0;
      try {
        if (member.size > 0) {
          for await (const chunk of memberStream(tarPath, member, signal)) {
            hash.update(chunk as Buffer);
            if (headLength < 4) {
              headBytes.push(chunk as Buffer);
              headLength += (chunk as Buffer).length;
            }
          }
        }
      } catch (err) {
        if (signal?.aborted) throw new AbortError("import aborted", { cause: signal.reason });
        throw err;
      }
      const digest = `sha256:${hash.digest("hex")}`;
      members.set(digest, member);
      layers.push({
        mediaType: ociLayerMediaType(sniffCompression(Buffer.concat(headBytes).subarray(0, 4))),
        digest,
        size: member.size,
      });
    }
    // The config is served from memory through the same fetcher interface.
    const manifestDoc = {
      schemaVersion: 2,
      mediaType: MediaType.ociManifest,
      config: { mediaType: MediaType.ociConfig, digest: configDigest, size: configBytes.length },
      layers: layers.map((l) => ({ mediaType: l.mediaType, digest: l.digest, size: l.size })),
    };
    const manifestBytes = Buffer.from(JSON.stringify(manifestDoc));
    const manifest = parseManifestDocument(manifestBytes, MediaType.ociManifest, malformed);
    if (manifest.kind !== "manifest") throw malformed("internal: synthesised manifest is not a manifest");
    const layerFetcher = new ArchiveBlobFetcher(tarPath, members);
    const blobs: BlobFetcher = {
      fetch: async (descriptor, writer, options) => {
        if (descriptor.digest === configDigest) {
          await writer.write(configBytes);
          options.onBytes(writer.bytesWritten);
          return;
        }
        await layerFetcher.fetch(descriptor, writer, options);
      },
    };
    return {
      reference: dockerArchiveReference(file, name),
      source: "docker-archive",
      manifestDigest: digestOf(manifestBytes),
      manifestBytes,
      manifest,
      blobs,
      malformed,
      close: cleanup,
    };
  } catch (err) {
    await cleanup();
    throw err;
  }
}
