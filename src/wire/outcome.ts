/** An exec's outcome on the wire: the library's `ExecOutcome` fields, output as base64. */

import type { ExecOutcome } from "../errors.ts";
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
  return new RemoteOutcome({
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

type OutcomeFields = Omit<ExecOutcome, "ok" | "stdoutText" | "stderrText" | "describe">;

/** An {@link ExecOutcome} received from a server; behaves like the library's own. */
export class RemoteOutcome implements ExecOutcome {
  readonly argv: readonly string[];
  readonly exitCode: number | null;
  readonly signal: string | null;
  readonly timedOut: boolean;
  readonly durationMs: number;
  readonly peakRssKiB: number;
  readonly stdout: Uint8Array;
  readonly stderr: Uint8Array;
  readonly step: number;
  #stdoutText: string | undefined;
  #stderrText: string | undefined;

  constructor(fields: OutcomeFields) {
    this.argv = Object.freeze([...fields.argv]);
    this.exitCode = fields.exitCode;
    this.signal = fields.signal;
    this.timedOut = fields.timedOut;
    this.durationMs = fields.durationMs;
    this.peakRssKiB = fields.peakRssKiB;
    this.stdout = fields.stdout;
    this.stderr = fields.stderr;
    this.step = fields.step;
  }

  get ok(): boolean {
    return this.exitCode === 0 && !this.timedOut;
  }

  get stdoutText(): string {
    this.#stdoutText ??= new TextDecoder().decode(this.stdout);
    return this.#stdoutText;
  }

  get stderrText(): string {
    this.#stderrText ??= new TextDecoder().decode(this.stderr);
    return this.#stderrText;
  }

  describe(): string {
    if (this.timedOut) return `timed out and was killed${this.signal ? ` (${this.signal})` : ""}`;
    if (this.signal !== null) return `was killed by ${this.signal}`;
    return `exited with code ${this.exitCode}`;
  }
}
