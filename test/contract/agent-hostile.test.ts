/**
 * The client against a scripted, misbehaving "agent": every bad input ends in a typed error on
 * `closed` and on pending operations — never a crash, a hang or an unhandled rejection.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { AgentClient } from "../../src/agent/agent-client.ts";
import { encodeTypedFields } from "../../src/agent/fields.ts";
import { encodeFrame, FLAG_FIN, MAX_PAYLOAD, MessageType } from "../../src/agent/frame-codec.ts";
import {
  AgentErrorCode,
  DEFAULT_WINDOW,
  decodeExec,
  decodeWindow,
  decodeWriteFile,
  encodeError,
  encodeExit,
  encodeFileInfo,
  encodeOk,
  encodeStarted,
  encodeWindow,
} from "../../src/agent/messages.ts";
import { AbortError, GuestIoError, SupermachineError, VmError } from "../../src/errors.ts";
import { execBuilder } from "../../src/vm/index.ts";
import { connected, type FakeAgent, failOnUnhandledRejections, fakeAgentPair, isCode } from "./fake-agent.ts";

failOnUnhandledRejections();

async function connectedWithSocket() {
  const { fake, host } = await fakeAgentPair();
  const [client] = await Promise.all([AgentClient.connect(host, { timeoutMs: 5000 }), fake.handshake()]);
  return { fake, host, client };
}

/** Opens an exec and answers STARTED. */
async function started(fake: FakeAgent, client: AgentClient, request = {}) {
  const channel = client.exec({ argv: ["x"], ...request });
  const exec = await fake.next((f) => f.type === MessageType.EXEC);
  fake.send(exec.stream, MessageType.STARTED, encodeStarted(42));
  await channel.started;
  return { channel, stream: exec.stream };
}

async function expectProtocolClose(client: AgentClient, fake: FakeAgent, pending: Promise<unknown>[] = []) {
  const error = await client.closed;
  assert.ok(error instanceof VmError, `closed with ${error}`);
  assert.equal(error.code, "AGENT_PROTOCOL");
  for (const p of pending) await assert.rejects(p, isCode("AGENT_PROTOCOL"));
  await fake.hostClosed; // the host dropped the channel
  await assert.rejects(client.ping(), isCode("AGENT_PROTOCOL"));
}

describe("handshake", () => {
  test("reads the agent's identity and epoch", async () => {
    const { fake, host } = await fakeAgentPair();
    const [client, epoch] = await Promise.all([AgentClient.connect(host, { epoch: 77n }), fake.handshake()]);
    assert.equal(epoch, 77n);
    assert.equal(client.epoch, 77n);
    assert.equal(client.agentVersion, "fake-agent 1");
    assert.equal(client.bootNs, 123n);
    assert.ok((await client.ping()) >= 0);
    client.close();
    assert.equal(await client.closed, undefined);
  });

  test("ERROR VERSION → AGENT_VERSION", async () => {
    const { fake, host } = await fakeAgentPair();
    const connecting = AgentClient.connect(host);
    await fake.next();
    fake.send(0, MessageType.ERROR, encodeError({ code: AgentErrorCode.VERSION, message: "want 2" }));
    await assert.rejects(connecting, isCode("AGENT_VERSION"));
    await fake.hostClosed;
  });

  test("a HELLO with another version → AGENT_VERSION; a wrong epoch → AGENT_PROTOCOL", async () => {
    for (const [overrides, code] of [
      [{ version: 2 }, "AGENT_VERSION"],
      [{ epoch: 5n }, "AGENT_PROTOCOL"],
    ] as const) {
      const { fake, host } = await fakeAgentPair();
      const connecting = AgentClient.connect(host, { epoch: 4n });
      await fake.handshake(overrides);
      await assert.rejects(connecting, isCode(code));
    }
  });

  test("guest frames before the HELLO answer are ignored (left over from before a restore)", async () => {
    const { fake, host } = await fakeAgentPair();
    const connecting = AgentClient.connect(host, { timeoutMs: 5000 });
    fake.send(0, MessageType.PONG, new Uint8Array(8));
    fake.send(3, MessageType.STDOUT, new Uint8Array([1, 2, 3]));
    fake.send(
      3,
      MessageType.EXIT,
      encodeExit({ exitCode: 0, timedOut: false, durationUs: 1, peakRssKiB: 1, step: 0 }),
    );
    await fake.handshake();
    const client = await connecting;
    assert.equal(client.agentVersion, "fake-agent 1");
    client.close();
  });

  test("a host-to-guest message before HELLO → AGENT_PROTOCOL", async () => {
    const { fake, host } = await fakeAgentPair();
    const connecting = AgentClient.connect(host, { timeoutMs: 5000 });
    fake.send(0, MessageType.SHUTDOWN, new Uint8Array(0));
    await assert.rejects(connecting, isCode("AGENT_PROTOCOL"));
  });

  test("no answer → VM_BOOT_TIMEOUT; abort → AbortError; EOF → VM_EXITED", async () => {
    let pair = await fakeAgentPair();
    await assert.rejects(AgentClient.connect(pair.host, { timeoutMs: 50 }), isCode("VM_BOOT_TIMEOUT"));
    await pair.fake.hostClosed;

    pair = await fakeAgentPair();
    const controller = new AbortController();
    const connecting = AgentClient.connect(pair.host, { signal: controller.signal });
    await pair.fake.next();
    controller.abort();
    await assert.rejects(connecting, AbortError);

    pair = await fakeAgentPair();
    const ending = AgentClient.connect(pair.host);
    await pair.fake.next();
    pair.fake.socket.end();
    await assert.rejects(ending, isCode("VM_EXITED"));
  });
});

