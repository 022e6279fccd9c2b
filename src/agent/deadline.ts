/**
 * Host-side deadlines of calls that wait on the guest agent (docs/protocol.md, "Host limits"): the
 * guest is untrusted, so no wait on it is unbounded. A deadline counts only time spent waiting on
 * the guest — not time the host's own consumer takes — and expiring resets the stream.
 */

import { AgentTimeoutError, SupermachineError } from "../errors.ts";
import type { StreamLink } from "./stream-link.ts";

/** Options every call that waits on the agent takes. */
export interface AgentCallOptions {
  signal?: AbortSignal | undefined;
  /** Longest wait on the guest agent, in milliseconds (default 30 000): then `AGENT_TIMEOUT`. */
  timeoutMs?: number | undefined;
}

/** Deadline of a call that waits on the agent when the caller gives no `timeoutMs`. */
export const DEFAULT_AGENT_TIMEOUT_MS = 30_000;
/** Deadline of `ping()`. */
export const DEFAULT_PING_TIMEOUT_MS = 10_000;

/** `timeoutMs` as given (a positive number of milliseconds) or the default. */
export function timeoutOption(timeoutMs: number | undefined, fallback = DEFAULT_AGENT_TIMEOUT_MS): number {
  if (timeoutMs === undefined) return fallback;
  if (typeof timeoutMs !== "number" || !(timeoutMs > 0) || !Number.isFinite(timeoutMs)) {
    throw new SupermachineError(
      "INVALID_ARGUMENT",
      `timeoutMs must be a positive number of milliseconds, got ${timeoutMs}`,
    );
  }
  return timeoutMs;
}

/**
 * The error of an expired deadline. It also marks `link`'s connection timed out: the guest kept the
 * host waiting, so what it is doing is unknown from then on (a VM counts as tainted).
 */
export function agentTimeout(
  link: Pick<StreamLink, "timedOut">,
  operation: string,
  timeoutMs: number,
): AgentTimeoutError {
  link.timedOut();
  return new AgentTimeoutError(
    `${operation}: the guest agent did not answer within ${timeoutMs} ms; pass a larger timeoutMs if the guest is busy`,
    { operation, timeoutMs },
  );
}

/** What the shared timer reads and does to a watchdog (set by the class's static block). */
let deadlineOf: (watchdog: Watchdog) => number;
let expire: (watchdog: Watchdog) => void;

/**
 * A timer that runs while the host waits on the guest ({@link arm}) and pauses while it does not
 * ({@link disarm}); {@link progress} restarts it. It calls `onExpire` once, after `timeoutMs`
 * armed without progress.
 *
 * Watchdogs share one Node timer ({@link deadlines}): arming, disarming and progress only note a
 * time, so a call that waits on the guest sets no timer of its own (an exec arms one per run, a
 * file stream restarts one per chunk).
 */
export class Watchdog {
  readonly timeoutMs: number;
  readonly #onExpire: () => void;
  /** When it expires (`performance.now()` milliseconds) while armed. */
  #deadline = 0;
  #armed = false;
  #stopped = false;

  constructor(timeoutMs: number, onExpire: () => void) {
    this.timeoutMs = timeoutMs;
    this.#onExpire = onExpire;
  }

  arm(): void {
    if (this.#armed || this.#stopped) return;
    this.#armed = true;
    this.#deadline = performance.now() + this.timeoutMs;
    deadlines.add(this, this.#deadline);
  }

  /** The guest made progress: if armed, the full `timeoutMs` starts over. */
  progress(): void {
    if (this.#armed) this.#deadline = performance.now() + this.timeoutMs;
  }

  disarm(): void {
    if (!this.#armed) return;
    this.#armed = false;
    deadlines.delete(this);
  }

  /** For good (the operation is over). */
  stop(): void {
    this.disarm();
    this.#stopped = true;
  }

  static {
    deadlineOf = (watchdog) => watchdog.#deadline;
    expire = (watchdog) => {
      watchdog.#armed = false;
      watchdog.#stopped = true;
      watchdog.#onExpire();
    };
  }
}

/**
 * The armed watchdogs and the one timer that checks them. The timer is due at the earliest
 * deadline it was asked for; a watchdog disarmed or pushed back meanwhile is looked at again then
 * (a wakeup at most once per timeout, not a timer per wait). It keeps the process alive only
 * while a watchdog is armed, as a timer of each would.
 */
class DeadlineTimer {
  readonly #armed = new Set<Watchdog>();
  #timer: ReturnType<typeof setTimeout> | undefined;
  /** When {@link #timer} fires (`performance.now()` milliseconds). */
  #timerAt = Number.POSITIVE_INFINITY;
  readonly #check = () => this.#fire();

  add(watchdog: Watchdog, deadline: number): void {
    this.#armed.add(watchdog);
    if (deadline < this.#timerAt) this.#schedule(deadline);
    else if (this.#armed.size === 1) this.#timer?.ref();
  }

  delete(watchdog: Watchdog): void {
    this.#armed.delete(watchdog);
    if (this.#armed.size === 0) this.#timer?.unref();
  }

  #schedule(at: number): void {
    if (this.#timer !== undefined) clearTimeout(this.#timer);
    this.#timerAt = at;
    this.#timer = setTimeout(this.#check, Math.max(1, Math.ceil(at - performance.now())));
  }

  #fire(): void {
    this.#timer = undefined;
    this.#timerAt = Number.POSITIVE_INFINITY;
    // Node starts a timer from the event loop's cached time, which can lag the clock by up to a
    // millisecond or so: a deadline less than one millisecond away counts as due.
    const now = performance.now() + 1;
    const due: Watchdog[] = [];
    let next = Number.POSITIVE_INFINITY;
    for (const watchdog of this.#armed) {
      const deadline = deadlineOf(watchdog);
      if (deadline <= now) due.push(watchdog);
      else if (deadline < next) next = deadline;
    }
    for (const watchdog of due) this.#armed.delete(watchdog);
    if (next !== Number.POSITIVE_INFINITY) this.#schedule(next);
    for (const watchdog of due) {
      try {
        expire(watchdog);
      } catch (error) {
        queueMicrotask(() => {
          throw error;
        });
      }
    }
  }
}

const deadlines = new DeadlineTimer();
