/**
 * `oci:PATH[:TAG]` — an OCI image layout directory (`oci-layout`, `index.json`, `blobs/`), as
 * written by `skopeo copy … oci:DIR:TAG`, `buildah push`, `docker buildx --output type=oci`.
 * TAG is matched against the `org.opencontainers.image.ref.name` annotation of `index.json`.
 */

import { createReadStream } from "node:fs";
import { readFile, stat } from "node:fs/promises";
import { join, resolve } from "node:path";
import { AbortError, DigestMismatchError, SupermachineError } from "../errors.ts";
import type { BlobWriter } from "./content-store.ts";
import { digestOf, parseDigest } from "./digest.ts";
import type { BlobFetcher, ResolvedImage } from "./image-source.ts";
import {
  type Descriptor,
  type ImageIndex,
  type ImageManifest,
  MANIFEST_MAX_BYTES,
  parseManifestDocument,
} from "./manifest.ts";
import { isIndexMediaType, MediaType } from "./media-types.ts";
import { type Platform, platformScore, selectPlatform } from "./platform.ts";

export const REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name";

async function isDirectory(path: string): Promise<boolean> {
  return stat(path).then(
    (s) => s.isDirectory(),
    () => false,
  );
}

/**
 * Split `PATH[:TAG]` (what follows `oci:`). A path that exists as a directory as a whole wins, so
 * paths containing `:` work; otherwise the text after the last `:` is the tag.
 */
export async function parseOciLayoutSpec(spec: string): Promise<{ dir: string; tag: string | undefined }> {
  if (spec === "")
    throw new SupermachineError("INVALID_REFERENCE", `invalid source "oci:": expected oci:PATH[:TAG]`);
  if (await isDirectory(spec)) return { dir: resolve(spec), tag: undefined };
  const colon = spec.lastIndexOf(":");
  if (colon > 0 && colon < spec.length - 1 && !spec.slice(colon + 1).includes("/")) {
    return { dir: resolve(spec.slice(0, colon)), tag: spec.slice(colon + 1) };
  }
  return { dir: resolve(spec), tag: undefined };
}

/** The string recorded in the store for a layout image. */
export function ociLayoutReference(dir: string, tag: string | undefined): string {
  return `oci:${dir}${tag !== undefined ? `:${tag}` : ""}`;
}

function malformedLayout(dir: string): (message: string) => Error {
  return (message) => new SupermachineError("INVALID_ARGUMENT", `OCI layout ${dir} is malformed: ${message}`);
}

export function layoutBlobPath(dir: string, digest: string): string {
  const d = parseDigest(digest);
  if (d === undefined) throw malformedLayout(dir)(`invalid digest ${JSON.stringify(digest)}`);
  return join(dir, "blobs", d.algorithm, d.hex);
}

async function readLayoutBlob(dir: string, desc: Descriptor, max: number): Promise<Buffer> {
  const path = layoutBlobPath(dir, desc.digest);
  let bytes: Buffer;
  try {
    const size = (await stat(path)).size;
    if (size > max)
      throw malformedLayout(dir)(`blob ${desc.digest} is ${size} bytes (at most ${max} expected)`);
    bytes = await readFile(path);
  } catch (err) {
    if (err instanceof SupermachineError) throw err;
    throw malformedLayout(dir)(`blob ${desc.digest} is missing (${(err as Error).message})`);
  }
  const actual = digestOf(bytes, parseDigest(desc.digest)!.algorithm);
  if (actual !== desc.digest) {
    throw new DigestMismatchError(`blob ${desc.digest} in OCI layout ${dir} hashes to ${actual}`, {
      digest: desc.digest,
      actualDigest: actual,
    });
  }
  return bytes;
}

function tagMatches(refName: string | undefined, tag: string): boolean {
  if (refName === undefined) return false;
  if (refName === tag) return true;
  // Some tools record a full reference (`docker.io/library/busybox:1.36`) as the ref name.
  const colon = refName.lastIndexOf(":");
  return colon > refName.lastIndexOf("/") && refName.slice(colon + 1) === tag;
}

export class LayoutBlobFetcher implements BlobFetcher {
  readonly #dir: string;

  constructor(dir: string) {
    this.#dir = dir;
  }