describe("malformed input closes the channel with AGENT_PROTOCOL", () => {
  test("garbage bytes", async () => {
    const { fake, client } = await connected();
    const channel = client.exec({ argv: ["x"] });
    fake.sendRaw(new Uint8Array(Buffer.from("HTTP/1.1 400 Bad Request\r\n\r\n")));
    await expectProtocolClose(client, fake, [channel.started, channel.exited]);
  });

  test("an oversized header, before any payload", async () => {
    const { fake, client } = await connected();
    const header = encodeFrame({ stream: 0, type: MessageType.PONG }).slice();
    new DataView(header.buffer).setUint32(0, MAX_PAYLOAD + 1);
    fake.sendRaw(header);
    await expectProtocolClose(client, fake);
  });

  test("reserved flag bits and unknown types", async () => {
    for (const frame of [
      Uint8Array.of(0, 0, 0, 0, 0, 0, 0, 0, MessageType.PONG, 0x40),
      Uint8Array.of(0, 0, 0, 0, 0, 0, 0, 1, 0x30, 0),
    ]) {
      const { fake, client } = await connected();
      fake.sendRaw(frame);
      await expectProtocolClose(client, fake);
    }
  });

  test("a host-to-guest message type from the guest", async () => {
    const { fake, client } = await connected();
    fake.send(0, MessageType.SHUTDOWN);
    await expectProtocolClose(client, fake);
  });

  test("a frame for a stream that was never opened", async () => {
    const { fake, client } = await connected();
    fake.send(9, MessageType.STDOUT, Uint8Array.of(1));
    await expectProtocolClose(client, fake);
  });

  test("output beyond the credit granted", async () => {
    const { fake, client } = await connected();
    const { channel, stream } = await started(fake, client);
    // Exactly the window is fine; one byte more is a flood.
    fake.send(stream, MessageType.STDOUT, new Uint8Array(DEFAULT_WINDOW));
    fake.send(stream, MessageType.STDERR, new Uint8Array(1));
    await expectProtocolClose(client, fake, [channel.exited]);
    // Output received before the violation can still be read, then the error.
    const first = await channel.read();
    assert.equal(first?.data.length, DEFAULT_WINDOW);
    await assert.rejects(channel.read(), isCode("AGENT_PROTOCOL"));
  });

  test("a flood of small frames beyond credit", async () => {
    const { fake, client } = await connected();
    const { channel, stream } = await started(fake, client, { windowBytes: 1000 });
    for (let i = 0; i < 2000; i++) fake.send(stream, MessageType.STDOUT, new Uint8Array(1));
    await expectProtocolClose(client, fake, [channel.exited]);
  });

  test("bad fields: a short u32, non-UTF-8 where UTF-8 is required, missing required field", async () => {
    const payloads: [number, Uint8Array][] = [
      [MessageType.STARTED, Uint8Array.of(1, 0, 0, 0, 2, 0, 1)],
      [MessageType.ERROR, Uint8Array.of(1, 0, 0, 0, 4, 0, 0, 0, 5, 3, 0, 0, 0, 2, 0xff, 0xfe)],
      [MessageType.STARTED, new Uint8Array(0)],
      [MessageType.EXIT, encodeExit({ timedOut: false, durationUs: 1, peakRssKiB: 1, step: 0 })],
    ];
    for (const [type, payload] of payloads) {
      const { fake, client } = await connected();
      const channel = client.exec({ argv: ["x"] });
      const exec = await fake.next((f) => f.type === MessageType.EXEC);
      if (type === MessageType.EXIT) fake.send(exec.stream, MessageType.STARTED, encodeStarted(1));
      fake.send(exec.stream, type, payload);
      await expectProtocolClose(client, fake, [channel.exited]);
    }
  });

  test("out-of-order exec frames: output before STARTED, STARTED twice, data after FIN", async () => {
    const scripts: ((fake: FakeAgent, stream: number) => void)[] = [
      (fake, s) => fake.send(s, MessageType.STDOUT, Uint8Array.of(1)),
      (fake, s) => {
        fake.send(s, MessageType.STARTED, encodeStarted(1));
        fake.send(s, MessageType.STARTED, encodeStarted(1));
      },
      (fake, s) => {
        fake.send(s, MessageType.STARTED, encodeStarted(1));
        fake.send(s, MessageType.STDOUT, new Uint8Array(0), FLAG_FIN);
        fake.send(s, MessageType.STDOUT, Uint8Array.of(1));
      },
      (fake, s) => fake.send(s, MessageType.FILE_INFO, encodeFileInfo({ size: 1, mode: 0, uid: 0, gid: 0 })),
    ];
    for (const script of scripts) {
      const { fake, client } = await connected();
      const channel = client.exec({ argv: ["x"] });
      const exec = await fake.next((f) => f.type === MessageType.EXEC);
      script(fake, exec.stream);
      await expectProtocolClose(client, fake, [channel.exited]);
    }
  });

  test("a PONG nobody asked for, an OK without SHUTDOWN, an ERROR on stream 0", async () => {
    for (const [type, payload] of [
      [MessageType.PONG, new Uint8Array(8)],
      [MessageType.OK, encodeOk()],
      [MessageType.ERROR, encodeError({ code: AgentErrorCode.BAD_FRAME })],
    ] as const) {
      const { fake, client } = await connected();
      fake.send(0, type, payload);
      await expectProtocolClose(client, fake);
    }
  });

  test("a guest that stops reading its end gets no more credit (the host buffer stays bounded)", async () => {
    const { fake, host, client } = await connectedWithSocket();
    const { channel, stream } = await started(fake, client, { windowBytes: 4096 });
    fake.socket.pause(); // never reads the host's WINDOW frames again
    let maxQueued = 0;
    const frame = encodeFrame({ stream, type: MessageType.STDOUT, payload: new Uint8Array(4096) });
    // Each round sends what the host has granted back so far (the host grants what it consumed).
    for (let round = 0; round < 20_000 && client.closedError === undefined; round++) {
      fake.sendRaw(frame);
      while (channel.bufferedBytes === 0 && client.closedError === undefined) await new Promise(setImmediate);
      await channel.read().catch(() => {});
      await new Promise(setImmediate);
      maxQueued = Math.max(maxQueued, host.writableLength);
    }
    // Bounded by the socket's high-water mark (64 KiB) plus one frame, then credit runs out.
    assert.ok(maxQueued < 128 * 1024, `host queued ${maxQueued} bytes for a guest that does not read`);
    assert.ok(client.closedError, "the guest ran out of credit and overran it");
    fake.socket.resume();
    await expectProtocolClose(client, fake, [channel.exited]);
  });

  test("read-file data beyond credit", async () => {
    const { fake, client } = await connected();
    const reading = client.readFile("/f");
    const req = await fake.next((f) => f.type === MessageType.READ_FILE);
    fake.send(
      req.stream,
      MessageType.FILE_INFO,
      encodeFileInfo({ size: 5_000_000, mode: 0o100644, uid: 0, gid: 0 }),
    );
    const file = await reading;
    file.stream.on("error", () => {});
    for (let i = 0; i < 2; i++) fake.send(req.stream, MessageType.FILE_DATA, new Uint8Array(MAX_PAYLOAD));
    await expectProtocolClose(client, fake);
    assert.ok(file.stream.destroyed);
  });
});

