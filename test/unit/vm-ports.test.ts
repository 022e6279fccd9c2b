/**
 * exposeTcp's host side with a TCP connection standing in for the agent tunnel: bytes both ways,
 * half-close, many connections, refused tunnels, close.
 */
import assert from "node:assert/strict";
import { once } from "node:events";
import { connect, createServer, type Server, type Socket } from "node:net";
import { after, before, describe, it } from "node:test";
import { exposeTcp } from "../../src/vm/ports.ts";

/** A server that answers each connection with "got N bytes" once the client half-closes. */
let server: Server;
let serverPort: number;
before(async () => {
  server = createServer({ allowHalfOpen: true }, (socket) => {
    let n = 0;
    socket.on("data", (chunk: Buffer) => {
      n += chunk.length;
    });
    socket.on("end", () => socket.end(`got ${n} bytes`));
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  serverPort = (server.address() as { port: number }).port;
});
after(() => server.close());

/** The "tunnel": a TCP connection to the test server (port ignored). */
const connector = async (_guestPort: number) => {
  const socket = connect({ port: serverPort, host: "127.0.0.1", allowHalfOpen: true });
  await once(socket, "connect");
  return socket;
};

async function request(port: number, body: Buffer): Promise<string> {
  const socket: Socket = connect({ port, host: "127.0.0.1", allowHalfOpen: true });
  await once(socket, "connect");
  socket.end(body);
  const chunks: Buffer[] = [];
  for await (const chunk of socket) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString();
}

describe("exposeTcp (host side)", () => {
  it("listens on a free port when asked for 0 and carries bytes both ways with half-close", async () => {
    await using exposed = await exposeTcp(connector, 0, 8080, { vmId: "t" });
    assert.equal(exposed.host, "127.0.0.1");
    assert.ok(exposed.hostPort > 0);
    assert.equal(exposed.guestPort, 8080);
    assert.equal(
      await request(exposed.hostPort, Buffer.alloc(3 * 1024 * 1024, 7)),
      `got ${3 * 1024 * 1024} bytes`,
    );
  });

  it("carries 100 concurrent connections", async () => {
    await using exposed = await exposeTcp(connector, 0, 80, { vmId: "t" });
    const answers = await Promise.all(
      Array.from({ length: 100 }, (_, i) => request(exposed.hostPort, Buffer.alloc(i + 1))),
    );
    assert.deepEqual(
      answers,
      Array.from({ length: 100 }, (_, i) => `got ${i + 1} bytes`),
    );
  });

  it("closes the host connection when the tunnel cannot be opened", async () => {
    const refused = async () => {
      throw new Error("connection refused in the guest");
    };
    await using exposed = await exposeTcp(refused, 0, 81, { vmId: "t" });
    const socket = connect({ port: exposed.hostPort, host: "127.0.0.1" });
    await once(socket, "close");
  });

  it("close() stops listening and ends open connections; a taken port is a typed error", async () => {
    const exposed = await exposeTcp(connector, 0, 82, { vmId: "t" });
    await assert.rejects(exposeTcp(connector, exposed.hostPort, 82, { vmId: "t" }), {
      code: "INVALID_ARGUMENT",
      message: /cannot listen on 127\.0\.0\.1:\d+ .*EADDRINUSE/,
    });
    const socket = connect({ port: exposed.hostPort, host: "127.0.0.1" });
    await once(socket, "connect");
    while (exposed.connections === 0) await new Promise((resolve) => setImmediate(resolve));
    await exposed.close();
    await once(socket, "close");
    await exposed.close();
    await assert.rejects(request(exposed.hostPort, Buffer.alloc(1)), { code: "ECONNREFUSED" });
  });

  it("refuses bad ports", async () => {
    await assert.rejects(exposeTcp(connector, 70000, 80, { vmId: "t" }), { code: "INVALID_ARGUMENT" });
    await assert.rejects(exposeTcp(connector, 0, 0, { vmId: "t" }), { code: "INVALID_ARGUMENT" });
  });
});