  async fetch(
    descriptor: Descriptor,
    writer: BlobWriter,
    options: { signal: AbortSignal; onBytes: (bytesDone: number) => void },
  ): Promise<void> {
    const path = layoutBlobPath(this.#dir, descriptor.digest);
    try {
      for await (const chunk of createReadStream(path, {
        signal: options.signal,
        highWaterMark: 1024 * 1024,
      })) {
        await writer.write(chunk as Buffer);
        options.onBytes(writer.bytesWritten);
      }
    } catch (err) {
      if (options.signal.aborted) throw new AbortError("import aborted", { cause: options.signal.reason });
      if ((err as NodeJS.ErrnoException).code === "ENOENT") {
        throw malformedLayout(this.#dir)(`blob ${descriptor.digest} is missing`);
      }
      throw err;
    }
  }
}

/** Resolve an image inside an OCI layout to its manifest, choosing by tag and platform. */
export async function resolveOciLayout(
  dir: string,
  tag: string | undefined,
  wanted: Platform,
): Promise<ResolvedImage> {
  const malformed = malformedLayout(dir);
  if (!(await isDirectory(dir))) {
    throw new SupermachineError("IMAGE_NOT_FOUND", `OCI layout directory ${dir} does not exist`);
  }
  let layoutText: string;
  try {
    layoutText = await readFile(join(dir, "oci-layout"), "utf8");
  } catch {
    throw new SupermachineError(
      "INVALID_ARGUMENT",
      `${dir} is not an OCI image layout (no oci-layout file); create one with skopeo copy … oci:${dir}:TAG`,
    );
  }
  try {
    const version = (JSON.parse(layoutText) as { imageLayoutVersion?: unknown }).imageLayoutVersion;
    if (typeof version !== "string" || !version.startsWith("1."))
      throw new Error(`version ${String(version)}`);
  } catch (err) {
    throw malformed(`unsupported oci-layout file (${(err as Error).message})`);
  }
  let indexBytes: Buffer;
  try {
    indexBytes = await readFile(join(dir, "index.json"));
  } catch {
    throw malformed("index.json is missing");
  }
  const top = parseManifestDocument(indexBytes, MediaType.ociIndex, malformed);
  if (top.kind !== "index") throw malformed("index.json is not an image index");

  let candidates: readonly Descriptor[] = top.manifests;
  if (tag !== undefined) {
    candidates = top.manifests.filter((m) => tagMatches(m.annotations?.[REF_NAME_ANNOTATION], tag));
    if (candidates.length === 0) {
      const tags = top.manifests
        .map((m) => m.annotations?.[REF_NAME_ANNOTATION])
        .filter((t) => t !== undefined);
      throw new SupermachineError(
        "IMAGE_NOT_FOUND",
        `OCI layout ${dir} has no image tagged ${JSON.stringify(tag)}; tags: ${tags.length > 0 ? tags.join(", ") : "none"}`,
      );
    }
  }
  if (candidates.length === 0)
    throw new SupermachineError("IMAGE_NOT_FOUND", `OCI layout ${dir} contains no images`);

  const where = `OCI layout ${dir}${tag !== undefined ? `:${tag}` : ""}`;
  let chosen: Descriptor;
  let index: { digest: string; bytes: Uint8Array } | undefined;
  const ambiguous = () => {
    const tags = candidates.map((m) => m.annotations?.[REF_NAME_ANNOTATION]).filter((t) => t !== undefined);
    return new SupermachineError(
      "INVALID_REFERENCE",
      `${where} holds ${candidates.length} images: name one with oci:${dir}:TAG${tags.length > 0 ? ` (tags: ${tags.join(", ")})` : ""}`,
    );
  };
  if (candidates.length === 1) chosen = candidates[0]!;
  else if (candidates.every((c) => c.platform !== undefined && !isIndexMediaType(c.mediaType))) {
    // Per-platform manifests listed directly in index.json: choose by platform, if that is unambiguous.
    chosen = selectPlatform(candidates, wanted, where);
    const score = platformScore(chosen.platform!, wanted);
    if (candidates.filter((c) => c !== chosen && platformScore(c.platform!, wanted) === score).length > 0) {
      throw ambiguous();
    }
  } else throw ambiguous();
  let indexPlatform = chosen.platform;
  for (let depth = 0; isIndexMediaType(chosen.mediaType); depth++) {
    if (depth >= 2) throw malformed("indexes nested more than two deep");
    const bytes = await readLayoutBlob(dir, chosen, MANIFEST_MAX_BYTES);
    const doc = parseManifestDocument(bytes, chosen.mediaType, malformed) as ImageIndex | ImageManifest;
    if (doc.kind !== "index") throw malformed(`${chosen.digest} is declared an index but is a manifest`);
    index = { digest: chosen.digest, bytes };
    chosen = selectPlatform(doc.manifests, wanted, where);
    indexPlatform = chosen.platform;
  }
  const manifestBytes = await readLayoutBlob(dir, chosen, MANIFEST_MAX_BYTES);
  const manifest = parseManifestDocument(manifestBytes, chosen.mediaType, malformed);
  if (manifest.kind !== "manifest") throw malformed(`${chosen.digest} is not an image manifest`);
  return {
    reference: ociLayoutReference(dir, tag),
    source: "oci-layout",
    index,
    indexPlatform: index !== undefined || candidates.length > 1 ? indexPlatform : undefined,
    manifestDigest: chosen.digest,
    manifestBytes,
    manifest,
    blobs: new LayoutBlobFetcher(dir),
    malformed,
  };
}
