/**
 * The blob GET of its own (src/oci/bulk-get.ts, through httpGet's `bulk`) against a TCP server
 * that writes scripted bytes: framing (Content-Length, chunked, end of connection), bodies split
 * at every byte, a sink that makes reading wait, broken and malformed answers, aborts.
 */
import assert from "node:assert/strict";
import { once } from "node:events";
import { readFile } from "node:fs/promises";
import { createServer as createHttpsServer, globalAgent } from "node:https";
import { createServer, type Server, type Socket } from "node:net";
import { afterEach, describe, test } from "node:test";
import { HttpFramingError } from "../../src/oci/bulk-get.ts";
import { httpGet } from "../../src/oci/http-get.ts";
import type { HttpResponse } from "../../src/oci/http-response.ts";
import { makeTlsCertificate } from "../helpers/registry.ts";
import { scratchDir } from "../helpers/scratch.ts";

let server: Server | undefined;
afterEach(async () => {
  server?.close();
  server = undefined;
});

/** A server answering every connection with `answer` (after reading the request head). */
async function serve(answer: (socket: Socket, request: string) => void | Promise<void>): Promise<URL> {
  server = createServer((socket) => {
    let request = "";
    socket.on("error", () => {});
    socket.on("data", (data) => {
      if (request.includes("\r\n\r\n")) return;
      request += data.toString("latin1");
      if (request.includes("\r\n\r\n")) void answer(socket, request);
    });
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const { port } = server.address() as { port: number };
  return new URL(`http://127.0.0.1:${port}/v2/app/blobs/sha256:ab?x=1`);
}

/** Writes `parts` one at a time, each after the previous one left (separate reads on the other end). */
async function trickle(socket: Socket, parts: (string | Uint8Array)[]): Promise<void> {
  for (const part of parts) {
    await new Promise<void>((resolve) => socket.write(part, () => resolve()));
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
}

function get(url: URL, signal?: AbortSignal): Promise<HttpResponse> {
  return httpGet(url, { accept: "*/*", range: "bytes=0-" }, signal, { bulk: true });
}

/** The body as one buffer, and what consume resolved with. */
async function read(res: HttpResponse): Promise<{ body: Buffer; outcome: unknown }> {
  const chunks: Buffer[] = [];
  const outcome = await res.body.consume((chunk) => {
    chunks.push(Buffer.from(chunk));
  });
  return { body: Buffer.concat(chunks), outcome };
}

const payload = Buffer.from(Array.from({ length: 3000 }, (_, i) => i % 251));

describe("bulk GET", () => {
  test("request line and headers; Content-Length body split at every byte; 1xx skipped; repeated headers joined", async () => {
    let seen = "";
    const url = await serve(async (socket, request) => {
      seen = request;
      const head = `HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: ${payload.length}\r\nX-A: 1\r\nx-a: 2\r\n\r\n`;
      const bytes = Buffer.concat([Buffer.from(head), payload]);
      await trickle(
        socket,
        [...bytes.subarray(0, 200)].map((b) => Uint8Array.of(b)),
      );
      socket.end(bytes.subarray(200));
    });
    const res = await get(url);
    assert.equal(res.status, 200);
    assert.equal(res.ok, true);
    assert.equal(res.header("X-A"), "1, 2");
    const { body, outcome } = await read(res);
    assert.equal(outcome, undefined);
    assert.deepEqual(body, payload);
    assert.match(seen, /^GET \/v2\/app\/blobs\/sha256:ab\?x=1 HTTP\/1\.1\r\n/);
    assert.match(seen, /\r\nhost: 127\.0\.0\.1:\d+\r\n/);
    assert.match(seen, /\r\nrange: bytes=0-\r\n/);
    assert.match(seen, /\r\nconnection: close\r\n\r\n$/);
  });

  test("chunked body with extensions and a trailer, split across reads; bytes after the end ignored", async () => {
    const url = await serve(async (socket) => {
      const a = payload.subarray(0, 1000);
      const b = payload.subarray(1000);
      await trickle(socket, [
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e",
        "8;ext=1\r\n",
        a.subarray(0, 10),
        Buffer.concat([a.subarray(10), Buffer.from("\r")]),
        `\n${b.length.toString(16)}\r\n`,
        Buffer.concat([b, Buffer.from("\r\n0\r\nX-Trailer: 1\r\n\r\nJUNK")]),
      ]);
      socket.end();
    });
    const { body, outcome } = await read(await get(url));
    assert.equal(outcome, undefined);
    assert.deepEqual(body, payload);
  });

  test("a body without length ends with the connection", async () => {
    const url = await serve((socket) => {
      socket.end(Buffer.concat([Buffer.from("HTTP/1.0 200 OK\r\n\r\n"), payload]));
    });
    const { body, outcome } = await read(await get(url));
    assert.equal(outcome, undefined);
    assert.deepEqual(body, payload);
  });

  test("a sink's promise makes reading wait; chunks arrive in order, each once", async () => {
    const big = Buffer.alloc(3 * 1024 * 1024);
    for (let i = 0; i < big.length; i += 4) big.writeUInt32LE(i, i);
    const url = await serve((socket) => {
      socket.end(
        Buffer.concat([Buffer.from(`HTTP/1.1 200 OK\r\nContent-Length: ${big.length}\r\n\r\n`), big]),
      );
    });
    const res = await get(url);
    const chunks: Buffer[] = [];
    let calls = 0;
    const outcome = await res.body.consume(async (chunk) => {
      chunks.push(Buffer.from(chunk));
      if (++calls % 3 === 0) await new Promise((resolve) => setTimeout(resolve, 2));
    });
    assert.equal(outcome, undefined);
    assert.deepEqual(Buffer.concat(chunks), big);
  });

  test("a connection closed mid-body resolves with the error; closed before the head rejects", async () => {
    let count = 0;
    const url = await serve((socket) => {
      if (++count === 1) socket.end("HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\nabc");
      else socket.end("HTTP/1.1 200 O");
    });
    const { body, outcome } = await read(await get(url));
    assert.equal(body.toString(), "abc");
    assert.match(String(outcome), /closed before the body ended/);
    await assert.rejects(get(url), /closed before the response/);
  });

  test("malformed answers: status line, header line, Content-Length, chunk size", async () => {
    const answers = [
      `SSH-2.0-OpenSSH${"x".repeat(5000)}\r\n\r\n`,
      "HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
      "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    ];
    let count = 0;
    const url = await serve((socket) => {
      const answer = answers[count++] ?? "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
      socket.end(answer);
    });
    for (const pattern of [/not an HTTP\/1\.1 response/, /malformed header line/, /bad Content-Length/]) {
      await assert.rejects(
        get(url),
        (e: unknown) => e instanceof HttpFramingError && pattern.test(e.message) && e.message.length < 200,
      );
    }
    const { outcome } = await read(await get(url));
    assert.ok(outcome instanceof HttpFramingError && /bad chunk size/.test(outcome.message), String(outcome));
  });

  test("a head over 64 KiB is refused, 1xx answers before it counted", async () => {
    let count = 0;
    const url = await serve((socket) => {
      if (++count === 1) socket.end(`HTTP/1.1 200 OK\r\nX-Big: ${"a".repeat(70 * 1024)}\r\n\r\n`);
      else socket.end("HTTP/1.1 102 Processing\r\n\r\n".repeat(3000));
    });
    await assert.rejects(get(url), /response head over 65536 bytes/);
    await assert.rejects(get(url), /response head over 65536 bytes/);
  });

  test("a sink that threw is not called again, though more chunks came in the same read", async () => {
    const url = await serve((socket) => {
      socket.end(`HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n${"2\r\nab\r\n".repeat(50)}0\r\n\r\n`);
    });
    const res = await get(url);
    let calls = 0;
    await assert.rejects(
      res.body.consume(() => {
        calls++;
        throw new Error("no more");
      }),
      /no more/,
    );
    assert.equal(calls, 1);
  });

  test("what the sink throws rejects consume and closes the connection", async () => {
    let closed: Promise<unknown> | undefined;
    const url = await serve((socket) => {
      closed = once(socket, "close");
      socket.write(`HTTP/1.1 200 OK\r\nContent-Length: ${10 * payload.length}\r\n\r\n`);
      socket.write(payload);
    });
    const res = await get(url);
    const failure = new Error("the disk is full");
    await assert.rejects(
      res.body.consume(() => {
        throw failure;
      }),
      (e) => e === failure,
    );
    await closed;
  });

  test("an abort before the head rejects; during the body consume resolves with an AbortError", async () => {
    const url = await serve((socket) => {
      socket.write(`HTTP/1.1 200 OK\r\nContent-Length: ${10 * payload.length}\r\n\r\n`);
      socket.write(payload);
    });
    await assert.rejects(get(url, AbortSignal.abort()), { name: "AbortError" });
    const controller = new AbortController();
    const res = await get(url, controller.signal);
    const outcome = await res.body.consume(() => controller.abort());
    assert.equal((outcome as Error).name, "AbortError");
  });

  test("a header value with a line break is refused before anything is sent", async () => {
    let connections = 0;
    const url = await serve(() => {});
    server!.on("connection", () => connections++);
    await assert.rejects(
      httpGet(url, { authorization: "Bearer x\r\nX-Evil: 1" }, undefined, { bulk: true }),
      /invalid character in HTTP header "authorization"/,
    );
    assert.equal(connections, 0);
  });

  test("HTTPS: the certificate is checked, with the CA a program gave https.globalAgent", async () => {
    const { certPath, keyPath } = await makeTlsCertificate(await scratchDir("sm-bulk-tls-"));
    const cert = await readFile(certPath);
    const tls = createHttpsServer({ cert, key: await readFile(keyPath) }, (_req, res) => {
      res.end(payload);
    });
    tls.listen(0, "127.0.0.1");
    await once(tls, "listening");
    try {
      const url = new URL(`https://127.0.0.1:${(tls.address() as { port: number }).port}/v2/`);
      await assert.rejects(get(url), { code: "DEPTH_ZERO_SELF_SIGNED_CERT" });
      globalAgent.options.ca = cert;
      try {
        const { body, outcome } = await read(await get(url));
        assert.equal(outcome, undefined);
        assert.deepEqual(body, payload);
      } finally {
        delete globalAgent.options.ca;
      }
    } finally {
      tls.close();
    }
  });
});
