/**
 * A blob's GET on a connection of its own (`node:net`, or `node:tls` for https, with Node's CA
 * store, `NODE_EXTRA_CA_CERTS` and the TLS settings of `https.globalAgent`), its response read
 * into one reused buffer (`onread`) and its body handed on chunk by chunk, no allocation per
 * read. `node:http` allocates every 64 KiB read, parses it and pushes it through a stream whose 16
 * KiB high-water mark stops and restarts the socket on each one: 500–600 ms of CPU for a 134 MB
 * blob from a loopback registry, against ~100 ms for this path with its SHA-256 (docs/oci.md,
 * "Where a pull's time goes").
 *
 * HTTP/1.1 with `Connection: close`: a status line and headers (at most 64 KiB, 1xx answers
 * skipped), then a body framed by `Transfer-Encoding: chunked`, `Content-Length`, or the end of the
 * connection. Redirects, auth and retries are the registry client's, as with `node:http`.
 */

import { isIP, connect as netConnect, type Socket } from "node:net";
import type { HttpBody, HttpResponse } from "./http-response.ts";

/** Bytes read from the socket at once (one buffer per connection, reused for every read). */
const READ_BUFFER_BYTES = 256 * 1024;
/** A status line and headers longer than this (1xx answers before them included) are refused. */
const MAX_HEAD_BYTES = 64 * 1024;
/** A chunk-size or trailer line longer than this is refused (the trailer as a whole: MAX_HEAD_BYTES). */
const MAX_CHUNK_LINE_BYTES = 4096;

/** A response that is not HTTP/1.x as this reader takes it (a connection failure to the caller). */
export class HttpFramingError extends Error {
  readonly code = "EPROTO";
}

/**
 * GET `url` on a new connection; resolves when the status and headers arrived (as `httpGet`).
 * `idle`: the error to fail with after `idleMs` without a byte in either direction.
 */
export async function bulkGet(
  url: URL,
  headers: Record<string, string>,
  signal: AbortSignal | undefined,
  idleMs: number,
  idle: () => Error,
): Promise<HttpResponse> {
  const lines = [`GET ${url.pathname}${url.search} HTTP/1.1`, `host: ${url.host}`];
  for (const [name, value] of Object.entries(headers)) {
    if (/[\r\n\0]/.test(name) || /[\r\n\0]/.test(value)) {
      throw new TypeError(`invalid character in HTTP header ${JSON.stringify(name)}`);
    }
    lines.push(`${name}: ${value}`);
  }
  lines.push("connection: close", "", "");
  const response = new BulkResponse(signal);
  const host = url.hostname.replace(/^\[(.*)\]$/, "$1");
  const onread = { buffer: Buffer.allocUnsafe(READ_BUFFER_BYTES), callback: response.onRead };
  // node:tls loaded on first use, as node:https is (start time of CLI commands that pull nothing).
  // Its `onread` (Node >= 15.1) is documented but missing from @types/node's ConnectionOptions.
  const socket =
    url.protocol === "https:"
      ? (await import("node:tls")).connect({
          ...(await globalTlsOptions()),
          host,
          port: Number(url.port || 443),
          ...(isIP(host) === 0 ? { servername: host } : {}),
          ...({ onread } as object),
        })
      : netConnect({ host, port: Number(url.port || 80), onread });
  response.attach(socket, idleMs, idle);
  socket.write(lines.join("\r\n"));
  return response.head;
}

/** TLS settings a program gave Node's global HTTPS agent (its CA, client certificate…), as node:https uses them. */
async function globalTlsOptions(): Promise<Record<string, unknown>> {
  const { globalAgent } = await import("node:https");
  const options = globalAgent.options as Record<string, unknown>;
  const kept: Record<string, unknown> = {};
  for (const key of TLS_OPTION_KEYS) if (options[key] !== undefined) kept[key] = options[key];
  return kept;
}

const TLS_OPTION_KEYS = [
  "ca",
  "cert",
  "key",
  "pfx",
  "passphrase",
  "ciphers",
  "ecdhCurve",
  "minVersion",
  "maxVersion",
  "secureOptions",
  "rejectUnauthorized",
  "checkServerIdentity",
] as const;

/** What the server sent, quoted for an error message: at most 80 characters of it. */
function quoted(text: string | undefined): string {
  const value = text ?? "";
  return JSON.stringify(value.length > 80 ? `${value.slice(0, 80)}…` : value);
}

type Framing =
  | { kind: "length"; left: number }
  | { kind: "close" }
  | {
      kind: "chunked";
      state: "size" | "data" | "data-end" | "trailer";
      left: number;
      line: string;
      trailerBytes: number;
    };

type Outcome = { readonly end: true } | { readonly error: unknown };

