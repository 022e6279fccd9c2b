import assert from "node:assert/strict";
import { once } from "node:events";
import { mkdtemp, rm } from "node:fs/promises";
import { createServer, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, test } from "node:test";
import { SocketReads, socketReads } from "../../src/internal/index.ts";

/** A `SocketReads` connected to a plain socket (the peer). */
async function pair(): Promise<{ reads: SocketReads; peer: Socket; [Symbol.asyncDispose](): Promise<void> }> {
  const dir = await mkdtemp(join(tmpdir(), "sm-reads-"));
  const path = join(dir, "s");
  const server = createServer();
  server.listen(path);
  await once(server, "listening");
  const accepted = once(server, "connection");
  const reads = SocketReads.connect(path);
  await once(reads.socket, "connect");
  const [peer] = (await accepted) as [Socket];
  server.close();
  return {
    reads,
    peer,
    async [Symbol.asyncDispose]() {
      reads.socket.destroy();
      peer.destroy();
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/** Collects chunks (copied: the buffer is reused) until `bytes` arrived. */
function collect(reads: SocketReads, bytes: number): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let total = 0;
  return new Promise((resolve) => {
    reads.read((chunk) => {
      chunks.push(Buffer.from(chunk));
      total += chunk.length;
      if (total >= bytes) resolve(Buffer.concat(chunks));
    });
  });
}

describe("SocketReads", () => {
  test("hands every byte to the reader, in order, through one reused buffer", async () => {
    await using p = await pair();
    const data = Buffer.alloc(300_000).map((_, i) => i % 251);
    const got = collect(p.reads, data.length);
    p.peer.write(data);
    assert.deepEqual(await got, data);
  });

  test("keeps what arrives before there is a reader, and reads on once there is one", async () => {
    await using p = await pair();
    p.peer.write("early");
    // Wait until the bytes were read and reading stopped: the socket saw them, nothing was lost.
    while (p.reads.socket.bytesRead === 0) await new Promise((resolve) => setImmediate(resolve));
    const got = collect(p.reads, "early and late".length);
    p.peer.write(" and late");
    assert.equal((await got).toString(), "early and late");
  });

  test("reports the peer's end as `end`, with no data events", async () => {
    await using p = await pair();
    let dataEvents = 0;
    p.reads.socket.on("data", () => dataEvents++);
    const got = collect(p.reads, 3);
    const ended = once(p.reads.socket, "end");
    p.peer.end("abc");
    assert.equal((await got).toString(), "abc");
    await ended;
    assert.equal(dataEvents, 0);
  });

  test("is found from its socket; other sockets have none", async () => {
    await using p = await pair();
    assert.equal(socketReads(p.reads.socket), p.reads);
    assert.equal(socketReads(p.peer), undefined);
  });
});
