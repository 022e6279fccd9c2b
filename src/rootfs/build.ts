/**
 * Root filesystem images: flatten OCI layers (or take a plain directory) into one ext4 image,
 * rootless, deterministic, written atomically. See docs/rootfs.md.
 */
import { unlinkSync } from "node:fs";
import { chmod, mkdir, mkdtemp, open, rename, rm, stat } from "node:fs/promises";
import { basename, dirname, join, resolve } from "node:path";
import { LayerError, SupermachineError } from "../errors.ts";
import { debug, mapAbort, nodeCrypto, publish, throwIfAborted } from "../internal/index.ts";
import { applyLayer, DEFAULT_ROOTFS_LIMITS, ImageBudget, type RootfsLimits, Spool } from "./apply-layer.ts";
import { DEFAULT_MIN_FREE_DISK_BYTES, DiskSpace } from "./disk-space.ts";
import { writeExt4Image } from "./ext4-writer.ts";
import { FileTree, type TreeNode, walkTree } from "./file-tree.ts";
import { openLayer, sniffCompression, zstdDeclaredSize } from "./open-layer.ts";
import { scanDirectory } from "./scan-directory.ts";
import { DEFAULT_TAR_LIMITS } from "./tar-reader.ts";

/**
 * Version of the image format this module writes (layout, features, fix-up rules). Fold it into
 * any cache key of built images: a new version means old images must be rebuilt.
 */
export const ROOTFS_FORMAT_VERSION = 2;

/** Default volume label of built images. */
export const ROOTFS_LABEL = "supermachine";

export interface LayerSource {
  /** Path of the layer blob (already verified against `digest` by the caller). */
  path: string;
  /** OCI / Docker layer media type; the compression is taken from the blob's magic bytes. */
  mediaType: string;
  /** The blob's digest; names the layer in errors and seeds the image's UUID. */
  digest: string;
}

export type RootfsProgress =
  | {
      phase: "layer";
      layerIndex: number;
      layerCount: number;
      digest: string;
      /** Compressed bytes of this layer read so far, and the blob's size. */
      bytesRead: number;
      bytesTotal: number;
      entries: number;
    }
  | { phase: "scan"; dir: string }
  | { phase: "write" }
  | { phase: "done"; imagePath: string; durationMs: number };

export interface ImageOptions {
  /** Where the image goes (replaced atomically). Its directory is created if missing. */
  output: string;
  signal?: AbortSignal | undefined;
  onProgress?: ((event: RootfsProgress) => void) | undefined;
  /** Exact image size. Default: content + `freeBytes` + file-system overhead. */
  sizeBytes?: number | undefined;
  /** Free space to leave for writes inside the VM. Default max(1 GiB, 2 × content). */
  freeBytes?: number | undefined;
  /** Volume label (≤ 16 bytes). Default {@link ROOTFS_LABEL}. */
  label?: string | undefined;
  /** File-system UUID. Default: derived from the inputs (same input → same UUID). */
  uuid?: string | undefined;
  /** Scratch space for spooled layer content. Default: next to `output`. */
  tmpDir?: string | undefined;
  /** fsync the image before it is renamed into place (default true). */
  durable?: boolean | undefined;
  /**
   * Free space the build leaves on the host file systems it writes to (scratch and output);
   * checked before and while flattening. Default 512 MiB.
   */
  minFreeDiskBytes?: number | undefined;
}

export interface FlattenLayersOptions extends ImageOptions {
  /** Layers, lowest first. */
  layers: readonly LayerSource[];
  limits?: Partial<RootfsLimits> | undefined;
}

export interface BuildImageFromDirectoryOptions extends ImageOptions {
  /** The root filesystem, as a host directory. It is read, never changed. */
  dir: string;
  /**
   * Host owner whose files become root-owned (uid/gid 0) in the image. Default: the invoking user
   * when not root (like a rootless container runtime); `null`: keep every owner as it is.
   */
  mapOwner?: { uid: number; gid: number } | null | undefined;
}

export interface RootfsImage {
  /** Absolute path of the image (= `output`). */
  imagePath: string;
  /** Apparent size of the (sparse) image file. */
  sizeBytes: number;
  /** Free space inside the file system. */
  freeBytes: number;
  /** Free inodes inside the file system. */
  freeInodes: number;
  /** Sum of the regular files' sizes. */
  fileBytes: number;
  /** Inodes holding the image's content. */
  inodeCount: number;
  uuid: string;
  label: string;
  formatVersion: number;
  /** xattrs ext4 has no namespace for, dropped (path, name). */
  skippedXattrs: { path: string; name: string }[];
  durationMs: number;
  /** Milliseconds per phase: reading layers (or the directory), then writing the image. */
  timings: { applyMs: number; writeMs: number };
}

