import { AbortError } from "../errors.ts";

/** Throws the library's `AbortError` (code `ABORTED`) when `signal` has fired. */
export function throwIfAborted(signal: AbortSignal | undefined, what: string): void {
  if (signal?.aborted) throw new AbortError(`${what} aborted`, { cause: signal.reason });
}

/** Maps an error caused by `signal` firing (Node's `AbortError`, the signal's reason) to ours. */
export function mapAbort(err: unknown, signal: AbortSignal | undefined, what: string): unknown {
  if (signal?.aborted && !(err instanceof AbortError))
    return new AbortError(`${what} aborted`, { cause: signal.reason });
  return err;
}