describe("stream ends and credit", () => {
  test("frames that cross a stream's end are dropped", async () => {
    const { fake, client } = await connected();
    const { channel, stream } = await started(fake, client);
    fake.send(
      stream,
      MessageType.EXIT,
      encodeExit({ exitCode: 0, timedOut: false, durationUs: 5, peakRssKiB: 9, step: 0 }),
    );
    const exit = await channel.exited;
    assert.deepEqual(exit, {
      exitCode: 0,
      signal: null,
      signalNumber: null,
      timedOut: false,
      durationMs: 0.005,
      peakRssKiB: 9,
      step: 0,
    });
    fake.send(stream, MessageType.ERROR, encodeError({ code: AgentErrorCode.BAD_REQUEST }));
    fake.send(stream, MessageType.STDOUT, Uint8Array.of(1));
    // A reset stream likewise.
    const second = await started(fake, client);
    second.channel.reset(new AbortError());
    await assert.rejects(second.channel.exited, AbortError);
    const reset = await fake.next((f) => f.type === MessageType.RESET);
    assert.equal(reset.stream, second.stream);
    fake.send(second.stream, MessageType.STDOUT, Uint8Array.of(1));
    assert.ok((await client.ping()) >= 0);
    assert.equal(client.closedError, undefined);
    client.close();
  });

  test("output credit is granted as the consumer takes bytes, not before", async () => {
    const { fake, client } = await connected();
    const { channel, stream } = await started(fake, client, { windowBytes: 100_000 });
    for (let i = 0; i < 10; i++) fake.send(stream, MessageType.STDOUT, new Uint8Array(10_000));
    await client.ping(); // the ten frames arrived before the PONG
    assert.equal(channel.bufferedBytes, 100_000);
    assert.equal(fake.pending.filter((f) => f.type === MessageType.WINDOW).length, 0);
    for (let i = 0; i < 3; i++) assert.equal((await channel.read())?.data.length, 10_000);
    let granted = 0;
    while (granted < 30_000)
      granted += decodeWindow((await fake.next((f) => f.type === MessageType.WINDOW)).payload);
    await client.ping();
    assert.equal(granted + fake.pending.filter((f) => f.type === MessageType.WINDOW).length, 30_000);
    client.close();
  });

  test("stdin stops at the agent's credit until WINDOW", async () => {
    const { fake, client } = await connected();
    const { channel, stream } = await started(fake, client, { stdin: true });
    const stdinBytes = () =>
      fake.pending.filter((f) => f.type === MessageType.STDIN).reduce((n, f) => n + f.payload.length, 0);
    const writing = channel.writeStdin(new Uint8Array(DEFAULT_WINDOW + 5000));
    await fake.until(() => stdinBytes() === DEFAULT_WINDOW);
    await client.ping(); // anything sent before the PING arrived before the PONG
    assert.equal(stdinBytes(), DEFAULT_WINDOW);
    fake.send(stream, MessageType.WINDOW, encodeWindow(3000));
    await fake.until(() => stdinBytes() === DEFAULT_WINDOW + 3000);
    fake.send(stream, MessageType.WINDOW, encodeWindow(1_000_000));
    await writing;
    await channel.endStdin();
    await fake.until(
      () => stdinBytes() === DEFAULT_WINDOW + 5000 && fake.pending.some((f) => f.flags === FLAG_FIN),
    );
    client.close();
  });

  test("opening frames go out in stream id order, also under backpressure", async () => {
    const { fake, client } = await connected();
    fake.socket.pause();
    const big = client.writeFile("/big", new Uint8Array(8 * MAX_PAYLOAD)).catch(() => {});
    const ops: Promise<unknown>[] = [];
    for (let i = 0; i < 30; i++) {
      const channel = client.exec({
        argv: ["x"],
        stdin: true,
        stage: [{ path: "/s", content: new Uint8Array(70_000) }],
      });
      void channel.writeStdin(new Uint8Array(100_000)).catch(() => {});
      ops.push(channel.exited.catch(() => {}));
      if (i % 3 === 0) ops.push(client.readFile(`/f${i}`).catch(() => {}));
    }
    fake.socket.resume();
    // Without backpressure too: an exec (which stages data) then a read, in the same tick.
    ops.push(client.exec({ argv: ["y"] }).exited.catch(() => {}));
    ops.push(client.readFile("/last").catch(() => {}));
    const opening = new Set<number>([MessageType.EXEC, MessageType.WRITE_FILE, MessageType.READ_FILE]);
    await fake.until((frames) => frames.filter((f) => opening.has(f.type)).length === 43);
    const ids = fake.pending.filter((f) => opening.has(f.type)).map((f) => f.stream);
    assert.deepEqual(
      ids,
      [...ids].sort((x, y) => x - y),
    );
    client.close();
    await Promise.all([big, ...ops]);
  });

  test("the request is written in one go: EXEC, staged files, first stdin", async () => {
    const { fake, client } = await connected();
    const channel = client.exec({
      argv: ["cat"],
      stdin: true,
      stage: [
        { path: "/a", content: new Uint8Array(MAX_PAYLOAD + 10).fill(1), mode: 0o755 },
        { path: "/b", content: new Uint8Array(0) },
      ],
    });
    void channel.writeStdin(Uint8Array.of(7));
    await fake.until((frames) => frames.some((f) => f.type === MessageType.STDIN));
    const frames = fake.pending.map((f) => [f.type, f.payload.length, f.flags]);
    assert.deepEqual(frames, [
      [MessageType.EXEC, frames[0]![1], 0],
      [MessageType.STAGE_DATA, MAX_PAYLOAD, 0],
      [MessageType.STAGE_DATA, 10, FLAG_FIN],
      [MessageType.STAGE_DATA, 0, FLAG_FIN],
      [MessageType.STDIN, 1, 0],
    ]);
    const exec = decodeExec(fake.pending[0]!.payload);
    assert.deepEqual(exec.stage, [
      { path: "/a", mode: 0o755, size: MAX_PAYLOAD + 10 },
      { path: "/b", mode: undefined, size: 0 },
    ]);
    assert.equal(exec.stdin, true);
    client.close();
  });
});

