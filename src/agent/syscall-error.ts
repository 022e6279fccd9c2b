import { GuestIoError, guestErrnoCode } from "../errors.ts";
import { type AgentErrorMessage, agentErrorCodeName } from "./messages.ts";

/** Where a failed guest system call was aimed, for {@link syscallError}. */
export interface SyscallTarget {
  /** Node-style name of the call: `stat`, `mkdir`, `scandir`, `connect`, `read`, ... */
  syscall: string;
  path: string;
  dest?: string | undefined;
  address?: string | undefined;
  port?: number | undefined;
}

/**
 * The agent's `ERROR` for a file-system or socket operation as a {@link GuestIoError} whose `code`
 * is the errno's name (`ENOENT`), like Node's `fs` and `net` errors; `GUEST_IO` when the agent
 * gave no errno this library knows.
 */
export function syscallError(m: AgentErrorMessage, target: SyscallTarget): GuestIoError {
  const code = guestErrnoCode(m.errno);
  const what = code ?? agentErrorCodeName(m.code);
  const where = target.dest === undefined ? target.path : `${target.path} -> ${target.dest}`;
  const detail = m.message ? ` (${m.message})` : "";
  return new GuestIoError(`${what}: ${target.syscall} ${where} failed in the guest${detail}`, {
    ...target,
    errno: m.errno,
    code: code ?? "GUEST_IO",
  });
}
