import { readdir, rm, stat } from "node:fs/promises";
import { join } from "node:path";
import { SupermachineError } from "../errors.ts";
import { dataDir } from "../internal/paths.ts";
import type { ImageRecord, PruneResult } from "../oci/content-store.ts";
import type { ImageConfig } from "../oci/image-config.ts";
import type { PulledImage, PullOptions, StoreOptions } from "../oci/pull.ts";
import { listImages, pruneImages, pullImage, removeImage } from "../oci/pull.ts";
import { type Pool, PoolBuilder, type PooledVm, type VmSource } from "../pool/index.ts";
import { flattenLayers, ROOTFS_FORMAT_VERSION, type RootfsProgress } from "../rootfs/index.ts";
import { bakeSnapshot } from "../snapshot/bake.ts";
import { Snapshot, type SnapshotOpenOptions } from "../snapshot/snapshot.ts";
import {
  listSnapshots,
  removeSnapshot,
  type SnapshotInfo,
  snapshotBackingFiles,
  snapshotDirOf,
} from "../snapshot/store.ts";
import type { AssetPaths } from "../vmm/asset-paths.ts";
import { type PrestartedVm, type RestoreConfig, Vm } from "./vm.ts";
import { DEFAULT_MEMORY_MIB, DEFAULT_VCPUS, type VmConfig } from "./vm-config.ts";

/** Options of {@link Image.pull}. */
export interface ImagePullOptions extends PullOptions {
  /** Progress of flattening the layers into the root filesystem image. */
  onRootfsProgress?: ((event: RootfsProgress) => void) | undefined;
}

/** What `Image.start` accepts: a {@link VmConfig} without the root filesystem, which is the image's. */
export type ImageStartConfig = Omit<VmConfig, "rootfs">;

/**
 * An OCI/Docker image made ready to boot: its blobs pulled and verified, its layers flattened into
 * one root filesystem image (cached by manifest digest), its config applied to every VM.
 */
export class Image {
  /** Canonical reference (`docker.io/library/alpine:3.20`) or local source (`oci:/dir:tag`). */
  readonly reference: string;
  /** Digest of the image manifest. */
  readonly digest: string;
  /** `os/arch[/variant]`. */
  readonly platform: string;
  /** The image's config: entrypoint, cmd, env, working dir, user, exposed ports, stop signal. */
  readonly config: ImageConfig;
  /** The flattened root filesystem (ext4, never written to: VMs write to overlays). */
  readonly rootfsPath: string;

  readonly #snapshot: Snapshot | undefined;
  /** Implicit pools of `acquire()`/`acquireWith()`, one per config. */
  readonly #pools = new Map<string, Promise<Pool<Vm>>>();

  private constructor(
    init: { reference: string; digest: string; platform: string; config: ImageConfig; rootfsPath: string },
    snapshot?: Snapshot,
  ) {
    this.reference = init.reference;
    this.digest = init.digest;
    this.platform = init.platform;
    this.config = init.config;
    this.rootfsPath = init.rootfsPath;
    this.#snapshot = snapshot;
  }

  /** The snapshot this image restores from (built by {@link Image.builder} or {@link Image.fromSnapshot}), if any. */
  get snapshot(): Snapshot | undefined {
    return this.#snapshot;
  }

  /**
   * A builder for an image backed by a snapshot: pull + flatten + boot + workload + warm-up +
   * save, cached by (image manifest digest, memory, vCPUs, kernel and initramfs digests, warm-up
   * tag, accelerator, QEMU version). `start()` of the result restores instead of booting.
   */
  static builder(reference: string): ImageBuilder {
    return new ImageBuilder(reference);
  }

  /**
   * Open a snapshot (a store name or a dir) as an image. Validates it first: `SnapshotError`
   * `SNAPSHOT_INCOMPATIBLE` (other accelerator, QEMU, kernel, initramfs) or `SNAPSHOT_CORRUPT`
   * (missing or damaged files) before anything starts.
   */
  static async fromSnapshot(
    nameOrDir: string,
    options: SnapshotOpenOptions & { dataDir?: string } = {},
  ): Promise<Image> {
    const snapshot = await Snapshot.open(snapshotDirOf(nameOrDir, options.dataDir ?? dataDir()), options);
    return Image.#fromSnapshotObject(snapshot);
  }

