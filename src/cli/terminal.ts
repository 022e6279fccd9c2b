/** The local end of a command's standard streams: raw mode and resizes for -t, exit codes. */
import { constants } from "node:os";

/**
 * With `tty`: puts our terminal in raw mode (Ctrl-C and every other key go to the guest as bytes)
 * and reports its size changes. Returns what undoes it.
 */
export function attachTerminal(tty: boolean, onResize: (rows: number, cols: number) => void): () => void {
  if (!tty) return () => {};
  process.stdin.setRawMode(true);
  const resize = () => onResize(process.stdout.rows, process.stdout.columns);
  process.stdout.on("resize", resize);
  return () => {
    process.stdout.off("resize", resize);
    process.stdin.setRawMode(false);
  };
}

/** Our terminal's size, for a command started with -t. */
export function terminalSize(): { rows: number; cols: number } {
  return { rows: process.stdout.rows || 24, cols: process.stdout.columns || 80 };
}

/** Writes to our stdout/stderr, waiting while it is full (backpressure reaches the guest). */
export function write(stream: NodeJS.WriteStream, data: Uint8Array): Promise<void> {
  return new Promise((resolve, reject) => {
    stream.write(data, (error) => (error ? reject(error) : resolve()));
  });
}

/** A command's exit status as a shell's: its code, or 128 + N when signal N killed it. */
export function shellExitCode(exitCode: number | null, signal: string | null): number {
  if (exitCode !== null) return exitCode;
  const signals = constants.signals as Readonly<Record<string, number>>;
  return 128 + ((signal !== null && signals[signal]) || 0);
}
