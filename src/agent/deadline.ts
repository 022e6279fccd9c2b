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

/**
 * A timer that runs while the host waits on the guest ({@link arm}) and pauses while it does not
 * ({@link disarm}); {@link progress} restarts it. It calls `onExpire` once, after `timeoutMs`
 * armed without progress.
 */
export class Watchdog {
  readonly timeoutMs: number;
  readonly #onExpire: () => void;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #stopped = false;

  constructor(timeoutMs: number, onExpire: () => void) {
    this.timeoutMs = timeoutMs;
    this.#onExpire = onExpire;
  }

  arm(): void {
    if (this.#timer !== undefined || this.#stopped) return;
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      this.#stopped = true;
      this.#onExpire();
    }, this.timeoutMs);
  }

  /** The guest made progress: if armed, the full `timeoutMs` starts over. */
  progress(): void {
    if (this.#timer === undefined) return;
    this.disarm();
    this.arm();
  }

  disarm(): void {
    if (this.#timer === undefined) return;
    clearTimeout(this.#timer);
    this.#timer = undefined;
  }

  /** For good (the operation is over). */
  stop(): void {
    this.disarm();
    this.#stopped = true;
  }
}
