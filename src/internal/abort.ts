import { AbortError } from "../errors.ts";

/** Throws a typed {@link AbortError} if `signal` is aborted. */
export function throwIfAborted(signal: AbortSignal | undefined, what = "operation"): void {
  if (signal?.aborted) throw new AbortError(`${what} aborted`, { cause: signal.reason });
}

/**
 * Races `promise` against `signal`. The promise keeps running when the signal fires; the caller
 * cleans up whatever it started.
 */
export function raceAbort<T>(
  promise: Promise<T>,
  signal: AbortSignal | undefined,
  what = "operation",
): Promise<T> {
  if (!signal) return promise;
  throwIfAborted(signal, what);
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(new AbortError(`${what} aborted`, { cause: signal.reason }));
    signal.addEventListener("abort", onAbort, { once: true });
    promise.then(
      (value) => {
        signal.removeEventListener("abort", onAbort);
        resolve(value);
      },
      (error: unknown) => {
        signal.removeEventListener("abort", onAbort);
        reject(error);
      },
    );
  });
}

/** Maps an error caused by `signal` firing (Node's `AbortError`, the signal's reason) to ours. */
export function mapAbort(err: unknown, signal: AbortSignal | undefined, what: string): unknown {
  if (signal?.aborted && !(err instanceof AbortError))
    return new AbortError(`${what} aborted`, { cause: signal.reason });
  return err;
}
