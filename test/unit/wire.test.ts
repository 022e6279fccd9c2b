/**
 * The wire protocol between server and client: every error class survives the trip with its
 * fields, outcomes and exec options keep their bytes, and the stream flow control bounds what a
 * peer can make the other hold (overruns, bad credits and floods disconnect it).
 */
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import {
  AbortError,
  AgentTimeoutError,
  DigestMismatchError,
  ERROR_CODES,
  ExecError,
  ExecStartError,
  ExecTimeoutError,
  GuestIoError,
  LayerError,
  OutputLimitError,
  PlatformNotFoundError,
  PoolTimeoutError,
  RegistryError,
  RemoteError,
  SnapshotError,
  SupermachineError,
  VmError,
} from "../../src/errors.ts";
import {
  CLOSE_PROTOCOL,
  encodeData,
  errorFromWire,
  errorToWire,
  execOptionsFromWire,
  execOptionsToWire,
  httpStatusOf,
  MAX_CHUNK_BYTES,
  MAX_QUEUED,
  outcomeFromWire,
  outcomeToWire,
  ReceiveWindow,
  RemoteOutcome,
  SendWindow,
  StreamPeer,
  WINDOW_BYTES,
} from "../../src/wire/index.ts";

const outcome = new RemoteOutcome({
  argv: ["sh", "-c", "x"],
  exitCode: 3,
  signal: null,
  timedOut: false,
  durationMs: 12.5,
  peakRssKiB: 900,
  step: 1,
  stdout: new Uint8Array([0, 1, 2, 255]),
  stderr: new TextEncoder().encode("é"),
});

const where = { endpoint: "http://server:7070", httpStatus: 422 };

/** Sends `error` through the wire and back. */
const trip = (error: Error) => errorFromWire(JSON.parse(JSON.stringify(errorToWire(error))), where);

describe("wire: errors", () => {
  it("every class comes back as itself, with its fields", () => {
    const cases: [Error, Record<string, unknown>][] = [
      [new AbortError("stop"), {}],
      [
        new RegistryError("REGISTRY_AUTH", "no", { registry: "r.io", httpStatus: 401 }),
        { registry: "r.io", httpStatus: 401 },
      ],
      [
        new PlatformNotFoundError("p", { platform: "linux/s390x", available: ["linux/amd64"] }),
        { available: ["linux/amd64"] },
      ],
      [
        new DigestMismatchError("d", { digest: "sha256:a", actualDigest: "sha256:b" }),
        { actualDigest: "sha256:b" },
      ],
      [new LayerError("UNSAFE_LAYER", "l", { layer: "sha256:c", entry: "../x" }), { entry: "../x" }],
      [new VmError("VM_EXITED", "gone", { consoleLogPath: "/c.log", qemuExitCode: 1 }), { qemuExitCode: 1 }],
      [new AgentTimeoutError("t", { operation: "ping", timeoutMs: 5 }), { operation: "ping" }],
      [
        new ExecStartError("EXEC_NOT_FOUND", "nf", { argv: ["nope"], errno: 2 }),
        { argv: ["nope"], errno: 2 },
      ],
      [new OutputLimitError("big", { maxBufferBytes: 10 }), { maxBufferBytes: 10 }],
      [new SnapshotError("SNAPSHOT_CORRUPT", "bad", { snapshotDir: "/s" }), { snapshotDir: "/s" }],
      [new PoolTimeoutError("wait", { timeoutMs: 7 }), { timeoutMs: 7 }],
      [
        new GuestIoError("enoent", { path: "/a", errno: 2, code: "ENOENT", syscall: "stat" }),
        { path: "/a", syscall: "stat" },
      ],
      [new RemoteError("LIMIT_EXCEEDED", "full"), { endpoint: where.endpoint, httpStatus: 422 }],
      [new SupermachineError("POOL_CLOSED", "closed"), {}],
    ];
    for (const [error, fields] of cases) {
      const back = trip(error);
      assert.equal(back.constructor, error.constructor, error.constructor.name);
      assert.equal((back as SupermachineError).code, (error as SupermachineError).code);
      assert.equal(back.message, error.message);
      for (const [key, value] of Object.entries(fields)) {
        assert.deepEqual(
          (back as unknown as Record<string, unknown>)[key],
          value,
          `${error.constructor.name}.${key}`,
        );
      }
    }
  });

  it("exec errors carry their outcome, bytes intact", () => {
    const failed = trip(new ExecError("failed", { outcome, argv: outcome.argv }));
    assert.ok(SupermachineError.is(failed, "EXEC_FAILED"));
    assert.deepEqual(failed.outcome.stdout, outcome.stdout);
    assert.equal(failed.outcome.stderrText, "é");
    assert.equal(failed.exitCode, 3);
    const timedOut = trip(new ExecTimeoutError("slow", { outcome, timeoutMs: 100, argv: ["x"] }));
    assert.ok(SupermachineError.is(timedOut, "EXEC_TIMEOUT"));
    assert.equal(timedOut.timeoutMs, 100);
    assert.equal(timedOut.outcome.step, 1);
  });

  it("an error that is not the library's becomes SERVER_UNAVAILABLE; an unknown code too, named", () => {
    assert.equal(errorToWire(new TypeError("boom")).code, "SERVER_UNAVAILABLE");
    const unknown = errorFromWire({ code: "FROM_THE_FUTURE", message: "new" }, where);
    assert.ok(SupermachineError.is(unknown, "SERVER_UNAVAILABLE"));
    assert.match(unknown.message, /FROM_THE_FUTURE/);
  });

  it("every code has an HTTP status: 4xx for the caller, 5xx for the host, 422 for the guest", () => {
    for (const code of ERROR_CODES) {
      const status = httpStatusOf(code);
      assert.ok(status >= 400 && status < 600, `${code}: ${status}`);
    }
    assert.equal(httpStatusOf("UNAUTHORIZED"), 401);
    assert.equal(httpStatusOf("NOT_FOUND"), 404);
    assert.equal(httpStatusOf("VMM_FAILED"), 500);
    assert.equal(httpStatusOf("ENOENT"), 422);
    assert.equal(httpStatusOf("EXEC_TIMEOUT"), 422);
  });
});

