import { resolve } from "node:path";
import { SupermachineError } from "../errors.ts";
import { dataDir, Lazy, typedErrors } from "../internal/index.ts";
import {
  dockerCommand,
  EMPTY_IMAGE_CONFIG,
  type ImageConfig,
  imageExecDefaults,
  type PullOptions,
  pullImage,
} from "../oci/index.ts";
import { type Pool, type PoolBuilder, type PooledVm, poolBuilder, type VmSource } from "../pool/index.ts";
import { flattenedImageRootfs, type RootfsProgress, resolveRootfs } from "../rootfs/index.ts";
import { Snapshot, type SnapshotOpenOptions, snapshotDirOf } from "../snapshot/index.ts";
import {
  DEFAULT_BOOT_TIMEOUT_MS,
  DEFAULT_MEMORY_MIB,
  DEFAULT_VCPUS,
  type NetworkPolicy,
  type PrestartedVm,
  type RestoreConfig,
  Vm,
  type VmConfig,
} from "../vm/index.ts";
import type { AssetPaths } from "../vmm/index.ts";
import { bakeSnapshot } from "./bake.ts";

/** Options of {@link Image.pull}. */
export interface ImagePullOptions extends PullOptions {
  /** Progress of flattening the layers into the root filesystem image. */
  onRootfsProgress?: ((event: RootfsProgress) => void) | undefined;
}

/** What `image.start()` accepts: a {@link VmConfig} without the root filesystem, which is the image's. */
export type ImageStartConfig = Omit<VmConfig, "rootfs">;

/** The fields of an image (what `Image` exposes besides its methods). */
interface ImageInit {
  reference: string;
  digest: string;
  platform: string;
  config: ImageConfig;
  rootfsPath: string;
}

let makeImage: (init: ImageInit, snapshot: Snapshot | undefined) => Image;
let makeBuilder: (reference: string) => ImageBuilder;

/**
 * An OCI/Docker image (or a root filesystem) made ready to boot: its blobs pulled and verified,
 * its layers flattened into one root filesystem image (cached by manifest digest), its config
 * applied to every VM. Backed by a snapshot ({@link Image.builder}, {@link Image.fromSnapshot}),
 * `start()` restores instead of booting.
 */
export class Image {
  /** Canonical reference (`docker.io/library/alpine:3.20`), local source (`oci:/dir:tag`) or `rootfs:/path`. */
  readonly reference: string;
  /** Digest of the image manifest (for a root filesystem: a key of its content). */
  readonly digest: string;
  /** `os/arch[/variant]`. */
  readonly platform: string;
  /** The image's config: entrypoint, cmd, env, working dir, user, exposed ports, stop signal. */
  readonly config: ImageConfig;
  /** The flattened root filesystem (ext4, never written to: VMs write to overlays). */
  readonly rootfsPath: string;

  readonly #snapshot: Snapshot | undefined;
  /** The pool of {@link acquire}, made on first use. */
  readonly #pool = new Lazy<Pool<Vm>>(() => this.pool().build());

  static {
    makeImage = (init, snapshot) => new Image(init, snapshot);
  }

  private constructor(init: ImageInit, snapshot: Snapshot | undefined) {
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
    return makeBuilder(reference);
  }

