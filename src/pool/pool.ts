import { AbortError, PoolTimeoutError, SupermachineError } from "../errors.ts";
import { debug, publish, throwIfAborted, yieldToLoop } from "../internal/index.ts";
import type { Vm } from "../vm/index.ts";
import type { PoolClock } from "./pool-clock.ts";
import { createLease, type PooledVm, revokeLease } from "./pooled-vm.ts";
import type { PoolableVm, PrestartedVmHandle, VmSource } from "./vm-source.ts";

/** Settings of a {@link Pool}; see {@link PoolBuilder} for each one's meaning and default. */
export interface PoolOptions {
  min: number;
  max: number;
  idleTimeoutMs: number;
  acquireTimeoutMs: number;
  restoreOnRelease: boolean;
  prestarted: number;
}

export const DEFAULT_POOL_OPTIONS: Readonly<PoolOptions> = Object.freeze({
  min: 0,
  max: 4,
  idleTimeoutMs: 60_000,
  acquireTimeoutMs: 30_000,
  restoreOnRelease: true,
  prestarted: 0,
});

/** A snapshot of a pool's state, from {@link Pool.stats}. */
export interface PoolStats {
  /** VMs ready to be acquired. */
  idle: number;
  /** VMs on loan. */
  busy: number;
  /** VMs being created (restored, booted or activated). */
  spawning: number;
  /** Pre-started VM processes waiting for their state. */
  prestarted: number;
  /** `acquire()` calls waiting for a VM. */
  waiters: number;
  /** VMs being stopped or killed in the background. */
  stopping: number;
  /** VMs created since the pool was built. */
  totalSpawned: number;
  /** Idle VMs stopped after `idleTimeoutMs`. */
  totalEvicted: number;
  /** VMs thrown away: tainted, dead, or discarded by their user. */
  totalDiscarded: number;
  /** Successful `acquire()` calls. */
  totalAcquired: number;
  /** Failed attempts to create a VM. */
  totalSpawnFailures: number;
  /** Time to create one VM (source `create()`, or `activate()` of a pre-started one), last 1024. */
  restoreLatencyMs: { p50: number; p95: number; count: number };
}

interface Slot<V extends PoolableVm> {
  vm: V;
  state: "idle" | "busy" | "gone";
  idleSince: number;
  dead: boolean;
}

interface Waiter<V extends PoolableVm> {
  since: number;
  give(slot: Slot<V>): void;
  fail(error: Error): void;
}

const LATENCY_SAMPLES = 1024;
const BACKOFF_BASE_MS = 100;
const BACKOFF_MAX_MS = 10_000;

let poolCount = 0;

/** Internal: see {@link PoolBuilder}. Set by the class's static block. */
export let createPool: <V extends PoolableVm>(
  source: VmSource<V>,
  options: Partial<PoolOptions>,
  clock: PoolClock,
  signal?: { signal?: AbortSignal },
) => Promise<Pool<V>>;

/**
 * A warm, auto-scaling set of VMs from one {@link VmSource}. Build with {@link PoolBuilder}
 * (`image.pool()…build()`), borrow with {@link Pool.acquire}, end with {@link Pool.close} or
 * `await using`.
 *
 * - VMs are created lazily, at most `max` at a time (idle + busy + being created).
 * - `min` VMs are kept ready (idle or being created) while the cap allows: refilled in the
 *   background after acquires, discards and evictions.
 * - Idle VMs above `min` are stopped after `idleTimeoutMs`.
 * - `acquire()` waiters are served first come, first served; a waiter gives up after
 *   `acquireTimeoutMs` ({@link PoolTimeoutError}) or when its signal aborts, and leaves the queue.
 * - A VM that is tainted (exec timeout, failure) or over (`done` settled) is discarded, never
 *   handed out again.
 */
export class Pool<V extends PoolableVm = Vm> {
  /** Name used in events and errors: `pool-<n> (<source>)`. */
  readonly name: string;

  readonly #source: VmSource<V>;
  readonly #options: PoolOptions;
  readonly #clock: PoolClock;
  /** Oldest first: acquire takes the newest, eviction the oldest. */
  #idle: Slot<V>[] = [];
  readonly #busy = new Map<PooledVm<PoolableVm>, Slot<V>>();
  #spawning = 0;
  #prestarted: PrestartedVmHandle<V>[] = [];
  #prestarting = 0;
  #waiters: Waiter<V>[] = [];
  readonly #background = new Set<Promise<unknown>>();
  #stoppingCount = 0;
  readonly #abort = new AbortController();
  #closed = false;
  #closing: Promise<void> | undefined;
  #force = false;
  #busyDrained: (() => void) | undefined;
  #sweepTimer: unknown;
  #retryTimer: unknown;
  #retryAt = 0;
  #failures = 0;
  #blockedUntil = 0;
  #prestartFailures = 0;
  #prestartBlockedUntil = 0;
  #totalSpawned = 0;
  #totalEvicted = 0;
  #totalDiscarded = 0;
  #totalAcquired = 0;
  #totalSpawnFailures = 0;
  #latencies: number[] = [];
  #latencyNext = 0;

