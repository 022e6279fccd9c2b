import { VmError } from "../errors.ts";

/**
 * A malformed or oversized 9P message from the guest (code `AGENT_PROTOCOL`). It ends the mount
 * that carried it; the host process carries on.
 */
export function ninepProtocolError(message: string, options?: ErrorOptions): VmError {
  return new VmError("AGENT_PROTOCOL", `9P protocol violation: ${message}`, {}, options);
}
