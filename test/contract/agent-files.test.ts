/**
 * File transfer, session and shutdown against the real guest agent in host mode.
 */
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import { after, before, describe, test } from "node:test";
import { AgentClient } from "../../src/agent/agent-client.ts";
import { encodeFrame, MessageType } from "../../src/agent/frame-codec.ts";
import { AbortError, GuestIoError, SupermachineError, VmError } from "../../src/errors.ts";
import { connectAgent, type HostAgent, spawnAgent } from "../helpers/agent-binary.ts";

let agent: HostAgent;
let client: AgentClient;
let dir: string;
const isRoot = process.getuid?.() === 0;
const sha = (data: Uint8Array) => createHash("sha256").update(data).digest("hex");

before(async () => {
  ({ agent, client } = await connectAgent());
  dir = await mkdtemp(join(tmpdir(), "sm-files-"));
});

after(async () => {
  client?.close();
  await agent?.kill();
  if (dir) await rm(dir, { recursive: true, force: true });
});

/** Waits (bounded) until `pid` is gone or a zombie: SIGKILL delivery is asynchronous. */
async function processGone(pid: number): Promise<void> {
  const deadline = Date.now() + 5000;
  for (;;) {
    const stat = await readFile(`/proc/${pid}/stat`, "utf8").catch(() => "");
    if (stat === "" || stat.slice(stat.lastIndexOf(")") + 2).startsWith("Z")) return;
    if (Date.now() > deadline) assert.fail(`process ${pid} is still running`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

describe("writeFile / readFile", () => {
  test("50 MB round-trip byte for byte, with mode", async () => {
    const data = randomBytes(50 * 1000 * 1000);
    const path = join(dir, "big.bin");
    await client.writeFile(path, data, { mode: 0o600 });
    assert.equal((await stat(path)).mode & 0o7777, 0o600);
    const file = await client.readFile(path);
    assert.equal(file.size, data.length);
    assert.equal(file.mode & 0o7777, 0o600);
    assert.equal(file.mode & 0o170000, 0o100000, "st_mode includes the file type");
    const hash = createHash("sha256");
    let size = 0;
    for await (const chunk of file.stream) {
      hash.update(chunk as Uint8Array);
      size += (chunk as Uint8Array).length;
    }
    assert.equal(size, data.length);
    assert.equal(hash.digest("hex"), sha(data));
    assert.equal(sha(await client.readFileBytes(path)), sha(data));
    assert.equal(client.openStreams, 0);
  });

  test("strings, empty files, mkdirs, replacing a file", async () => {
    const path = join(dir, "a", "b", "c.txt");
    await assert.rejects(client.writeFile(path, "x"), (e: unknown) => {
      assert.ok(e instanceof GuestIoError);
      assert.equal(e.path, path);
      assert.equal(e.errno, 2);
      return true;
    });
    await client.writeFile(path, "héllo\n", { mkdirs: true });
    assert.equal(await readFile(path, "utf8"), "héllo\n");
    await client.writeFile(path, "");
    assert.equal((await client.readFileBytes(path)).length, 0);
    assert.equal((await stat(path)).mode & 0o7777, 0o644, "default mode");
  });

  test("streams: with sizeBytes sent directly, without it spooled first", async () => {
    const data = randomBytes(3 * 1024 * 1024 + 5);
    async function* chunks() {
      for (let i = 0; i < data.length; i += 65_536) yield data.subarray(i, i + 65_536);
    }
    await client.writeFile(join(dir, "sized"), chunks(), { sizeBytes: data.length });
    await client.writeFile(join(dir, "spooled"), Readable.from(chunks()));
    assert.equal(sha(await readFile(join(dir, "sized"))), sha(data));
    assert.equal(sha(await readFile(join(dir, "spooled"))), sha(data));
  });

  test("ownership (root only)", async (t) => {
    if (!isRoot) return t.skip("needs root to give files away");
    const path = join(dir, "owned");
    await client.writeFile(path, "x", { uid: 1234, gid: 5678, mode: 0o640 });
    const st = await stat(path);
    assert.deepEqual([st.uid, st.gid, st.mode & 0o7777], [1234, 5678, 0o640]);
    const info = await client.readFile(path);
    info.stream.resume();
    assert.deepEqual([info.uid, info.gid], [1234, 5678]);
  });

  test("missing files and directories are GuestIoError", async () => {
    await assert.rejects(client.readFile(join(dir, "nope")), (e: unknown) => {
      assert.ok(e instanceof GuestIoError);
      assert.equal(e.code, "GUEST_IO");
      assert.equal(e.errno, 2);
      return true;
    });
    await assert.rejects(client.readFileBytes(dir), GuestIoError);
    await assert.rejects(
      client.writeFile("relative/path", "x"),
      (e) => SupermachineError.is(e) && e.code === "INVALID_ARGUMENT",
    );
  });

  test("abandoning a read early leaves the channel usable", async () => {
    const path = join(dir, "partial");
    await writeFile(path, randomBytes(8 * 1024 * 1024));
    const file = await client.readFile(path);
    for await (const _ of file.stream) break; // destroys the stream → RESET
    assert.ok(file.stream.destroyed);
    assert.ok((await client.ping()) >= 0);
    assert.equal(client.openStreams, 0);
    assert.equal((await client.readFileBytes(path)).length, 8 * 1024 * 1024);
  });

  test("abort during a write removes nothing that existed and keeps the channel", async () => {
    const path = join(dir, "aborted");
    await writeFile(path, "old");
    const controller = new AbortController();
    async function* slow() {
      yield new Uint8Array(1000);
      controller.abort();
      yield new Uint8Array(1000);
    }
    await assert.rejects(
      client.writeFile(path, slow(), { sizeBytes: 10_000, signal: controller.signal }),
      AbortError,
    );
    assert.equal(await readFile(path, "utf8"), "old", "the write was atomic");
    assert.ok((await client.ping()) >= 0);
  });
});

describe("session", () => {
  test("SHUTDOWN ends running commands, answers OK, and the agent exits cleanly", async () => {
    const own = await connectAgent();
    const running = own.client.exec({ argv: ["sleep", "100"] });
    const { pid } = await running.started;
    await own.client.shutdown();
    assert.equal(await own.client.closed, undefined);
    await assert.rejects(running.exited, (e) => e instanceof VmError);
    assert.deepEqual(await own.agent.exited, { code: 0, signal: null });
    await processGone(pid);
  });

  test("bytes the agent cannot parse: it answers BAD_FRAME and the client fails with AGENT_PROTOCOL", async () => {
    const own = await connectAgent();
    // A frame with reserved flag bits, written under the client's feet.
    own.agent.socket.write(
      encodeFrame({ stream: 0, type: MessageType.PING }).map((b, i) => (i === 9 ? 0x80 : b)),
    );
    const error = await own.client.closed;
    assert.ok(error instanceof VmError);
    assert.equal(error.code, "AGENT_PROTOCOL");
    assert.match(error.message, /BAD_FRAME/);
    await own.agent.kill();
  });

  test("a second HELLO starts a new session on the same agent", async () => {
    const own = await spawnAgent();
    try {
      const first = await AgentClient.connect(own.socket, { epoch: 1n });
      const running = first.exec({ argv: ["sleep", "100"] });
      const { pid } = await running.started;
      // A reconnect: a new client on the same socket (as after a snapshot restore).
      const detached = own.socket;
      const second = await (async () => {
        // Hand the socket over without destroying it: stop the first client reading.
        detached.removeAllListeners("data");
        return AgentClient.connect(detached, { epoch: 2n });
      })();
      assert.equal(second.epoch, 2n);
      const out = second.exec({ argv: ["echo", "again"] });
      assert.equal(Buffer.from((await out.read())!.data).toString(), "again\n");
      // The previous session's process was killed.
      await processGone(pid);
      second.close();
    } finally {
      await own.kill();
    }
  });
});