describe("wire: outcomes and exec options", () => {
  it("an outcome survives JSON with its bytes and behaviour", () => {
    const back = outcomeFromWire(JSON.parse(JSON.stringify(outcomeToWire(outcome))));
    assert.deepEqual(back.stdout, outcome.stdout);
    assert.equal(back.ok, false);
    assert.equal(back.describe(), "exited with code 3");
    assert.deepEqual(back.argv, outcome.argv);
  });

  it("exec options survive JSON: staged bytes, stdin, chain; the signal stays home", () => {
    const wire = execOptionsToWire({
      env: { A: "1" },
      stageFiles: [{ path: "/tmp/a", content: new Uint8Array([0, 200]), mode: 0o755 }],
      chain: [["true"]],
      stdin: "input",
      timeoutMs: 5,
      signal: new AbortController().signal,
    });
    assert.equal("signal" in wire, false);
    const back = execOptionsFromWire(JSON.parse(JSON.stringify({ argv: ["x"], ...wire })));
    assert.deepEqual(back.stageFiles?.[0]?.content, new Uint8Array([0, 200]));
    assert.equal(back.stageFiles?.[0]?.mode, 0o755);
    assert.equal(new TextDecoder().decode(back.stdin as Uint8Array), "input");
    assert.deepEqual(back.chain, [["true"]]);
    assert.equal("argv" in back, false);
  });

  it("a streamed stdin cannot go in a one-shot request", () => {
    assert.throws(
      () => execOptionsToWire({ stdin: (async function* () {})() }),
      (e) => SupermachineError.is(e, "INVALID_ARGUMENT"),
    );
  });

  it("malformed options are INVALID_ARGUMENT, never a crash", () => {
    for (const body of [
      null,
      [],
      { stageFiles: "x" },
      { stageFiles: [{ path: "/a", content: 5 }] },
      { stdin: 5 },
      { env: null },
      { winsize: 3 },
      { chain: [5] },
    ]) {
      assert.throws(
        () => execOptionsFromWire(body),
        (e) => SupermachineError.is(e, "INVALID_ARGUMENT"),
        JSON.stringify(body),
      );
    }
    assert.equal("signal" in execOptionsFromWire({ signal: "x" }), false);
  });
});