class BulkResponse implements HttpBody {
  readonly head: Promise<HttpResponse>;
  #resolveHead!: (response: HttpResponse) => void;
  #rejectHead!: (error: unknown) => void;
  #socket!: Socket;
  readonly #signal: AbortSignal | undefined;
  #onAbort: (() => void) | undefined;
  /** The head so far; undefined once it is complete (or failed). */
  #headBytes: Buffer | undefined = Buffer.alloc(0);
  #framing: Framing | undefined;
  /** Body bytes read but not yet handed to the sink (before consume, or while the sink waits). */
  #held: Buffer[] = [];
  #sink: ((chunk: Uint8Array) => void | Promise<void>) | undefined;
  /** A promise from the sink is pending. */
  #waiting = false;
  /** How the body ended (or broke), once known: reported after the held chunks. */
  #ended: Outcome | undefined;
  /** Settles consume's promise (destroying the connection), once. */
  #settle: ((result: Outcome | { readonly thrown: unknown }) => void) | undefined;
  #settled = false;

  constructor(signal: AbortSignal | undefined) {
    this.#signal = signal;
    this.head = new Promise((resolve, reject) => {
      this.#resolveHead = resolve;
      this.#rejectHead = reject;
    });
    this.head.catch(() => {});
  }

  attach(socket: Socket, idleMs: number, idle: () => Error): void {
    this.#socket = socket;
    socket.setTimeout(idleMs, () => socket.destroy(idle()));
    socket.on("error", (error) => this.#end({ error }));
    socket.on("end", () =>
      this.#end(
        this.#headBytes !== undefined
          ? { error: new Error("connection closed before the response") }
          : this.#framing?.kind === "close"
            ? { end: true }
            : { error: new Error("connection closed before the body ended") },
      ),
    );
    socket.on("close", () => {
      this.#end({ error: new Error("connection closed before the body ended") });
      if (this.#onAbort !== undefined) this.#signal?.removeEventListener("abort", this.#onAbort);
    });
    if (this.#signal !== undefined) {
      this.#onAbort = () => socket.destroy(new DOMException("This operation was aborted", "AbortError"));
      if (this.#signal.aborted) this.#onAbort();
      else this.#signal.addEventListener("abort", this.#onAbort, { once: true });
    }
  }

  /** `onread`'s callback: `buffer` is reused for the next read once this returns. */
  readonly onRead = (length: number, buffer: Uint8Array): boolean => {
    if (this.#ended !== undefined) return true;
    try {
      let bytes = buffer.subarray(0, length);
      if (this.#headBytes !== undefined) {
        const rest = this.#readHead(bytes);
        if (rest === undefined) return true;
        bytes = rest;
      }
      this.#feed(bytes);
    } catch (error) {
      this.#socket.destroy(error as Error);
    }
    return true;
  };

  /** Bytes of 1xx heads skipped so far (they count toward the head's bound). */
  #skippedHeadBytes = 0;

  /** Adds `bytes` to the head; once it is complete returns what follows it (the body's start). */
  #readHead(bytes: Uint8Array): Uint8Array | undefined {
    let head = Buffer.concat([this.#headBytes!, bytes]);
    for (;;) {
      const end = head.indexOf("\r\n\r\n");
      if (this.#skippedHeadBytes + (end < 0 ? head.length : end) > MAX_HEAD_BYTES) {
        throw new HttpFramingError(`response head over ${MAX_HEAD_BYTES} bytes`);
      }
      if (end < 0) {
        this.#headBytes = head;
        return undefined;
      }
      const [statusLine, ...fields] = head.toString("latin1", 0, end).split("\r\n");
      const status = /^HTTP\/1\.[01] (\d{3})(?: |$)/.exec(statusLine!);
      if (status === null) throw new HttpFramingError(`not an HTTP/1.1 response: ${quoted(statusLine)}`);
      const code = Number(status[1]);
      head = head.subarray(end + 4);
      if (code >= 100 && code < 200) {
        this.#skippedHeadBytes += end + 4;
        continue; // 100 Continue and friends: the answer follows
      }
      this.#respond(code, fields);
      this.#headBytes = undefined;
      return head;
    }
  }

  #respond(status: number, fields: string[]): void {
    const values = new Map<string, string>();
    for (const field of fields) {
      const colon = field.indexOf(":");
      if (colon <= 0) throw new HttpFramingError(`malformed header line ${quoted(field)}`);
      const name = field.slice(0, colon).trim().toLowerCase();
      const value = field.slice(colon + 1).trim();
      const before = values.get(name);
      values.set(name, before === undefined ? value : `${before}, ${value}`);
    }
    const encoding = values.get("transfer-encoding");
    const length = values.get("content-length");
    if (status === 204 || status === 304) this.#framing = { kind: "length", left: 0 };
    else if (encoding !== undefined && /(?:^|,)\s*chunked\s*$/i.test(encoding))
      this.#framing = { kind: "chunked", state: "size", left: 0, line: "", trailerBytes: 0 };
    else if (encoding !== undefined) this.#framing = { kind: "close" };
    else if (length !== undefined) {
      if (!/^\d{1,15}$/.test(length)) throw new HttpFramingError(`bad Content-Length ${quoted(length)}`);
      this.#framing = { kind: "length", left: Number(length) };
    } else this.#framing = { kind: "close" };
    this.#resolveHead({
      status,
      ok: status >= 200 && status < 300,
      header: (name) => values.get(name.toLowerCase()),
      body: this,
      discard: () => this.destroy(),
    });
  }

  consume(sink: (chunk: Uint8Array) => void | Promise<void>): Promise<unknown> {
    if (this.#sink !== undefined) return Promise.reject(new Error("an HTTP body is read once"));
    this.#sink = sink;
    return new Promise<unknown>((resolve, reject) => {
      this.#settle = (result) => {
        if (this.#settled) return;
        this.#settled = true;
        this.#held = [];
        this.#socket.destroy();
        if ("thrown" in result) reject(result.thrown);
        else resolve("error" in result ? result.error : undefined);
      };
      this.#drainHeld();
    });
  }

  destroy(): void {
    this.#socket.destroy();
  }

  /** Frames `bytes` of the body and hands them on. */
  #feed(bytes: Uint8Array): void {
    const framing = this.#framing!;
    if (framing.kind === "close") {
      this.#deliver(bytes);
    } else if (framing.kind === "length") {
      const take = Math.min(framing.left, bytes.length);
      framing.left -= take;
      this.#deliver(bytes.subarray(0, take));
      if (framing.left === 0) this.#end({ end: true });
    } else {
      let at = 0;
      while (at < bytes.length && this.#ended === undefined) at = this.#feedChunked(framing, bytes, at);
    }
  }

  /** One step of chunked decoding from `at`; returns where the next step starts. */
  #feedChunked(framing: Extract<Framing, { kind: "chunked" }>, bytes: Uint8Array, at: number): number {
    if (framing.state === "data") {
      const take = Math.min(framing.left, bytes.length - at);
      framing.left -= take;
      if (framing.left === 0) framing.state = "data-end";
      this.#deliver(bytes.subarray(at, at + take));
      return at + take;
    }
    // A line: the chunk size (with extensions), the CRLF after a chunk's data, or a trailer line.
    const newline = bytes.indexOf(0x0a, at);
    const end = newline < 0 ? bytes.length : newline + 1;
    framing.line += Buffer.from(bytes.buffer, bytes.byteOffset + at, end - at).toString("latin1");
    if (framing.line.length > MAX_CHUNK_LINE_BYTES) throw new HttpFramingError("chunk line too long");
    if (newline < 0) return end;
    const line = framing.line.replace(/\r?\n$/, "");
    framing.line = "";
    if (framing.state === "data-end") {
      if (line !== "") throw new HttpFramingError("chunk data longer than its size");
      framing.state = "size";
    } else if (framing.state === "size") {
      const size = /^([0-9a-fA-F]{1,12})[ \t]*(?:;.*)?$/.exec(line);
      if (size === null) throw new HttpFramingError(`bad chunk size line ${quoted(line)}`);
      framing.left = Number.parseInt(size[1]!, 16);
      framing.state = framing.left === 0 ? "trailer" : "data";
    } else if (line === "") {
      this.#end({ end: true });
    } else {
      framing.trailerBytes += line.length;
      if (framing.trailerBytes > MAX_HEAD_BYTES)
        throw new HttpFramingError(`trailer over ${MAX_HEAD_BYTES} bytes`);
    }
    return end;
  }

  #deliver(chunk: Uint8Array): void {
    if (chunk.length === 0 || this.#settled) return;
    if (this.#sink === undefined || this.#waiting || this.#held.length > 0) {
      // Nobody reads yet, or the sink waits: keep a copy (the read buffer is reused) and stop reading.
      this.#held.push(Buffer.from(chunk));
      this.#socket.pause();
      return;
    }
    this.#call(chunk);
  }

  /** Hands `chunk` to the sink; a promise from it pauses reading until it settles. */
  #call(chunk: Uint8Array): void {
    let waited: void | Promise<void>;
    try {
      waited = this.#sink!(chunk);
    } catch (thrown) {
      this.#settle!({ thrown });
      return;
    }
    if (waited === undefined) return;
    this.#waiting = true;
    this.#socket.pause();
    waited.then(
      () => {
        this.#waiting = false;
        this.#drainHeld();
      },
      (thrown: unknown) => this.#settle!({ thrown }),
    );
  }

  /** Hands the held chunks to the sink; then reports how the body ended, or reads on. */
  #drainHeld(): void {
    while (this.#held.length > 0 && !this.#waiting && !this.#settled) this.#call(this.#held.shift()!);
    if (this.#waiting || this.#settled) return;
    if (this.#ended !== undefined) this.#settle!(this.#ended);
    else this.#socket.resume();
  }

  /** The body ended or broke (the first such event counts): reported once the sink has every chunk. */
  #end(outcome: Outcome): void {
    if (this.#headBytes !== undefined) {
      this.#headBytes = undefined;
      this.#ended = outcome;
      this.#rejectHead("error" in outcome ? outcome.error : new Error("no response"));
      return;
    }
    if (this.#ended !== undefined) return;
    this.#ended = outcome;
    if (this.#sink !== undefined && !this.#waiting && this.#held.length === 0) this.#settle!(outcome);
  }
}
