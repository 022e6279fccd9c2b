/**
 * Guest ports: an HTTP reverse proxy to a guest port (`/v1/vms/{id}/ports/{port}/http/…`) and raw
 * TCP over a WebSocket (`/v1/vms/{id}/ports/{port}/tcp`), both through `vm.connect(port)`: the
 * agent's tunnel, so they work without a guest network device and under every network policy.
 */

import { request as httpRequest, type IncomingHttpHeaders, type OutgoingHttpHeaders } from "node:http";
import type { Duplex } from "node:stream";
import { pipeline } from "node:stream/promises";
import { CLOSE_NORMAL, TCP_CHANNEL } from "../wire/index.ts";
import { sendStreamError } from "./exec-routes.ts";
import { invalid } from "./http.ts";
import type { RequestContext, StreamContext } from "./router.ts";
import { peerOf } from "./ws-peer.ts";

/** Headers of one hop only (RFC 9110 §7.6.1), and our own credentials: never forwarded. */
const HOP_BY_HOP = new Set([
  "connection",
  "keep-alive",
  "proxy-authenticate",
  "proxy-authorization",
  "proxy-connection",
  "te",
  "trailer",
  "transfer-encoding",
  "upgrade",
  "authorization",
  "host",
]);

function forwardable(headers: IncomingHttpHeaders): OutgoingHttpHeaders {
  const named = new Set(
    String(headers.connection ?? "")
      .split(",")
      .map((name) => name.trim().toLowerCase()),
  );
  const out: OutgoingHttpHeaders = {};
  for (const [name, value] of Object.entries(headers)) {
    if (value !== undefined && !HOP_BY_HOP.has(name) && !named.has(name)) out[name] = value;
  }
  return out;
}

/** `* /v1/vms/{id}/ports/{port}/http/{rest*}`: the request, forwarded to the guest port as HTTP/1.1. */
export async function proxyHttp(ctx: RequestContext): Promise<void> {
  const port = Number(ctx.params.port);
  const path = `/${ctx.params.rest ?? ""}${ctx.url.search}`;
  if (ctx.req.headers.upgrade !== undefined)
    throw invalid("the HTTP proxy does not carry upgrades: use the tcp route");
  await ctx.core.holdings.using(ctx.params.id!, async (held) => {
    const tunnel: Duplex = await held.vm.connect(port, { signal: ctx.signal });
    const headers = forwardable(ctx.req.headers);
    headers.host = `127.0.0.1:${port}`;
    headers["x-forwarded-proto"] = "http";
    if (ctx.req.socket.remoteAddress) headers["x-forwarded-for"] = ctx.req.socket.remoteAddress;
    headers.connection = "close";
    const upstream = httpRequest({
      method: ctx.req.method,
      path,
      headers,
      createConnection: () => tunnel as never,
      signal: ctx.signal,
    });
    const response = new Promise<void>((resolve, reject) => {
      upstream.once("error", reject);
      upstream.once("response", (answer) => {
        const out: OutgoingHttpHeaders = forwardable(answer.headers);
        ctx.res.writeHead(answer.statusCode ?? 502, answer.statusMessage, out);
        pipeline(answer, ctx.res).then(resolve, reject);
      });
    });
    try {
      await Promise.all([pipeline(ctx.req, upstream), response]);
    } finally {
      tunnel.destroy();
    }
  });
}

/** `WS /v1/vms/{id}/ports/{port}/tcp`: bytes both ways, half-close with `end` messages. */
export async function tcpStream(ctx: StreamContext): Promise<void> {
  const { ws, core } = ctx;
  const port = Number(ctx.params.port);
  let tunnel: Duplex | undefined;
  const ready = Promise.withResolvers<void>();
  const peer = peerOf(ws, {
    control: async (message) => {
      await ready.promise;
      if (message.type === "end") tunnel?.end();
      else throw invalid(`unknown message ${JSON.stringify(message.type)}`);
    },
    data: async (channel, bytes) => {
      await ready.promise;
      if (channel !== TCP_CHANNEL || tunnel === undefined) throw invalid("data on an unknown channel");
      if (!tunnel.write(bytes)) {
        await new Promise<void>((resolve) => {
          const done = () => {
            tunnel!.off("drain", done);
            tunnel!.off("close", done);
            resolve();
          };
          tunnel!.on("drain", done);
          tunnel!.on("close", done);
        });
      }
    },
  });
  try {
    await core.holdings.using(ctx.params.id!, async (held) => {
      try {
        tunnel = await held.vm.connect(port, { signal: ctx.signal });
      } catch (error) {
        ready.resolve();
        sendStreamError(peer, core, error);
        return;
      }
      const t = tunnel;
      t.on("error", () => {});
      void peer.ended.then(() => t.destroy());
      peer.sendControl({ type: "connected" });
      ready.resolve();
      try {
        for await (const chunk of t as AsyncIterable<Uint8Array>) {
          await peer.sendData(TCP_CHANNEL, chunk);
        }
        peer.sendControl({ type: "end" });
        // Both halves done (the client's `end` ends ours): close.
        if (!t.writableEnded)
          await new Promise<void>((resolve) => t.once("finish", resolve).once("close", resolve));
        peer.close(CLOSE_NORMAL, "closed");
      } catch (error) {
        if (!peer.isEnded) sendStreamError(peer, core, error);
      }
      await peer.ended;
    });
  } finally {
    ready.resolve();
  }
}