describe("wire: flow control", () => {
  it("a sender waits for credit once a window is in flight", async () => {
    const window = new SendWindow();
    await window.reserve(WINDOW_BYTES - 10);
    let second = false;
    const waiting = window.reserve(20).then(() => {
      second = true;
    });
    await Promise.resolve();
    assert.equal(second, false);
    assert.equal(window.credit(WINDOW_BYTES - 10), true);
    await waiting;
    assert.equal(second, true);
    assert.equal(window.credit(21), false, "more credit than in flight");
    assert.equal(window.credit(-1), false);
  });

  it("a receiver credits in batches, and everything once it is drained", () => {
    const window = new ReceiveWindow();
    assert.equal(window.received(1000), true);
    assert.equal(window.consumed(1000), 1000, "all consumed: credit at once");
    for (let i = 0; i < 16; i++) assert.equal(window.received(MAX_CHUNK_BYTES), true);
    assert.equal(window.consumed(MAX_CHUNK_BYTES), 0, "a little consumed, more held: wait");
    let credited = 0;
    for (let i = 1; i < 16; i++) credited += window.consumed(MAX_CHUNK_BYTES);
    assert.equal(credited, 16 * MAX_CHUNK_BYTES);
  });

  /** Two peers wired back to back; `a` sends, `b` consumes through `consume`. */
  function pair(consume: (bytes: Uint8Array) => Promise<void>) {
    const closes: { side: string; code: number; reason: string }[] = [];
    let a!: StreamPeer;
    let b!: StreamPeer;
    a = new StreamPeer(
      {
        send: (m) => queueMicrotask(() => b.receive(m)),
        close: (code, reason) => {
          closes.push({ side: "a", code, reason });
          b.closed(code, reason);
        },
      },
      { control: () => {}, data: () => {} },
    );
    b = new StreamPeer(
      {
        send: (m) => queueMicrotask(() => a.receive(m)),
        close: (code, reason) => {
          closes.push({ side: "b", code, reason });
          a.closed(code, reason);
        },
      },
      { control: () => {}, data: (_channel, bytes) => consume(bytes) },
    );
    return { a, b, closes };
  }

  it("a slow consumer holds the sender back: never more than a window unconsumed", async () => {
    let held = 0;
    let most = 0;
    const release: (() => void)[] = [];
    const { a } = pair(
      (bytes) =>
        new Promise<void>((resolve) => {
          held += bytes.length;
          most = Math.max(most, held);
          release.push(() => {
            held -= bytes.length;
            resolve();
          });
        }),
    );
    const total = 4 * WINDOW_BYTES;
    const sending = a.sendData(1, new Uint8Array(total));
    let sent = false;
    void sending.then(() => {
      sent = true;
    });
    // Consume one chunk at a time, each once it is there.
    let consumed = 0;
    while (consumed < total) {
      while (release.length === 0) await new Promise((r) => setImmediate(r));
      release.shift()!();
      consumed += MAX_CHUNK_BYTES;
    }
    await sending;
    assert.equal(sent, true);
    assert.ok(most <= WINDOW_BYTES, `held ${most}`);
  });

  it("a peer that overruns its window is disconnected", () => {
    const closes: number[] = [];
    const peer = new StreamPeer(
      { send: () => {}, close: (code) => closes.push(code) },
      { control: () => {}, data: () => new Promise<void>(() => {}) },
    );
    const chunk = encodeData(0, new Uint8Array(MAX_CHUNK_BYTES));
    for (let i = 0; i < WINDOW_BYTES / MAX_CHUNK_BYTES + 2; i++) peer.receive(chunk);
    assert.deepEqual(closes, [CLOSE_PROTOCOL]);
    assert.equal(peer.isEnded, true);
  });

  it("malformed messages, bad credits and floods of control messages disconnect the peer", () => {
    for (const messages of [
      ["not json"],
      ['{"no":"type"}'],
      ['{"type":"credit","bytes":5}'],
      [new Uint8Array(0)],
      Array.from({ length: MAX_QUEUED + 1 }, () => '{"type":"resize","rows":1,"cols":1}'),
    ]) {
      const closes: number[] = [];
      const peer = new StreamPeer(
        { send: () => {}, close: (code) => closes.push(code) },
        { control: () => new Promise<void>(() => {}), data: () => {} },
      );
      for (const m of messages) peer.receive(m);
      assert.deepEqual(closes, [CLOSE_PROTOCOL], String(messages[0]));
    }
  });

  it("inbound messages are handled in order, one at a time", async () => {
    const seen: string[] = [];
    const peer = new StreamPeer(
      { send: () => {}, close: () => {} },
      {
        control: async (m) => {
          await new Promise((r) => setTimeout(r, 5));
          seen.push(m.type);
        },
        data: async (_c, bytes) => {
          seen.push(`data:${bytes.length}`);
        },
      },
    );
    peer.receive('{"type":"start"}');
    peer.receive(encodeData(0, new Uint8Array(3)));
    peer.receive('{"type":"stdin-end"}');
    while (seen.length < 3) await new Promise((r) => setTimeout(r, 5));
    assert.deepEqual(seen, ["start", "data:3", "stdin-end"]);
  });
});