describe("ending the channel", () => {
  test("EOF fails pending operations with VM_EXITED", async () => {
    const { fake, client } = await connected();
    const { channel } = await started(fake, client);
    const reading = assert.rejects(client.readFile("/x"), isCode("VM_EXITED"));
    fake.socket.end();
    await assert.rejects(channel.exited, isCode("VM_EXITED"));
    await reading;
    const error = await client.closed;
    assert.ok(error instanceof VmError && error.code === "VM_EXITED");
    assert.throws(() => client.exec({ argv: ["x"] }), isCode("VM_EXITED"));
  });

  test("close() fails pending operations with VM_STOPPED, or the reason given", async () => {
    let { fake, client } = await connected();
    let exec = await started(fake, client);
    client.close();
    await assert.rejects(exec.channel.exited, isCode("VM_STOPPED"));
    assert.equal(await client.closed, undefined);

    ({ fake, client } = await connected());
    exec = await started(fake, client);
    const reason = new VmError("VM_EXITED", "qemu died", { qemuExitCode: 1 });
    client.close(reason);
    await assert.rejects(exec.channel.exited, (e) => e === reason);
    assert.equal(await client.closed, reason);
  });

  test("SHUTDOWN → OK → EOF is a clean close", async () => {
    const { fake, client } = await connected();
    const shutting = client.shutdown();
    assert.equal(client.shutdown(), shutting);
    await fake.next((f) => f.type === MessageType.SHUTDOWN);
    fake.send(0, MessageType.OK, encodeOk());
    await shutting;
    fake.socket.end();
    assert.equal(await client.closed, undefined);
  });
});

