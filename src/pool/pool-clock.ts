/**
 * Time as the pool sees it: milliseconds and one-shot timers. The default is the real clock;
 * tests inject a {@link ManualClock}.
 */
export interface PoolClock {
  /** Milliseconds, monotonic. */
  now(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

/** The real clock (`performance.now()` and Node timers). */
export const systemClock: PoolClock = {
  now: () => performance.now(),
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (handle) => clearTimeout(handle as ReturnType<typeof setTimeout>),
};

interface ManualTimer {
  id: number;
  at: number;
  fn: () => void;
}

/**
 * A clock that moves only when told to: `advance(ms)` runs the timers that fall due, in order.
 * For tests of code that takes a {@link PoolClock}.
 */
export class ManualClock implements PoolClock {
  #now: number;
  #nextId = 1;
  #timers: ManualTimer[] = [];

  constructor(startMs = 0) {
    this.#now = startMs;
  }

  now(): number {
    return this.#now;
  }

  setTimeout(fn: () => void, ms: number): unknown {
    const timer = { id: this.#nextId++, at: this.#now + Math.max(0, ms), fn };
    this.#timers.push(timer);
    return timer.id;
  }

  clearTimeout(handle: unknown): void {
    this.#timers = this.#timers.filter((timer) => timer.id !== handle);
  }

  /** Timers not yet run or cleared. */
  get pendingTimers(): number {
    return this.#timers.length;
  }

  /** Move time forward by `ms`, running each timer that falls due at its own time. */
  advance(ms: number): void {
    const end = this.#now + ms;
    for (;;) {
      let next: ManualTimer | undefined;
      for (const timer of this.#timers) {
        if (
          timer.at <= end &&
          (next === undefined || timer.at < next.at || (timer.at === next.at && timer.id < next.id))
        ) {
          next = timer;
        }
      }
      if (next === undefined) break;
      this.#timers = this.#timers.filter((timer) => timer !== next);
      this.#now = Math.max(this.#now, next.at);
      next.fn();
    }
    this.#now = end;
  }
}
