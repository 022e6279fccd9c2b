import { VmError } from "../errors.ts";

/** A malformed, oversized or unexpected frame or field from the peer (code `AGENT_PROTOCOL`). */
export function protocolError(message: string, options?: ErrorOptions): VmError {
  return new VmError("AGENT_PROTOCOL", `agent protocol violation: ${message}`, {}, options);
}

/** True for a `VmError` with code `AGENT_PROTOCOL`. */
export function isProtocolError(error: unknown): error is VmError {
  return error instanceof VmError && error.code === "AGENT_PROTOCOL";
}
