/** Defensive parsing of OCI / Docker manifests and indexes. */

import { SupermachineError } from "../errors.ts";
import { isDigest } from "./digest.ts";
import {
  isConfigMediaType,
  isIndexMediaType,
  isManifestMediaType,
  isSchema1MediaType,
  layerCompression,
  MediaType,
} from "./media-types.ts";
import type { Platform } from "./platform.ts";

/** Largest manifest or index accepted (containerd uses the same bound). */
export const MANIFEST_MAX_BYTES = 4 * 1024 * 1024;
/** Most layers an image may have. */
export const MAX_LAYERS = 1000;
/** Most entries an index may have. */
export const MAX_INDEX_ENTRIES = 10_000;

export interface Descriptor {
  readonly mediaType: string;
  readonly digest: string;
  readonly size: number;
  readonly platform?: Platform | undefined;
  readonly annotations?: Readonly<Record<string, string>> | undefined;
  readonly urls?: readonly string[] | undefined;
}

export interface ImageIndex {
  readonly kind: "index";
  readonly mediaType: string;
  readonly manifests: readonly Descriptor[];
  readonly annotations?: Readonly<Record<string, string>> | undefined;
}

export interface ImageManifest {
  readonly kind: "manifest";
  readonly mediaType: string;
  readonly config: Descriptor;
  readonly layers: readonly Descriptor[];
  readonly annotations?: Readonly<Record<string, string>> | undefined;
}

/** Makes the error for malformed content; the caller knows whether it came from a registry or a file. */
export type Malformed = (message: string) => Error;

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function stringMap(v: unknown): Record<string, string> | undefined {
  if (!isRecord(v)) return undefined;
  const out: Record<string, string> = {};
  for (const [k, val] of Object.entries(v)) if (typeof val === "string") out[k] = val;
  return out;
}

function parsePlatformField(v: unknown): Platform | undefined {
  if (!isRecord(v)) return undefined;
  if (typeof v.os !== "string" || typeof v.architecture !== "string") return undefined;
  return {
    os: v.os,
    architecture: v.architecture,
    variant: typeof v.variant === "string" && v.variant !== "" ? v.variant : undefined,
  };
}

export function parseDescriptor(v: unknown, where: string, malformed: Malformed): Descriptor {
  if (!isRecord(v)) throw malformed(`${where} is not an object`);
  if (typeof v.mediaType !== "string" || v.mediaType === "") throw malformed(`${where} has no mediaType`);
  if (!isDigest(v.digest)) {
    throw malformed(`${where} has an invalid or unsupported digest ${JSON.stringify(v.digest)}`);
  }
  if (typeof v.size !== "number" || !Number.isSafeInteger(v.size) || v.size < 0) {
    throw malformed(`${where} has an invalid size ${JSON.stringify(v.size)}`);
  }
  const urls = Array.isArray(v.urls) ? v.urls.filter((u): u is string => typeof u === "string") : undefined;
  return {
    mediaType: v.mediaType,
    digest: v.digest,
    size: v.size,
    platform: parsePlatformField(v.platform),
    annotations: stringMap(v.annotations),
    urls,
  };
}

/**
 * Parse a manifest or index. `contentType` is the media type the transport claims (Content-Type
 * header, or the descriptor that pointed here); the document's own `mediaType` wins when present.
 * Schema 1 manifests and non-image artifacts are refused with `UNSUPPORTED_MEDIA_TYPE`.
 */
export function parseManifestDocument(
  bytes: Uint8Array,
  contentType: string | undefined,
  malformed: Malformed,
): ImageIndex | ImageManifest {
  if (bytes.length > MANIFEST_MAX_BYTES) {
    throw malformed(`manifest is ${bytes.length} bytes, more than the ${MANIFEST_MAX_BYTES} allowed`);
  }
  let doc: unknown;
  try {
    doc = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch (err) {
    throw malformed(`manifest is not valid JSON (${(err as Error).message})`);
  }
  if (!isRecord(doc)) throw malformed("manifest is not a JSON object");
  if (
    doc.schemaVersion === 1 ||
    isSchema1MediaType(contentType) ||
    isSchema1MediaType(doc.mediaType as string)
  ) {
    throw new SupermachineError(
      "UNSUPPORTED_MEDIA_TYPE",
      "registry returned a Docker schema 1 manifest, which is not supported; push the image again with a current client (schema 2 or OCI)",
    );
  }
  if (doc.schemaVersion !== 2)
    throw malformed(`unsupported schemaVersion ${JSON.stringify(doc.schemaVersion)}`);

  let mediaType = typeof doc.mediaType === "string" && doc.mediaType !== "" ? doc.mediaType : contentType;
  if (mediaType === undefined || (!isIndexMediaType(mediaType) && !isManifestMediaType(mediaType))) {
    // Early OCI documents may omit mediaType and registries may send a generic Content-Type.
    if (
      mediaType === undefined ||
      mediaType === "application/octet-stream" ||
      mediaType === "application/json"
    ) {
      if (Array.isArray(doc.manifests)) mediaType = MediaType.ociIndex;
      else if (isRecord(doc.config) && Array.isArray(doc.layers)) mediaType = MediaType.ociManifest;
    }
  }
  if (isIndexMediaType(mediaType)) {
    if (!Array.isArray(doc.manifests)) throw malformed("index has no manifests array");
    if (doc.manifests.length > MAX_INDEX_ENTRIES)
      throw malformed(`index has ${doc.manifests.length} entries`);
    const manifests = doc.manifests.map((m, i) => parseDescriptor(m, `index entry ${i}`, malformed));
    return { kind: "index", mediaType: mediaType!, manifests, annotations: stringMap(doc.annotations) };
  }
  if (isManifestMediaType(mediaType)) {
    const config = parseDescriptor(doc.config, "manifest config", malformed);
    if (!Array.isArray(doc.layers)) throw malformed("manifest has no layers array");
    if (doc.layers.length > MAX_LAYERS)
      throw malformed(`manifest has ${doc.layers.length} layers (at most ${MAX_LAYERS})`);
    const layers = doc.layers.map((l, i) => parseDescriptor(l, `layer ${i}`, malformed));
    return {
      kind: "manifest",
      mediaType: mediaType!,
      config,
      layers,
      annotations: stringMap(doc.annotations),
    };
  }
  throw new SupermachineError(
    "UNSUPPORTED_MEDIA_TYPE",
    `unsupported manifest media type ${JSON.stringify(mediaType ?? "(none)")}: expected an OCI or Docker schema 2 manifest or index`,
  );
}

/** Refuse manifests that are not runnable container images (artifacts, encrypted or unknown layers). */
export function assertRunnableImage(manifest: ImageManifest): void {
  if (!isConfigMediaType(manifest.config.mediaType)) {
    throw new SupermachineError(
      "UNSUPPORTED_MEDIA_TYPE",
      `not a container image: config media type ${JSON.stringify(manifest.config.mediaType)} (an OCI artifact?)`,
    );
  }
  for (const layer of manifest.layers) {
    if (layerCompression(layer.mediaType) === undefined) {
      throw new SupermachineError(
        "UNSUPPORTED_MEDIA_TYPE",
        `layer ${layer.digest} has unsupported media type ${JSON.stringify(layer.mediaType)} (supported: tar, tar+gzip, tar+zstd)`,
      );
    }
  }
}
