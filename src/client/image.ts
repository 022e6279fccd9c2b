/**
 * Images on servers: `RemoteImage` is the library's `Image` surface (start, pool, acquire,
 * close, command) for an image that one or more servers hold; `RemoteImageBuilder` bakes on
 * every server (warm-ups are commands, not functions: they run on the server).
 */

import { SupermachineError } from "../errors.ts";
import type { ImageConfig } from "../index.ts";
import { Lazy } from "../internal/index.ts";
import type { WireBake, WireImage, WireStartConfig, WireVm } from "../wire/index.ts";
import type { Cluster } from "./cluster.ts";
import type { Endpoint } from "./endpoint.ts";
import { type RemotePool, type RemotePoolBuilder, remotePoolBuilder } from "./pool.ts";
import { type RemotePooledVm, type RemoteVm, remoteVm } from "./vm.ts";

/** What `image.start()` takes on a server: no host paths (mounts are relative to the server's `--mount-root`). */
export interface RemoteStartConfig extends WireStartConfig {
  signal?: AbortSignal;
}

/** The snapshot a remote image restores from. */
export interface RemoteSnapshot {
  readonly name: string;
  readonly memoryMiB: number | undefined;
  readonly vcpus: number | undefined;
}

let makeImage: (cluster: Cluster, endpoints: readonly Endpoint[], info: WireImage) => RemoteImage;

/** Internal: the client's object for an image on `endpoints`. */
export function remoteImage(cluster: Cluster, endpoints: readonly Endpoint[], info: WireImage): RemoteImage {
  return makeImage(cluster, endpoints, info);
}

export class RemoteImage {
  readonly reference: string;
  readonly digest: string;
  readonly platform: string;
  readonly config: ImageConfig;
  /** The snapshot it restores from, if any (else `start()` boots it on the server). */
  readonly snapshot: RemoteSnapshot | undefined;
  readonly #cluster: Cluster;
  readonly #endpoints: readonly Endpoint[];
  /** The pool of {@link acquire}, made on first use. */
  readonly #pool = new Lazy<RemotePool>(() => this.pool().build());

  static {
    makeImage = (cluster, endpoints, info) => new RemoteImage(cluster, endpoints, info);
  }

  private constructor(cluster: Cluster, endpoints: readonly Endpoint[], info: WireImage) {
    this.#cluster = cluster;
    this.#endpoints = endpoints;
    this.reference = info.reference;
    this.digest = info.digest;
    this.platform = info.platform;
    this.config = info.config;
    this.snapshot =
      info.snapshot === undefined
        ? undefined
        : { name: info.snapshot, memoryMiB: info.memoryMiB, vcpus: info.vcpus };
  }

  /** The servers that hold this image. */
  get endpoints(): readonly string[] {
    return this.#endpoints.map((e) => e.url);
  }

  /** A new VM of this image on the next server in turn: a fresh restore of its snapshot, else a boot. */
  async start(config: RemoteStartConfig = {}): Promise<RemoteVm> {
    const { signal, ...rest } = config;
    const source = this.snapshot === undefined ? { image: this.reference } : { snapshot: this.snapshot.name };
    return this.#cluster.first(this.#endpoints, async (endpoint) => {
      const info = await endpoint.json<WireVm>("POST", "/v1/vms", { json: { ...rest, ...source }, signal });
      let untrack = () => {};
      const vm = remoteVm(endpoint, info, () => untrack());
      untrack = this.#cluster.track({ close: () => vm.stop() });
      return vm;
    });
  }

  /** A pool of this image's clones on each server that holds it. Snapshot images only. */
  pool(config: WireStartConfig = {}): RemotePoolBuilder {
    if (this.snapshot === undefined) {
      throw new SupermachineError(
        "INVALID_ARGUMENT",
        "a pool on a server needs an image backed by a snapshot (fromSnapshot or builder)",
      );
    }
    return remotePoolBuilder(this.#cluster, this.#endpoints, this.snapshot.name, config);
  }

  /** A VM from this image's default pool (built on first use; closed by {@link close}). */
  async acquire(options: { signal?: AbortSignal } = {}): Promise<RemotePooledVm> {
    return (await this.#pool.get()).acquire(options);
  }

  /** Close the default pool of {@link acquire}. Idempotent. */
  async close(options: { force?: boolean } = {}): Promise<void> {
    await this.#pool.close(options);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  /** The argv docker would run (as the library's `image.command()`). */
  command(
    overrides: { entrypoint?: readonly string[] | undefined; args?: readonly string[] | undefined } = {},
  ): string[] {
    const entrypoint = overrides.entrypoint ?? this.config.entrypoint ?? [];
    const args =
      overrides.args !== undefined && overrides.args.length > 0
        ? overrides.args
        : overrides.entrypoint !== undefined
          ? []
          : (this.config.cmd ?? []);
    const argv = [...entrypoint, ...args];
    if (argv.length === 0) {
      throw new SupermachineError(
        "INVALID_ARGUMENT",
        "the image has no Entrypoint or Cmd: give a command to run",
      );
    }
    return argv;
  }
}

let makeBuilder: (cluster: Cluster, reference: string) => RemoteImageBuilder;

/** Internal. */
export function remoteImageBuilder(cluster: Cluster, reference: string): RemoteImageBuilder {
  return makeBuilder(cluster, reference);
}

/**
 * The library's `ImageBuilder` against servers: pull, boot, start the workload, run the warm-up
 * commands ({@link warmupExec}), snapshot — on every server, cached there by the same inputs.
 */
export class RemoteImageBuilder {
  readonly #cluster: Cluster;
  readonly #bake: WireBake;
  #signal: AbortSignal | undefined;

  static {
    makeBuilder = (cluster, reference) => new RemoteImageBuilder(cluster, reference);
  }

  private constructor(cluster: Cluster, reference: string) {
    this.#cluster = cluster;
    this.#bake = { reference };
  }

  name(name: string): this {
    this.#bake.name = name;
    return this;
  }

  memoryMiB(memoryMiB: number): this {
    this.#bake.memoryMiB = memoryMiB;
    return this;
  }

  vcpus(vcpus: number): this {
    this.#bake.vcpus = vcpus;
    return this;
  }

  env(vars: Record<string, string>): this {
    this.#bake.env = { ...this.#bake.env, ...vars };
    return this;
  }

  platform(platform: string): this {
    this.#bake.platform = platform;
    return this;
  }

  /** A command run in the VM before the snapshot is taken (calls accumulate; give a {@link warmupTag}). */
  warmupExec(argv: string[]): this {
    this.#bake.warmup = [...(this.#bake.warmup ?? []), [...argv]];
    return this;
  }

  warmupTag(tag: string): this {
    this.#bake.warmupTag = tag;
    return this;
  }

  workload(on: boolean): this {
    this.#bake.workload = on;
    return this;
  }

  force(on = true): this {
    this.#bake.force = on;
    return this;
  }

  signal(signal: AbortSignal): this {
    this.#signal = signal;
    return this;
  }

  /** Bakes on every server that can be reached (in parallel). */
  async build(): Promise<RemoteImage> {
    const made = await this.#cluster.each(this.#cluster.endpoints, (endpoint) =>
      endpoint.json<WireImage>("POST", "/v1/snapshots", { json: this.#bake, signal: this.#signal }),
    );
    return remoteImage(
      this.#cluster,
      made.map((m) => m.endpoint),
      made[0]!.value,
    );
  }
}
