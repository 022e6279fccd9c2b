/**
 * What a hostile guest can make the host hold or wait for, against a scripted agent: memory is
 * bounded by the credit actually retained (floods of empty and 1-byte frames, frames for ended
 * streams), announced sizes are checked, every wait on the guest has a deadline, and the streams of
 * protocol version 2 refuse what the agent may not send.
 */
import assert from "node:assert/strict";
import type { Socket } from "node:net";
import { describe, test } from "node:test";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import type { AgentClient } from "../../src/agent/agent-client.ts";
import { encodeFrame, FLAG_FIN, FRAME_COST, MessageType } from "../../src/agent/frame-codec.ts";
import {
  decodeWindow,
  encodeDirents,
  encodeExit,
  encodeFileInfo,
  encodeOk,
  encodeStarted,
  encodeStat,
  encodeWatchEvent,
  encodeWorkloadStatus,
  WatchEventKind,
  WorkloadState,
} from "../../src/agent/messages.ts";
import { GuestIoError, VmError } from "../../src/errors.ts";
import { connected, type FakeAgent, failOnUnhandledRejections, isCode } from "./fake-agent.ts";

failOnUnhandledRejections();

setFlagsFromString("--expose-gc");
const gc = runInNewContext("gc") as () => void;

const MiB = 1024 * 1024;

/** A 64 KiB run of STDOUT frames on `stream`, alternating empty and 1-byte payloads. */
function tinyFrames(stream: number): Buffer {
  const empty = encodeFrame({ stream, type: MessageType.STDOUT, payload: new Uint8Array(0) });
  const one = encodeFrame({ stream, type: MessageType.STDOUT, payload: Uint8Array.of(0x61) });
  const parts: Uint8Array[] = [];
  let size = 0;
  for (let i = 0; size + 11 <= 64 * 1024; i++) {
    const f = i % 2 ? one : empty;
    parts.push(f);
    size += f.length;
  }
  return Buffer.concat(parts);
}

/** Writes `chunk` `times` times as fast as the socket takes it; stops early when it closes. */
async function flood(socket: Socket, chunk: Uint8Array, times: number, sample: () => void): Promise<number> {
  // Not events.once: it rejects on 'error', and the host resetting the socket is expected here.
  const closed = new Promise<"closed">((resolve) => socket.once("close", () => resolve("closed")));
  for (let i = 0; i < times; i++) {
    if (socket.destroyed || !socket.writable) return i;
    if (!socket.write(chunk)) {
      const drained = new Promise<"drained">((resolve) => socket.once("drain", () => resolve("drained")));
      if ((await Promise.race([drained, closed])) === "closed") return i;
    }
    if (i % 50 === 0) sample();
  }
  return times;
}

/**
 * Peak growth of what the host retains over a baseline taken now: each sample runs a full GC
 * first, so garbage the flood made and the collector has not reclaimed yet does not count (RSS
 * would: it follows V8's young generation, not what the client keeps). `heap` is the JavaScript
 * heap (frame objects, queued chunks), `arrayBuffers` the bytes outside it (payloads).
 */
function memoryProbe(): { sample: () => void; peak: () => { arrayBuffers: number; heap: number } } {
  gc();
  const base = process.memoryUsage();
  let arrayBuffers = 0;
  let heap = 0;
  const sample = () => {
    gc();
    const now = process.memoryUsage();
    arrayBuffers = Math.max(arrayBuffers, now.arrayBuffers - base.arrayBuffers);
    heap = Math.max(heap, now.heapUsed - base.heapUsed);
  };
  const peak = () => {
    sample();
    return { arrayBuffers, heap };
  };
  return { sample, peak };
}

/** A fake agent whose own side discards what the host sends (so only the host's memory counts). */
function deaf(fake: FakeAgent): void {
  fake.socket.removeAllListeners("data");
  fake.socket.on("data", () => {});
}

async function startedExec(fake: FakeAgent, client: AgentClient, windowBytes: number) {
  const channel = client.exec({ argv: ["x"], windowBytes });
  const exec = await fake.next((f) => f.type === MessageType.EXEC);
  fake.send(exec.stream, MessageType.STARTED, encodeStarted(42));
  await channel.started;
  return { channel, stream: exec.stream };
}

const EXIT_0 = encodeExit({ exitCode: 0, timedOut: false, durationUs: 1, peakRssKiB: 1, step: 0 });

