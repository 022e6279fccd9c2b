/**
 * `pullImage`: the one entry point from a reference (registry, `oci:…`, `docker-archive:…`) to
 * verified blobs in the content store plus a parsed image config.
 */

import {
  AbortError,
  DigestMismatchError,
  PlatformNotFoundError,
  RegistryError,
  SupermachineError,
} from "../errors.ts";
import { debug } from "../internal/index.ts";
import {
  BlobSizeError,
  ContentStore,
  type ImageRecord,
  type ImageSource,
  type LayerRecord,
  type PruneResult,
} from "./content-store.ts";
import { dockerArchiveReference, parseDockerArchiveSpec, resolveDockerArchive } from "./docker-archive.ts";
import {
  IMAGE_CONFIG_MAX_BYTES,
  type ImageConfig,
  ImageConfigError,
  parseImageConfig,
} from "./image-config.ts";
import type { ResolvedImage } from "./image-source.ts";
import {
  assertRunnableImage,
  type Descriptor,
  type ImageManifest,
  parseManifestDocument,
} from "./manifest.ts";
import {
  isIndexMediaType,
  isManifestMediaType,
  type LayerCompression,
  layerCompression,
} from "./media-types.ts";
import { ociLayoutReference, parseOciLayoutSpec, resolveOciLayout } from "./oci-layout.ts";
import {
  DEFAULT_PLATFORM,
  formatPlatform,
  type Platform,
  parsePlatform,
  platformScore,
  selectPlatform,
} from "./platform.ts";
import { PROGRESS_INTERVAL_MS, type ProgressSink, type PullProgress, progressSink } from "./progress.ts";
import { parseReference } from "./reference.ts";
import { type CredentialsOption, RegistryClient } from "./registry-client.ts";

export interface PulledLayer {
  /** Digest of the blob as stored (compressed). */
  readonly digest: string;
  readonly mediaType: string;
  /** From the media type; check the blob's magic bytes too if you must be robust to mislabelled layers. */
  readonly compression: LayerCompression;
  readonly size: number;
  /** Path of the verified blob in the store. Read-only: never modify it. */
  readonly path: string;
  /** Digest of the uncompressed tar (`rootfs.diff_ids`), when the config lists one. */
  readonly diffId: string | undefined;
}

/** A pulled (or imported) image, its blobs verified and stored. */
export interface PulledImage {
  /** Canonical reference (`docker.io/library/alpine:3.20`) or local source (`oci:/abs/dir:tag`). */
  readonly reference: string;
  readonly source: ImageSource;
  /** `os/arch[/variant]` of the image. */
  readonly platform: string;
  readonly indexDigest: string | undefined;
  readonly manifestDigest: string;
  readonly configDigest: string;
  readonly config: ImageConfig;
  /** Layers, bottom first. */
  readonly layers: readonly PulledLayer[];
  /** Config plus compressed layers. */
  readonly sizeBytes: number;
  /** ISO 8601. */
  readonly pulledAt: string;
}

export interface StoreOptions {
  /** supermachine data dir; the store is `<dataDir>/oci`. Default: `$SUPERMACHINE_DATA_DIR`, else `${XDG_DATA_HOME:-~/.local/share}/supermachine`. */
  readonly dataDir?: string | undefined;
}

export interface PullOptions extends StoreOptions {
  /** `os/arch[/variant]` (default `linux/amd64`). */
  readonly platform?: string | undefined;
  /** Registries (`host` or `host:port`) that may be reached over plain HTTP. Loopback always may. */
  readonly insecureRegistries?: readonly string[] | undefined;
  /** Registry credentials; otherwise `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`. */
  readonly credentials?: CredentialsOption | undefined;
  /** Docker config file for credentials; `false` never reads one. */
  readonly dockerConfigPath?: string | false | undefined;
  readonly signal?: AbortSignal | undefined;
  readonly onProgress?: ((event: PullProgress) => void) | undefined;
  /** Parallel blob downloads (default 3). */
  readonly concurrency?: number | undefined;
  /**
   * `always` (default): ask the registry what the reference points at now, download what is missing.
   * `missing`: use the stored image when there is one, else pull. `never`: stored image or `IMAGE_NOT_FOUND`.
   */
  readonly pullPolicy?: "always" | "missing" | "never" | undefined;
  /** Retries after 5xx/429 answers or connection errors (default 4). */
  readonly retries?: number | undefined;
  /** First retry delay in ms, doubled each retry (default 200). */
  readonly retryDelayMs?: number | undefined;
}

