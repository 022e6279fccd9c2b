/**
 * What a server holds for its clients: images (opened snapshots), pools and VMs, with the
 * server's bounds on them — how many VMs (`maxVms`, counting every pool's `max`), how long a VM
 * may sit unused (`idleTimeoutMs`) or live at all (`maxLifetimeMs`) — and the reaper that
 * enforces the last two. Everything ends with {@link Holdings.close}.
 */

import { randomBytes } from "node:crypto";
import { realpath } from "node:fs/promises";
import { isAbsolute, join, relative, sep } from "node:path";
import {
  Image,
  type ImageStartConfig,
  type MountSpec,
  type NetworkPolicy,
  type Pool,
  type PooledVm,
  type PoolOptions,
  RemoteError,
  Store,
  type Vm,
} from "../index.ts";
import type { WireMount, WirePool, WireStartConfig, WireVm } from "../wire/index.ts";
import { invalid } from "./http.ts";

export interface HoldingsOptions {
  maxVms: number;
  /** 0: never. */
  idleTimeoutMs: number;
  /** 0: never. */
  maxLifetimeMs: number;
  /** Host directory under which clients may mount (relative paths); undefined: no mounts. */
  mountRoot: string | undefined;
  dataDir: string | undefined;
  /** Called for each VM the reaper ends, and why. */
  onReap?(vm: HeldVm, reason: "idle" | "lifetime"): void;
}

export interface HeldVm {
  readonly id: string;
  readonly vm: Vm;
  /** Set when acquired from a pool. */
  readonly lease: PooledVm<Vm> | undefined;
  readonly pool: HeldPool | undefined;
  readonly snapshot: string | undefined;
  readonly memoryMiB: number;
  readonly createdAt: number;
  lastUsed: number;
  /** Requests and streams using it now: the idle reaper leaves it alone meanwhile. */
  users: number;
}

export interface HeldPool {
  readonly id: string;
  readonly pool: Pool<Vm>;
  readonly snapshot: string;
  readonly memoryMiB: number;
  readonly owner: "server" | "client";
  lastUsed: number;
  /** VMs on loan through the API. */
  leases: number;
}

const DEFAULT_MEMORY_MIB = 512;

export class Holdings {
  readonly options: HoldingsOptions;
  readonly #images = new Map<string, Promise<Image>>();
  readonly #vms = new Map<string, HeldVm>();
  readonly #pools = new Map<string, HeldPool>();
  /** VM slots promised to starts in progress. */
  #starting = 0;
  #reaper: NodeJS.Timeout | undefined;
  #closed = false;

  constructor(options: HoldingsOptions) {
    this.options = options;
    const periods = [options.idleTimeoutMs, options.maxLifetimeMs].filter((ms) => ms > 0);
    if (periods.length > 0) {
      const every = Math.max(100, Math.min(1_000, ...periods.map((ms) => ms / 4)));
      this.#reaper = setInterval(() => void this.#reap(), every);
      this.#reaper.unref();
    }
  }

  // -- images ----------------------------------------------------------------------------------

  /** The image of a stored snapshot (opened once; checked against this host on first use). */
  image(snapshot: string): Promise<Image> {
    if (typeof snapshot !== "string" || snapshot.includes("/") || snapshot.startsWith(".")) {
      throw invalid(`snapshot must be a snapshot name, got ${JSON.stringify(snapshot)}`);
    }
    let image = this.#images.get(snapshot);
    if (image === undefined) {
      image = Image.fromSnapshot(snapshot, this.#dataDirOption()).catch(async (error: unknown) => {
        this.#images.delete(snapshot);
        const stored = await new Store(this.#dataDirOption()).snapshots().catch(() => []);
        if (stored.some((info) => info.name === snapshot)) throw error;
        throw new RemoteError(
          "NOT_FOUND",
          `no snapshot ${snapshot} on this server (bake it first: POST /v1/snapshots)`,
          {},
          { cause: error },
        );
      });
      this.#images.set(snapshot, image);
    }
    return image;
  }

