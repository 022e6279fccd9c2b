/**
 * TCP tunnels (`AgentClient.connectTcp`) against the real guest agent in host mode: the agent
 * connects to servers on this host's loopback, which stands in for the guest's.
 */
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { once } from "node:events";
import { createServer, type Server, type Socket } from "node:net";
import type { Duplex } from "node:stream";
import { after, before, describe, test } from "node:test";
import type { AgentClient } from "../../src/agent/agent-client.ts";
import { GuestIoError } from "../../src/errors.ts";
import { connectAgent, type HostAgent } from "../helpers/agent-binary.ts";
import { failOnUnhandledRejections, isCode } from "./fake-agent.ts";

failOnUnhandledRejections();

let agent: HostAgent;
let client: AgentClient;
let server: Server;
let port: number;
/** Connections the server accepted, in order. */
const accepted: Socket[] = [];
const acceptWaiters: (() => void)[] = [];

before(async () => {
  ({ agent, client } = await connectAgent());
  server = createServer({ allowHalfOpen: true }, (socket) => {
    socket.on("error", () => {});
    accepted.push(socket);
    for (const wake of acceptWaiters.splice(0)) wake();
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  port = (server.address() as { port: number }).port;
});

after(async () => {
  client?.close();
  await agent?.kill();
  for (const s of accepted) s.destroy();
  server?.close();
});

/** The next connection the server accepts. */
async function nextAccepted(): Promise<Socket> {
  const index = accepted.length;
  while (accepted.length <= index) await new Promise<void>((resolve) => acceptWaiters.push(resolve));
  return accepted[index]!;
}

async function readAll(stream: Duplex | Socket): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

const sha = (data: Uint8Array) => createHash("sha256").update(data).digest("hex");

describe("connectTcp", () => {
  test("bytes both ways and half-closes: end() is the server's EOF, its end is ours", async () => {
    const accepting = nextAccepted();
    const tunnel = await client.connectTcp(port);
    const closed = once(tunnel, "close");
    const peer = await accepting;
    const up = randomBytes(3 * 1024 * 1024 + 17);
    const down = randomBytes(2 * 1024 * 1024 + 5);
    const peerGot = readAll(peer);
    tunnel.end(up);
    assert.equal(sha(await peerGot), sha(up), "the server got every byte, then EOF");
    const tunnelGot = readAll(tunnel);
    peer.end(down);
    assert.equal(sha(await tunnelGot), sha(down));
    await closed;
    assert.equal(client.openStreams, 0, "the stream ended with the agent's OK");
  });

  test("the server answers while the host still writes (half-open the other way)", async () => {
    const accepting = nextAccepted();
    const tunnel = await client.connectTcp(port, { address: "127.0.0.1" });
    const closed = once(tunnel, "close");
    const peer = await accepting;
    peer.end("early bye");
    assert.equal((await readAll(tunnel)).toString(), "early bye");
    tunnel.write("still writing");
    const peerGot = readAll(peer);
    tunnel.end();
    assert.equal((await peerGot).toString(), "still writing");
    await closed;
  });

  test("a refused port rejects promptly with ECONNREFUSED", async () => {
    const closed = createServer();
    closed.listen(0, "127.0.0.1");
    await once(closed, "listening");
    const deadPort = (closed.address() as { port: number }).port;
    closed.close();
    await once(closed, "close");
    await assert.rejects(client.connectTcp(deadPort), (e: unknown) => {
      assert.ok(e instanceof GuestIoError);
      assert.equal(e.code, "ECONNREFUSED");
      assert.equal(e.syscall, "connect");
      assert.equal(e.port, deadPort);
      assert.equal(e.address, "127.0.0.1");
      return true;
    });
    await assert.rejects(client.connectTcp(port, { address: "localhost" }), isCode("GUEST_IO"));
    await assert.rejects(client.connectTcp(0), isCode("INVALID_ARGUMENT"));
    assert.equal(client.openStreams, 0);
  });

  test("destroy() resets the guest connection", async () => {
    const accepting = nextAccepted();
    const tunnel = await client.connectTcp(port);
    const peer = await accepting;
    tunnel.write("x");
    await once(peer, "data");
    const peerError = once(peer, "error").catch((e: unknown) => [e]);
    tunnel.destroy();
    const [error] = (await peerError) as [NodeJS.ErrnoException];
    assert.equal(error.code, "ECONNRESET");
    assert.ok((await client.ping()) >= 0);
  });

  test("a server that resets: the duplex fails with ECONNRESET", async () => {
    const accepting = nextAccepted();
    const tunnel = await client.connectTcp(port);
    const peer = await accepting;
    const failed = once(tunnel, "error");
    peer.resetAndDestroy();
    const [error] = (await failed) as [GuestIoError];
    assert.ok(error instanceof GuestIoError);
    assert.equal(error.code, "ECONNRESET");
  });

  test("a slow reader holds the guest server back: the host buffers at most the credit", async () => {
    const accepting = nextAccepted();
    const tunnel = await client.connectTcp(port, { windowBytes: 128 * 1024 });
    const peer = await accepting;
    const total = 16 * 1024 * 1024;
    let written = 0;
    const chunk = Buffer.alloc(64 * 1024, 7);
    const writer = (async () => {
      while (written < total) {
        written += chunk.length;
        if (!peer.write(chunk)) await once(peer, "drain");
      }
      peer.end();
    })();
    // Nobody reads the tunnel: the server's writes stall once the agent holds its credit's worth.
    tunnel.pause();
    let stalledAt = -1;
    for (let i = 0; i < 200 && stalledAt !== written; i++) {
      stalledAt = written;
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    assert.ok(written < total, `the server could write all ${written} bytes while nobody read`);
    assert.ok(tunnel.readableLength <= 2 * 1024 * 1024, `host holds ${tunnel.readableLength} bytes`);
    tunnel.resume();
    let received = 0;
    for await (const data of tunnel) received += (data as Buffer).length;
    await writer;
    assert.equal(received, total);
  });

  test("many tunnels at once", async () => {
    const echo = createServer((socket) => socket.pipe(socket));
    echo.listen(0, "127.0.0.1");
    await once(echo, "listening");
    const echoPort = (echo.address() as { port: number }).port;
    try {
      const results = await Promise.all(
        Array.from({ length: 24 }, async (_, i) => {
          const tunnel = await client.connectTcp(echoPort);
          const payload = randomBytes(50_000 + i);
          const got = readAll(tunnel);
          tunnel.end(payload);
          return sha(await got) === sha(payload);
        }),
      );
      assert.deepEqual(results, Array(24).fill(true));
    } finally {
      echo.close();
    }
  });

  test("abort while connected destroys the tunnel", async () => {
    const accepting = nextAccepted();
    const controller = new AbortController();
    const tunnel = await client.connectTcp(port, { signal: controller.signal });
    await accepting;
    const failed = once(tunnel, "error");
    controller.abort();
    const [error] = (await failed) as [Error];
    assert.ok(isCode("ABORTED")(error));
  });
});