const LOCAL_OCI = "oci:";
const LOCAL_ARCHIVE = "docker-archive:";

function isAbortLike(err: unknown): boolean {
  return SupermachineError.is(err) && err.code === "ABORTED";
}

async function forEachLimit<T>(
  items: readonly T[],
  limit: number,
  signal: AbortSignal | undefined,
  fn: (item: T, signal: AbortSignal) => Promise<void>,
): Promise<void> {
  const inner = new AbortController();
  const combined = signal ? AbortSignal.any([signal, inner.signal]) : inner.signal;
  let next = 0;
  const failures: unknown[] = [];
  const worker = async () => {
    while (failures.length === 0 && next < items.length) {
      const item = items[next++]!;
      try {
        await fn(item, combined);
      } catch (error) {
        // Keep the first real error; aborts caused by it are noise.
        if (failures.length === 0) failures.push(error);
        else if (isAbortLike(failures[0]) && !isAbortLike(error) && !signal?.aborted) failures[0] = error;
        inner.abort(error);
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(limit, items.length)) }, worker));
  if (failures.length > 0) throw failures[0];
}

/** Canonical key of a reference or local source, as recorded in the store. */
async function canonicalSource(source: string): Promise<string> {
  if (source.startsWith(LOCAL_OCI)) {
    const { dir, tag } = await parseOciLayoutSpec(source.slice(LOCAL_OCI.length));
    return ociLayoutReference(dir, tag);
  }
  if (source.startsWith(LOCAL_ARCHIVE)) {
    const { file, name } = await parseDockerArchiveSpec(source.slice(LOCAL_ARCHIVE.length));
    return dockerArchiveReference(file, name);
  }
  return parseReference(source).toString();
}

function platformOf(config: ImageConfig): Platform | undefined {
  if (config.os === "" || config.architecture === "") return undefined;
  return { os: config.os, architecture: config.architecture, variant: config.variant };
}

async function resolveFromRegistry(
  source: string,
  wanted: Platform,
  options: PullOptions,
  signal: AbortSignal | undefined,
): Promise<ResolvedImage> {
  const ref = parseReference(source);
  const client = new RegistryClient(ref.registry, {
    insecureRegistries: options.insecureRegistries,
    credentials: options.credentials,
    dockerConfigPath: options.dockerConfigPath,
    retries: options.retries,
    retryDelayMs: options.retryDelayMs,
  });
  const malformed = (message: string) =>
    new RegistryError(
      "REGISTRY_ERROR",
      `registry ${ref.registry} returned a malformed manifest for ${ref}: ${message}`,
      {
        registry: ref.registry,
      },
    );
  let fetched = await client.getManifest(ref.repository, ref.digest ?? ref.tag!, signal);
  let doc = parseManifestDocument(fetched.bytes, fetched.contentType, malformed);
  let index: { digest: string; bytes: Uint8Array } | undefined;
  let indexPlatform: Platform | undefined;
  for (let depth = 0; doc.kind === "index"; depth++) {
    if (depth >= 2) throw malformed("indexes nested more than two deep");
    index = { digest: fetched.digest, bytes: fetched.bytes };
    const entries = doc.manifests.filter(
      (m) => isManifestMediaType(m.mediaType) || isIndexMediaType(m.mediaType),
    );
    const chosen = selectPlatform(entries, wanted, ref.toString());
    indexPlatform = chosen.platform;
    fetched = await client.getManifest(ref.repository, chosen.digest, signal);
    doc = parseManifestDocument(fetched.bytes, fetched.contentType ?? chosen.mediaType, malformed);
  }
  const manifest: ImageManifest = doc;
  return {
    reference: ref.toString(),
    source: "registry",
    index,
    indexPlatform,
    manifestDigest: fetched.digest,
    manifestBytes: fetched.bytes,
    manifest,
    malformed,
    blobs: {
      fetch: (descriptor, writer, opts) =>
        client.fetchBlob(ref.repository, descriptor, writer, { signal: opts.signal, onBytes: opts.onBytes }),
    },
  };
}

