/**
 * Guest ports through a server: `vm.connect(port)` is a `Duplex` over the server's TCP
 * WebSocket (backpressure both ways through the stream's flow control, half-close with `end`
 * messages); `vm.exposeTcp()` listens here (the library's listener, src/internal/expose-tcp.ts)
 * and carries each connection that way.
 */

import { Duplex } from "node:stream";
import { RemoteError } from "../errors.ts";
import type { ConnectTcpOptions } from "../index.ts";
import { checkPort } from "../internal/index.ts";
import { errorFromWire, type StreamPeer, TCP_CHANNEL, type WireError } from "../wire/index.ts";
import type { FileSite } from "./fs.ts";

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
