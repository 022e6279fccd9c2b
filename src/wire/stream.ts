/**
 * Streams over a WebSocket: an exec's stdin/stdout/stderr (`/v1/vms/{id}/exec`) and a raw
 * TCP tunnel to a guest port (`/v1/vms/{id}/ports/{port}/tcp`). docs/server.md describes them.
 *
 * - Binary messages carry data: one byte of channel ({@link CHANNEL}), then the bytes.
 * - Text messages are JSON control messages ({@link ClientMessage}, {@link ServerMessage}).
 * - Flow control is our own, the same both ways and on any WebSocket implementation: a side may
 *   have at most {@link WINDOW_BYTES} of data sent and not yet credited back; the receiver sends
 *   `{ type: "credit", bytes }` as its consumer takes the data. A peer that sends past its window
 *   broke the protocol and is disconnected (close code 1008), so neither side ever holds more
 *   than one window per stream for a slow or hostile peer.
 */

import type { WireError } from "./errors.ts";
import type { WireExecOptions } from "./exec-options.ts";
import type { WireOutcome } from "./outcome.ts";

/** Most data a side may have in flight (sent, not yet credited). */
export const WINDOW_BYTES = 1024 * 1024;
/** Largest data message payload a side sends. */
export const MAX_CHUNK_BYTES = 64 * 1024;
/** Close codes: normal end, and a peer that broke this protocol. */
export const CLOSE_NORMAL = 1000;
export const CLOSE_PROTOCOL = 1008;

/** Data channels (the first byte of a binary message). */
export const CHANNEL = { stdin: 0, stdout: 1, stderr: 2 } as const;
/** TCP tunnels carry their bytes on one channel both ways. */
export const TCP_CHANNEL = 0;

export type ClientMessage =
  | { type: "start"; argv: string[]; options: WireExecOptions }
  | { type: "stdin-end" }
  | { type: "resize"; rows: number; cols: number }
  | { type: "signal"; signal: string | number }
  | { type: "credit"; bytes: number }
  | { type: "end" };

export type ServerMessage =
  | { type: "started"; pid: number }
  | { type: "exit"; exitCode: number | null; signal: string | null; outcome: WireOutcome }
  | { type: "error"; error: WireError }
  | { type: "connected" }
  | { type: "credit"; bytes: number }
  | { type: "end" };

/** A data message: `channel` then `data`. */
export function encodeData(channel: number, data: Uint8Array): Uint8Array {
  const out = new Uint8Array(data.length + 1);
  out[0] = channel;
  out.set(data, 1);
  return out;
}

/** The channel and bytes of a data message (a view, no copy), or undefined when it is empty. */
export function decodeData(message: Uint8Array): { channel: number; data: Uint8Array } | undefined {
  if (message.length === 0) return undefined;
  return { channel: message[0]!, data: message.subarray(1) };
}

/** Parses a control message: an object with a string `type`, or undefined. */
export function parseControl(text: string): ({ type: string } & Record<string, unknown>) | undefined {
  try {
    const value: unknown = JSON.parse(text);
    if (
      typeof value === "object" &&
      value !== null &&
      typeof (value as { type?: unknown }).type === "string"
    ) {
      return value as { type: string } & Record<string, unknown>;
    }
  } catch {}
  return undefined;
}

/**
 * The sending side of one direction: {@link reserve} waits until `n` more bytes fit in the window,
 * {@link credit} is called for each credit message. A chunk larger than the window waits for an
 * empty window.
 */
export class SendWindow {
  #inFlight = 0;
  #waiters: { need: number; resolve: () => void; reject: (error: Error) => void }[] = [];
  #failure: Error | undefined;

  async reserve(n: number): Promise<void> {
    if (this.#failure) throw this.#failure;
    if (this.#fits(n) && this.#waiters.length === 0) {
      this.#inFlight += n;
      return;
    }
    await new Promise<void>((resolve, reject) => this.#waiters.push({ need: n, resolve, reject }));
  }

  /** Returns false for a credit the peer had no right to give (more than is in flight). */
  credit(bytes: unknown): boolean {
    if (typeof bytes !== "number" || !Number.isSafeInteger(bytes) || bytes <= 0 || bytes > this.#inFlight) {
      return false;
    }
    this.#inFlight -= bytes;
    while (this.#waiters.length > 0 && this.#fits(this.#waiters[0]!.need)) {
      const waiter = this.#waiters.shift()!;
      this.#inFlight += waiter.need;
      waiter.resolve();
    }
    return true;
  }

  /** Every waiting and later `reserve` rejects with `error`. */
  fail(error: Error): void {
    this.#failure ??= error;
    for (const waiter of this.#waiters.splice(0)) waiter.reject(this.#failure);
  }

  #fits(n: number): boolean {
    return this.#inFlight === 0 || this.#inFlight + n <= WINDOW_BYTES;
  }
}

/**
 * The receiving side of one direction: {@link received} for each data message (false: the peer
 * overran its window), {@link consumed} when the consumer took bytes; it returns the credit to
 * send, in batches of a quarter window so that credits cost few messages.
 */
export class ReceiveWindow {
  #held = 0;
  #uncredited = 0;

  received(n: number): boolean {
    this.#held += n;
    this.#uncredited += n;
    return this.#uncredited <= WINDOW_BYTES + MAX_CHUNK_BYTES;
  }

  /** Bytes to credit back now (0: not yet). */
  consumed(n: number): number {
    this.#held -= n;
    const settled = this.#uncredited - this.#held;
    if (settled < WINDOW_BYTES / 4 && this.#held > 0) return 0;
    if (settled <= 0) return 0;
    this.#uncredited -= settled;
    return settled;
  }
}