  static {
    createPool = (source, options, clock, signal) => Pool.#create(source, options, clock, signal);
  }

  private constructor(source: VmSource<V>, options: PoolOptions, clock: PoolClock) {
    this.#source = source;
    this.#options = options;
    this.#clock = clock;
    this.name = `pool-${++poolCount} (${source.describe()})`;
  }

  /**
   * A pool over `source`, resolved once its `min` VMs (and `prestarted` processes) are ready. If
   * one of them fails, the pool is closed and the error thrown. Internal: see {@link PoolBuilder}.
   */
  static async #create<V extends PoolableVm>(
    source: VmSource<V>,
    options: Partial<PoolOptions>,
    clock: PoolClock,
    { signal }: { signal?: AbortSignal } = {},
  ): Promise<Pool<V>> {
    const pool = new Pool(source, { ...DEFAULT_POOL_OPTIONS, ...options }, clock);
    throwIfAborted(signal, "pool build");
    const first = pool.#ensure();
    const onAbort = () => void pool.close({ force: true });
    signal?.addEventListener("abort", onAbort, { once: true });
    try {
      const errors = (await Promise.all(first)).filter((error) => error !== undefined);
      throwIfAborted(signal, "pool build");
      if (errors[0] !== undefined) throw errors[0];
    } catch (error) {
      await pool.close({ force: true });
      throw error;
    } finally {
      signal?.removeEventListener("abort", onAbort);
    }
    publish("pool:ready", { pool: pool.name, stats: pool.stats() });
    return pool;
  }

  /** The settings the pool runs with. */
  get options(): Readonly<PoolOptions> {
    return this.#options;
  }

  /** True once {@link close} was called. */
  get closed(): boolean {
    return this.#closed;
  }

  /**
   * Borrow a VM: an idle one at once, else a new one (up to `max`), else the next one released.
   * Throws {@link PoolTimeoutError} (`POOL_TIMEOUT`) after `acquireTimeoutMs`, `ABORTED` when
   * `signal` aborts, `POOL_CLOSED` once the pool is closing, or the source's error when creating
   * the VM this call waited for failed.
   */
  acquire(options: { signal?: AbortSignal } = {}): Promise<PooledVm<V>> {
    const { signal } = options;
    if (this.#closed) return Promise.reject(closedError(this.name));
    if (signal?.aborted)
      return Promise.reject(new AbortError("pool acquire aborted", { cause: signal.reason }));
    const since = this.#clock.now();
    const slot = this.#takeIdle();
    if (slot !== undefined) {
      const lease = this.#lend(slot, since);
      this.#ensure();
      return Promise.resolve(lease);
    }
    return new Promise<PooledVm<V>>((resolve, reject) => {
      let timer: unknown;
      const cleanup = () => {
        if (timer !== undefined) this.#clock.clearTimeout(timer);
        signal?.removeEventListener("abort", onAbort);
      };
      const leave = (error: Error) => {
        const index = this.#waiters.indexOf(waiter);
        if (index === -1) return;
        this.#waiters.splice(index, 1);
        waiter.fail(error);
      };
      const onAbort = () => leave(new AbortError("pool acquire aborted", { cause: signal?.reason }));
      const waiter: Waiter<V> = {
        since,
        give: (slot) => {
          cleanup();
          resolve(this.#lend(slot, since));
        },
        fail: (error) => {
          cleanup();
          reject(error);
        },
      };
      const timeoutMs = this.#options.acquireTimeoutMs;
      if (Number.isFinite(timeoutMs)) {
        timer = this.#clock.setTimeout(() => {
          timer = undefined;
          leave(
            new PoolTimeoutError(
              `no VM became free in ${timeoutMs} ms (${this.name}: max ${this.#options.max}, ${this.#busy.size} busy): raise max or acquireTimeout, or release VMs sooner`,
              { timeoutMs },
            ),
          );
        }, timeoutMs);
      }
      signal?.addEventListener("abort", onAbort, { once: true });
      this.#waiters.push(waiter);
      this.#ensure();
    });
  }

  /** Counts, totals and restore latency percentiles. */
  stats(): PoolStats {
    const sorted = [...this.#latencies].sort((a, b) => a - b);
    return {
      idle: this.#idle.length,
      busy: this.#busy.size,
      spawning: this.#spawning,
      prestarted: this.#prestarted.length,
      waiters: this.#waiters.length,
      stopping: this.#stoppingCount,
      totalSpawned: this.#totalSpawned,
      totalEvicted: this.#totalEvicted,
      totalDiscarded: this.#totalDiscarded,
      totalAcquired: this.#totalAcquired,
      totalSpawnFailures: this.#totalSpawnFailures,
      restoreLatencyMs: {
        p50: percentile(sorted, 0.5),
        p95: percentile(sorted, 0.95),
        count: sorted.length,
      },
    };
  }

  /**
   * Close the pool: waiters get `POOL_CLOSED`, idle VMs and pre-started processes are stopped, VMs
   * being created are stopped when ready, and busy VMs are stopped when released. Resolves when
   * every VM is gone. With `force`, busy VMs are killed at once (their leases end) and nothing is
   * waited for but the kills. Idempotent; a forced call escalates a graceful close in progress.
   */
  close(options: { force?: boolean } = {}): Promise<void> {
    if (options.force === true && !this.#force) {
      this.#force = true;
      if (this.#closed) this.#killBusy();
    }
    this.#closing ??= this.#close();
    return this.#closing;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  /**
   * Resolves once the pool has nothing in flight: what already happened (a VM that died, a lease
   * returned) has been handled, and no VM is being created, pre-started or stopped. (With `min`
   * VMs wanted it resolves after they are ready; while a creation hangs, it waits.) For tests and
   * orderly shutdowns; `acquire()` never needs it.
   */
  async settled(): Promise<void> {
    for (;;) {
      // Reactions already due (a VM that just died, a lease just returned) run first.
      await yieldToLoop();
      if (this.#background.size === 0) return;
      await Promise.allSettled([...this.#background]);
    }
  }

  readonly #returnLease = async (lease: PooledVm<PoolableVm>, how: "release" | "discard"): Promise<void> => {
    const slot = this.#busy.get(lease);
    if (slot === undefined) return;
    this.#busy.delete(lease);
    const reason =
      how === "discard" ? "discarded" : slot.dead ? "exited" : slot.vm.tainted ? "tainted" : undefined;
    publish("pool:release", () => ({ pool: this.name, vmId: slot.vm.id, discarded: reason !== undefined }));
    if (reason !== undefined) {
      this.#discard(slot, reason);
    } else if (this.#closed) {
      this.#retire(slot, this.#force ? "kill" : "stop");
    } else if (this.#options.restoreOnRelease) {
      // The guest's state is thrown away: no need for a graceful shutdown.
      this.#retire(slot, "kill");
    } else {
      this.#offer(slot);
    }
    if (this.#busy.size === 0) this.#busyDrained?.();
    this.#ensure();
  };

  // --- internals ---

  #takeIdle(): Slot<V> | undefined {
    for (;;) {
      const slot = this.#idle.pop();
      if (slot === undefined) return undefined;
      if (slot.dead || slot.vm.tainted) {
        this.#discard(slot, slot.dead ? "exited" : "tainted");
        continue;
      }
      this.#scheduleSweep();
      return slot;
    }
  }

  #lend(slot: Slot<V>, since: number): PooledVm<V> {
    slot.state = "busy";
    const waitedMs = this.#clock.now() - since;
    const lease = createLease(slot.vm, this.#returnLease, waitedMs);
    this.#busy.set(lease as PooledVm<PoolableVm>, slot);
    this.#totalAcquired++;
    publish("pool:acquire", () => ({ pool: this.name, vmId: slot.vm.id, waitedMs }));
    return lease;
  }

  /** A ready VM: to the first waiter, else to the idle set. */
  #offer(slot: Slot<V>): void {
    if (slot.dead || slot.vm.tainted) {
      this.#discard(slot, slot.dead ? "exited" : "tainted");
      return;
    }
    const waiter = this.#waiters.shift();
    if (waiter !== undefined) {
      waiter.give(slot);
      return;
    }
    slot.state = "idle";
    slot.idleSince = this.#clock.now();
    this.#idle.push(slot);
    this.#scheduleSweep();
  }

  #discard(slot: Slot<V>, reason: string): void {
    this.#totalDiscarded++;
    publish("pool:discard", { pool: this.name, vmId: slot.vm.id, reason });
    debug("%s: discarding VM %s (%s)", this.name, slot.vm.id, reason);
    this.#retire(slot, "kill");
  }

  #retire(slot: Slot<V>, how: "stop" | "kill"): void {
    slot.state = "gone";
    const vm = slot.vm;
    this.#track(
      (how === "kill" ? vm.kill() : vm.stop()).catch((error: unknown) => {
        debug("%s: %s of VM %s failed: %s", this.name, how, vm.id, (error as Error).message);
      }),
      true,
    );
  }

  #track(promise: Promise<unknown>, stopping = false): void {
    if (stopping) this.#stoppingCount++;
    this.#background.add(promise);
    void promise.finally(() => {
      if (stopping) this.#stoppingCount--;
      this.#background.delete(promise);
    });
  }

  /** Start whatever creations the current demand calls for; returns their outcomes. */
  #ensure(): Promise<Error | undefined>[] {
    if (this.#closed) return [];
    const started = this.#ensurePrestarted();
    const { min, max } = this.#options;
    const live = this.#idle.length + this.#busy.size + this.#spawning;
    let wanted = Math.min(max - live, min + this.#waiters.length - this.#idle.length - this.#spawning);
    if (wanted <= 0) return started;
    if (this.#failures > 0) {
      const now = this.#clock.now();
      if (now < this.#blockedUntil) {
        this.#scheduleRetry(this.#blockedUntil - now);
        return started;
      }
      // After a failure, probe with one creation at a time.
      if (this.#spawning > 0) return started;
      wanted = 1;
    }
    for (let i = 0; i < wanted; i++) started.push(this.#spawn());
    return started;
  }

  #ensurePrestarted(): Promise<Error | undefined>[] {
    const started: Promise<Error | undefined>[] = [];
    const wanted = this.#options.prestarted;
    if (this.#source.prestart === undefined || wanted === 0 || this.#closed) return started;
    if (this.#prestartFailures > 0) {
      const now = this.#clock.now();
      if (now < this.#prestartBlockedUntil) {
        this.#scheduleRetry(this.#prestartBlockedUntil - now);
        return started;
      }
      if (this.#prestarting > 0) return started;
      if (this.#prestarted.length < wanted) started.push(this.#prestartOne());
      return started;
    }
    while (this.#prestarted.length + this.#prestarting < wanted) started.push(this.#prestartOne());
    return started;
  }

  #prestartOne(): Promise<Error | undefined> {
    this.#prestarting++;
    const promise = (async () => {
      let handle: PrestartedVmHandle<V>;
      try {
        handle = await (this.#source.prestart as () => Promise<PrestartedVmHandle<V>>)();
      } catch (error) {
        this.#prestarting--;
        this.#prestartFailures++;
        this.#prestartBlockedUntil = this.#clock.now() + backoffMs(this.#prestartFailures);
        debug("%s: pre-start failed: %s", this.name, (error as Error).message);
        this.#ensure();
        return error as Error;
      }
      this.#prestarting--;
      this.#prestartFailures = 0;
      if (this.#closed) {
        this.#track(
          handle.kill().catch(() => {}),
          true,
        );
      } else {
        this.#prestarted.push(handle);
      }
      return undefined;
    })();
    this.#track(promise);
    return promise;
  }

  #spawn(): Promise<Error | undefined> {
    this.#spawning++;
    const started = this.#clock.now();
    const promise = (async () => {
      let vm: V;
      try {
        vm = await this.#obtain();
      } catch (error) {
        this.#spawning--;
        this.#spawnFailed(error as Error);
        return error as Error;
      }
      this.#spawning--;
      this.#failures = 0;
      this.#totalSpawned++;
      this.#recordLatency(this.#clock.now() - started);
      const slot: Slot<V> = { vm, state: "idle", idleSince: this.#clock.now(), dead: false };
      void vm.done.then(() => this.#onDone(slot));
      if (this.#closed) {
        this.#retire(slot, this.#force ? "kill" : "stop");
      } else {
        this.#offer(slot);
        this.#ensure();
      }
      return undefined;
    })();
    this.#track(promise);
    return promise;
  }

  /** A VM from a pre-started process when there is one, else from `create()`. */
  async #obtain(): Promise<V> {
    const handle = this.#prestarted.shift();
    if (handle !== undefined) {
      try {
        return await handle.activate();
      } catch (error) {
        debug(
          "%s: activating a pre-started VM failed, creating one: %s",
          this.name,
          (error as Error).message,
        );
        this.#track(
          handle.kill().catch(() => {}),
          true,
        );
      } finally {
        this.#ensurePrestarted();
      }
    }
    return await this.#source.create(this.#abort.signal);
  }

  #spawnFailed(error: Error): void {
    this.#totalSpawnFailures++;
    this.#failures++;
    this.#blockedUntil = this.#clock.now() + backoffMs(this.#failures);
    debug("%s: creating a VM failed (%d in a row): %s", this.name, this.#failures, error.message);
    if (this.#closed) return;
    publish("pool:spawn-failed", { pool: this.name, error, failures: this.#failures });
    // The oldest waiter learns why it has no VM; the others wait for a later success.
    this.#waiters.shift()?.fail(error);
    this.#ensure();
  }

  #onDone(slot: Slot<V>): void {
    slot.dead = true;
    if (slot.state !== "idle") return;
    const index = this.#idle.indexOf(slot);
    if (index !== -1) this.#idle.splice(index, 1);
    this.#discard(slot, "exited");
    this.#scheduleSweep();
    this.#ensure();
  }

  #recordLatency(ms: number): void {
    if (this.#latencies.length < LATENCY_SAMPLES) this.#latencies.push(ms);
    else this.#latencies[this.#latencyNext] = ms;
    this.#latencyNext = (this.#latencyNext + 1) % LATENCY_SAMPLES;
  }

  #scheduleRetry(ms: number): void {
    if (this.#closed) return;
    const at = this.#clock.now() + ms;
    if (this.#retryTimer !== undefined) {
      if (this.#retryAt <= at) return;
      this.#clock.clearTimeout(this.#retryTimer);
    }
    this.#retryAt = at;
    this.#retryTimer = this.#clock.setTimeout(() => {
      this.#retryTimer = undefined;
      this.#ensure();
    }, ms);
  }

  #scheduleSweep(): void {
    if (this.#sweepTimer !== undefined) {
      this.#clock.clearTimeout(this.#sweepTimer);
      this.#sweepTimer = undefined;
    }
    const { min, idleTimeoutMs } = this.#options;
    const oldest = this.#idle[0];
    if (this.#closed || oldest === undefined || this.#idle.length <= min || !Number.isFinite(idleTimeoutMs))
      return;
    const dueMs = Math.max(0, oldest.idleSince + idleTimeoutMs - this.#clock.now());
    this.#sweepTimer = this.#clock.setTimeout(() => {
      this.#sweepTimer = undefined;
      this.#sweep();
    }, dueMs);
  }

  #sweep(): void {
    const now = this.#clock.now();
    const { min, idleTimeoutMs } = this.#options;
    for (;;) {
      const oldest = this.#idle[0];
      if (oldest === undefined || this.#idle.length <= min || oldest.idleSince + idleTimeoutMs > now) break;
      this.#idle.shift();
      this.#totalEvicted++;
      publish("pool:evict", { pool: this.name, vmId: oldest.vm.id });
      this.#retire(oldest, "stop");
    }
    this.#scheduleSweep();
  }

  #killBusy(): void {
    for (const [lease, slot] of this.#busy) {
      revokeLease(lease);
      this.#retire(slot, "kill");
    }
    this.#busy.clear();
    this.#busyDrained?.();
  }

  async #close(): Promise<void> {
    this.#closed = true;
    for (const timer of [this.#sweepTimer, this.#retryTimer]) {
      if (timer !== undefined) this.#clock.clearTimeout(timer);
    }
    this.#sweepTimer = this.#retryTimer = undefined;
    this.#abort.abort(closedError(this.name));
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const waiter of waiters) waiter.fail(closedError(this.name));
    const how = this.#force ? "kill" : "stop";
    for (const slot of this.#idle) this.#retire(slot, how);
    this.#idle = [];
    for (const handle of this.#prestarted)
      this.#track(
        handle.kill().catch(() => {}),
        true,
      );
    this.#prestarted = [];
    if (this.#force) this.#killBusy();
    while (this.#busy.size > 0) {
      await new Promise<void>((resolve) => {
        this.#busyDrained = resolve;
      });
    }
    this.#busyDrained = undefined;
    while (this.#background.size > 0) await Promise.allSettled([...this.#background]);
    publish("pool:closed", { pool: this.name, stats: this.stats() });
  }
}

function closedError(name: string): SupermachineError {
  // POOL_CLOSED has no class of its own.
  return new SupermachineError("POOL_CLOSED", `${name} is closed`);
}

function backoffMs(failures: number): number {
  return Math.min(BACKOFF_BASE_MS * 2 ** (failures - 1), BACKOFF_MAX_MS);
}

function percentile(sorted: number[], q: number): number {
  if (sorted.length === 0) return 0;
  const index = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1));
  return sorted[index] as number;
}