async function storeResolved(
  store: ContentStore,
  resolved: ResolvedImage,
  wanted: Platform,
  options: PullOptions,
  report: ProgressSink,
): Promise<PulledImage> {
  const started = performance.now();
  const signal = options.signal;
  const { manifest, reference } = resolved;
  assertRunnableImage(manifest);
  let downloadedBytes = 0;

  const ensureBlob = async (
    desc: Descriptor,
    kind: "config" | "layer",
    blobSignal: AbortSignal | undefined,
    commitAfter?: Promise<void>,
  ) => {
    if (await store.hasBlob(desc.digest, desc.size)) {
      report({
        type: "blob",
        reference,
        kind,
        digest: desc.digest,
        bytesDone: desc.size,
        totalBytes: desc.size,
        state: "cached",
      });
      return;
    }
    report({
      type: "blob",
      reference,
      kind,
      digest: desc.digest,
      bytesDone: 0,
      totalBytes: desc.size,
      state: "downloading",
    });
    let last = performance.now();
    let counted = 0;
    try {
      await store.writeBlob(
        desc.digest,
        desc.size,
        (writer) =>
          resolved.blobs.fetch(desc, writer, {
            signal: blobSignal ?? new AbortController().signal,
            onBytes: (bytesDone) => {
              if (bytesDone > counted) downloadedBytes += bytesDone - counted;
              counted = bytesDone;
              const now = performance.now();
              if (now - last >= PROGRESS_INTERVAL_MS) {
                last = now;
                report({
                  type: "blob",
                  reference,
                  kind,
                  digest: desc.digest,
                  bytesDone,
                  totalBytes: desc.size,
                  state: "downloading",
                });
              }
            },
          }),
        commitAfter,
      );
    } catch (err) {
      if (blobSignal?.aborted && !SupermachineError.is(err))
        throw new AbortError("pull aborted", { cause: err });
      if (err instanceof DigestMismatchError) {
        throw new DigestMismatchError(
          `${kind} ${desc.digest} of ${reference} is corrupt: its content hashes to ${err.actualDigest}`,
          { digest: err.digest, actualDigest: err.actualDigest },
          { cause: err },
        );
      }
      if (err instanceof BlobSizeError) throw resolved.malformed(err.message);
      throw err;
    }
    report({
      type: "blob",
      reference,
      kind,
      digest: desc.digest,
      bytesDone: desc.size,
      totalBytes: desc.size,
      state: "done",
    });
  };

  // The index and manifest are stored while the config and layers download (each write is its own
  // temp file, fsync and rename); all of them are stored before the record is written.
  const manifestsStored = (async () => {
    if (resolved.index) await store.putBlobBytes(resolved.index.digest, resolved.index.bytes);
    await store.putBlobBytes(resolved.manifestDigest, resolved.manifestBytes);
  })();
  // The layers download while the config is fetched and checked (its round trips and fsyncs are
  // most of a pull's fixed cost), but enter the store only once it passed; a config that fails the
  // checks stops them and leaves no layer behind.
  const unique = [...new Map(manifest.layers.map((l) => [l.digest, l])).values()];
  const configFailed = new AbortController();
  let configPassed: () => void = () => {};
  const configChecked = new Promise<void>((resolve, reject) => {
    configPassed = resolve;
    configFailed.signal.addEventListener("abort", () => reject(configFailed.signal.reason), { once: true });
  });
  configChecked.catch(() => {}); // the config's own error is thrown below
  const layersStored = forEachLimit(
    unique,
    options.concurrency ?? 3,
    signal ? AbortSignal.any([signal, configFailed.signal]) : configFailed.signal,
    (layer, s) => ensureBlob(layer, "layer", s, configChecked),
  );
  layersStored.catch(() => {}); // awaited below, or dropped when the config fails
  const totalBytes = manifest.config.size + manifest.layers.reduce((n, l) => n + l.size, 0);
  let record: ImageRecord;
  let config: ImageConfig;
  let platform: string;
  try {
    try {
      await ensureBlob(manifest.config, "config", signal);
      const configBytes = await store.readBlob(manifest.config.digest, IMAGE_CONFIG_MAX_BYTES);
      try {
        config = parseImageConfig(configBytes);
      } catch (err) {
        if (err instanceof ImageConfigError)
          throw resolved.malformed(`image config ${manifest.config.digest}: ${err.message}`);
        throw err;
      }
      const imagePlatform = platformOf(config) ?? resolved.indexPlatform;
      if (
        resolved.indexPlatform === undefined &&
        imagePlatform !== undefined &&
        platformScore(imagePlatform, wanted) === undefined
      ) {
        const available = [formatPlatform(imagePlatform)];
        throw new PlatformNotFoundError(
          `${reference} is a single-platform image for ${available[0]}, not ${formatPlatform(wanted)}`,
          { platform: formatPlatform(wanted), available },
        );
      }
      if (config.diffIds.length !== manifest.layers.length) {
        throw resolved.malformed(
          `image config lists ${config.diffIds.length} diff_ids but the manifest has ${manifest.layers.length} layers`,
        );
      }
      platform = formatPlatform(imagePlatform ?? wanted);
      report({
        type: "resolved",
        reference,
        manifestDigest: resolved.manifestDigest,
        platform,
        layerCount: manifest.layers.length,
        totalBytes,
      });
      configPassed();
    } catch (err) {
      configFailed.abort(err);
      await layersStored.catch(() => {});
      throw err;
    }
    await layersStored;

    const layers: LayerRecord[] = manifest.layers.map((l, i) => ({
      digest: l.digest,
      mediaType: l.mediaType,
      size: l.size,
      diffId: config.diffIds[i],
    }));
    record = {
      version: 1,
      reference,
      source: resolved.source,
      platform,
      indexDigest: resolved.index?.digest,
      manifestDigest: resolved.manifestDigest,
      manifestMediaType: manifest.mediaType,
      configDigest: manifest.config.digest,
      layers,
      sizeBytes: totalBytes,
      pulledAt: new Date().toISOString(),
    };
  } finally {
    await manifestsStored.catch(() => {});
  }
  await manifestsStored;
  if (signal?.aborted) throw new AbortError("pull aborted", { cause: signal.reason });
  await store.putImage(record);
  report({
    type: "done",
    reference,
    manifestDigest: resolved.manifestDigest,
    downloadedBytes,
    durationMs: performance.now() - started,
  });
  return toPulledImage(store, record, config);
}

