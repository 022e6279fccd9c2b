/**
 * One HTTP GET through `node:http` / `node:https` (Node's global agents: keep-alive, the CA store
 * plus `NODE_EXTRA_CA_CERTS`, and `NODE_USE_ENV_PROXY` proxies). The body is the Node stream
 * itself: a blob arrives in the socket's own buffers, without the copies and per-chunk promises of
 * WHATWG `fetch` streams. Redirects are not followed here (the registry client checks each hop).
 */

import type { IncomingMessage } from "node:http";

/** Idle time (no byte sent or received) after which a request fails, as undici's default. */
const IDLE_TIMEOUT_MS = 300_000;

/** Bodies at most this long (by Content-Length) are drained on discard, keeping the connection. */
const DRAIN_MAX_BYTES = 64 * 1024;

export interface HttpResponse {
  readonly status: number;
  readonly ok: boolean;
  /** A header's value (repeated headers joined with ", "), or undefined. */
  header(name: string): string | undefined;
  readonly body: IncomingMessage;
  /** Drop the body: drained when short and declared, else the connection is closed. */
  discard(): void;
}

class IdleTimeoutError extends Error {
  readonly code = "ETIMEDOUT";
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
    body: res,
    discard() {
      // A body read to its end gives the connection back to the agent.
      const length = Number(res.headers["content-length"] ?? Number.NaN);
      if (res.complete || (Number.isFinite(length) && length <= DRAIN_MAX_BYTES)) res.resume();
      else res.destroy();
    },
  };
}

/**
 * GET `url` with `headers`; resolves when the status and headers arrived. Connection and TLS
 * errors reject with Node's error (its `code`: `ECONNREFUSED`, `EPROTO`, certificate codes…),
 * an abort through `signal` with an `AbortError`.
 */
export async function httpGet(
  url: URL,
  headers: Record<string, string>,
  signal: AbortSignal | undefined,
): Promise<HttpResponse> {
  // Loaded on first use: TLS alone adds ~20 ms to the start of every CLI command that pulls nothing.
  const { request } = url.protocol === "https:" ? await import("node:https") : await import("node:http");
  return new Promise((resolve, reject) => {
    const req = request(url, { method: "GET", headers, signal, timeout: IDLE_TIMEOUT_MS }, (res) => {
      res.on("error", () => {}); // surfaced to whoever reads the body
      resolve(toResponse(res));
    });
    req.on("timeout", () => {
      req.destroy(new IdleTimeoutError(`no data from ${url.origin} for ${IDLE_TIMEOUT_MS / 1000} s`));
    });
    req.on("error", reject);
    req.end();
  });
}
