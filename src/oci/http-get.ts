/**
 * One HTTP GET. Requests go through `node:http` / `node:https` (Node's global agents: keep-alive,
 * the CA store plus `NODE_EXTRA_CA_CERTS`, and `NODE_USE_ENV_PROXY` proxies); a blob's GET
 * (`bulk`) takes a connection of its own read into one reused buffer (bulk-get.ts), unless Node
 * sends requests through a proxy. Either way the body is an {@link HttpBody}, handed to one sink
 * chunk by chunk without the copies and per-chunk promises of WHATWG `fetch` streams. Redirects
 * are not followed here (the registry client checks each hop).
 */

import type { IncomingMessage } from "node:http";
import type { Readable } from "node:stream";
import { bulkGet } from "./bulk-get.ts";
import type { HttpBody, HttpResponse } from "./http-response.ts";

/** Idle time (no byte sent or received) after which a request fails, as undici's default. */
const IDLE_TIMEOUT_MS = 300_000;

/** Bodies at most this long (by Content-Length) are drained on discard, keeping the connection. */
const DRAIN_MAX_BYTES = 64 * 1024;

class IdleTimeoutError extends Error {
  readonly code = "ETIMEDOUT";
}

/** A Node stream (a `node:http` response) as an {@link HttpBody}. */
export function streamBody(stream: Readable): HttpBody {
  return {
    consume(sink) {
      if (stream.destroyed || stream.readableEnded) {
        // Broke (or was read) before anyone came to read it: no event will come.
        return Promise.resolve(
          stream.readableEnded
            ? undefined
            : (stream.errored ?? new Error("connection closed before the body ended")),
        );
      }
      return new Promise<unknown>((resolve, reject) => {
        /** The sink's pending promise: the outcome waits for it. */
        let waiting: Promise<void> | undefined;
        let done = false;
        const finish = (outcome: () => void) => {
          if (done) return;
          done = true;
          stream.off("data", onData);
          stream.off("end", onEnd);
          stream.off("error", onError);
          stream.off("close", onClose);
          if (!stream.readableEnded) stream.destroy();
          outcome();
        };
        const settle = (outcome: () => void) => {
          if (waiting === undefined) finish(outcome);
          else
            waiting.then(
              () => finish(outcome),
              () => {},
            );
        };
        const onData = (chunk: Buffer) => {
          let waited: void | Promise<void>;
          try {
            waited = sink(chunk);
          } catch (err) {
            finish(() => reject(err));
            return;
          }
          if (waited === undefined) return;
          stream.pause();
          waiting = waited.then(
            () => {
              waiting = undefined;
              if (!done) stream.resume();
            },
            (err: unknown) => finish(() => reject(err)),
          );
        };
        const onEnd = () => settle(() => resolve(undefined));
        const onError = (err: unknown) => settle(() => resolve(err));
        const onClose = () => settle(() => resolve(new Error("connection closed before the body ended")));
        stream.on("data", onData);
        stream.on("end", onEnd);
        stream.on("error", onError);
        stream.on("close", onClose);
      });
    },
    destroy() {
      stream.destroy();
    },
  };
}

function toResponse(res: IncomingMessage): HttpResponse {
  const status = res.statusCode ?? 0;
  return {
    status,
    ok: status >= 200 && status < 300,
    header(name) {
      const v = res.headers[name.toLowerCase()];
      return Array.isArray(v) ? v.join(", ") : v;
    },
    body: streamBody(res),
    discard() {
      // A body read to its end gives the connection back to the agent.
      const length = Number(res.headers["content-length"] ?? Number.NaN);
      if (res.complete || (Number.isFinite(length) && length <= DRAIN_MAX_BYTES)) res.resume();
      else res.destroy();
    },
  };
}

/**
 * True when Node sends HTTP requests through the proxy of the environment (Node >= 24:
 * `NODE_USE_ENV_PROXY=1`, or `--use-env-proxy` on the command line or in `NODE_OPTIONS`).
 */
function envProxyEnabled(): boolean {
  const flag = process.env.NODE_USE_ENV_PROXY;
  if (flag !== undefined && flag !== "" && flag !== "0") return true;
  const options = [...process.execArgv, ...(process.env.NODE_OPTIONS ?? "").split(/\s+/)];
  return options.includes("--use-env-proxy");
}

/**
 * GET `url` with `headers`; resolves when the status and headers arrived. `bulk`: a blob's body,
 * read on a connection of its own (see above). Connection and TLS errors reject with Node's error
 * (its `code`: `ECONNREFUSED`, `EPROTO`, certificate codes…), an abort through `signal` with an
 * `AbortError`.
 */
export async function httpGet(
  url: URL,
  headers: Record<string, string>,
  signal: AbortSignal | undefined,
  options: { bulk?: boolean } = {},
): Promise<HttpResponse> {
  const idle = () => new IdleTimeoutError(`no data from ${url.origin} for ${IDLE_TIMEOUT_MS / 1000} s`);
  if (options.bulk === true && !envProxyEnabled()) {
    return bulkGet(url, headers, signal, IDLE_TIMEOUT_MS, idle);
  }
  // Loaded on first use: TLS alone adds ~20 ms to the start of every CLI command that pulls nothing.
  const { request } = url.protocol === "https:" ? await import("node:https") : await import("node:http");
  return new Promise((resolve, reject) => {
    const req = request(url, { method: "GET", headers, signal, timeout: IDLE_TIMEOUT_MS }, (res) => {
      res.on("error", () => {}); // surfaced to whoever reads the body
      resolve(toResponse(res));
    });
    req.on("timeout", () => req.destroy(idle()));
    req.on("error", reject);
    req.end();
  });
}
