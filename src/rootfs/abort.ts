import { AbortError, SupermachineError } from "../errors.ts";

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

/**
 * The error a build reports: ours as they are, an abort as `ABORTED`, anything else (a host I/O
 * error: disk full, permission denied, a file that vanished) as `ROOTFS_BUILD` with the cause.
 */
export function buildError(err: unknown, signal: AbortSignal | undefined, what: string): unknown {
  const mapped = mapAbort(err, signal, what);
  if (SupermachineError.is(mapped)) return mapped;
  const message = mapped instanceof Error ? mapped.message : String(mapped);
  return new SupermachineError("ROOTFS_BUILD", `${what} failed: ${message}`, { cause: mapped });
}
