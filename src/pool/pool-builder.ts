import { SupermachineError } from "../errors.ts";
import type { Vm } from "../vm/index.ts";
import { createPool, DEFAULT_POOL_OPTIONS, type Pool, type PoolOptions } from "./pool.ts";
import { type PoolClock, systemClock } from "./pool-clock.ts";
import type { PoolableVm, VmSource } from "./vm-source.ts";

let makeBuilder: <V extends PoolableVm>(source: VmSource<V>, clock: PoolClock) => PoolBuilder<V>;

/**
 * Settings of a {@link Pool}, then `build()`:
 * ```ts
 * await using pool = await image.pool().min(2).max(8).restoreOnRelease(false).build();
 * ```
 */
export class PoolBuilder<V extends PoolableVm = Vm> {
  readonly #source: VmSource<V>;
  readonly #clock: PoolClock;
  readonly #options: PoolOptions = { ...DEFAULT_POOL_OPTIONS };

  static {
    makeBuilder = (source, clock) => new PoolBuilder(source, clock);
  }

  private constructor(source: VmSource<V>, clock: PoolClock) {
    this.#source = source;
    this.#clock = clock;
  }

  /** VMs kept ready (idle or being created) whenever fewer than `max` exist. Default 0. */
  min(count: number): this {
    this.#options.min = count;
    return this;
  }

  /** Most VMs at once: idle + busy + being created. Default 4. */
  max(count: number): this {
    this.#options.max = count;
    return this;
  }

  /** Milliseconds an idle VM above `min` lives before it is stopped. Default 60 000; `Infinity` keeps them. */
  idleTimeout(ms: number): this {
    this.#options.idleTimeoutMs = ms;
    return this;
  }

  /** Milliseconds `acquire()` waits before it throws `POOL_TIMEOUT`. Default 30 000; `Infinity` waits forever. */
  acquireTimeout(ms: number): this {
    this.#options.acquireTimeoutMs = ms;
    return this;
  }

  /**
   * `true` (default): a released VM is stopped and the next `acquire()` gets a fresh one.
   * `false`: a released VM goes back to the idle set with its state (files, processes) kept.
   */
  restoreOnRelease(enabled: boolean): this {
    this.#options.restoreOnRelease = enabled;
    return this;
  }

  /**
   * VM processes kept started and waiting for their state, when the source can pre-start
   * (snapshot restores): a new VM then costs only the activation. Default 0.
   */
  prestarted(count: number): this {
    this.#options.prestarted = count;
    return this;
  }

  /** Validate the settings, create the pool and wait for its `min` VMs. */
  build(options: { signal?: AbortSignal } = {}): Promise<Pool<V>> {
    try {
      validate(this.#options);
    } catch (error) {
      return Promise.reject(error);
    }
    return createPool(this.#source, { ...this.#options }, this.#clock, options);
  }
}

/**
 * A pool builder over any {@link VmSource} (internal, and `supermachine/testing`: pools of fakes
 * driven by a `ManualClock`). Users get builders from `image.pool()`.
 */
export function poolBuilder<V extends PoolableVm>(
  source: VmSource<V>,
  options: { clock?: PoolClock } = {},
): PoolBuilder<V> {
  return makeBuilder(source, options.clock ?? systemClock);
}

function validate(options: PoolOptions): void {
  const count = (value: number, name: string, least: number) => {
    if (!Number.isSafeInteger(value) || value < least) {
      throw new SupermachineError(
        "INVALID_ARGUMENT",
        `pool ${name} must be an integer ≥ ${least} (got ${value})`,
      );
    }
  };
  const duration = (value: number, name: string) => {
    if (typeof value !== "number" || Number.isNaN(value) || value < 0) {
      throw new SupermachineError(
        "INVALID_ARGUMENT",
        `pool ${name} must be milliseconds ≥ 0 or Infinity (got ${value})`,
      );
    }
  };
  count(options.max, "max", 1);
  count(options.min, "min", 0);
  count(options.prestarted, "prestarted", 0);
  if (options.min > options.max) {
    throw new SupermachineError(
      "INVALID_ARGUMENT",
      `pool min (${options.min}) must not exceed max (${options.max})`,
    );
  }
  duration(options.idleTimeoutMs, "idleTimeout");
  duration(options.acquireTimeoutMs, "acquireTimeout");
}
