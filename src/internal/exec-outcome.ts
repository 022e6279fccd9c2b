import type { ExecOutcome } from "../errors.ts";

/** What an {@link ExecOutcomeRecord} is made from: the {@link ExecOutcome} fields, without the derived ones. */
export type ExecOutcomeInit = Omit<ExecOutcome, "ok" | "stdoutText" | "stderrText" | "describe">;

/**
 * The {@link ExecOutcome} the library and the client hand out (its docs are on the interface):
 * the library makes it from the agent's exit, the client from a server's JSON.
 */
export class ExecOutcomeRecord implements ExecOutcome {
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

  constructor(init: ExecOutcomeInit) {
    this.argv = Object.freeze([...init.argv]);
    this.exitCode = init.exitCode;
    this.signal = init.signal;
    this.timedOut = init.timedOut;
    this.durationMs = init.durationMs;
    this.peakRssKiB = init.peakRssKiB;
    this.stdout = init.stdout;
    this.stderr = init.stderr;
    this.step = init.step;
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