function toPulledImage(store: ContentStore, record: ImageRecord, config: ImageConfig): PulledImage {
  return {
    reference: record.reference,
    source: record.source,
    platform: record.platform,
    indexDigest: record.indexDigest,
    manifestDigest: record.manifestDigest,
    configDigest: record.configDigest,
    config,
    layers: record.layers.map((l) => ({
      digest: l.digest,
      mediaType: l.mediaType,
      compression: layerCompression(l.mediaType) ?? "none",
      size: l.size,
      path: store.blobPath(l.digest),
      diffId: l.diffId,
    })),
    sizeBytes: record.sizeBytes,
    pulledAt: record.pulledAt,
  };
}

/**
 * Pull an image into the content store and return it: `reference` is a registry reference
 * (`alpine:3.20`, `localhost:5000/app@sha256:…`), `oci:PATH[:TAG]` or `docker-archive:FILE[:NAME:TAG]`.
 * Blobs already stored are not fetched again. Safe to run concurrently with other pulls (in this
 * or other processes) of the same or different images, and with {@link pruneImages}.
 */
export async function pullImage(reference: string, options: PullOptions = {}): Promise<PulledImage> {
  const signal = options.signal;
  if (signal?.aborted) throw new AbortError("pull aborted", { cause: signal.reason });
  const wanted = parsePlatform(options.platform ?? DEFAULT_PLATFORM);
  const policy = options.pullPolicy ?? "always";
  if (policy !== "always") {
    try {
      return await resolveLocalImage(reference, options);
    } catch (err) {
      if (policy === "never" || !(SupermachineError.is(err) && err.code === "IMAGE_NOT_FOUND")) throw err;
    }
  }
  const store = await ContentStore.open(options.dataDir);
  const report = progressSink(options.onProgress);
  return store.withPullLock(async () => {
    let resolved: ResolvedImage;
    if (reference.startsWith(LOCAL_OCI)) {
      const { dir, tag } = await parseOciLayoutSpec(reference.slice(LOCAL_OCI.length));
      resolved = await resolveOciLayout(dir, tag, wanted);
    } else if (reference.startsWith(LOCAL_ARCHIVE)) {
      const { file, name } = await parseDockerArchiveSpec(reference.slice(LOCAL_ARCHIVE.length));
      resolved = await resolveDockerArchive(file, name, `${store.root}/tmp`, signal);
    } else {
      resolved = await resolveFromRegistry(reference, wanted, options, signal);
    }
    try {
      const image = await storeResolved(store, resolved, wanted, options, report);
      debug("pulled %s (%s, %d layers)", image.reference, image.manifestDigest, image.layers.length);
      return image;
    } finally {
      await resolved.close?.();
    }
  }, signal);
}

