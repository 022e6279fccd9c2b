/**
 * `AgentClient.rehello()`: a new session on the same connection, against a scripted agent (old
 * session's frames, wrong answers, no answer) and against the real agent in host mode.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import type { AgentClient } from "../../src/agent/agent-client.ts";
import { MessageType } from "../../src/agent/frame-codec.ts";
import {
  decodeHostHello,
  encodeExit,
  encodeGuestHello,
  encodeStarted,
  PROTOCOL_VERSION,
} from "../../src/agent/messages.ts";
import { VmError } from "../../src/errors.ts";
import { type ExecTarget, execBuilder } from "../../src/vm/index.ts";
import { connectAgent } from "../helpers/agent-binary.ts";
import { connected, type FakeAgent, failOnUnhandledRejections, isCode } from "./fake-agent.ts";

failOnUnhandledRejections();

/** Runs one exec to its end on the fake agent (STARTED, EXIT 0). */
async function execOnce(fake: FakeAgent, client: AgentClient): Promise<number> {
  const channel = client.exec({ argv: ["x"] });
  const exec = await fake.next((f) => f.type === MessageType.EXEC);
  fake.send(exec.stream, MessageType.STARTED, encodeStarted(42));
  fake.send(
    exec.stream,
    MessageType.EXIT,
    encodeExit({ exitCode: 0, timedOut: false, durationUs: 1, peakRssKiB: 1, step: 0 }),
  );
  assert.equal((await channel.exited).exitCode, 0);
  return exec.stream;
}