  static #fromSnapshotObject(snapshot: Snapshot): Image {
    const m = snapshot.manifest;
    const chain = m.files.disk.backingChain;
    return new Image(
      {
        reference: m.reference,
        digest: m.imageDigest,
        platform: m.platform,
        config: m.imageConfig,
        rootfsPath: chain[chain.length - 1]?.path ?? "",
      },
      snapshot,
    );
  }

  /** @internal Used by {@link ImageBuilder}. */
  static fromBake(image: Image, snapshot: Snapshot): Image {
    return new Image(image, snapshot);
  }

  /** The snapshots in the store (`<dataDir>/snapshots`). */
  static snapshots(options: { dataDir?: string } = {}): Promise<SnapshotInfo[]> {
    return listSnapshots(options);
  }

  /**
   * Delete a stored snapshot by name. Refuses (`INVALID_ARGUMENT`) when another stored snapshot is
   * layered on it, unless `force`. Running VMs restored from it are not affected.
   */
  static removeSnapshot(name: string, options: { dataDir?: string; force?: boolean } = {}): Promise<void> {
    return removeSnapshot(name, options);
  }

  /**
   * Pull `reference` (a registry reference, `oci:DIR[:TAG]` or `docker-archive:FILE[:NAME:TAG]`)
   * into the local store and flatten it. Both steps are cached: blobs by digest, the root
   * filesystem by manifest digest.
   */
  static async pull(reference: string, options: ImagePullOptions = {}): Promise<Image> {
    const pulled = await pullImage(reference, options);
    const rootfsPath = await flattenedRootfs(pulled, options);
    return new Image(
      {
        reference: pulled.reference,
        digest: pulled.manifestDigest,
        platform: pulled.platform,
        config: pulled.config,
        rootfsPath,
      },
      undefined,
    );
  }

  /** The images in the local store. */
  static list(options: StoreOptions = {}): Promise<ImageRecord[]> {
    return listImages(options);
  }

  /**
   * Forget a stored image (every platform unless one is given) and its flattened root filesystem.
   * Its blobs stay until {@link Image.prune}. Throws `IMAGE_NOT_FOUND` when nothing matched.
   */
  static async remove(
    reference: string,
    options: StoreOptions & { platform?: string } = {},
  ): Promise<number> {
    const removed = await removeImage(reference, options);
    await pruneRootfsCache(options);
    return removed;
  }

  /** Delete blobs and flattened root filesystems that no stored image uses any more. */
  static async prune(
    options: StoreOptions & { signal?: AbortSignal } = {},
  ): Promise<PruneResult & { removedRootfs: number }> {
    const result = await pruneImages(options);
    const removedRootfs = await pruneRootfsCache(options);
    return { ...result, removedRootfs };
  }

  /**
   * A new VM of this image. Backed by a snapshot: a fresh restore (the snapshot's memory and disk
   * exactly as baked; `memoryMiB`/`vcpus` must match it if given). Otherwise a boot. The image's
   * env, working dir and user are the defaults of every exec.
   */
  start(config: ImageStartConfig = {}): Promise<Vm> {
    if (this.#snapshot !== undefined) return Vm.restore(this.#snapshot, restoreConfig(config));
    const defaults = imageExecDefaults(this.config);
    return Vm.start({
      ...config,
      rootfs: this.rootfsPath,
      env: { ...defaults.env, ...config.env },
      cwd: config.cwd ?? defaults.cwd,
      user: config.user ?? defaults.user,
    });
  }

  /**
   * Start a QEMU process for this image's snapshot now, waiting for its state;
   * `prestarted.activate()` then gives a running VM faster than `start()`. Snapshot images only.
   */
  prestart(config: ImageStartConfig = {}): Promise<PrestartedVm> {
    if (this.#snapshot === undefined) {
      return Promise.reject(
        new SupermachineError(
          "INVALID_ARGUMENT",
          "prestart() needs an image backed by a snapshot (Image.builder or Image.fromSnapshot)",
        ),
      );
    }
    return Vm.prestart(this.#snapshot, restoreConfig(config));
  }

  /**
   * Where a pool gets VMs of this image: `start(config)` (a fresh restore for snapshot images, a
   * boot otherwise) and, for snapshot images, `prestart(config)`.
   */
  vmSource(config: ImageStartConfig = {}): VmSource<Vm> {
    const snapshot = this.#snapshot;
    return {
      create: (signal) => this.start(signal === undefined ? config : { ...config, signal }),
      ...(snapshot === undefined ? {} : { prestart: () => this.prestart(config) }),
      describe: () => (snapshot === undefined ? `image ${this.reference}` : `snapshot ${snapshot.dir}`),
    };
  }

  /** A pool of VMs of this image: `image.pool().min(2).max(8).build()`. */
  pool(config: ImageStartConfig = {}): PoolBuilder<Vm> {
    return new PoolBuilder(this.vmSource(config));
  }

  /** A VM from this image's implicit default pool (created on first use). Release it when done. */
  acquire(options: { signal?: AbortSignal } = {}): Promise<PooledVm<Vm>> {
    return this.acquireWith({}, options);
  }

  /** Like {@link acquire}, from the implicit pool for `config` (one pool per distinct config). */
  async acquireWith(config: ImageStartConfig, options: { signal?: AbortSignal } = {}): Promise<PooledVm<Vm>> {
    const { signal: _ignored, ...rest } = config;
    const key = stableJson(rest);
    let pool = this.#pools.get(key);
    if (pool === undefined) {
      pool = this.pool(rest).build();
      this.#pools.set(key, pool);
      pool.catch(() => this.#pools.delete(key));
    }
    return (await pool).acquire(options);
  }

  /** Close the implicit pools of `acquire()`/`acquireWith()` (their VMs stop). */
  async closePools(options: { force?: boolean } = {}): Promise<void> {
    const pools = [...this.#pools.values()];
    this.#pools.clear();
    await Promise.all(pools.map(async (pool) => (await pool).close(options)));
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.closePools();
  }

  /**
   * The argv docker would run: `entrypoint` replaces the image's Entrypoint (and then the image's
   * Cmd is dropped); non-empty `args` replace Cmd.
   */
  command(
    overrides: { entrypoint?: readonly string[] | undefined; args?: readonly string[] | undefined } = {},
  ): string[] {
    return dockerCommand(this.config, overrides);
  }
}

/** Where the flattened root filesystem of an image lives. */
export function rootfsCachePath(manifestDigest: string, root = dataDir()): string {
  const hex = manifestDigest.replace(/^[a-z0-9]+:/, "");
  return join(root, "rootfs", "images", `${hex}-f${ROOTFS_FORMAT_VERSION}.ext4`);
}

/** Removes flattened root filesystems of images no longer in the store (and of older formats). */
async function pruneRootfsCache(options: StoreOptions): Promise<number> {
  const root = options.dataDir ?? dataDir();
  const keep = new Set((await listImages(options)).map((r) => rootfsCachePath(r.manifestDigest, root)));
  // Snapshots' disks are layered on flattened root filesystems: those stay while a snapshot needs them.
  for (const path of await snapshotBackingFiles({ dataDir: root })) keep.add(path);
  const dir = join(root, "rootfs", "images");
  const names = await readdir(dir).catch(() => [] as string[]);
  let removed = 0;
  for (const name of names) {
    const path = join(dir, name);
    if (!keep.has(path) && name.endsWith(".ext4")) {
      await rm(path, { force: true });
      removed++;
    }
  }
  return removed;
}

async function flattenedRootfs(pulled: PulledImage, options: ImagePullOptions): Promise<string> {
  const output = rootfsCachePath(pulled.manifestDigest, options.dataDir ?? dataDir());
  const existing = await stat(output).catch(() => undefined);
  if (existing?.isFile()) return output;
  await flattenLayers({
    layers: pulled.layers.map((layer) => ({
      path: layer.path,
      mediaType: layer.mediaType,
      digest: layer.digest,
    })),
    output,
    signal: options.signal,
    onProgress: options.onRootfsProgress,
  });
  return output;
}

/** Exec defaults from an image config: env (with PATH), working dir, user. */
export function imageExecDefaults(config: ImageConfig): {
  env: Record<string, string>;
  cwd: string;
  user: string;
} {
  const env: Record<string, string> = {};
  for (const entry of config.env) {
    const eq = entry.indexOf("=");
    if (eq > 0) env[entry.slice(0, eq)] = entry.slice(eq + 1);
  }
  return { env, cwd: config.workingDir || "/", user: config.user || "root" };
}

/** Docker's rules for combining Entrypoint, Cmd and the user's overrides. */
export function dockerCommand(
  config: Pick<ImageConfig, "entrypoint" | "cmd">,
  overrides: { entrypoint?: readonly string[] | undefined; args?: readonly string[] | undefined },
): string[] {
  const entrypoint = overrides.entrypoint ?? config.entrypoint ?? [];
  const args =
    overrides.args && overrides.args.length > 0
      ? overrides.args
      : overrides.entrypoint !== undefined
        ? []
        : (config.cmd ?? []);
  const argv = [...entrypoint, ...args];
  if (argv.length === 0) {
    throw new SupermachineError(
      "INVALID_ARGUMENT",
      "the image has no Entrypoint or Cmd: give a command to run",
    );
  }
  return argv;
}

function restoreConfig(config: ImageStartConfig): RestoreConfig {
  if (config.kernelArgs !== undefined || config.assets !== undefined) {
    throw new SupermachineError(
      "INVALID_ARGUMENT",
      "kernelArgs and assets are fixed when a snapshot is baked; a restore cannot change them",
    );
  }
  const { kernelArgs: _k, assets: _a, ...rest } = config;
  return rest;
}

/** Builds an {@link Image} backed by a snapshot. Setters are bare nouns; `build()` does the work. */
export class ImageBuilder {
  readonly #reference: string;
  #name: string | undefined;
  #memoryMiB = DEFAULT_MEMORY_MIB;
  #vcpus = DEFAULT_VCPUS;
  #warmup: ((vm: Vm) => Promise<void>) | undefined;
  #warmupTag: string | undefined;
  #platform: string | undefined;
  #pullOptions: ImagePullOptions = {};
  #assets: Partial<AssetPaths> | undefined;
  #workload = true;
  #force = false;
  #env: Record<string, string> = {};
  #signal: AbortSignal | undefined;

  /** @internal Use {@link Image.builder}. */
  constructor(reference: string) {
    this.#reference = reference;
  }

  /** Name in the snapshot store. Default: from the reference and the cache key. */
  name(name: string): this {
    this.#name = name;
    return this;
  }

  /** Guest RAM in MiB (default 512): fixed for every VM restored from the snapshot. */
  memoryMiB(memoryMiB: number): this {
    this.#memoryMiB = memoryMiB;
    return this;
  }

  vcpus(vcpus: number): this {
    this.#vcpus = vcpus;
    return this;
  }

  /** Runs after the workload started, before the snapshot is taken: what it leaves is in every clone. */
  withWarmup(warmup: (vm: Vm) => Promise<void>): this {
    this.#warmup = warmup;
    return this;
  }

  /**
   * Names the warm-up's version: part of the cache key, so a new tag bakes again. With a warm-up
   * and no tag, every `build()` bakes again (a function cannot be compared).
   */
  warmupTag(tag: string): this {
    this.#warmupTag = tag;
    return this;
  }

  /** `os/arch[/variant]` to pull. Default `linux/amd64`. */
  platform(platform: string): this {
    this.#platform = platform;
    return this;
  }

  /** Options of the pull (credentials, insecure registries, progress, data dir). */
  pullOptions(options: ImagePullOptions): this {
    this.#pullOptions = options;
    return this;
  }

  /** Guest kernel and initramfs. Default: found by `resolveAssetPaths()`. */
  assets(assets: Partial<AssetPaths>): this {
    this.#assets = assets;
    return this;
  }

  /** Extra environment of the workload, the warm-up and every exec. Part of the cache key. */
  env(vars: Record<string, string>): this {
    this.#env = { ...this.#env, ...vars };
    return this;
  }

  /** Start the image's Entrypoint + Cmd in the background before the warm-up (default true). */
  workload(on: boolean): this {
    this.#workload = on;
    return this;
  }

  /** Bake again even if a snapshot with the same inputs is stored. */
  force(on = true): this {
    this.#force = on;
    return this;
  }

  signal(signal: AbortSignal): this {
    this.#signal = signal;
    return this;
  }

  /** Pull, flatten and bake (or reuse the stored snapshot with the same inputs). */
  async build(): Promise<Image> {
    const signal = this.#signal ?? this.#pullOptions.signal;
    const image = await Image.pull(this.#reference, {
      ...this.#pullOptions,
      ...(this.#platform === undefined ? {} : { platform: this.#platform }),
      ...(signal === undefined ? {} : { signal }),
    });
    const defaults = imageExecDefaults(image.config);
    const hasCommand = (image.config.entrypoint?.length ?? 0) > 0 || (image.config.cmd?.length ?? 0) > 0;
    const { snapshot } = await bakeSnapshot({
      image,
      execDefaults: { env: { ...defaults.env, ...this.#env }, cwd: defaults.cwd, user: defaults.user },
      workload: this.#workload && hasCommand ? image.command() : undefined,
      name: this.#name,
      memoryMiB: this.#memoryMiB,
      vcpus: this.#vcpus,
      warmup: this.#warmup,
      warmupTag: this.#warmupTag ?? "",
      assets: this.#assets,
      force: this.#force || (this.#warmup !== undefined && this.#warmupTag === undefined),
      dataDir: this.#pullOptions.dataDir,
      signal,
    });
    return Image.fromBake(image, snapshot);
  }
}

/** JSON with object keys sorted at every level: equal configs give equal keys. */
function stableJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(stableJson).join(",")}]`;
  if (typeof value === "object" && value !== null) {
    const entries = Object.entries(value as Record<string, unknown>)
      .filter(([, v]) => v !== undefined)
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    return `{${entries.map(([k, v]) => `${JSON.stringify(k)}:${stableJson(v)}`).join(",")}}`;
  }
  return JSON.stringify(value) ?? "null";
}
