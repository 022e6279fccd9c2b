/**
 * Guest ports on the host: `vm.exposeTcp()` listens on a host address and carries every accepted
 * connection to a guest port through a tunnel over the agent channel (docs/network.md). Works on
 * VMs without a network device, and on restored clones. The listener is shared with the client
 * (src/internal/expose-tcp.ts).
 */

import {
  type ExposedPort,
  type ExposeTcpOptions,
  exposeTcp as forward,
  type GuestConnector,
  publish,
} from "../internal/index.ts";

export type { ExposedPort, ExposeTcpOptions } from "../internal/index.ts";

/**
 * How long an exposed port's connection may wait for the guest's connect. A guest server whose
 * listen backlog overflows under a burst drops SYNs, and the guest kernel retries them with
 * backoff for up to ~127 s before it answers ETIMEDOUT itself; a shorter deadline would cut off
 * connections a busy server accepts late.
 */
export const EXPOSED_CONNECT_TIMEOUT_MS = 150_000;

/** Listens on `host:hostPort` and forwards each connection to `guestPort` through `connect`. */
export async function exposeTcp(
  connect: GuestConnector,
  hostPort: number,
  guestPort: number,
  options: ExposeTcpOptions & { vmId: string },
): Promise<ExposedPort> {
  const { vmId, ...rest } = options;
  const exposed = await forward(connect, hostPort, guestPort, rest);
  publish("vm:port", { id: vmId, host: exposed.host, hostPort: exposed.hostPort, guestPort });
  return exposed;
}
