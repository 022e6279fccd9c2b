/**
 * The servers a client talks to. New work (an acquire, a VM) goes to the next server in turn
 * that is up; a server that cannot be reached is skipped for a while, so one server's loss moves
 * new work to the others. Everything the client makes is tracked, so that `close()` ends it.
 */

import { RemoteError, SupermachineError } from "../errors.ts";
import type { Endpoint } from "./endpoint.ts";

/** Something `client.close()` ends. */
export interface Owned {
  close(): Promise<void>;
}

export class Cluster {
  readonly endpoints: readonly Endpoint[];
  #next = 0;
  readonly #owned = new Set<Owned>();

  constructor(endpoints: readonly Endpoint[]) {
    this.endpoints = endpoints;
  }

  /** `among` (default: all) in the order to try: starting after the last one used, those up first. */
  order(among: readonly Endpoint[] = this.endpoints): Endpoint[] {
    const start = this.#next++ % Math.max(1, among.length);
    const turn = [...among.slice(start), ...among.slice(0, start)];
    return [...turn.filter((e) => e.up), ...turn.filter((e) => !e.up)];
  }

  /**
   * `fn` on the first endpoint of `among` that can do it: a server that cannot be reached (or is
   * draining, or full) is passed over for the next. Rejects with the last error when none could.
   */
  async first<T>(among: readonly Endpoint[], fn: (endpoint: Endpoint) => Promise<T>): Promise<T> {
    let last: unknown = new RemoteError("SERVER_UNAVAILABLE", "no server to send the request to");
    for (const endpoint of this.order(among)) {
      try {
        return await fn(endpoint);
      } catch (error) {
        if (!passOver(error)) throw error;
        last = error;
      }
    }
    throw last;
  }

  /**
   * `fn` on every endpoint of `among` at once; the ones that could not (unreachable, full, or
   * `NOT_FOUND`), passed over. Rejects when none could, or one failed otherwise (then `undo`
   * runs for what was done).
   */
  async each<T>(
    among: readonly Endpoint[],
    fn: (endpoint: Endpoint) => Promise<T>,
    undo?: (endpoint: Endpoint, value: T) => Promise<unknown>,
  ): Promise<{ endpoint: Endpoint; value: T }[]> {
    const results = await Promise.allSettled(
      among.map(async (endpoint) => ({ endpoint, value: await fn(endpoint) })),
    );
    const done = results.flatMap((r) => (r.status === "fulfilled" ? [r.value] : []));
    const failures = results.flatMap((r) => (r.status === "rejected" ? [r.reason as unknown] : []));
    const fatal = failures.find((error) => !passOver(error));
    if (done.length === 0 || (fatal !== undefined && !SupermachineError.is(fatal, "NOT_FOUND"))) {
      if (undo !== undefined)
        await Promise.allSettled(done.map(({ endpoint, value }) => undo(endpoint, value)));
      throw fatal ?? failures[0];
    }
    return done;
  }

  track(owned: Owned): () => void {
    this.#owned.add(owned);
    return () => this.#owned.delete(owned);
  }

  async close(): Promise<void> {
    const owned = [...this.#owned];
    this.#owned.clear();
    await Promise.allSettled(owned.map((o) => o.close()));
  }
}

/** Errors after which another server may do what this one could not. */
function passOver(error: unknown): boolean {
  return SupermachineError.is(error, "SERVER_UNAVAILABLE") || SupermachineError.is(error, "LIMIT_EXCEEDED");
}