describe("host memory is bounded by the credit retained", () => {
  test("4,000 × 64 KiB of empty and 1-byte output frames, read as they come", async () => {
    const { fake, client } = await connected();
    const { channel, stream } = await startedExec(fake, client, 2 * MiB);
    deaf(fake);
    let received = 0;
    const reading = (async () => {
      for (;;) {
        const chunk = await channel.read().catch(() => null);
        if (!chunk) return;
        received += chunk.data.length;
      }
    })();
    const probe = memoryProbe();
    const sent = await flood(fake.socket, tinyFrames(stream), 4000, probe.sample);
    if (!client.closedError) {
      fake.send(stream, MessageType.STDOUT, new Uint8Array(0), FLAG_FIN);
      fake.send(stream, MessageType.STDERR, new Uint8Array(0), FLAG_FIN);
      fake.send(stream, MessageType.EXIT, EXIT_0);
      await Promise.race([channel.exited.catch(() => {}), client.closed]);
    }
    await reading;
    const peak = probe.peak();
    assert.ok(peak.arrayBuffers < 32 * MiB, `arrayBuffers grew ${peak.arrayBuffers} bytes`);
    assert.ok(peak.heap < 32 * MiB, `the heap grew ${peak.heap} bytes`);
    if (client.closedError) {
      assert.ok(isCode("AGENT_PROTOCOL")(client.closedError), String(client.closedError));
    } else {
      assert.equal(sent, 4000);
      assert.equal((await channel.exited).exitCode, 0);
      assert.ok(received <= 4000 * 3000, `${received} bytes of output`);
    }
    client.close();
  });

  test("the same flood with nobody reading: the host holds the credit's worth, then AGENT_PROTOCOL", async () => {
    const { fake, client } = await connected();
    const { channel, stream } = await startedExec(fake, client, 2 * MiB);
    deaf(fake);
    const probe = memoryProbe();
    await flood(fake.socket, tinyFrames(stream), 4000, probe.sample);
    const error = await client.closed;
    const peak = probe.peak();
    assert.ok(error instanceof VmError && error.code === "AGENT_PROTOCOL", String(error));
    assert.ok(channel.bufferedBytes <= (2 * MiB) / (1 + FRAME_COST), `${channel.bufferedBytes} bytes held`);
    assert.ok(peak.arrayBuffers < 32 * MiB, `arrayBuffers grew ${peak.arrayBuffers} bytes`);
    assert.ok(peak.heap < 32 * MiB, `the heap grew ${peak.heap} bytes`);
  });

  test("frames for an ended stream, beyond what could have been in flight, are AGENT_PROTOCOL", async () => {
    const { fake, client } = await connected();
    const { channel, stream } = await startedExec(fake, client, 2 * MiB);
    fake.send(stream, MessageType.STDOUT, new Uint8Array(0), FLAG_FIN);
    fake.send(stream, MessageType.STDERR, new Uint8Array(0), FLAG_FIN);
    fake.send(stream, MessageType.EXIT, EXIT_0);
    assert.equal((await channel.exited).exitCode, 0);
    deaf(fake);
    const probe = memoryProbe();
    const sent = await flood(fake.socket, tinyFrames(stream), 4000, probe.sample);
    const error = await client.closed;
    assert.ok(error instanceof VmError && error.code === "AGENT_PROTOCOL", String(error));
    assert.match(error.message, /has ended/);
    assert.ok(sent < 100, `the host read ${sent} chunks of junk before refusing it`);
    assert.ok(probe.peak().arrayBuffers < 32 * MiB);
  });

  test("a reset stream may still receive what its credit allowed, not more", async () => {
    const { fake, client } = await connected();
    const { channel, stream } = await startedExec(fake, client, 100_000);
    channel.reset(new Error("host gave up"));
    await fake.next((f) => f.type === MessageType.RESET);
    // In flight before the agent saw the RESET: up to the credit, and the stream's last frames.
    fake.send(stream, MessageType.STDOUT, new Uint8Array(100_000 - FRAME_COST));
    fake.send(stream, MessageType.EXIT, EXIT_0);
    assert.ok((await client.ping()) >= 0);
    assert.equal(client.closedError, undefined);
    for (let i = 0; i < 3; i++) fake.send(stream, MessageType.STDOUT, new Uint8Array(60_000));
    const error = await client.closed;
    assert.ok(isCode("AGENT_PROTOCOL")(error));
  });
});