describe("rehello against a scripted agent", () => {
  test("sends a HELLO with a new epoch, the host time and fresh entropy; the session goes on", async () => {
    const { fake, client } = await connected();
    const first = client.epoch;
    const stream = await execOnce(fake, client);
    const before = BigInt(Date.now()) * 1_000_000n;
    const done = client.rehello({ timeoutMs: 5000 });
    const hello = await fake.next((f) => f.type === MessageType.HELLO);
    assert.equal(hello.stream, 0);
    const m = decodeHostHello(hello.payload);
    assert.notEqual(m.epoch, first);
    assert.equal(m.version, PROTOCOL_VERSION);
    assert.ok(
      m.timeNs !== undefined && m.timeNs >= before - 1_000_000n && m.timeNs <= before + 5_000_000_000n,
    );
    assert.equal(m.entropy?.length, 64);
    // No operation while the new session is not answered.
    assert.throws(() => client.exec({ argv: ["x"] }), isCode("VM_STOPPED"));
    fake.send(
      0,
      MessageType.HELLO,
      encodeGuestHello({ version: PROTOCOL_VERSION, epoch: m.epoch, agent: "fake-agent 2", bootNs: 7n }),
    );
    await done;
    assert.equal(client.epoch, m.epoch);
    assert.equal(client.agentVersion, "fake-agent 2");
    assert.equal(client.bootNs, 7n);
    assert.ok((await execOnce(fake, client)) > stream, "stream ids keep increasing");
    assert.equal(typeof (await client.ping()), "number");
    client.close();
    assert.equal(await client.closed, undefined);
  });

  test("explicit epoch, time and entropy are sent as given", async () => {
    const { fake, client } = await connected();
    const entropy = new Uint8Array(32).fill(9);
    const done = client.rehello({ epoch: 77n, timeNs: 123_456n, entropy, timeoutMs: 5000 });
    const m = decodeHostHello((await fake.next((f) => f.type === MessageType.HELLO)).payload);
    assert.equal(m.epoch, 77n);
    assert.equal(m.timeNs, 123_456n);
    assert.deepEqual(m.entropy, entropy);
    fake.send(
      0,
      MessageType.HELLO,
      encodeGuestHello({ version: PROTOCOL_VERSION, epoch: 77n, agent: "fake-agent 1", bootNs: 1n }),
    );
    await done;
    assert.equal(client.epoch, 77n);
    client.close();
  });

  test("frames of the old session before the answer are dropped", async () => {
    const { fake, client } = await connected();
    const stream = await execOnce(fake, client);
    const done = client.rehello({ timeoutMs: 5000 });
    const m = decodeHostHello((await fake.next((f) => f.type === MessageType.HELLO)).payload);
    // Output, exit, a pong and a frame for a stream never opened: all from the old session.
    fake.send(stream, MessageType.STDOUT, Uint8Array.of(1, 2, 3));
    fake.send(
      stream,
      MessageType.EXIT,
      encodeExit({ exitCode: 1, timedOut: false, durationUs: 1, peakRssKiB: 1, step: 0 }),
    );
    fake.send(0, MessageType.PONG, new Uint8Array(8));
    fake.send(stream + 5, MessageType.STDOUT, Uint8Array.of(4));
    fake.send(
      0,
      MessageType.HELLO,
      encodeGuestHello({ version: PROTOCOL_VERSION, epoch: m.epoch, agent: "fake-agent 1", bootNs: 1n }),
    );
    await done;
    await execOnce(fake, client);
    assert.equal(client.closedError, undefined);
    client.close();
  });

  test("refused while a stream of the current session is open; the session stays usable", async () => {
    const { fake, client } = await connected();
    const channel = client.exec({ argv: ["x"] });
    const exec = await fake.next((f) => f.type === MessageType.EXEC);
    fake.send(exec.stream, MessageType.STARTED, encodeStarted(1));
    await channel.started;
    const epoch = client.epoch;
    await assert.rejects(client.rehello({ timeoutMs: 5000 }), isCode("INVALID_ARGUMENT"));
    assert.equal(client.epoch, epoch);
    assert.equal(fake.pending.filter((f) => f.type === MessageType.HELLO).length, 0, "no HELLO was sent");
    fake.send(
      exec.stream,
      MessageType.EXIT,
      encodeExit({ exitCode: 0, timedOut: false, durationUs: 1, peakRssKiB: 1, step: 0 }),
    );
    await channel.exited;
    await execOnce(fake, client);
    client.close();
  });

  test("an answer with another epoch closes the connection with AGENT_PROTOCOL", async () => {
    const { fake, client } = await connected();
    const done = client.rehello({ timeoutMs: 5000 });
    const m = decodeHostHello((await fake.next((f) => f.type === MessageType.HELLO)).payload);
    fake.send(
      0,
      MessageType.HELLO,
      encodeGuestHello({ version: PROTOCOL_VERSION, epoch: m.epoch + 1n, agent: "x", bootNs: 1n }),
    );
    await assert.rejects(done, isCode("AGENT_PROTOCOL"));
    const error = await client.closed;
    assert.ok(error instanceof VmError && error.code === "AGENT_PROTOCOL");
    await fake.hostClosed;
  });

  test("no answer: VM_BOOT_TIMEOUT and the connection is closed", async () => {
    const { fake, client } = await connected();
    await assert.rejects(client.rehello({ timeoutMs: 100 }), isCode("VM_BOOT_TIMEOUT"));
    assert.ok(client.closedError);
    await fake.hostClosed;
    await assert.rejects(client.rehello(), isCode("VM_BOOT_TIMEOUT"));
  });

  test("abort closes the connection with an AbortError", async () => {
    const { fake, client } = await connected();
    const controller = new AbortController();
    const done = client.rehello({ signal: controller.signal, timeoutMs: 5000 });
    await fake.next((f) => f.type === MessageType.HELLO);
    controller.abort();
    await assert.rejects(done, isCode("ABORTED"));
    await fake.hostClosed;
  });
});

describe("rehello against the real agent (host mode)", () => {
  test("a new session on the same channel: new epoch, exec works before and after", async () => {
    await using connectedAgent = await connectAgent();
    const { client } = connectedAgent;
    const target: ExecTarget = {
      agent: () => client,
      defaults: () => ({ env: {}, cwd: "", user: "" }),
      describe: () => "host-mode agent",
      onExecTimedOut: () => {},
    };
    const run = async (argv: string[]) =>
      new TextDecoder().decode((await execBuilder(target).argv(argv).output()).stdout);
    assert.equal(await run(["echo", "one"]), "one\n");
    const first = client.epoch;
    const spawned = await execBuilder(target).argv(["sleep", "100"]).spawn();
    await assert.rejects(client.rehello({ timeoutMs: 10_000 }), isCode("INVALID_ARGUMENT"));
    spawned.kill("SIGKILL");
    await spawned.wait().catch(() => {});
    assert.equal(client.openStreams, 0);
    for (let i = 0; i < 3; i++) {
      await client.rehello({ timeoutMs: 10_000 });
      assert.notEqual(client.epoch, first);
      assert.equal(await run(["echo", `after ${i}`]), `after ${i}\n`);
    }
    assert.equal(typeof (await client.ping()), "number");
    assert.equal(client.closedError, undefined);
  });
});