/** A UUID (RFC 9562 version 8: custom) derived from `parts`. */
function derivedUuid(...parts: string[]): string {
  const h = nodeCrypto().createHash("sha256").update(parts.join("\0")).digest();
  h[6] = (h[6]! & 0x0f) | 0x80;
  h[8] = (h[8]! & 0x3f) | 0x80;
  const x = h.subarray(0, 16).toString("hex");
  return `${x.slice(0, 8)}-${x.slice(8, 12)}-${x.slice(12, 16)}-${x.slice(16, 20)}-${x.slice(20)}`;
}

function checkOptions(o: ImageOptions): void {
  if (typeof o.output !== "string" || o.output === "") {
    throw new SupermachineError("INVALID_ARGUMENT", "output must be a file path");
  }
  if (o.sizeBytes !== undefined && o.freeBytes !== undefined) {
    throw new SupermachineError("INVALID_ARGUMENT", "give sizeBytes or freeBytes, not both");
  }
  for (const [k, v] of [
    ["sizeBytes", o.sizeBytes],
    ["freeBytes", o.freeBytes],
    ["minFreeDiskBytes", o.minFreeDiskBytes],
  ] as const) {
    if (v !== undefined && (!Number.isSafeInteger(v) || v < 0)) {
      throw new SupermachineError("INVALID_ARGUMENT", `${k} must be a non-negative integer`);
    }
  }
  if (o.sizeBytes !== undefined && o.sizeBytes < 16 * 1024 * 1024) {
    throw new SupermachineError("INVALID_ARGUMENT", "sizeBytes must be at least 16 MiB");
  }
  if (o.label !== undefined && Buffer.byteLength(o.label) > 16) {
    throw new SupermachineError("INVALID_ARGUMENT", "label must be at most 16 bytes");
  }
  if (
    o.uuid !== undefined &&
    !/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(o.uuid)
  ) {
    throw new SupermachineError("INVALID_ARGUMENT", `uuid ${JSON.stringify(o.uuid)} is not a UUID`);
  }
}

interface Scratch {
  output: string;
  workDir: string;
  tempImage: string;
}

async function makeScratch(o: ImageOptions): Promise<Scratch> {
  const output = resolve(o.output);
  let workDir: string;
  try {
    await mkdir(dirname(output), { recursive: true, mode: 0o700 });
    workDir = await mkdtemp(join(o.tmpDir ?? dirname(output), ".supermachine-rootfs-"));
    await chmod(workDir, 0o700);
  } catch (cause) {
    throw new SupermachineError("ROOTFS_BUILD", `cannot create scratch space for ${output}`, { cause });
  }
  const tempImage = join(
    dirname(output),
    `.${basename(output)}.${nodeCrypto().randomBytes(6).toString("hex")}.tmp`,
  );
  return { output, workDir, tempImage };
}

async function cleanup(s: Scratch, failed: boolean): Promise<void> {
  await rm(s.workDir, { recursive: true, force: true, maxRetries: 2 });
  if (failed) {
    try {
      unlinkSync(s.tempImage);
    } catch {}
  }
}

function emitter(o: ImageOptions): (event: RootfsProgress) => void {
  return (event) => {
    publish("rootfs:progress", event);
    o.onProgress?.(event);
  };
}

/**
 * Applies `layers` in order and writes the result as an ext4 image at `output`.
 * Throws `LayerError` (`UNSAFE_LAYER`, `CORRUPT_LAYER`) naming the layer and entry,
 * `SupermachineError` `ROOTFS_BUILD` when the host or the file system refuses (disk full, content
 * that does not fit `sizeBytes`), `ABORTED` on `signal`.
 */