describe("readFile trusts no announced size", () => {
  async function announce(size: number, maxBytes?: number) {
    const { fake, client } = await connected();
    const reading = client.readFileBytes("/f", maxBytes === undefined ? {} : { maxBytes });
    const req = await fake.next((f) => f.type === MessageType.READ_FILE);
    fake.send(req.stream, MessageType.FILE_INFO, encodeFileInfo({ size, mode: 0o100644, uid: 0, gid: 0 }));
    return { fake, client, reading, stream: req.stream };
  }

  test("a huge announcement fails with EFBIG, allocates nothing, resets the stream and leaves the session usable", async () => {
    const probe = memoryProbe();
    const { fake, client, reading } = await announce(2 ** 52);
    await assert.rejects(reading, (e: unknown) => e instanceof GuestIoError && e.code === "EFBIG");
    assert.ok(probe.peak().arrayBuffers < 32 * MiB);
    await fake.next((f) => f.type === MessageType.RESET);
    assert.equal(client.openStreams, 0);
    const rehello = client.rehello({ timeoutMs: 5000 });
    await fake.handshake();
    await rehello;
    client.close();
  });

  test("more data than announced, or FIN before it, is AGENT_PROTOCOL", async () => {
    let { fake, reading, stream } = await announce(10);
    fake.send(stream, MessageType.FILE_DATA, new Uint8Array(8));
    fake.send(stream, MessageType.FILE_DATA, new Uint8Array(8), FLAG_FIN);
    await assert.rejects(reading, isCode("AGENT_PROTOCOL"));
    ({ fake, reading, stream } = await announce(10));
    fake.send(stream, MessageType.FILE_DATA, new Uint8Array(4), FLAG_FIN);
    await assert.rejects(reading, isCode("AGENT_PROTOCOL"));
    ({ fake, reading, stream } = await announce(4));
    fake.send(stream, MessageType.FILE_DATA, new Uint8Array(4));
    await assert.rejects(reading, isCode("AGENT_PROTOCOL"), "all the data without FIN");
    // A large (within maxBytes) announcement is not allocated up front: data arrives as it comes.
    ({ fake, reading, stream } = await announce(200 * MiB));
    fake.send(stream, MessageType.FILE_DATA, new Uint8Array(5), FLAG_FIN);
    await assert.rejects(reading, isCode("AGENT_PROTOCOL"));
  });
});

describe("every wait on the guest has a deadline", () => {
  test("ping, readFile, writeFile, exec start, fs, connectTcp, watch, workload → AGENT_TIMEOUT", async () => {
    const { fake, client } = await connected();
    fake.autoPong = false;
    const t = { timeoutMs: 50 };
    const resets = () => fake.pending.filter((f) => f.type === MessageType.RESET).length;
    await assert.rejects(client.ping(t), isCode("AGENT_TIMEOUT"));
    await assert.rejects(client.readFileBytes("/f", t), isCode("AGENT_TIMEOUT"));
    await assert.rejects(client.writeFile("/f", "data", t), isCode("AGENT_TIMEOUT"));
    const exec = client.exec({ argv: ["x"], startTimeoutMs: 50 });
    await assert.rejects(exec.started, isCode("AGENT_TIMEOUT"));
    await assert.rejects(client.fs.stat("/", t), (e: unknown) => {
      assert.ok(isCode("AGENT_TIMEOUT")(e));
      assert.equal((e as { operation: string }).operation, "stat /");
      return true;
    });
    await assert.rejects(client.connectTcp(80, t), isCode("AGENT_TIMEOUT"));
    await assert.rejects(client.watch("/", t).ready, isCode("AGENT_TIMEOUT"));
    await assert.rejects(client.workloadStatus(t), isCode("AGENT_TIMEOUT"));
    await fake.until(() => resets() === 7);
    assert.equal(client.openStreams, 0);
    // A PONG that comes after its deadline is dropped, not a violation.
    const ping = await fake.next((f) => f.type === MessageType.PING);
    fake.send(0, MessageType.PONG, ping.payload);
    fake.autoPong = true;
    assert.ok((await client.ping()) >= 0);
    assert.equal(client.closedError, undefined);
    client.close();
  });

  test("every expired deadline marks the connection timed out (a VM then counts as tainted)", async () => {
    const t = { timeoutMs: 50 };
    const calls: [string, (client: AgentClient) => Promise<unknown>][] = [
      ["ping", (c) => c.ping(t)],
      ["readFile", (c) => c.readFileBytes("/f", t)],
      ["writeFile", (c) => c.writeFile("/f", "data", t)],
      ["exec start", (c) => c.exec({ argv: ["x"], startTimeoutMs: 50 }).started],
      ["fs", (c) => c.fs.stat("/", t)],
      ["connectTcp", (c) => c.connectTcp(80, t)],
      ["watch", (c) => c.watch("/", t).ready],
      ["workload", (c) => c.workloadStatus(t)],
    ];
    for (const [name, call] of calls) {
      const { fake, client } = await connected();
      fake.autoPong = false;
      assert.equal(client.timedOut, false, name);
      await assert.rejects(call(client), isCode("AGENT_TIMEOUT"), name);
      assert.equal(client.timedOut, true, name);
      assert.equal(client.closedError, undefined, name);
      client.close();
    }
    // Answered calls leave it clear.
    const { client } = await connected();
    await client.ping(t);
    assert.equal(client.timedOut, false);
    client.close();
  });

  test("readFile's deadline runs only while its consumer wants data", async () => {
    const { fake, client } = await connected();
    const file = client.readFile("/f", { timeoutMs: 100 });
    const req = await fake.next((f) => f.type === MessageType.READ_FILE);
    fake.send(
      req.stream,
      MessageType.FILE_INFO,
      encodeFileInfo({ size: 10, mode: 0o100644, uid: 0, gid: 0 }),
    );
    const { stream } = await file;
    fake.send(req.stream, MessageType.FILE_DATA, new Uint8Array(5));
    await client.ping();
    // Nobody reads for longer than the deadline: not the guest's fault.
    await new Promise((resolve) => setTimeout(resolve, 250));
    assert.equal(client.openStreams, 1);
    const reading = (async () => {
      for await (const _ of stream) {
        // drain
      }
    })();
    await assert.rejects(reading, isCode("AGENT_TIMEOUT"));
    client.close();
  });
});

