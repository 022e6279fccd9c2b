/**
 * MountChannel against a scripted relay (what the real one never does: lie about credit, repeat
 * itself, speak another version), and the MOUNT payload's bytes. The real relay is exercised in
 * test/contract/mount-relay.test.ts and in VMs.
 */
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type Duplex, duplexPair } from "node:stream";
import { describe, type TestContext, test } from "node:test";
import { encodeFrame, type Frame, FrameDecoder, MessageType } from "../../src/agent/frame-codec.ts";
import { decodeHostHello, encodeError, encodeGuestHello, encodeWindow } from "../../src/agent/messages.ts";
import { MountChannel } from "../../src/agent/mount-channel.ts";
import { decodeMount, encodeMount } from "../../src/agent/mount-messages.ts";
import { GuestIoError, SupermachineError, VmError } from "../../src/errors.ts";
import { encodeMessage, NOTAG } from "../../src/ninep/index.ts";
import { mountDir } from "../helpers/mounts.ts";

const OWNER = process.geteuid?.() === 0 ? { owner: { uid: 4242, gid: 4243 } } : {};
const isCode = (code: string) => (e: unknown) => e instanceof SupermachineError && e.code === code;

/** The relay's side: frames in, frames out, by hand. */
class FakeRelay {
  readonly frames: Frame[] = [];
  readonly #socket: Duplex;
  readonly #decoder = new FrameDecoder();
  #waiters: (() => void)[] = [];
  constructor(socket: Duplex) {
    this.#socket = socket;
    socket.on("data", (chunk: Buffer) => {
      for (const f of this.#decoder.push(chunk)) this.frames.push({ ...f, payload: Buffer.from(f.payload) });
      for (const w of this.#waiters.splice(0)) w();
    });
  }
  send(stream: number, type: number, payload: Uint8Array = new Uint8Array(0)): void {
    this.#socket.write(encodeFrame({ stream, type, payload }));
  }
  /** Several frames in one write (one chunk on the host). */
  sendAll(frames: { stream: number; type: number; payload: Uint8Array }[]): void {
    this.#socket.write(Buffer.concat(frames.map((f) => encodeFrame(f))));
  }
  async next(match: (f: Frame) => boolean): Promise<Frame> {
    for (;;) {
      const i = this.frames.findIndex(match);
      if (i >= 0) return this.frames.splice(i, 1)[0]!;
      await new Promise<void>((resolve) => this.#waiters.push(resolve));
    }
  }
  /** Answers the channel's HELLO. */
  async hello(version = 1): Promise<void> {
    const h = decodeHostHello((await this.next((f) => f.type === MessageType.HELLO)).payload);
    this.send(0, MessageType.HELLO, encodeGuestHello({ version, epoch: h.epoch, agent: "fake", bootNs: 0n }));
  }
}

async function setup(t: TestContext): Promise<{ channel: MountChannel; relay: FakeRelay; root: string }> {
  const root = await mkdtemp(join(tmpdir(), "sm-mc-"));
  t.after(() => rm(root, { recursive: true, force: true }));
  const [host, guest] = duplexPair();
  const relay = new FakeRelay(guest);
  const [channel] = await Promise.all([MountChannel.connect(host, { timeoutMs: 5000 }), relay.hello()]);
  t.after(() => channel.close());
  return { channel, relay, root };
}

/** Starts a mount and answers it MOUNTED; resolves with the handle and the stream id. */
async function mounted(
  channel: MountChannel,
  relay: FakeRelay,
  root: string,
  guestPath = "/mnt/x",
  msizeBytes?: number,
) {
  const pending = mountDir(channel, {
    hostPath: root,
    guestPath,
    ...OWNER,
    ...(msizeBytes ? { msizeBytes } : {}),
  });
  const open = await relay.next((f) => f.type === MessageType.MOUNT);
  relay.send(open.stream, MessageType.MOUNTED);
  return { handle: await pending, stream: open.stream, request: decodeMount(open.payload) };
}

describe("MOUNT payload", () => {
  test("golden bytes", () => {
    const bytes = encodeMount({ path: "/w", msize: 65536, readOnly: true, window: 1024, cache: "mmap" });
    assert.equal(
      Buffer.from(bytes).toString("hex"),
      "0100000002" +
        "2f77" +
        "0200000004" +
        "00010000" +
        "030000000101" +
        "0400000004" +
        "00000400" +
        "0500000004" +
        "6d6d6170",
    );
    assert.deepEqual(decodeMount(bytes), {
      path: "/w",
      msize: 65536,
      readOnly: true,
      window: 1024,
      cache: "mmap",
    });
  });

  test("guest paths must be absolute, below / and free of . and ..", () => {
    for (const path of ["rel", "/", "/a/../b", "/a/./b", "/x\0y"]) {
      assert.throws(() => encodeMount({ path }), isCode("INVALID_ARGUMENT"), path);
    }
  });
});

describe("MountChannel", () => {
  test("a mount: options on the wire, 9P served, unmounted in the guest", async (t) => {
    const { channel, relay, root } = await setup(t);
    const { handle, stream, request } = await mounted(channel, relay, root);
    assert.deepEqual(request, {
      path: "/mnt/x",
      msize: 524288,
      readOnly: undefined,
      window: 1048576,
      cache: "mmap",
    });
    // The guest kernel's Tversion through the relay reaches the server; its answer comes back.
    relay.send(
      stream,
      MessageType.MOUNT_DATA,
      encodeMessage("Tversion", NOTAG, { msize: 8192, version: Buffer.from("9P2000.L") }),
    );
    const reply = await relay.next((f) => f.stream === stream && f.type === MessageType.MOUNT_DATA);
    assert.equal(reply.payload[4], 101); // Rversion
    assert.deepEqual(channel.mounts, [handle]);
    // Unmounted by the guest (umount in the VM): OK without UNMOUNT.
    relay.send(stream, MessageType.OK);
    assert.equal(await handle.closed, undefined);
    assert.equal(handle.state, "unmounted");
    assert.deepEqual(channel.mounts, []);
  });

  test("unmount sends UNMOUNT and waits for OK", async (t) => {
    const { channel, relay, root } = await setup(t);
    const { handle, stream } = await mounted(channel, relay, root);
    const done = handle.unmount();
    assert.equal(handle.state, "unmounting");
    await relay.next((f) => f.stream === stream && f.type === MessageType.UNMOUNT);
    relay.send(stream, MessageType.OK);
    await done;
    assert.equal(await handle.closed, undefined);
    await handle.unmount(); // idempotent
  });

  test("an unmount the guest does not confirm times out, resets the stream and tears down the host side", async (t) => {
    const { channel, relay, root } = await setup(t);
    const { handle, stream } = await mounted(channel, relay, root);
    await assert.rejects(
      handle.unmount({ timeoutMs: 50 }),
      (e: unknown) => e instanceof GuestIoError && e.errno === 110,
    );
    await relay.next((f) => f.stream === stream && f.type === MessageType.RESET);
    assert.ok((await handle.closed) instanceof GuestIoError);
  });

  test("a mount the guest refuses is GUEST_IO with the errno", async (t) => {
    const { channel, relay, root } = await setup(t);
    const pending = mountDir(channel, { hostPath: root, guestPath: "/mnt/y", ...OWNER });
    const open = await relay.next((f) => f.type === MessageType.MOUNT);
    relay.send(
      open.stream,
      MessageType.ERROR,
      encodeError({ code: 5, errno: 20, message: "mount /mnt/y: Not a directory" }),
    );
    await assert.rejects(
      pending,
      (e: unknown) => e instanceof GuestIoError && e.errno === 20 && e.path === "/mnt/y",
    );
  });

  test("a bad host path is INVALID_ARGUMENT before anything reaches the guest", async (t) => {
    const { channel, relay, root } = await setup(t);
    await assert.rejects(
      mountDir(channel, { hostPath: join(root, "missing"), guestPath: "/m", ...OWNER }),
      isCode("INVALID_ARGUMENT"),
    );
    await assert.rejects(
      mountDir(channel, { hostPath: root, guestPath: "m", ...OWNER }),
      isCode("INVALID_ARGUMENT"),
    );
    await assert.rejects(
      mountDir(channel, { hostPath: root, guestPath: "/m", msizeBytes: 10, ...OWNER }),
      isCode("INVALID_ARGUMENT"),
    );
    assert.equal(relay.frames.length, 0);
  });

  test("a malformed 9P message ends that mount only", async (t) => {
    const { channel, relay, root } = await setup(t);
    const { handle, stream } = await mounted(channel, relay, root);
    relay.send(stream, MessageType.MOUNT_DATA, Buffer.from("0300000064ffff", "hex")); // size 3 < header
    await relay.next((f) => f.stream === stream && f.type === MessageType.RESET);
    const error = await handle.closed;
    assert.ok(error instanceof VmError && error.code === "AGENT_PROTOCOL", String(error));
    assert.equal(channel.closedError, undefined);
    const again = await mounted(channel, relay, root, "/mnt/z");
    assert.equal(again.handle.state, "mounted");
  });

  test("a relay that sends beyond its credit closes the channel and every mount", async (t) => {
    const { channel, relay, root } = await setup(t);
    const { handle, stream } = await mounted(channel, relay, root, "/mnt/x", 1024 * 1024);
    // A message header announcing 1 MiB (the server waits for the rest), then more than the
    // credit in one chunk, before any grant can go out.
    const start = Buffer.alloc(65536);
    start.writeUInt32LE(1024 * 1024, 0);
    relay.sendAll(
      Array.from({ length: 17 }, (_, i) => ({
        stream,
        type: MessageType.MOUNT_DATA,
        payload: i === 0 ? start : Buffer.alloc(65536),
      })),
    );
    const error = await channel.closed;
    assert.ok(error instanceof VmError && error.code === "AGENT_PROTOCOL", String(error));
    assert.equal(await handle.closed, error);
  });

  test("protocol violations of the relay close the channel", async (t) => {
    for (const [what, act] of [
      ["MOUNTED twice", (r: FakeRelay, s: number) => r.send(s, MessageType.MOUNTED)],
      ["a stream never opened", (r: FakeRelay) => r.send(99, MessageType.MOUNT_DATA, Buffer.from("x"))],
      ["a host-only type", (r: FakeRelay, s: number) => r.send(s, MessageType.UNMOUNT)],
      ["an agent type", (r: FakeRelay, s: number) => r.send(s, MessageType.STDOUT, Buffer.from("x"))],
      ["ERROR on stream 0", (r: FakeRelay) => r.send(0, MessageType.ERROR, encodeError({ code: 2 }))],
    ] as const) {
      const { channel, relay, root } = await setup(t);
      const { stream } = await mounted(channel, relay, root);
      act(relay, stream);
      const error = await channel.closed;
      assert.ok(error instanceof VmError && error.code === "AGENT_PROTOCOL", `${what}: ${error}`);
    }
  });

  test("WINDOW lets the host send more than the first credit", async (t) => {
    const { channel, relay, root } = await setup(t);
    const { stream } = await mounted(channel, relay, root);
    relay.send(stream, MessageType.WINDOW, encodeWindow(100));
    relay.send(
      stream,
      MessageType.MOUNT_DATA,
      encodeMessage("Tversion", NOTAG, { msize: 8192, version: Buffer.from("9P2000.L") }),
    );
    await relay.next((f) => f.stream === stream && f.type === MessageType.MOUNT_DATA);
    assert.equal(channel.closedError, undefined);
  });

  test("a relay of another version is AGENT_VERSION; one that does not answer is VM_BOOT_TIMEOUT", async () => {
    const [host, guest] = duplexPair();
    const relay = new FakeRelay(guest);
    const connecting = MountChannel.connect(host, { timeoutMs: 5000 });
    await relay.hello(2);
    await assert.rejects(connecting, isCode("AGENT_VERSION"));
    const [host2] = duplexPair();
    await assert.rejects(MountChannel.connect(host2, { timeoutMs: 50 }), isCode("VM_BOOT_TIMEOUT"));
  });
});