/**
 * The stored image for a reference or local source, without network access. Throws
 * `IMAGE_NOT_FOUND` when it was never pulled (for that platform) or a blob has gone missing.
 */
export async function resolveLocalImage(
  reference: string,
  options: StoreOptions & { readonly platform?: string | undefined } = {},
): Promise<PulledImage> {
  const key = await canonicalSource(reference);
  const platform = formatPlatform(parsePlatform(options.platform ?? DEFAULT_PLATFORM));
  const store = await ContentStore.open(options.dataDir);
  let record = await store.getImage(key, platform);
  if (record === undefined) {
    // A platform variant recorded more precisely than asked (linux/arm64 vs linux/arm64/v8, amd64 v2…).
    const wanted = parsePlatform(platform);
    const all = await store.listImages();
    record = all.find(
      (r) => r.reference === key && platformScore(parsePlatform(r.platform), wanted) !== undefined,
    );
    if (record === undefined && !reference.startsWith(LOCAL_OCI) && !reference.startsWith(LOCAL_ARCHIVE)) {
      // `name@digest` also finds an image pulled by tag whose manifest or index has that digest.
      const ref = parseReference(reference);
      if (ref.digest !== undefined) {
        record = all.find(
          (r) =>
            r.source === "registry" &&
            parseReference(r.reference).name === ref.name &&
            (r.manifestDigest === ref.digest || r.indexDigest === ref.digest) &&
            platformScore(parsePlatform(r.platform), wanted) !== undefined,
        );
      }
    }
  }
  if (record === undefined) {
    throw new SupermachineError(
      "IMAGE_NOT_FOUND",
      `image ${key} (${platform}) is not in the local store: pull it first`,
    );
  }
  for (const d of [record.configDigest, ...record.layers.map((l) => l.digest)]) {
    if (!(await store.hasBlob(d))) {
      throw new SupermachineError(
        "IMAGE_NOT_FOUND",
        `image ${key} is recorded but blob ${d} is missing from the store: pull it again`,
      );
    }
  }
  const config = parseImageConfig(await store.readBlob(record.configDigest, IMAGE_CONFIG_MAX_BYTES));
  return toPulledImage(store, record, config);
}

/** Records of all stored images. */
export async function listImages(options: StoreOptions = {}): Promise<ImageRecord[]> {
  return (await ContentStore.open(options.dataDir)).listImages();
}

/**
 * Forget a stored image (all platforms unless one is given). Its blobs stay until
 * {@link pruneImages}. Throws `IMAGE_NOT_FOUND` when nothing matched.
 */
export async function removeImage(
  reference: string,
  options: StoreOptions & { readonly platform?: string | undefined } = {},
): Promise<number> {
  const key = await canonicalSource(reference).catch((err: unknown) => {
    // A local source whose file is gone can still be forgotten by its recorded name.
    if (reference.startsWith(LOCAL_OCI) || reference.startsWith(LOCAL_ARCHIVE)) return reference;
    throw err;
  });
  const store = await ContentStore.open(options.dataDir);
  const platform =
    options.platform === undefined ? undefined : formatPlatform(parsePlatform(options.platform));
  const removed = await store.removeImage(key, platform);
  if (removed === 0) throw new SupermachineError("IMAGE_NOT_FOUND", `image ${key} is not in the local store`);
  return removed;
}

/** Delete blobs no stored image uses. Waits for running pulls; see {@link ContentStore.prune}. */
export async function pruneImages(
  options: StoreOptions & { readonly signal?: AbortSignal | undefined } = {},
): Promise<PruneResult> {
  return (await ContentStore.open(options.dataDir)).prune({ signal: options.signal });
}