describe("version 2 streams refuse what the agent may not send", () => {
  async function expectProtocol(client: AgentClient) {
    const error = await client.closed;
    assert.ok(isCode("AGENT_PROTOCOL")(error), String(error));
  }

  test("a tunnel: data before TCP_CONNECTED, beyond the credit, after FIN; OK before both FINs", async () => {
    const scripts: ((fake: FakeAgent, s: number) => void)[] = [
      (fake, s) => fake.send(s, MessageType.TCP_DATA, Uint8Array.of(1)),
      (fake, s) => {
        fake.send(s, MessageType.TCP_CONNECTED);
        fake.send(s, MessageType.TCP_DATA, new Uint8Array(1000 - FRAME_COST + 1));
      },
      (fake, s) => {
        fake.send(s, MessageType.TCP_CONNECTED);
        fake.send(s, MessageType.TCP_DATA, new Uint8Array(0), FLAG_FIN);
        fake.send(s, MessageType.TCP_DATA, Uint8Array.of(1));
      },
      (fake, s) => {
        fake.send(s, MessageType.TCP_CONNECTED);
        fake.send(s, MessageType.OK, encodeOk());
      },
    ];
    for (const script of scripts) {
      const { fake, client } = await connected();
      const tunnel = client.connectTcp(8080, { windowBytes: 1000 }).then(
        (duplex) => duplex.on("error", () => {}),
        () => {},
      );
      const req = await fake.next((f) => f.type === MessageType.TCP_CONNECT);
      script(fake, req.stream);
      await expectProtocol(client);
      await tunnel;
    }
  });

  test("a tunnel's writes wait for the agent's credit", async () => {
    const { fake, client } = await connected();
    const connecting = client.connectTcp(8080);
    const req = await fake.next((f) => f.type === MessageType.TCP_CONNECT);
    fake.send(req.stream, MessageType.TCP_CONNECTED);
    const tunnel = await connecting;
    const sent = () =>
      fake.pending.filter((f) => f.type === MessageType.TCP_DATA).reduce((n, f) => n + f.payload.length, 0);
    tunnel.write(new Uint8Array(300_000));
    await fake.until(() => sent() === 262_144);
    await client.ping();
    assert.equal(sent(), 262_144);
    fake.send(req.stream, MessageType.WINDOW, new Uint8Array([0, 1, 0, 0]));
    await fake.until(() => sent() === 300_000);
    tunnel.end();
    await fake.until(() => fake.pending.some((f) => f.type === MessageType.TCP_DATA && f.flags === FLAG_FIN));
    tunnel.destroy();
    await fake.next((f) => f.type === MessageType.RESET);
    client.close();
  });

  test("fs: a second STAT, a DIRENTS name with a slash, DIRENTS beyond the credit", async () => {
    const stat = encodeStat({
      mode: 0o100644,
      uid: 0,
      gid: 0,
      size: 1,
      atimeNs: 0n,
      mtimeNs: 0n,
      ctimeNs: 0n,
      ino: 1n,
      dev: 1n,
      nlink: 1,
      rdev: 0n,
      blocks: 0,
      blksize: 4096,
    });
    const big = encodeDirents(
      Array.from({ length: 1100 }, (_, i) => ({
        name: new TextEncoder().encode(`${i}`.padEnd(250, "n")),
        type: 8,
      })),
    );
    const scripts: [string, (fake: FakeAgent, s: number) => void][] = [
      [
        "stat",
        (fake, s) => {
          fake.send(s, MessageType.STAT, stat);
          fake.send(s, MessageType.STAT, stat);
        },
      ],
      [
        "readdir",
        (fake, s) =>
          fake.send(
            s,
            MessageType.DIRENTS,
            encodeDirents([{ name: Uint8Array.of(0x61, 0x2f, 0x62), type: 8 }]),
          ),
      ],
      ["readdir", (fake, s) => fake.send(s, MessageType.DIRENTS, big)],
    ];
    for (const [op, script] of scripts) {
      const { fake, client } = await connected();
      const call = op === "stat" ? client.fs.stat("/x") : client.fs.readdir("/x");
      const req = await fake.next((f) => f.type === MessageType.FS);
      script(fake, req.stream);
      await expectProtocol(client);
      await assert.rejects(call, isCode("AGENT_PROTOCOL"));
    }
  });

  test("watch: an event before ready; the workload: a running status on stream 0", async () => {
    let { fake, client } = await connected();
    const watcher = client.watch("/w");
    const req = await fake.next((f) => f.type === MessageType.WATCH);
    fake.send(req.stream, MessageType.WATCH_EVENT, encodeWatchEvent({ event: WatchEventKind.CREATE }));
    await expectProtocol(client);
    await assert.rejects(watcher.ready, isCode("AGENT_PROTOCOL"));

    ({ fake, client } = await connected());
    fake.send(0, MessageType.WORKLOAD_STATUS, encodeWorkloadStatus({ state: WorkloadState.RUNNING, pid: 5 }));
    await expectProtocol(client);
  });

  test("the workload's exit on stream 0 reaches every listener until it unsubscribes", async () => {
    const { fake, client } = await connected();
    const first: unknown[] = [];
    const second: unknown[] = [];
    const offFirst = client.onWorkloadExit((s) => first.push(s));
    client.onWorkloadExit((s) => second.push(s));
    const exit = encodeWorkloadStatus({ state: WorkloadState.EXITED, pid: 5, signal: 9 });
    fake.send(0, MessageType.WORKLOAD_STATUS, exit);
    await client.ping();
    offFirst();
    fake.send(0, MessageType.WORKLOAD_STATUS, exit);
    await client.ping();
    const status = { state: "exited", pid: 5, exitCode: null, signal: "SIGKILL", signalNumber: 9 };
    assert.deepEqual(first, [status]);
    assert.deepEqual(second, [status, status]);
    client.close();
  });

  test("a watch grants credit as the iterator takes events", async () => {
    const { fake, client } = await connected();
    const watcher = client.watch("/w", { windowBytes: 1000 });
    const req = await fake.next((f) => f.type === MessageType.WATCH);
    const ready = encodeWatchEvent({ event: WatchEventKind.READY });
    fake.send(req.stream, MessageType.WATCH_EVENT, ready);
    await watcher.ready;
    const event = encodeWatchEvent({ event: WatchEventKind.CREATE, name: Uint8Array.of(0x78) });
    for (let i = 0; i < 3; i++) fake.send(req.stream, MessageType.WATCH_EVENT, event);
    await client.ping();
    const iterator = watcher[Symbol.asyncIterator]();
    assert.deepEqual((await iterator.next()).value, {
      eventType: "create",
      filename: "x",
      isDirectory: false,
    });
    const expected = ready.length + FRAME_COST + event.length + FRAME_COST; // ready, and the event taken
    let granted = 0;
    while (granted < expected) {
      granted += decodeWindow((await fake.next((f) => f.type === MessageType.WINDOW)).payload);
    }
    await client.ping();
    assert.equal(granted, expected);
    assert.equal(
      fake.pending.filter((f) => f.type === MessageType.WINDOW).length,
      0,
      "nothing for the events not taken",
    );
    watcher.close();
    await fake.next((f) => f.type === MessageType.RESET);
    client.close();
  });
});
