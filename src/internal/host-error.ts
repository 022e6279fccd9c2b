import { AbortError, SupermachineError, VmError } from "../errors.ts";

/**
 * An error from the host (a Node system error such as ENOENT, EACCES or ENOSPC, or anything else
 * that is not ours) as a typed error that says what failed; supermachine's own errors pass
 * through. `STORE_ERROR` for the data dir and files the user named, `VMM_FAILED` for a VM's
 * runtime files.
 */
export function hostError(error: unknown, code: "STORE_ERROR" | "VMM_FAILED", what: string): Error {
  if (error instanceof SupermachineError) return error;
  const cause = error as NodeJS.ErrnoException;
  if (cause?.name === "AbortError") return new AbortError(`${what} aborted`, { cause });
  const message = `${what} failed: ${cause?.message ?? String(error)}`;
  return code === "VMM_FAILED"
    ? new VmError("VMM_FAILED", message, {}, { cause })
    : new SupermachineError("STORE_ERROR", message, { cause });
}

/** Runs `fn`; whatever it throws leaves as a typed error (see {@link hostError}). */
export async function typedErrors<T>(
  code: "STORE_ERROR" | "VMM_FAILED",
  what: string,
  fn: () => Promise<T>,
): Promise<T> {
  try {
    return await fn();
  } catch (error) {
    throw hostError(error, code, what);
  }
}
