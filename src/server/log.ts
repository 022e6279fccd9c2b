/** Structured logs: one JSON object per line (`time`, `level`, `msg`, then fields). */

import type { Writable } from "node:stream";

export type LogLevel = "debug" | "info" | "warn" | "error";

export type LogFn = (level: LogLevel, msg: string, fields?: Record<string, unknown>) => void;

/** A logger writing JSON lines to `out`; `debug` lines only when `verbose`. */
export function jsonLogger(out: Writable, verbose = false): LogFn {
  return (level, msg, fields = {}) => {
    if (level === "debug" && !verbose) return;
    out.write(`${JSON.stringify({ time: new Date().toISOString(), level, msg, ...fields })}\n`);
  };
}
