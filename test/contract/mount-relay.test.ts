/**
 * The guest's mount relay run as a host process (`sm-init --mount-relay`) against the host's
 * MountChannel: sessions, framing and credit both ways. mount(2) needs the guest kernel, so here
 * the relay runs a stand-in (test/helpers/fake-9p-kernel.ts) where it would mount; the real
 * mount is tested in VMs (test/integration/mount-*.test.ts).
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { chmod, mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { createServer, type Server } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Duplex } from "node:stream";
import { after, before, describe, test } from "node:test";
import { FieldWriter } from "../../src/agent/fields.ts";
import {
  encodeFrame,
  FLAG_FIN,
  FRAME_COST,
  type Frame,
  FrameDecoder,
  MessageType,
} from "../../src/agent/frame-codec.ts";
import { decodeError, encodeHostHello, encodeWindow } from "../../src/agent/messages.ts";
import { MountChannel } from "../../src/agent/mount-channel.ts";
import { encodeMount, MOUNT_WINDOW } from "../../src/agent/mount-messages.ts";
import { GuestIoError } from "../../src/errors.ts";
import { agentBinary } from "../helpers/agent-binary.ts";
import { pattern } from "../helpers/fake-9p-kernel.ts";
import { mountDir } from "../helpers/mounts.ts";

const ROOT = process.geteuid?.() === 0;
const OWNER = ROOT ? { owner: { uid: 4242, gid: 4243 } } : {};

let dir: string;
let fake: string;
let reports: Server;
let reportPath: string;
const reportWaiters: { name: string; event: string; resolve: (r: Record<string, unknown>) => void }[] = [];
const reportsSeen: Record<string, unknown>[] = [];

/** The next report `event` from the fake kernel mounted at a path ending in `name`. */
function nextReport(name: string, event: string): Promise<Record<string, unknown>> {
  const seen = reportsSeen.findIndex((r) => r.name === name && r.event === event);
  if (seen >= 0) return Promise.resolve(reportsSeen.splice(seen, 1)[0]!);
  return new Promise((resolve) => reportWaiters.push({ name, event, resolve }));
}

before(async () => {
  dir = await mkdtemp(join(tmpdir(), "sm-relay-"));
  reportPath = join(dir, "report.sock");
  reports = createServer((s) => {
    let text = "";
    s.on("error", () => {}); // a fake killed mid-report
    s.on("data", (d) => {
      text += d;
    });
    s.on("end", () => {
      for (const line of text.split("\n").filter(Boolean)) {
        const r = JSON.parse(line) as Record<string, unknown>;
        const i = reportWaiters.findIndex((w) => w.name === r.name && w.event === r.event);
        if (i >= 0) reportWaiters.splice(i, 1)[0]!.resolve(r);
        else reportsSeen.push(r);
      }
    });
  });
  await new Promise<void>((resolve) => reports.listen(reportPath, resolve));
  fake = join(dir, "fake-kernel");
  const script = join(import.meta.dirname, "..", "helpers", "fake-9p-kernel.ts");
  await writeFile(fake, `#!/bin/sh\nexec "${process.execPath}" "${script}" "$@"\n`);
  await chmod(fake, 0o755);
  await agentBinary();
});

after(async () => {
  reports?.close();
  if (dir) await rm(dir, { recursive: true, force: true });
});

interface Relay {
  child: ChildProcess;
  socket: Duplex;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  kill(): Promise<void>;
}

async function spawnRelay(env: Record<string, string> = {}): Promise<Relay> {
  const bin = await agentBinary();
  const child = spawn(bin, ["--mount-relay", "--mount-exec", fake, "--channel-fd", "3"], {
    stdio: ["ignore", "inherit", "inherit", "pipe"],
    env: { ...process.env, SM_FAKE_REPORT: reportPath, ...env },
  });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.once("exit", (code, signal) => resolve({ code, signal })),
  );
  const socket = child.stdio[3] as Duplex;
  socket.on("error", () => {}); // reset when the relay is killed; the tests look at frames and exits
  return {
    child,
    socket,
    exited,
    async kill() {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
      await exited;
    },
  };
}

async function hostDir(name: string): Promise<string> {
  const path = join(dir, name);
  await mkdir(path);
  return path;
}

