/** What every command gets: output helpers and the cancellation signal (Ctrl-C). */
export interface Cli {
  /** Print a line to standard output. */
  out(text: string): void;
  /** Print a line to standard error, prefixed with `supermachine: `. */
  err(text: string): void;
  /** Aborted on SIGINT/SIGTERM. */
  readonly signal: AbortSignal;
}
