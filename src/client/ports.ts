/**
 * Guest ports through a server: `vm.connect(port)` is a `Duplex` over the server's TCP
 * WebSocket (backpressure both ways through the stream's flow control, half-close with `end`
 * messages); `vm.exposeTcp()` listens here and carries each connection that way.
 */

import { createServer, type Server, type Socket } from "node:net";
import { Duplex } from "node:stream";
import { RemoteError, SupermachineError } from "../errors.ts";
import type { ConnectTcpOptions, ExposedPort, ExposeTcpOptions } from "../index.ts";
import { errorFromWire, type StreamPeer, TCP_CHANNEL, type WireError } from "../wire/index.ts";
import type { FileSite } from "./fs.ts";

function checkPort(port: number, what: string, allowZero: boolean): void {
  if (!Number.isInteger(port) || port < (allowZero ? 0 : 1) || port > 65535) {
    throw new SupermachineError(
      "INVALID_ARGUMENT",
      `${what} must be an integer from ${allowZero ? 0 : 1} to 65535, got ${port}`,
    );
  }
}

/** A connection to `port` in the VM at `site`. A refused port rejects with `GuestIoError` `ECONNREFUSED`. */
export async function connectTcp(
  site: FileSite,
  port: number,
  options: ConnectTcpOptions = {},
): Promise<Duplex> {
  site.check?.();
  checkPort(port, "port", false);
  const endpoint = site.endpoint;
  const connected = Promise.withResolvers<void>();
  let isConnected = false;
  let wantMore: (() => void) | undefined;
  let peer: StreamPeer | undefined;
  const duplex = new Duplex({
    allowHalfOpen: true,
    read: () => {
      const wake = wantMore;
      wantMore = undefined;
      wake?.();
    },
    write: (chunk: Uint8Array, _encoding, callback) => {
      peer!.sendData(TCP_CHANNEL, chunk).then(
        () => callback(),
        () => callback(new RemoteError("SERVER_UNAVAILABLE", `the tunnel to guest port ${port} is closed`)),
      );
    },
    final: (callback) => {
      peer!.sendControl({ type: "end" });
      callback();
    },
    destroy: (error, callback) => {
      peer?.close(1000, "closed");
      const wake = wantMore;
      wantMore = undefined;
      wake?.();
      callback(error);
    },
  });
  peer = await endpoint.openStream(
    `${site.path}/ports/${port}/tcp`,
    undefined,
    {
      control: (message) => {
        if (message.type === "connected") {
          isConnected = true;
          connected.resolve();
        } else if (message.type === "end") duplex.push(null);
        else if (message.type === "error") {
          const error = errorFromWire(message.error as WireError, { endpoint: endpoint.url });
          // Before the connection: the caller gets the error; after: the stream fails with it.
          if (isConnected) duplex.destroy(error);
          else connected.reject(error);
        }
      },
      data: async (_channel, bytes) => {
        if (duplex.destroyed) return;
        if (!duplex.push(bytes)) await new Promise<void>((resolve) => (wantMore = resolve));
      },
    },
    () => endpoint.json("GET", site.path),
    options.signal,
  );
  void peer.ended.then(({ code }) => {
    connected.reject(
      new RemoteError("SERVER_UNAVAILABLE", `the tunnel to guest port ${port} closed (${code})`, {
        endpoint: endpoint.url,
      }),
    );
    if (!isConnected || duplex.destroyed) {
      duplex.destroy();
      return;
    }
    // The tunnel is gone: what was received is still read, then the stream ends both ways.
    if (duplex.readableEnded) duplex.destroy();
    else {
      duplex.once("end", () => duplex.destroy());
      duplex.push(null);
    }
  });
  await connected.promise;
  return duplex;
}

/** Carries bytes both ways with backpressure and half-close; a failure on one side ends both. */
function splice(a: Duplex, b: Duplex): void {
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

/** Listens on this host and forwards each connection to `guestPort` through `connect`. */
export async function exposeTcp(
  connect: (guestPort: number) => Promise<Duplex>,
  hostPort: number,
  guestPort: number,
  options: ExposeTcpOptions = {},
): Promise<ExposedPort> {
  checkPort(hostPort, "hostPort", true);
  checkPort(guestPort, "guestPort", false);
  const host = options.host ?? "127.0.0.1";
  const maxConnections = options.maxConnections ?? 1024;
  const sockets = new Set<Socket>();
  const server: Server = createServer({ allowHalfOpen: true, pauseOnConnect: true }, (socket) => {
    if (sockets.size >= maxConnections) {
      socket.destroy();
      return;
    }
    sockets.add(socket);
    socket.once("close", () => sockets.delete(socket));
    socket.on("error", () => {});
    connect(guestPort).then(
      (tunnel) => {
        if (socket.destroyed) {
          tunnel.destroy();
          return;
        }
        tunnel.on("error", () => {});
        splice(socket, tunnel);
        socket.resume();
      },
      () => socket.destroy(),
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