/** Raw frames over the relay's socket, for what MountChannel never sends. */
class RawPeer {
  readonly frames: Frame[] = [];
  readonly #decoder = new FrameDecoder();
  #waiters: (() => void)[] = [];
  readonly socket: Duplex;
  constructor(socket: Duplex) {
    this.socket = socket;
    socket.on("data", (chunk: Buffer) => {
      for (const f of this.#decoder.push(chunk)) this.frames.push({ ...f, payload: Buffer.from(f.payload) });
      for (const w of this.#waiters.splice(0)) w();
    });
  }
  send(stream: number, type: number, payload: Uint8Array = new Uint8Array(0), flags = 0): void {
    this.socket.write(encodeFrame({ stream, type, flags, payload }));
  }
  async next(match: (f: Frame) => boolean): Promise<Frame> {
    for (;;) {
      const i = this.frames.findIndex(match);
      if (i >= 0) return this.frames.splice(i, 1)[0]!;
      await new Promise<void>((resolve) => this.#waiters.push(resolve));
    }
  }
  async hello(epoch = 7n): Promise<void> {
    this.send(0, MessageType.HELLO, encodeHostHello({ version: 1, epoch }));
    const h = await this.next((f) => f.stream === 0);
    assert.equal(h.type, MessageType.HELLO);
  }
}

function errorOf(f: Frame): { code: number; errno?: number | undefined; message?: string | undefined } {
  assert.equal(f.type, MessageType.ERROR, `expected ERROR, got type ${f.type}`);
  return decodeError(f.payload);
}

describe("mount relay (host mode)", { timeout: 120_000 }, () => {
  test("a mount carries 9P both ways beyond every window, then unmounts", async () => {
    const relay = await spawnRelay({ SM_FAKE_UPLOAD: String(6 * 1024 * 1024 + 5) });
    try {
      const channel = await MountChannel.connect(relay.socket, { timeoutMs: 10_000 });
      const root = await hostDir("transfer-root");
      const big = randomBytes(5 * MOUNT_WINDOW + 123);
      await writeFile(join(root, "big"), big);
      const handle = await mountDir(channel, {
        hostPath: root,
        guestPath: join(dir, "transfer"),
        msizeBytes: 128 * 1024,
        ...OWNER,
      });
      assert.equal(handle.state, "mounted");
      const r = await nextReport("transfer", "transfer");
      assert.equal(r.sha256, createHash("sha256").update(big).digest("hex"));
      assert.equal(r.read, big.length);
      assert.deepEqual(await readFile(join(root, "upload")), pattern(6 * 1024 * 1024 + 5));
      // Each Tread/Twrite moves at most msize - 24 bytes: ~90 of them.
      assert.ok(handle.server.stats.requests > 90, `requests: ${handle.server.stats.requests}`);
      await handle.unmount();
      assert.equal(await handle.closed, undefined);
      assert.equal(handle.state, "unmounted");
      await nextReport("transfer", "eof"); // the relay cut the connection
      assert.deepEqual(channel.mounts, []);
      channel.close();
      assert.deepEqual(await relay.exited, { code: 0, signal: null });
    } finally {
      await relay.kill();
    }
  });

  test("a mount that fails in the guest is GUEST_IO with its errno; the channel carries on", async () => {
    const relay = await spawnRelay();
    try {
      const channel = await MountChannel.connect(relay.socket, { timeoutMs: 10_000 });
      const root = await hostDir("fail-root");
      await assert.rejects(
        mountDir(channel, { hostPath: root, guestPath: join(dir, "fail-13"), ...OWNER }),
        (e: unknown) => e instanceof GuestIoError && e.errno === 13 && e.path === join(dir, "fail-13"),
      );
      const ok = await mountDir(channel, { hostPath: root, guestPath: join(dir, "after-fail"), ...OWNER });
      await nextReport("after-fail", "attached");
      await ok.unmount();
      channel.close();
    } finally {
      await relay.kill();
    }
  });

  test("a mount that does not complete in time is abandoned", async () => {
    const relay = await spawnRelay();
    try {
      const channel = await MountChannel.connect(relay.socket, { timeoutMs: 10_000 });
      const root = await hostDir("hang-root");
      await assert.rejects(
        mountDir(channel, { hostPath: root, guestPath: join(dir, "hang"), timeoutMs: 300, ...OWNER }),
        (e: unknown) => e instanceof GuestIoError && e.errno === 110,
      );
      const ok = await mountDir(channel, { hostPath: root, guestPath: join(dir, "after-hang"), ...OWNER });
      await nextReport("after-hang", "attached");
      await channel.unmountAll();
      assert.equal(ok.state, "unmounted");
      channel.close();
    } finally {
      await relay.kill();
    }
  });

  test("a new HELLO cuts the mounts of the previous session", async () => {
    const relay = await spawnRelay();
    try {
      const peer = new RawPeer(relay.socket);
      await peer.hello(1n);
      const root = await hostDir("session-root");
      // Serve the one mount by hand: a MountChannel on the same socket would see the second HELLO.
      const { serve9p } = await import("../../src/ninep/index.ts");
      const { Duplex } = await import("node:stream");
      const pipe = new Duplex({
        read() {},
        write(chunk: Buffer, _e, cb) {
          peer.send(1, MessageType.MOUNT_DATA, chunk);
          cb();
        },
      });
      const server = await serve9p(pipe, { root, ...OWNER });
      peer.socket.on("data", () => {
        for (let i = 0; i < peer.frames.length; ) {
          const f = peer.frames[i]!;
          if (f.stream === 1 && f.type === MessageType.MOUNT_DATA) {
            pipe.push(f.payload);
            peer.frames.splice(i, 1);
          } else i++;
        }
      });
      peer.send(1, MessageType.MOUNT, encodeMount({ path: join(dir, "session"), window: 1 << 20 }));
      assert.equal(
        (await peer.next((f) => f.stream === 1 && f.type !== MessageType.MOUNT_DATA)).type,
        MessageType.MOUNTED,
      );
      await nextReport("session", "attached");
      await peer.hello(2n);
      await nextReport("session", "eof");
      server.close();
    } finally {
      await relay.kill();
    }
  });

  test("refuses frames a host must not send, each on its stream", async () => {
    const relay = await spawnRelay();
    try {
      const peer = new RawPeer(relay.socket);
      peer.send(1, MessageType.MOUNT, encodeMount({ path: "/x" }));
      assert.match(errorOf(await peer.next((f) => f.stream === 0)).message ?? "", /before HELLO/);
      await peer.hello();
      // Bad fields: relative path, msize out of range.
      peer.send(1, MessageType.MOUNT, new FieldWriter().string(1, "rel/path").finish());
      assert.equal(errorOf(await peer.next((f) => f.stream === 1)).code, 2);
      peer.send(2, MessageType.MOUNT, new FieldWriter().string(1, "/ok").u32(2, 100).finish());
      assert.equal(errorOf(await peer.next((f) => f.stream === 2)).code, 2);
      // Stream ids must increase.
      peer.send(2, MessageType.MOUNT, encodeMount({ path: "/again" }));
      assert.match(errorOf(await peer.next((f) => f.stream === 0)).message ?? "", /already used/);
      // Data for a stream never opened.
      peer.send(9, MessageType.MOUNT_DATA, Buffer.from("x"));
      assert.match(errorOf(await peer.next((f) => f.stream === 0)).message ?? "", /never opened/);
      // FIN is not part of this protocol; unknown types are UNSUPPORTED.
      peer.send(0, MessageType.PING, Buffer.from("hi"), FLAG_FIN);
      assert.equal(errorOf(await peer.next((f) => f.stream === 0)).code, 2);
      peer.send(0, MessageType.EXEC, new Uint8Array(0));
      assert.equal(errorOf(await peer.next((f) => f.stream === 0)).code, 1);
      peer.send(0, MessageType.PING, Buffer.from("ping"));
      const pong = await peer.next((f) => f.stream === 0);
      assert.equal(pong.type, MessageType.PONG);
      assert.equal(Buffer.from(pong.payload).toString(), "ping");
    } finally {
      await relay.kill();
    }
  });

  test("a host that sends beyond the relay's credit loses that mount", async () => {
    const relay = await spawnRelay();
    try {
      const peer = new RawPeer(relay.socket);
      await peer.hello();
      // The fake never reads its socket; flood it well past the credit.
      peer.send(1, MessageType.MOUNT, encodeMount({ path: join(dir, "hang-greedy") }));
      for (let sent = 0; sent < 4 * MOUNT_WINDOW; sent += 65536)
        peer.send(1, MessageType.MOUNT_DATA, Buffer.alloc(65536));
      const e = errorOf(await peer.next((f) => f.stream === 1 && f.type === MessageType.ERROR));
      assert.equal(e.code, 2);
      assert.match(e.message ?? "", /exceed/);
      // The channel lives on.
      peer.send(0, MessageType.PING, Buffer.from("ok"));
      assert.equal((await peer.next((f) => f.stream === 0)).type, MessageType.PONG);
    } finally {
      await relay.kill();
    }
  });

  test("a host that stops reading stops the relay (bounded), which resumes on WINDOW", async () => {
    // The relay sends a mount's bytes only within the credit the host gave, each frame costing its
    // payload plus FRAME_COST: with a window of one byte's worth the fake kernel's Tversion arrives
    // one byte per WINDOW.
    const relay = await spawnRelay();
    try {
      const peer = new RawPeer(relay.socket);
      await peer.hello();
      peer.send(
        1,
        MessageType.MOUNT,
        new FieldWriter()
          .string(1, join(dir, "trickle"))
          .u32(4, 1 + FRAME_COST)
          .finish(),
      );
      const bytes: number[] = [];
      for (let i = 0; i < 4; i++) {
        const f = await peer.next((x) => x.stream === 1 && x.type === MessageType.MOUNT_DATA);
        assert.equal(f.payload.length, 1);
        bytes.push(f.payload[0]!);
        peer.send(1, MessageType.WINDOW, encodeWindow(1 + FRAME_COST));
      }
      // The first four bytes of a Tversion: its little-endian size.
      assert.ok(bytes[0]! > 0 && bytes[3] === 0);
      peer.send(1, MessageType.RESET);
    } finally {
      await relay.kill();
    }
  });
});