describe("files against the fake agent", () => {
  test("an ERROR part-way through a write rejects with GuestIoError and stops the upload", async () => {
    const { fake, client } = await connected();
    const writing = client.writeFile("/big", new Uint8Array(20 * MAX_PAYLOAD), { mode: 0o600, mkdirs: true });
    const req = await fake.next((f) => f.type === MessageType.WRITE_FILE);
    assert.deepEqual(decodeWriteFile(req.payload), {
      path: "/big",
      mode: 0o600,
      uid: undefined,
      gid: undefined,
      size: 20 * MAX_PAYLOAD,
      mkdirs: true,
    });
    await fake.next((f) => f.type === MessageType.FILE_DATA);
    fake.send(
      req.stream,
      MessageType.ERROR,
      encodeError({ code: AgentErrorCode.IO, errno: 28, message: "No space" }),
    );
    await assert.rejects(writing, (e) => e instanceof GuestIoError && e.errno === 28 && e.path === "/big");
    await client.ping();
    const data = fake.pending.filter((f) => f.type === MessageType.FILE_DATA).length;
    assert.ok(data < 19, `sent ${data} more data frames after the ERROR`);
    client.close();
  });

  test("a source shorter or longer than sizeBytes abandons the write", async () => {
    const { fake, client } = await connected();
    async function* gen(n: number) {
      yield new Uint8Array(n);
    }
    const short = client.writeFile("/s", gen(5), { sizeBytes: 10 });
    await assert.rejects(short, isCode("INVALID_ARGUMENT"));
    const long = client.writeFile("/l", gen(15), { sizeBytes: 10 });
    await assert.rejects(long, isCode("INVALID_ARGUMENT"));
    await fake.until((frames) => frames.filter((f) => f.type === MessageType.RESET).length === 2);
    client.close();
  });

  test("abort while waiting for the agent", async () => {
    const { fake, client } = await connected();
    const controller = new AbortController();
    const reading = client.readFile("/x", { signal: controller.signal });
    await fake.next((f) => f.type === MessageType.READ_FILE);
    controller.abort();
    await assert.rejects(reading, AbortError);
    await fake.next((f) => f.type === MessageType.RESET);
    client.close();
  });
});

