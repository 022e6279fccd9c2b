/**
 * Guest ports on this host: `vm.exposeTcp()` of the library and of the client listen on a host
 * address and carry every accepted connection to a guest port through a tunnel the caller opens
 * (the agent channel, docs/network.md; or a server's TCP WebSocket, docs/server.md).
 */

import { createServer, type Server, type Socket } from "node:net";
import type { Duplex } from "node:stream";
import { SupermachineError } from "../errors.ts";
import { debug } from "./diagnostics.ts";

/** Options of `vm.exposeTcp()`. */
export interface ExposeTcpOptions {
  /** Host address to listen on. Default `127.0.0.1` (never all interfaces unless asked). */
  host?: string;
  /** Most connections carried at once; more are refused (closed) on accept. Default 1024. */
  maxConnections?: number;
}

/** A host listener forwarding to a guest port. Close it with {@link close} or `await using`; it also closes with its VM. */
export interface ExposedPort extends AsyncDisposable {
  /** The address the listener is bound to. */
  readonly host: string;
  /** The host port (the one chosen by the system when 0 was asked for). */
  readonly hostPort: number;
  readonly guestPort: number;
  /** Connections being carried now. */
  readonly connections: number;
  /** Stop listening and end every connection. Idempotent. */
  close(): Promise<void>;
}

/** Opens one tunnel to a guest port. */
export type GuestConnector = (guestPort: number) => Promise<Duplex>;

/** Throws `INVALID_ARGUMENT` unless `port` is a TCP port (or 0, "any free one", with `allowZero`). */
export function checkPort(port: number, what: string, allowZero: boolean): void {
  if (!Number.isInteger(port) || port < (allowZero ? 0 : 1) || port > 65535) {
    throw new SupermachineError(
      "INVALID_ARGUMENT",
      `${what} must be an integer from ${allowZero ? 0 : 1} to 65535, got ${port}`,
    );
  }
}

/**
 * Guest connects in progress at once per exposed port; more wait for one to finish. The tunnel
 * makes every host connection a connect inside the guest at once, with no network to spread them:
 * a burst overflows a small listen backlog (busybox httpd's is 9), the guest kernel drops the
 * handshake's last ACK, and about a minute later resets a connection its client already uses.
 */
const MAX_PENDING_CONNECTS = 8;

/** Listens on `host:hostPort` and forwards each connection to `guestPort` through `connect`. */
export async function exposeTcp(
  connect: GuestConnector,
  hostPort: number,
  guestPort: number,
  options: ExposeTcpOptions = {},
): Promise<ExposedPort> {
  checkPort(hostPort, "hostPort", true);
  checkPort(guestPort, "guestPort", false);
  const host = options.host ?? "127.0.0.1";
  const maxConnections = options.maxConnections ?? 1024;
  const sockets = new Set<Socket>();
  let pending = 0;
  const waiting: (() => void)[] = [];
  const connectInTurn = async (socket: Socket): Promise<Duplex | undefined> => {
    while (pending >= MAX_PENDING_CONNECTS) await new Promise<void>((resolve) => waiting.push(resolve));
    if (socket.destroyed) {
      waiting.shift()?.(); // its turn passes to the next
      return undefined;
    }
    pending++;
    try {
      return await connect(guestPort);
    } finally {
      pending--;
      waiting.shift()?.();
    }
  };
  const server: Server = createServer({ allowHalfOpen: true, pauseOnConnect: true }, (socket) => {
    if (sockets.size >= maxConnections) {
      socket.destroy();
      return;
    }
    sockets.add(socket);
    socket.once("close", () => sockets.delete(socket));
    socket.on("error", (error) => debug("exposeTcp %s:%d: %s", host, port, error.message));
    connectInTurn(socket).then(
      (tunnel) => {
        if (tunnel === undefined) return;
        if (socket.destroyed) {
          tunnel.destroy();
          return;
        }
        tunnel.on("error", (error: Error) =>
          debug("exposeTcp %s:%d → guest %d: %s", host, port, guestPort, error.message),
        );
        splice(socket, tunnel);
        socket.resume();
      },
      (error: Error) => {
        debug("exposeTcp %s:%d → guest %d: %s", host, port, guestPort, error.message);
        socket.destroy();
      },
    );
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", (error: NodeJS.ErrnoException) =>
      reject(
        new SupermachineError(
          "INVALID_ARGUMENT",
          `cannot listen on ${host}:${hostPort} for guest port ${guestPort} (${error.code}): choose another host port, or 0 for any free one`,
          { cause: error },
        ),
      ),
    );
    server.listen({ host, port: hostPort }, () => resolve());
  });
  const address = server.address();
  const port = typeof address === "object" && address !== null ? address.port : hostPort;
  let closing: Promise<void> | undefined;
  const exposed: ExposedPort = {
    host,
    hostPort: port,
    guestPort,
    get connections() {
      return sockets.size;
    },
    close() {
      closing ??= new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const socket of sockets) socket.destroy();
      });
      return closing;
    },
    async [Symbol.asyncDispose]() {
      await exposed.close();
    },
  };
  return exposed;
}

/**
 * Carries bytes both ways with backpressure (a slow reader on either side pauses the other) and
 * half-close (an end on one side ends the other's writing side only). A side that fails, or
 * closes without ending its data, takes the other down with it.
 */
export function splice(a: Duplex, b: Duplex): void {
  a.pipe(b);
  b.pipe(a);
  const destroyBoth = (error?: Error) => {
    a.destroy(error);
    b.destroy(error);
  };
  a.once("error", destroyBoth);
  b.once("error", destroyBoth);
  a.once("close", () => {
    if (!a.readableEnded) b.destroy();
  });
  b.once("close", () => {
    if (!b.readableEnded) a.destroy();
  });
}
