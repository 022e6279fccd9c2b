/** What every command gets: output helpers and the cancellation signal (Ctrl-C). */
export interface Cli {
  /** Print a line to standard output. */
  out(text: string): void;
  /** Print a line to standard error, prefixed with `supermachine: `. */
  err(text: string): void;
  /** Print a line to standard error as it is: what a person or a script reads next to the output (published ports). */
  note(text: string): void;
  /** Aborted on SIGINT/SIGTERM. */
  readonly signal: AbortSignal;
}

/** An error of the CLI's own: print the one-line message, exit with `exitCode` (default 125). */
export class CliError extends Error {
  readonly exitCode: number;

  constructor(message: string, exitCode = 125) {
    super(message);
    this.name = new.target.name;
    this.exitCode = exitCode;
  }
}

/**
 * A mistake on the command line: exit 125. The CLI's own class (not the library's), so that
 * `--help` and bad flags never load the library.
 */
export class UsageError extends CliError {}

/**
 * The exit code for a failure with this error code, as docker's: 127 when the command is not
 * found, 126 when it cannot be run, 125 for every other error of supermachine's own.
 */
export function exitCodeFor(code: string | undefined): number {
  if (code === "EXEC_NOT_FOUND") return 127;
  if (code === "EXEC_START") return 126;
  return 125;
}

/** A positive integer option, or undefined when absent. */
export function positiveInt(value: string | undefined, flag: string): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!/^\d+$/.test(value) || !Number.isSafeInteger(n) || n <= 0)
    throw new UsageError(`${flag} expects a positive integer, got ${JSON.stringify(value)}`);
  return n;
}

/** `-e KEY=VALUE` options as an environment. */
export function envPairs(pairs: readonly string[]): Record<string, string> {
  const env: Record<string, string> = {};
  for (const pair of pairs) {
    const eq = pair.indexOf("=");
    if (eq <= 0) throw new UsageError(`-e expects KEY=VALUE, got ${JSON.stringify(pair)}`);
    env[pair.slice(0, eq)] = pair.slice(eq + 1);
  }
  return env;
}
