/**
 * Node built-ins that a command which neither pulls nor runs a VM never needs, loaded on first
 * use: importing them with the library cost ~15–25 ms of every CLI start that loads it
 * (`node:crypto` alone ~8 ms; docs/cli.md, start time); and the one way to yield to the event loop.
 */
import { createRequire } from "node:module";
import { once } from "./memo.ts";

const load = createRequire(import.meta.url);

/** `node:crypto`. */
export const nodeCrypto = once(() => load("node:crypto") as typeof import("node:crypto"));

/** `node:zlib`. */
export const nodeZlib = once(() => load("node:zlib") as typeof import("node:zlib"));

/** `node:dns/promises`. */
export const nodeDns = once(() => load("node:dns/promises") as typeof import("node:dns/promises"));

/** Resolves on the event loop's next turn (after pending I/O and the reactions already due). */
export function yieldToLoop(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}
