/** An exec's outcome on the wire: the library's `ExecOutcome` fields, output as base64. */

import type { ExecOutcome } from "../errors.ts";
import { ExecOutcomeRecord } from "../internal/index.ts";
import { fromBase64, toBase64 } from "./base64.ts";

export interface WireOutcome {
  argv: string[];
  exitCode: number | null;
  signal: string | null;
  timedOut: boolean;
  durationMs: number;
  peakRssKiB: number;
  step: number;
  /** base64 */
  stdout: string;
  /** base64 */
  stderr: string;
}

export function outcomeToWire(outcome: ExecOutcome): WireOutcome {
  return {
    argv: [...outcome.argv],
    exitCode: outcome.exitCode,
    signal: outcome.signal,
    timedOut: outcome.timedOut,
    durationMs: outcome.durationMs,
    peakRssKiB: outcome.peakRssKiB,
    step: outcome.step,
    stdout: toBase64(outcome.stdout),
    stderr: toBase64(outcome.stderr),
  };
}

/** The outcome a wire outcome describes (missing or mistyped fields read as empty). */
export function outcomeFromWire(wire: Partial<WireOutcome> | undefined): ExecOutcome {
  const w = wire ?? {};
  return new ExecOutcomeRecord({
    argv: Array.isArray(w.argv) ? w.argv.filter((a) => typeof a === "string") : [],
    exitCode: typeof w.exitCode === "number" ? w.exitCode : null,
    signal: typeof w.signal === "string" ? w.signal : null,
    timedOut: w.timedOut === true,
    durationMs: typeof w.durationMs === "number" ? w.durationMs : 0,
    peakRssKiB: typeof w.peakRssKiB === "number" ? w.peakRssKiB : 0,
    step: typeof w.step === "number" ? w.step : 0,
    stdout: fromBase64(typeof w.stdout === "string" ? w.stdout : ""),
    stderr: fromBase64(typeof w.stderr === "string" ? w.stderr : ""),
  });
}
