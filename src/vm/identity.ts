/**
 * A VM's own names: its hostname (default: its id, as docker names a container) and a fresh
 * `/etc/machine-id`, sent with every agent session so that clones of one snapshot never share them
 * (docs/snapshots.md, "Clones are independent").
 */
import { type GuestIdentity, HOSTNAME_PATTERN } from "../agent/index.ts";
import { SupermachineError } from "../errors.ts";
import { nodeCrypto } from "../internal/index.ts";

/** Checks a user's `hostname` option. */
export function checkHostname(hostname: unknown, what: string): void {
  if (hostname !== undefined && (typeof hostname !== "string" || !HOSTNAME_PATTERN.test(hostname))) {
    throw new SupermachineError(
      "INVALID_ARGUMENT",
      `${what} must be 1–64 letters, digits, "-" and ".", not starting with "-" or ".", got ${JSON.stringify(hostname)}`,
    );
  }
}

/** A new `/etc/machine-id` value. */
export function newMachineId(): string {
  return nodeCrypto().randomBytes(16).toString("hex");
}

/** The identity of the VM `vmId`: `hostname` or the id, and its machine id (default a new one). */
export function guestIdentity(
  vmId: string,
  hostname: string | undefined,
  machineId = newMachineId(),
): GuestIdentity {
  return { hostname: hostname ?? vmId, machineId };
}
