/** A {@link StreamPeer} over a `ws` WebSocket (the server's side of a stream). */

import type { WebSocket } from "ws";
import { type PeerHandlers, StreamPeer } from "../wire/index.ts";

export function peerOf(ws: WebSocket, handlers: PeerHandlers): StreamPeer {
  const peer = new StreamPeer(
    {
      send: (message) => ws.send(message),
      close: (code, reason) => ws.close(code, reason),
    },
    handlers,
  );
  ws.on("message", (data: Buffer, isBinary: boolean) =>
    peer.receive(isBinary ? data : data.toString("utf8")),
  );
  ws.on("close", (code: number, reason: Buffer) => peer.closed(code, reason.toString("utf8")));
  return peer;
}