export async function flattenLayers(options: FlattenLayersOptions): Promise<RootfsImage> {
  checkOptions(options);
  if (!Array.isArray(options.layers))
    throw new SupermachineError("INVALID_ARGUMENT", "layers must be an array");
  const { signal } = options;
  const limits: RootfsLimits = { ...DEFAULT_TAR_LIMITS, ...DEFAULT_ROOTFS_LIMITS, ...options.limits };
  const progress = emitter(options);
  throwIfAborted(signal, "building the image");
  const started = performance.now();
  const scratch = await makeScratch(options);
  let failed = true;
  let spool: Spool | undefined;
  try {
    const tree = new FileTree();
    const layerSpool = new Spool(join(scratch.workDir, "spool"));
    spool = layerSpool;
    await mkdir(layerSpool.dir, { mode: 0o700 });
    // Content nobody links to any more frees its spool space as soon as possible.
    tree.onRelease = (file) => {
      if (file.source !== undefined) layerSpool.release(file.source, file.size);
    };
    const budget = new ImageBudget();
    const disk = new DiskSpace(
      [scratch.workDir, dirname(scratch.output)],
      options.minFreeDiskBytes ?? DEFAULT_MIN_FREE_DISK_BYTES,
    );
    disk.check(0, "flattening the image");
    let nextCheck = 0;
    const t0 = performance.now();
    for (const [layerIndex, layer] of options.layers.entries()) {
      throwIfAborted(signal, "applying layers");
      const name = layer.digest || layer.path;
      const bytesTotal = (await stat(layer.path)).size;
      await refuseDeclaredBomb(layer.path, name, limits.maxTotalBytes - budget.unpackedBytes);
      const opened = await openLayer(layer.path, layer.mediaType, signal);
      let lastReport = 0;
      const report = (entries: number): void => {
        progress({
          phase: "layer",
          layerIndex,
          layerCount: options.layers.length,
          digest: layer.digest,
          bytesRead: opened.bytesRead(),
          bytesTotal,
          entries,
        });
      };
      try {
        const r = await applyLayer({
          tree,
          source: opened.stream,
          layer: name,
          spool: layerSpool,
          limits,
          budget,
          signal,
          // Free space is checked again after every half of what was left (1 ... 64 MiB) has been
          // written (zeros are holes and cost nothing).
          onSpool: (written, ctx) => {
            if (written < nextCheck) return;
            const left = disk.check(0, `entry ${JSON.stringify(ctx.entry)} of layer ${name}`);
            nextCheck = written + Math.min(64 * 1024 * 1024, Math.max(1024 * 1024, Math.floor(left / 2)));
          },
          onEntry: (entries) => {
            const now = performance.now();
            if (now - lastReport >= 100) {
              lastReport = now;
              report(entries);
            }
          },
        });
        report(r.entries);
        debug(
          "rootfs: layer %s: %d entries, %d tar bytes (%s)",
          name,
          r.entries,
          r.tarBytes,
          opened.compression,
        );
      } catch (err) {
        throw mapAbort(err, signal, "applying layers");
      } finally {
        opened.stream.destroy();
      }
    }
    const applyMs = performance.now() - t0;

    const digests = options.layers.map((l) => l.digest || l.path);
    const uuid =
      options.uuid ?? derivedUuid("supermachine-rootfs", String(ROOTFS_FORMAT_VERSION), ...digests);
    // The image holds the content spooled so far (its zero blocks are holes) plus metadata.
    disk.check(layerSpool.writtenBytes + tree.nodeCount * 512 + 8 * 1024 * 1024, "writing the image");
    const written = await writeImage(options, tree, scratch, uuid, progress);
    const image = await publishImage(scratch, written, { started, applyMs, progress, signal });
    failed = false;
    return image;
  } catch (err) {
    throw buildError(err, signal, "building the image");
  } finally {
    spool?.close(); // its files' space comes back only once they are closed
    await cleanup(scratch, failed);
  }
}

/**
 * A zstd layer declares what it decompresses to (its frames' content sizes): one that declares
 * more than the image may still take is refused before a byte is decompressed.
 */
async function refuseDeclaredBomb(path: string, layer: string, remaining: number): Promise<void> {
  const head = Buffer.alloc(8);
  const fh = await open(path, "r");
  try {
    await fh.read(head, 0, head.length, 0);
  } finally {
    await fh.close();
  }
  if (sniffCompression(head) !== "zstd") return;
  const declared = zstdDeclaredSize(path, remaining);
  if (declared !== undefined && declared > remaining) {
    throw new LayerError(
      "UNSAFE_LAYER",
      `unsafe layer ${layer}: it declares ${declared} bytes decompressed, more than the ${remaining} left of limits.maxTotalBytes`,
      { layer },
    );
  }
}

/**
 * Writes the host directory `dir` as an ext4 image at `output` (like podman's `--rootfs`).
 * Symlinks are copied as symlinks and never followed; device nodes, FIFOs and sockets are kept;
 * files owned by the invoking non-root user become owned by root (uid/gid 0); other owners,
 * permission bits and times are kept (xattrs are not: Node has no xattr API). `dir` is not changed.
 */