  /**
   * Pull `reference` (a registry reference, `oci:DIR[:TAG]` or `docker-archive:FILE[:NAME:TAG]`)
   * into the local store and flatten it. Both steps are cached: blobs by digest, the root
   * filesystem by manifest digest.
   */
  static async pull(reference: string, options: ImagePullOptions = {}): Promise<Image> {
    return typedErrors("STORE_ERROR", `pulling ${reference}`, () => Image.#pull(reference, options));
  }

  static async #pull(reference: string, options: ImagePullOptions): Promise<Image> {
    const pulled = await pullImage(reference, options);
    const rootfsPath = await flattenedImageRootfs({
      manifestDigest: pulled.manifestDigest,
      layers: pulled.layers,
      dataDir: options.dataDir,
      signal: options.signal,
      onProgress: options.onRootfsProgress,
    });
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

  /**
   * A root filesystem as an image without a config: an ext4 image file, or a directory tree that
   * is made into one (cached by the tree's fingerprint, like podman's `--rootfs`).
   */
  static async fromRootfs(
    path: string,
    options: { dataDir?: string; signal?: AbortSignal } = {},
  ): Promise<Image> {
    const rootfs = await typedErrors("STORE_ERROR", `making ${path} an image`, () =>
      resolveRootfs(path, options),
    );
    return new Image(
      {
        reference: `rootfs:${resolve(path)}`,
        digest: rootfs.key,
        platform: `linux/${process.arch === "x64" ? "amd64" : process.arch}`,
        config: EMPTY_IMAGE_CONFIG,
        rootfsPath: rootfs.imagePath,
      },
      undefined,
    );
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
    const snapshot = await typedErrors("STORE_ERROR", `opening snapshot ${nameOrDir}`, () =>
      Snapshot.open(snapshotDirOf(nameOrDir, options.dataDir ?? dataDir()), {
        ...options,
        trustedDataDirs: [
          ...(options.trustedDataDirs ?? []),
          ...(options.dataDir === undefined ? [] : [options.dataDir]),
        ],
      }),
    );
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

  /**
   * A new VM of this image. Backed by a snapshot: a fresh restore (the snapshot's memory and disk
   * exactly as baked; `memoryMiB`/`vcpus` must match it if given). Otherwise a boot. The image's
   * env, working dir and user are the defaults of every exec.
   */
  async start(config: ImageStartConfig = {}): Promise<Vm> {
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
   * Start a QEMU for this image's snapshot now (restored, warmed and paused by default);
   * `prestarted.activate()` then gives a running VM much faster than `start()`. Snapshot images only.
   */
  async prestart(config: ImageStartConfig & { warm?: boolean } = {}): Promise<PrestartedVm> {
    if (this.#snapshot === undefined) {
      throw new SupermachineError(
        "INVALID_ARGUMENT",
        "prestart() needs an image backed by a snapshot (Image.builder or Image.fromSnapshot)",
      );
    }
    const { warm, ...rest } = config;
    return Vm.prestart(this.#snapshot, { ...restoreConfig(rest), ...(warm === undefined ? {} : { warm }) });
  }

  /** A pool of VMs of this image: `image.pool().min(2).max(8).build()`. */
  pool(config: ImageStartConfig = {}): PoolBuilder<Vm> {
    return poolBuilder(this.#source(config));
  }

  /**
   * A VM from this image's default pool (built on first use with the pool defaults; closed by
   * {@link close}). Release it when done. For other settings, build a pool with {@link pool}.
   */
  async acquire(options: { signal?: AbortSignal } = {}): Promise<PooledVm<Vm>> {
    return (await this.#pool.get()).acquire(options);
  }

  /** Close the default pool of {@link acquire} (its VMs stop). Idempotent. */
  async close(options: { force?: boolean } = {}): Promise<void> {
    await this.#pool.close(options);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
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

  /**
   * Where a pool gets VMs of this image: a boot, or from a snapshot a warmed restore (restored,
   * then `true` run once, as a pre-started VM is warmed: the first exec of a pooled VM does not
   * pay the emulator's cold start, and pools larger than the machine's cores keep their
   * throughput), and pre-started ones.
   */
  #source(config: ImageStartConfig): VmSource<Vm> {
    const snapshot = this.#snapshot;
    return {
      create: async (signal) => {
        const vm = await this.start(signal === undefined ? config : { ...config, signal });
        if (snapshot !== undefined) await warm(vm, config.bootTimeoutMs ?? DEFAULT_BOOT_TIMEOUT_MS, signal);
        return vm;
      },
      ...(snapshot === undefined ? {} : { prestart: () => this.prestart(config) }),
      describe: () => (snapshot === undefined ? `image ${this.reference}` : `snapshot ${snapshot.dir}`),
    };
  }
}

/**
 * Runs `true` once in a new VM, within the start's own time limit. An image without `true` still
 * warms the fork/exec paths: only a VM that is no longer running (or an abort) fails the warm-up,
 * and the VM is killed then; one that timed out is tainted, and the pool discards it.
 */
async function warm(vm: Vm, timeoutMs: number, signal: AbortSignal | undefined): Promise<void> {
  try {
    await vm.exec(["true"], { reject: false, timeoutMs, ...(signal === undefined ? {} : { signal }) });
  } catch (error) {
    if (vm.state === "running" && !signal?.aborted) return;
    await vm.kill();
    throw error;
  }
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
  #network: NetworkPolicy | undefined;
  #force = false;
  #env: Record<string, string> = {};
  #signal: AbortSignal | undefined;

  static {
    makeBuilder = (reference) => new ImageBuilder(reference);
  }

  private constructor(reference: string) {
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

  /**
   * The network of the VM while it bakes, and the default of every VM restored from the snapshot
   * (`start`, `pool`, `acquire`; each can ask for another one). Default `"none"`: the snapshot has
   * no network device, and its VMs can never have one. Part of the cache key. See docs/network.md.
   */
  network(policy: NetworkPolicy): this {
    this.#network = policy;
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
    return typedErrors("STORE_ERROR", `building an image of ${this.#reference}`, () => this.#build());
  }

  async #build(): Promise<Image> {
    const signal = this.#signal ?? this.#pullOptions.signal;
    const image = await Image.pull(this.#reference, {
      ...this.#pullOptions,
      ...(this.#platform === undefined ? {} : { platform: this.#platform }),
      ...(signal === undefined ? {} : { signal }),
    });
    const defaults = imageExecDefaults(image.config);
    const hasCommand = (image.config.entrypoint?.length ?? 0) > 0 || (image.config.cmd?.length ?? 0) > 0;
    const { snapshot } = await bakeSnapshot({
      image: {
        reference: image.reference,
        digest: image.digest,
        platform: image.platform,
        config: image.config,
        rootfsPath: image.rootfsPath,
      },
      execDefaults: { env: { ...defaults.env, ...this.#env }, cwd: defaults.cwd, user: defaults.user },
      workload: this.#workload && hasCommand ? image.command() : undefined,
      name: this.#name,
      memoryMiB: this.#memoryMiB,
      vcpus: this.#vcpus,
      network: this.#network,
      warmup: this.#warmup,
      warmupTag: this.#warmupTag ?? "",
      assets: this.#assets,
      force: this.#force || (this.#warmup !== undefined && this.#warmupTag === undefined),
      dataDir: this.#pullOptions.dataDir,
      signal,
    });
    return makeImage(image, snapshot);
  }
}
