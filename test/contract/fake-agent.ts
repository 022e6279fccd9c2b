/**
 * A scripted stand-in for the guest agent, for the cases the real one never produces: garbage,
 * oversized frames, floods beyond credit, frames for unknown streams. It speaks through a real
 * unix socket pair, so the client sees ordinary socket behaviour (backpressure, EOF, errors).
 */
import assert from "node:assert/strict";
import { once } from "node:events";
import { mkdtemp, rm } from "node:fs/promises";
import { createServer, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after } from "node:test";
import { AgentClient } from "../../src/agent/agent-client.ts";
import { encodeFrame, type Frame, FrameDecoder, MessageType } from "../../src/agent/frame-codec.ts";
import { decodeHostHello, encodeGuestHello, PROTOCOL_VERSION } from "../../src/agent/messages.ts";
import { SupermachineError } from "../../src/errors.ts";
import { SocketReads } from "../../src/internal/index.ts";

/**
 * Two connected unix stream sockets; the first is read like a VM's agent channel (`SocketReads`:
 * one reused buffer, no stream machinery).
 */
export async function socketPair(): Promise<[Socket, Socket]> {
  const dir = await mkdtemp(join(tmpdir(), "sm-pair-"));
  const path = join(dir, "s");
  const server = createServer();
  try {
    server.listen(path);
    await once(server, "listening");
    const accepted = once(server, "connection");
    const client = SocketReads.connect(path).socket;
    await once(client, "connect");
    const [peer] = (await accepted) as [Socket];
    return [client, peer];
  } finally {
    server.close();
    await rm(dir, { recursive: true, force: true });
  }
}

export class FakeAgent {
  readonly socket: Socket;
  /** Resolves when the host closes or destroys its end. */
  readonly hostClosed: Promise<void>;
  /** Answer PING with PONG automatically. */
  autoPong = true;
  readonly #decoder = new FrameDecoder();
  readonly #frames: Frame[] = [];
  #waiters: (() => void)[] = [];

  constructor(socket: Socket) {
    this.socket = socket;
    socket.on("error", () => {});
    this.hostClosed = new Promise((resolve) => socket.once("close", () => resolve()));
    socket.on("data", (chunk: Buffer) => {
      for (const f of this.#decoder.push(chunk)) {
        const frame = { ...f, payload: new Uint8Array(f.payload) };
        if (this.autoPong && frame.type === MessageType.PING) {
          this.send(0, MessageType.PONG, frame.payload);
          continue;
        }
        this.#frames.push(frame);
      }
      const waiters = this.#waiters;
      this.#waiters = [];
      for (const wake of waiters) wake();
    });
  }

  /** Frames received and not yet taken. */
  get pending(): readonly Frame[] {
    return this.#frames;
  }

  /** The next frame from the host (optionally the next one matching `match`, others stay queued). */
  async next(match: (f: Frame) => boolean = () => true): Promise<Frame> {
    for (;;) {
      const i = this.#frames.findIndex(match);
      if (i >= 0) return this.#frames.splice(i, 1)[0]!;
      await new Promise<void>((resolve) => this.#waiters.push(resolve));
    }
  }

  /** Waits until `predicate` over the received frames holds. */
  async until(predicate: (frames: readonly Frame[]) => boolean): Promise<void> {
    while (!predicate(this.#frames)) await new Promise<void>((resolve) => this.#waiters.push(resolve));
  }

  send(stream: number, type: number, payload: Uint8Array = new Uint8Array(0), flags = 0): void {
    this.socket.write(encodeFrame({ stream, type, flags, payload }));
  }

  sendRaw(bytes: Uint8Array): void {
    this.socket.write(bytes);
  }

  /** Reads the host's HELLO and answers it (with `overrides` applied). */
  async handshake(overrides: { version?: number; epoch?: bigint } = {}): Promise<bigint> {
    const hello = await this.next((f) => f.type === MessageType.HELLO);
    const { epoch } = decodeHostHello(hello.payload);
    this.send(
      0,
      MessageType.HELLO,
      encodeGuestHello({
        version: overrides.version ?? PROTOCOL_VERSION,
        epoch: overrides.epoch ?? epoch,
        agent: "fake-agent 1",
        bootNs: 123n,
      }),
    );
    return epoch;
  }
}

/** A fake agent and the host end of its socket. */
export async function fakeAgentPair(): Promise<{ fake: FakeAgent; host: Socket }> {
  const [host, guest] = await socketPair();
  return { fake: new FakeAgent(guest), host };
}

/** A client connected to a fake agent that answered the handshake. */
export async function connected(): Promise<{ fake: FakeAgent; client: AgentClient }> {
  const { fake, host } = await fakeAgentPair();
  const [client] = await Promise.all([AgentClient.connect(host, { timeoutMs: 5000 }), fake.handshake()]);
  return { fake, client };
}

/** `assert.rejects`/`throws` predicate: a SupermachineError with this code. */
export const isCode = (code: string) => (e: unknown) => SupermachineError.is(e) && e.code === code;

/** Fails the test file (in an `after` hook) if any promise rejection went unhandled in it. */
export function failOnUnhandledRejections(): void {
  const unhandled: unknown[] = [];
  const onUnhandled = (reason: unknown) => unhandled.push(reason);
  process.on("unhandledRejection", onUnhandled);
  after(() => {
    process.off("unhandledRejection", onUnhandled);
    assert.deepEqual(unhandled, [], "no unhandled rejections");
  });
}