export async function buildImageFromDirectory(options: BuildImageFromDirectoryOptions): Promise<RootfsImage> {
  checkOptions(options);
  const { signal } = options;
  const progress = emitter(options);
  throwIfAborted(signal, "building the image");
  const started = performance.now();
  const dir = resolve(options.dir);
  const scratch = await makeScratch(options);
  let failed = true;
  try {
    progress({ phase: "scan", dir });
    const t0 = performance.now();
    const tree = await scanDirectory(dir, {
      signal,
      mapUid: options.mapOwner === null ? -1 : options.mapOwner?.uid,
      mapGid: options.mapOwner === null ? -1 : options.mapOwner?.gid,
    });
    const applyMs = performance.now() - t0;
    let contentBytes = 0;
    const counted = new Set<TreeNode>();
    for (const { node } of walkTree(tree.root)) {
      if (node.kind === "file" && !counted.has(node)) contentBytes += node.size;
      counted.add(node);
    }
    new DiskSpace([dirname(scratch.output)], options.minFreeDiskBytes ?? DEFAULT_MIN_FREE_DISK_BYTES).check(
      contentBytes + tree.nodeCount * 512 + 8 * 1024 * 1024,
      `the image of ${dir}`,
    );
    const uuid = options.uuid ?? derivedUuid("supermachine-rootfs-dir", String(ROOTFS_FORMAT_VERSION), dir);
    const written = await writeImage(options, tree, scratch, uuid, progress);
    const image = await publishImage(scratch, written, { started, applyMs, progress, signal });
    failed = false;
    return image;
  } catch (err) {
    throw buildError(err, signal, "building the image");
  } finally {
    await cleanup(scratch, failed);
  }
}

type Written = Omit<RootfsImage, "imagePath" | "durationMs" | "timings"> & { writeMs: number };

/** Moves the finished image into place and reports it. */
async function publishImage(
  scratch: Scratch,
  written: Written,
  run: {
    started: number;
    applyMs: number;
    progress: (event: RootfsProgress) => void;
    signal: AbortSignal | undefined;
  },
): Promise<RootfsImage> {
  throwIfAborted(run.signal, "building the image");
  await rename(scratch.tempImage, scratch.output);
  const durationMs = performance.now() - run.started;
  run.progress({ phase: "done", imagePath: scratch.output, durationMs });
  return {
    ...written,
    imagePath: scratch.output,
    durationMs,
    timings: { applyMs: run.applyMs, writeMs: written.writeMs },
  };
}

/** Writes `tree` to `scratch.tempImage`. */
async function writeImage(
  options: ImageOptions,
  tree: FileTree,
  scratch: Scratch,
  uuid: string,
  progress: (event: RootfsProgress) => void,
): Promise<Written> {
  const label = options.label ?? ROOTFS_LABEL;
  const hashSeed = derivedUuid("supermachine-rootfs-hash-seed", uuid);
  const t0 = performance.now();
  progress({ phase: "write" });
  const r = await writeExt4Image({
    tree,
    imagePath: scratch.tempImage,
    sizeBytes: options.sizeBytes,
    freeBytes: options.freeBytes,
    uuid,
    hashSeed,
    label,
    durable: options.durable,
    signal: options.signal,
  });
  debug("rootfs: wrote %d inodes, layout %d ms, write %d ms", r.inodes, r.layoutMs, r.writeMs);
  return {
    uuid,
    label,
    formatVersion: ROOTFS_FORMAT_VERSION,
    sizeBytes: r.sizeBytes,
    freeBytes: r.freeBytes,
    freeInodes: r.freeInodes,
    fileBytes: r.fileBytes,
    inodeCount: r.inodes,
    skippedXattrs: r.skippedXattrs,
    writeMs: performance.now() - t0,
  };
}

/**
 * The error a build reports: ours as they are, an abort as `ABORTED`, anything else (a host I/O
 * error: disk full, permission denied, a file that vanished) as `ROOTFS_BUILD` with the cause.
 */
function buildError(err: unknown, signal: AbortSignal | undefined, what: string): unknown {
  const mapped = mapAbort(err, signal, what);
  if (SupermachineError.is(mapped)) return mapped;
  const message = mapped instanceof Error ? mapped.message : String(mapped);
  return new SupermachineError("ROOTFS_BUILD", `${what} failed: ${message}`, { cause: mapped });
}