  /** Forget an opened snapshot (after a bake replaced it or it was removed). */
  forgetImage(snapshot: string): void {
    this.#images.delete(snapshot);
  }

  #dataDirOption(): { dataDir?: string } {
    return this.options.dataDir === undefined ? {} : { dataDir: this.options.dataDir };
  }

  // -- VMs -------------------------------------------------------------------------------------

  get vmCount(): number {
    return this.#vms.size;
  }

  /** VMs started directly (not pool leases). */
  get directVms(): HeldVm[] {
    return [...this.#vms.values()].filter((held) => held.lease === undefined);
  }

  vms(): HeldVm[] {
    return [...this.#vms.values()];
  }

  /** The VM `id`, marked used now; `NOT_FOUND` when this server holds none by that id. */
  vm(id: string): HeldVm {
    const held = this.#vms.get(id);
    if (held === undefined) {
      throw new RemoteError(
        "NOT_FOUND",
        `no VM ${id} on this server (stopped, released, ended by --idle-timeout or --max-lifetime, or never made here)`,
      );
    }
    held.lastUsed = Date.now();
    return held;
  }

  /** Runs `fn` with the VM marked in use (the idle reaper waits for it). */
  async using<T>(id: string, fn: (held: HeldVm) => Promise<T>): Promise<T> {
    const held = this.vm(id);
    held.users += 1;
    try {
      return await fn(held);
    } finally {
      held.users -= 1;
      held.lastUsed = Date.now();
    }
  }

  /** Start a VM of `image` (restored from its snapshot, else booted), within `maxVms`. */
  async startVm(
    image: Image,
    snapshot: string | undefined,
    config: WireStartConfig,
    signal: AbortSignal,
  ): Promise<HeldVm> {
    this.#reserve(1);
    this.#starting += 1;
    try {
      const startConfig = await this.startConfig(config, signal);
      const vm = await image.start(startConfig);
      return this.#hold({
        vm,
        lease: undefined,
        pool: undefined,
        snapshot,
        memoryMiB: image.snapshot?.manifest.memoryMiB ?? config.memoryMiB ?? DEFAULT_MEMORY_MIB,
      });
    } finally {
      this.#starting -= 1;
    }
  }

  /** Acquire from a pool and hold the lease as a VM of the API. */
  async acquire(held: HeldPool, signal: AbortSignal): Promise<HeldVm> {
    held.lastUsed = Date.now();
    const lease = await held.pool.acquire({ signal });
    held.leases += 1;
    return this.#hold({
      vm: lease.vm,
      lease,
      pool: held,
      snapshot: held.snapshot,
      memoryMiB: held.memoryMiB,
    });
  }

  #hold(init: Pick<HeldVm, "vm" | "lease" | "pool" | "snapshot" | "memoryMiB">): HeldVm {
    const now = Date.now();
    const held: HeldVm = { id: init.vm.id, ...init, createdAt: now, lastUsed: now, users: 0 };
    if (this.#closed) {
      void this.#end(held, "kill");
      throw unavailable();
    }
    this.#vms.set(held.id, held);
    return held;
  }

  /**
   * Ends a VM: a pool lease is released (`discard`: thrown away), a VM of its own is stopped
   * (`kill`: at once). Resolves once done; the VM is gone from the holdings at once.
   */
  async end(held: HeldVm, how: "stop" | "kill" | "discard" = "stop"): Promise<void> {
    if (this.#vms.get(held.id) !== held) return;
    await this.#end(held, how);
  }

  async #end(held: HeldVm, how: "stop" | "kill" | "discard"): Promise<void> {
    this.#vms.delete(held.id);
    if (held.lease !== undefined) {
      held.pool!.leases -= 1;
      held.pool!.lastUsed = Date.now();
      await (how === "stop" ? held.lease.release() : held.lease.discard());
    } else {
      await (how === "stop" ? held.vm.stop() : held.vm.kill());
    }
  }

  // -- pools -----------------------------------------------------------------------------------

  pools(): HeldPool[] {
    return [...this.#pools.values()];
  }

  pool(id: string): HeldPool {
    const held = this.#pools.get(id);
    if (held === undefined) throw new RemoteError("NOT_FOUND", `no pool ${id} on this server`);
    held.lastUsed = Date.now();
    return held;
  }

  /** Build a pool of `snapshot`'s clones; its `max` counts against `maxVms` until it closes. */
  async createPool(
    snapshot: string,
    options: Partial<PoolOptions>,
    config: WireStartConfig,
    owner: "server" | "client",
    signal: AbortSignal,
    id = randomBytes(8).toString("hex"),
  ): Promise<HeldPool> {
    if (this.#pools.has(id)) throw invalid(`pool ${id} exists already`);
    // The pool's max counts against maxVms from the start (the library's default max is 4).
    const max = options.max ?? 4;
    this.#reserve(max);
    const image = await this.image(snapshot);
    const startConfig = await this.startConfig(config, signal);
    const builder = image.pool(startConfig);
    if (options.min !== undefined) builder.min(options.min);
    if (options.max !== undefined) builder.max(options.max);
    if (options.prestarted !== undefined) builder.prestarted(options.prestarted);
    if (options.idleTimeoutMs !== undefined) builder.idleTimeout(options.idleTimeoutMs);
    if (options.acquireTimeoutMs !== undefined) builder.acquireTimeout(options.acquireTimeoutMs);
    if (options.restoreOnRelease !== undefined) builder.restoreOnRelease(options.restoreOnRelease);
    this.#reserve(max);
    this.#starting += max;
    let pool: Pool<Vm>;
    try {
      pool = await builder.build({ signal });
    } finally {
      this.#starting -= max;
    }
    const held: HeldPool = {
      id,
      pool,
      snapshot,
      memoryMiB: image.snapshot?.manifest.memoryMiB ?? DEFAULT_MEMORY_MIB,
      owner,
      lastUsed: Date.now(),
      leases: 0,
    };
    if (this.#closed) {
      await pool.close({ force: true });
      throw unavailable();
    }
    this.#pools.set(id, held);
    return held;
  }

  /** Close a pool: its leases are revoked (their VMs leave the holdings) and its VMs stop. */
  async closePool(held: HeldPool, options: { force?: boolean } = {}): Promise<void> {
    if (this.#pools.get(held.id) !== held) return;
    this.#pools.delete(held.id);
    for (const vm of this.#vms.values()) if (vm.pool === held) this.#vms.delete(vm.id);
    await held.pool.close({ force: options.force ?? true });
  }

  // -- bounds ----------------------------------------------------------------------------------

  /** VM slots in use: VMs of their own, every pool's `max`, starts in progress. */
  get reservedVms(): number {
    let n = this.directVms.length + this.#starting;
    for (const held of this.#pools.values()) n += held.pool.options.max;
    return n;
  }

  #reserve(n: number): void {
    if (this.#closed) throw unavailable();
    if (this.reservedVms + n > this.options.maxVms) {
      throw new RemoteError(
        "LIMIT_EXCEEDED",
        `this server holds at most ${this.options.maxVms} VMs (--max-vms) and ${this.reservedVms} are in use or reserved by pools; release VMs, close pools or use another server`,
      );
    }
  }

  /** Library start config from a request's: mounts resolved under the mount root. */
  async startConfig(config: WireStartConfig, signal: AbortSignal): Promise<ImageStartConfig> {
    if (typeof config !== "object" || config === null || Array.isArray(config)) {
      throw invalid("config must be a JSON object");
    }
    const { mounts, network, ...rest } = config;
    const out: ImageStartConfig = { ...(rest as ImageStartConfig), signal };
    // The library checks the policy (a typed INVALID_ARGUMENT names what is wrong).
    if (network !== undefined) out.network = network as NetworkPolicy;
    if (mounts !== undefined) {
      if (!Array.isArray(mounts)) throw invalid("mounts must be an array");
      out.mounts = await Promise.all(mounts.map((m) => this.#mount(m)));
    }
    return out;
  }

  async #mount(mount: WireMount): Promise<MountSpec> {
    const root = this.options.mountRoot;
    if (root === undefined) {
      throw invalid(
        "this server allows no mounts: start it with --mount-root DIR to let clients mount under DIR",
      );
    }
    const path = mount?.hostPath;
    if (typeof path !== "string" || isAbsolute(path) || path.split(/[\\/]/).includes("..")) {
      throw invalid(
        `mount hostPath must be a path relative to the server's mount root, without "..": got ${JSON.stringify(path)}`,
      );
    }
    const rootReal = await realpath(root);
    let real: string;
    try {
      real = await realpath(join(rootReal, path));
    } catch {
      throw new RemoteError(
        "NOT_FOUND",
        `mount hostPath ${JSON.stringify(path)} does not exist under the mount root`,
      );
    }
    const inside = relative(rootReal, real);
    if (inside.startsWith(`..${sep}`) || inside === ".." || isAbsolute(inside)) {
      throw invalid(`mount hostPath ${JSON.stringify(path)} leads out of the mount root`);
    }
    return { ...mount, hostPath: real };
  }

  // -- life cycle ------------------------------------------------------------------------------

  async #reap(): Promise<void> {
    const now = Date.now();
    const { idleTimeoutMs, maxLifetimeMs } = this.options;
    for (const held of [...this.#vms.values()]) {
      let reason: "idle" | "lifetime" | undefined;
      if (maxLifetimeMs > 0 && now - held.createdAt >= maxLifetimeMs) reason = "lifetime";
      else if (idleTimeoutMs > 0 && held.users === 0 && now - held.lastUsed >= idleTimeoutMs) reason = "idle";
      if (reason === undefined) continue;
      this.options.onReap?.(held, reason);
      void this.end(held, reason === "lifetime" ? "kill" : "stop").catch(() => {});
    }
    if (idleTimeoutMs > 0) {
      for (const held of [...this.#pools.values()]) {
        if (held.owner === "client" && held.leases === 0 && now - held.lastUsed >= idleTimeoutMs) {
          void this.closePool(held).catch(() => {});
        }
      }
    }
  }

  /** End everything: every pool closes (forced), every VM stops. No new VM after this. */
  async close(): Promise<void> {
    this.#closed = true;
    if (this.#reaper !== undefined) clearInterval(this.#reaper);
    const vms = [...this.#vms.values()];
    const pools = [...this.#pools.values()];
    await Promise.allSettled([
      ...vms.filter((held) => held.lease === undefined).map((held) => this.#end(held, "stop")),
      ...pools.map((held) => this.closePool(held, { force: true })),
    ]);
    this.#vms.clear();
  }

  vmInfo(held: HeldVm): WireVm {
    return {
      id: held.id,
      state: held.vm.state,
      accelerator: held.vm.accelerator,
      timings: held.vm.timings,
      ...(held.pool === undefined ? {} : { pool: held.pool.id }),
      ...(held.snapshot === undefined ? {} : { snapshot: held.snapshot }),
      memoryMiB: held.memoryMiB,
      createdAt: new Date(held.createdAt).toISOString(),
    };
  }

  poolInfo(held: HeldPool): WirePool {
    return {
      id: held.id,
      name: held.pool.name,
      snapshot: held.snapshot,
      owner: held.owner,
      options: { ...held.pool.options },
      stats: held.pool.stats(),
    };
  }
}

function unavailable(): RemoteError {
  return new RemoteError("SERVER_UNAVAILABLE", "this server is shutting down: use another one", {
    httpStatus: 503,
  });
}