describe("exec API against the fake agent", () => {
  const target = (client: AgentClient, onExecTimedOut?: () => void) => ({
    agent: () => client,
    defaults: () => ({ env: { LANG: "C.UTF-8" }, cwd: "/srv", user: "app" }),
    describe: () => "fake VM",
    onExecTimedOut,
  });

  test("the host backstop ends a timed-out exec the agent never ends", async () => {
    const { fake, client } = await connected();
    let timedOut = 0;
    const builder = execBuilder(target(client, () => timedOut++))
      .argv(["sleep", "9"])
      .timeout(1)
      .killGrace(0);
    const output = builder.output();
    const exec = await fake.next((f) => f.type === MessageType.EXEC);
    fake.send(exec.stream, MessageType.STARTED, encodeStarted(5));
    await assert.rejects(output, isCode("EXEC_TIMEOUT"));
    assert.equal(timedOut, 1);
    await fake.next((f) => f.type === MessageType.RESET);
    client.close();
  });

  test("defaults fill env (with PATH), cwd and user; builder values win", async () => {
    const { fake, client } = await connected();
    void execBuilder(target(client))
      .argv(["env"])
      .env({ LANG: "C", X: "1" })
      .output()
      .catch(() => {});
    const exec = decodeExec((await fake.next((f) => f.type === MessageType.EXEC)).payload);
    assert.deepEqual(exec.env, [
      "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
      "LANG=C",
      "X=1",
    ]);
    assert.equal(exec.cwd, "/srv");
    assert.equal(exec.user, "app");
    assert.equal(exec.stdin, undefined);
    client.close();
  });

  test("an exit by signal rejects output() with ExecError carrying the outcome", async () => {
    const { fake, client } = await connected();
    const output = execBuilder(target(client)).argv(["x"]).output();
    const exec = await fake.next((f) => f.type === MessageType.EXEC);
    fake.send(exec.stream, MessageType.STARTED, encodeStarted(5));
    fake.send(exec.stream, MessageType.STDERR, Buffer.from("boom\n"), FLAG_FIN);
    fake.send(exec.stream, MessageType.STDOUT, new Uint8Array(0), FLAG_FIN);
    fake.send(
      exec.stream,
      MessageType.EXIT,
      encodeExit({ signal: 9, timedOut: false, durationUs: 1, peakRssKiB: 1, step: 0 }),
    );
    await assert.rejects(output, (e: unknown) => {
      assert.ok(SupermachineError.is(e) && e.code === "EXEC_FAILED");
      const outcome = (e as unknown as { outcome: { signal: string; stderrText: string } }).outcome;
      assert.equal(outcome.signal, "SIGKILL");
      assert.equal(outcome.stderrText, "boom\n");
      assert.match((e as Error).message, /killed by SIGKILL in fake VM; stderr: boom/);
      return true;
    });
    client.close();
  });

  test("a window of many frames still decodes: STARTED with unknown fields is accepted", async () => {
    const { fake, client } = await connected();
    const channel = client.exec({ argv: ["x"] });
    const exec = await fake.next((f) => f.type === MessageType.EXEC);
    fake.send(
      exec.stream,
      MessageType.STARTED,
      encodeTypedFields([
        { tag: 1, kind: "u32", value: 77 },
        { tag: 9, kind: "string", value: "future" },
      ]),
    );
    assert.deepEqual(await channel.started, { pid: 77 });
    client.close();
  });
});
