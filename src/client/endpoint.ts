/**
 * One server as the client sees it: requests with the bearer token, errors rebuilt as the
 * library's classes, a connection failure as `SERVER_UNAVAILABLE` (and the endpoint marked down
 * for a while, so that new acquires go elsewhere), WebSocket streams.
 */

import { AbortError, RemoteError } from "../errors.ts";
import { errorFromWire, type PeerHandlers, StreamPeer, type WireError } from "../wire/index.ts";

/** After a connection failure, an endpoint is skipped by new acquires for this long. */
const DOWN_FOR_MS = 5_000;

/** A request body: bytes, text, or a stream of bytes. */
export type RequestBody = NonNullable<RequestInit["body"]> | AsyncIterable<Uint8Array>;

export interface RequestOptions {
  json?: unknown;
  body?: RequestBody;
  query?: Record<string, string | number | boolean | undefined>;
  signal?: AbortSignal | undefined;
}

export class Endpoint {
  /** The server's base URL, without a trailing slash. */
  readonly url: string;
  readonly #token: string | undefined;
  #downUntil = 0;

  constructor(url: string, token: string | undefined) {
    let parsed: URL;
    try {
      parsed = new URL(url);
    } catch {
      throw new RemoteError(
        "SERVER_UNAVAILABLE",
        `${JSON.stringify(url)} is not a URL: give http://HOST:PORT`,
      );
    }
    if (parsed.protocol !== "http:" && parsed.protocol !== "https:") {
      throw new RemoteError("SERVER_UNAVAILABLE", `${url}: only http:// and https:// servers are supported`);
    }
    this.url = parsed.href.replace(/\/+$/, "");
    this.#token = token;
  }

  /** False for a while after a connection to it failed. */
  get up(): boolean {
    return Date.now() >= this.#downUntil;
  }

  markDown(): void {
    this.#downUntil = Date.now() + DOWN_FOR_MS;
  }

  #headers(extra: Record<string, string> = {}): Record<string, string> {
    return this.#token === undefined ? extra : { ...extra, authorization: `Bearer ${this.#token}` };
  }

  #href(path: string, query: RequestOptions["query"]): string {
    const url = new URL(this.url + path);
    for (const [name, value] of Object.entries(query ?? {})) {
      if (value !== undefined) url.searchParams.set(name, String(value));
    }
    return url.href;
  }

  /** Sends a request; resolves with the response when its status is 2xx, else rejects with the typed error. */
  async request(method: string, path: string, options: RequestOptions = {}): Promise<Response> {
    const init: RequestInit & { duplex?: "half" } = { method, signal: options.signal ?? null };
    if (options.json !== undefined) {
      init.headers = this.#headers({ "content-type": "application/json" });
      init.body = JSON.stringify(options.json);
    } else {
      init.headers = this.#headers(
        options.body === undefined ? {} : { "content-type": "application/octet-stream" },
      );
      if (options.body !== undefined) {
        init.body = options.body as NonNullable<RequestInit["body"]>;
        init.duplex = "half";
      }
    }
    let response: Response;
    try {
      response = await fetch(this.#href(path, options.query), init);
    } catch (error) {
      throw this.transportError(error, options.signal, `${method} ${path}`);
    }
    if (response.ok) {
      this.#downUntil = 0;
      return response;
    }
    throw await this.#errorOf(response);
  }

  /** A request with a JSON answer. */
  async json<T>(method: string, path: string, options: RequestOptions = {}): Promise<T> {
    const response = await this.request(method, path, options);
    if (response.status === 204) return undefined as T;
    try {
      return (await response.json()) as T;
    } catch (error) {
      throw this.transportError(error, options.signal, `${method} ${path}`);
    }
  }

  async #errorOf(response: Response): Promise<Error> {
    const where = { endpoint: this.url, httpStatus: response.status };
    let body: unknown;
    try {
      body = await response.json();
    } catch {}
    const error = (body as { error?: WireError } | undefined)?.error;
    if (typeof error?.code === "string") return errorFromWire(error, where);
    return new RemoteError(
      response.status === 401 ? "UNAUTHORIZED" : "SERVER_UNAVAILABLE",
      `${this.url} answered ${response.status} ${response.statusText} without an error body: is it a supermachine server?`,
      where,
    );
  }

  /** The error for a failed transfer: `ABORTED` when `signal` fired, else `SERVER_UNAVAILABLE`. */
  transportError(error: unknown, signal: AbortSignal | undefined, what: string): Error {
    if (signal?.aborted) return new AbortError(`${what} on ${this.url} aborted`, { cause: signal.reason });
    if (error instanceof RemoteError || error instanceof AbortError) return error;
    this.markDown();
    const cause = error as Error & { cause?: Error & { code?: string } };
    const detail = cause?.cause?.code ?? cause?.cause?.message ?? cause?.message ?? String(error);
    return new RemoteError(
      "SERVER_UNAVAILABLE",
      `${what}: ${this.url} cannot be reached (${detail}); its VMs are lost to this client, new acquires go to other servers`,
      { endpoint: this.url },
      { cause: error },
    );
  }

  /**
   * Opens a stream WebSocket (`path` under the server) with `handlers`; resolves once the
   * connection is open. A refused upgrade is explained by `explain` (a plain request that fails
   * with the typed reason: the VM is unknown, the token is wrong), else `SERVER_UNAVAILABLE`.
   */
  async openStream(
    path: string,
    query: RequestOptions["query"],
    handlers: PeerHandlers,
    explain: () => Promise<unknown>,
    signal?: AbortSignal,
  ): Promise<StreamPeer> {
    if (signal?.aborted)
      throw new AbortError(`opening ${path} on ${this.url} aborted`, { cause: signal.reason });
    const href = this.#href(path, query).replace(/^http/, "ws");
    // Node's WebSocket (undici) takes headers in its second argument.
    const socket = new WebSocket(href, { headers: this.#headers() } as unknown as string[]);
    socket.binaryType = "arraybuffer";
    const peer = new StreamPeer(
      {
        send: (message) => socket.send(message),
        // A browser-style WebSocket may close with 1000 or 3000-4999 only.
        close: (code, reason) => socket.close(code === 1000 ? 1000 : 4000 + (code % 1000), reason),
      },
      handlers,
      { drainOnClose: true },
    );
    socket.onmessage = (event: MessageEvent) =>
      peer.receive(typeof event.data === "string" ? event.data : new Uint8Array(event.data as ArrayBuffer));
    const opened = new Promise<void>((resolve, reject) => {
      socket.onopen = () => resolve();
      socket.onclose = (event: CloseEvent) => {
        peer.closed(event.code, event.reason);
        reject(new Error(`closed with ${event.code} before it opened`));
      };
    });
    const onAbort = () => peer.close(1000, "aborted");
    signal?.addEventListener("abort", onAbort, { once: true });
    void peer.ended.then(() => signal?.removeEventListener("abort", onAbort));
    try {
      await opened;
    } catch (error) {
      if (signal?.aborted)
        throw new AbortError(`opening ${path} on ${this.url} aborted`, { cause: signal.reason });
      await explain();
      throw this.transportError(error, signal, `opening ${path}`);
    }
    this.#downUntil = 0;
    socket.onclose = (event: CloseEvent) => peer.closed(event.code, event.reason);
    return peer;
  }
}
