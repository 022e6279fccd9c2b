/**
 * The host side of the mounts channel (docs/protocol.md, "Mounts channel"; docs/mounts.md): one
 * connection to the guest's mount relay on the `sm.mounts` port. Each mount is a stream whose
 * `MOUNT_DATA` carries the guest kernel's 9P connection to a file server on the host (the caller
 * starts it: `serve9p` of src/ninep, a sibling leaf this module does not import), with credit both
 * ways so neither side buffers without bound.
 *
 * The relay is guest code and untrusted: every frame is bounded and checked, and anything
 * malformed closes the channel with `AGENT_PROTOCOL` ({@link MountChannel.closed}); a malformed 9P
 * message ends only its mount. Nothing here survives a restore: after one, connect a new channel
 * to the new QEMU's socket (its `HELLO` starts a session that drops the mounts of the old one).
 */

import { Duplex } from "node:stream";
import { AbortError, GuestIoError, SupermachineError, VmError } from "../errors.ts";
import { debug, nodeCrypto, publish } from "../internal/index.ts";
import {
  describeType,
  encodeFrameHeader,
  type Frame,
  FrameDecoder,
  MAX_PAYLOAD,
  MAX_STREAM_ID,
  MessageType,
} from "./frame-codec.ts";
import {
  AgentErrorCode,
  agentErrorCodeName,
  decodeError,
  decodeGuestHello,
  decodeWindow,
  encodeHostHello,
} from "./messages.ts";
import {
  checkGuestPath,
  decodeMounted,
  encodeMount,
  MOUNT_CACHE_MODES,
  MOUNT_PROTOCOL_VERSION,
  MOUNT_WINDOW,
  type MountCacheMode,
} from "./mount-messages.ts";
import { protocolError } from "./protocol-error.ts";
import { deferred, GuestCredit, type StreamLink } from "./stream-link.ts";

export interface MountChannelConnectOptions {
  /** Session epoch sent in `HELLO`; default random. */
  epoch?: bigint;
  /** How long to wait for the relay's `HELLO`; default 30 000 ms. */
  timeoutMs?: number;
  signal?: AbortSignal;
}

/** The file server behind one mount (e.g. `NinepServer` of src/ninep). */
export interface MountServer {
  /** Settles when the server stops: `undefined` when its stream ended, else why. Never rejects. */
  readonly closed: Promise<Error | undefined>;
  /** Stops serving and destroys the stream. Idempotent. */
  close(reason?: Error): void;
}

/** What the guest mounts, and who serves it. */
export interface MountRequest<S extends MountServer = MountServer> {
  /** Absolute guest path; created (`mkdir -p`) if missing. */
  guestPath: string;
  /**
   * Starts the file server on `stream`, the guest kernel's 9P connection (it may reject, e.g. with
   * `INVALID_ARGUMENT` for a bad host directory: nothing reaches the guest then). Serve at most
   * `msizeBytes` per message.
   */
  serve: (stream: Duplex, context: { guestPath: string; msizeBytes: number }) => Promise<S>;
  /** Mount read-only in the guest too (`MS_RDONLY`); the server must refuse writes regardless. */
  readOnly?: boolean;
  /** 9P message size (4 KiB–1 MiB). Default 512 KiB. */
  msizeBytes?: number;
  /** The guest kernel's 9p `cache=` mode. Default `"mmap"` (coherent with host edits; shared mmap works). */
  cache?: MountCacheMode;
  /** How long the guest may take to mount. Default 30 000 ms. */
  timeoutMs?: number;
  signal?: AbortSignal;
}

export type MountState = "mounted" | "unmounting" | "unmounted";

const DEFAULT_TIMEOUT_MS = 30_000;
const DEFAULT_MSIZE = 512 * 1024;
/** Credit for guest→host 9P bytes per mount. */
const GUEST_WINDOW = 1_048_576;
const GRANT_BATCH = GUEST_WINDOW / 4;
/** Bytes the host side of one mount buffers toward the server before it stops granting credit. */
const READ_HIGH_WATER = 256 * 1024;
const COPY_BELOW = 16 * 1024;

/** What the relay may send. */
const GUEST_TYPES: ReadonlySet<number> = new Set([
  MessageType.HELLO,
  MessageType.ERROR,
  MessageType.WINDOW,
  MessageType.OK,
  MessageType.MOUNTED,
  MessageType.MOUNT_DATA,
]);

function invalid(message: string): SupermachineError {
  return new SupermachineError("INVALID_ARGUMENT", message);
}

/** A mount made by {@link MountChannel.mount}. */
export class MountHandle<S extends MountServer = MountServer> {
  readonly guestPath: string;
  readonly readOnly: boolean;
  /** The file server behind the mount. */
  readonly server: S;
  /**
   * Settles when the mount is over: `undefined` once unmounted (by {@link unmount}, or in the
   * guest), else the error that ended it (a 9P protocol violation, the channel closing). Never
   * rejects.
   */
  readonly closed: Promise<Error | undefined>;
  readonly #stream: MountStream;

  /** @internal */
  constructor(stream: MountStream, server: S, readOnly: boolean) {
    this.#stream = stream;
    this.guestPath = stream.guestPath;
    this.readOnly = readOnly;
    this.server = server;
    this.closed = stream.closed;
  }

  get state(): MountState {
    return this.#stream.state === "mounting" ? "mounted" : this.#stream.state;
  }

  /**
   * Unmounts in the guest (lazily: files still open there fail from now on) and stops serving.
   * Idempotent. Rejects with `GUEST_IO` (errno `ETIMEDOUT`) if the relay does not confirm within
   * `timeoutMs` (default 10 000 ms); the host side is torn down regardless.
   */
  unmount(options: { timeoutMs?: number } = {}): Promise<void> {
    return this.#stream.unmount(options.timeoutMs ?? 10_000);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.unmount().catch(() => {});
  }
}

/** The host end of one mount stream: frames in, a Duplex to the 9P server. */
class MountStream {
  /** Set by {@link open}, once the server is ready and the MOUNT goes out. */
  id = 0;
  readonly guestPath: string;
  readonly pipe: Duplex;
  server!: MountServer;
  state: "mounting" | MountState = "mounting";
  readonly mounted = deferred<void>();
  readonly closed: Promise<Error | undefined>;
  readonly #link: StreamLink;
  #credit!: GuestCredit;
  #hostCredit = MOUNT_WINDOW;
  #creditWaiters: (() => void)[] = [];
  #consumed = 0;
  #resolveClosed!: (value: Error | undefined) => void;
  #unmounted: ReturnType<typeof deferred<void>> | undefined;
  #ended = false;

  constructor(link: StreamLink, guestPath: string) {
    this.#link = link;
    this.guestPath = guestPath;
    this.closed = new Promise((resolve) => {
      this.#resolveClosed = resolve;
    });
    this.pipe = new Duplex({
      readableHighWaterMark: READ_HIGH_WATER,
      writableHighWaterMark: READ_HIGH_WATER,
      // The server took what was buffered: give the guest credit back.
      read: () => this.#grant(),
      write: (chunk: Buffer, _encoding, callback) => {
        this.#send(chunk).then(
          () => callback(),
          (error: Error) => callback(error),
        );
      },
      destroy: (error, callback) => {
        // The server stopped (protocol violation or close): cut the mount in the guest.
        this.#end(error ?? undefined, true);
        callback(null);
      },
    });
  }

  /**
   * Grants what the server consumed, a quarter window at a time: a WINDOW per 9P request would
   * wake the relay once more per request. The guest never waits on it: until the host has
   * consumed a quarter window, it still has three quarters of its credit.
   */
  #grant(): void {
    if (this.#consumed < GRANT_BATCH) return;
    const n = this.#consumed;
    this.#consumed = 0;
    this.#credit.grant(n);
  }

  open(id: number): void {
    this.id = id;
    this.#credit = new GuestCredit(this.#link, id, GUEST_WINDOW, () => !this.#ended);
  }

  /** Sends 9P bytes as MOUNT_DATA frames within the relay's credit and the socket's pace. */
  async #send(chunk: Buffer): Promise<void> {
    let offset = 0;
    while (offset < chunk.length) {
      while (this.#hostCredit === 0 && !this.#ended) {
        await new Promise<void>((resolve) => this.#creditWaiters.push(resolve));
      }
      if (this.#ended) return;
      const n = Math.min(chunk.length - offset, this.#hostCredit, MAX_PAYLOAD);
      this.#hostCredit -= n;
      await this.#link.sendData(this.id, MessageType.MOUNT_DATA, chunk.subarray(offset, offset + n));
      offset += n;
    }
  }

  onFrame(frame: Frame): void {
    switch (frame.type) {
      case MessageType.MOUNT_DATA: {
        if (this.state === "unmounted") return;
        this.#consumed += this.#credit.take(frame, "MOUNT_DATA");
        // A copy: the frame is a view into a socket chunk that may be much larger.
        if (this.pipe.push(Buffer.from(frame.payload))) this.#grant();
        return;
      }
      case MessageType.WINDOW: {
        this.#hostCredit += decodeWindow(frame.payload);
        const waiters = this.#creditWaiters;
        this.#creditWaiters = [];
        for (const wake of waiters) wake();
        return;
      }
      case MessageType.MOUNTED:
        if (this.state !== "mounting")
          throw protocolError(`MOUNTED for ${this.guestPath}, which is not being mounted`);
        decodeMounted(frame.payload);
        this.state = "mounted";
        this.mounted.resolve();
        return;
      case MessageType.ERROR: {
        const m = decodeError(frame.payload);
        const error = new GuestIoError(
          `mount ${this.guestPath} failed in the guest (${agentErrorCodeName(m.code)}${m.errno ? `, errno ${m.errno}` : ""})${m.message ? `: ${m.message}` : ""}`,
          { path: this.guestPath, errno: m.errno },
        );
        this.#end(error, false);
        return;
      }
      case MessageType.OK:
        this.#end(undefined, false);
        return;
      default:
        throw protocolError(`unexpected ${describeType(frame.type)} on mount stream ${this.id}`);
    }
  }

  /** The channel closed. */
  onClose(error: Error): void {
    this.#end(error, false);
  }

  /**
   * The mount is over. `cut`: the guest does not know yet (send RESET). The server drains what is
   * in flight on a clean end; the stream's frames are dropped from now on.
   */
  #end(error: Error | undefined, cut: boolean): void {
    if (this.#ended) return;
    this.#ended = true;
    const wasMounting = this.state === "mounting";
    this.state = "unmounted";
    if (cut) this.#link.reset(this.id);
    this.#link.release(this.id);
    for (const wake of this.#creditWaiters) wake();
    this.#creditWaiters = [];
    this.mounted.reject(
      error ?? new GuestIoError(`${this.guestPath} was unmounted while mounting`, { path: this.guestPath }),
    );
    if (error === undefined) {
      this.pipe.push(null); // the server finishes the requests in flight and closes
    } else {
      this.server.close(error);
      this.pipe.destroy();
    }
    const settle = (reason: Error | undefined) => {
      this.#unmounted?.resolve();
      this.#resolveClosed(reason);
      publish("mount:detach", { guestPath: this.guestPath, error: reason });
    };
    if (wasMounting) settle(error);
    else void this.server.closed.then((serverError) => settle(error ?? serverError));
  }

  /** Abandons the mount (timeout, abort): the relay cuts and detaches it. */
  abandon(error: Error): void {
    this.#end(error, true);
  }

  unmount(timeoutMs: number): Promise<void> {
    if (this.#unmounted) return this.#unmounted.promise;
    const d = deferred<void>();
    this.#unmounted = d;
    if (this.#ended) {
      d.resolve();
      return d.promise;
    }
    this.state = "unmounting";
    this.#link.sendControl(this.id, MessageType.UNMOUNT);
    const timer = setTimeout(() => {
      const error = new GuestIoError(
        `unmounting ${this.guestPath}: the guest did not confirm within ${timeoutMs} ms`,
        {
          path: this.guestPath,
          errno: 110, // ETIMEDOUT
        },
      );
      d.reject(error);
      this.#end(error, true);
    }, timeoutMs);
    return d.promise.finally(() => clearTimeout(timer));
  }
}

/** A connection to the guest's mount relay. Create with {@link MountChannel.connect}. */
export class MountChannel {
  /** Settles when the channel ends: `undefined` for {@link close} without a reason, else the error. */
  readonly closed: Promise<Error | undefined>;

  readonly #socket: Duplex;
  readonly #decoder = new FrameDecoder();
  readonly #streams = new Map<number, MountStream>();
  readonly #handles = new Set<MountHandle>();
  readonly #written = new Set<number>();
  readonly #link: StreamLink;
  #epoch: bigint;
  #state: "handshake" | "open" | "closed" = "handshake";
  #closedError: Error | undefined;
  #resolveClosed!: (value: Error | undefined) => void;
  #hello = deferred<void>();
  #nextStream = 1;
  #needDrain = false;
  #drainWaiters: (() => void)[] = [];
  readonly #onData = (chunk: Buffer) => this.#receive(chunk);
  readonly #onEnd = () =>
    this.#fail(new VmError("VM_EXITED", "mounts channel ended (the VM exited, or its mount relay did)"));
  readonly #onError = (error: Error) =>
    this.#fail(new VmError("VM_EXITED", `mounts channel failed: ${error.message}`, {}, { cause: error }));
  readonly #onDrain = () => {
    this.#needDrain = false;
    const waiters = this.#drainWaiters;
    this.#drainWaiters = [];
    for (const wake of waiters) wake();
  };

  private constructor(socket: Duplex, epoch: bigint) {
    this.#socket = socket;
    this.#epoch = epoch;
    this.closed = new Promise((resolve) => {
      this.#resolveClosed = resolve;
    });
    const self = this;
    this.#link = {
      sendControl: (stream, type, payload, flags) => this.#sendControl(stream, type, payload, flags),
      sendData: (stream, type, payload, flags) => this.#sendData(stream, type, payload, flags),
      sendOpen: (stream, type, payload) => {
        this.#sendControl(stream, type, payload);
        return Promise.resolve();
      },
      writable: () => this.#writable(),
      reset: (stream) => {
        if (this.#written.has(stream)) this.#sendControl(stream, MessageType.RESET);
      },
      release: (stream) => {
        this.#streams.delete(stream);
        this.#written.delete(stream);
      },
      get closedError() {
        return self.#closedError;
      },
      // No call on this channel waits on the guest under an agent deadline.
      timedOut: () => {},
    };
    socket.on("data", this.#onData);
    socket.on("end", this.#onEnd);
    socket.on("close", this.#onEnd);
    socket.on("error", this.#onError);
    socket.on("drain", this.#onDrain);
  }

  /**
   * Sends `HELLO` on `socket` (QEMU's connection for the `sm.mounts` port) and waits for the
   * relay's answer; a new session, so any mount of a previous one is dropped in the guest. The
   * channel owns the socket from then on. Rejects with `AGENT_VERSION`, `AGENT_PROTOCOL`,
   * `VM_BOOT_TIMEOUT`, `VM_EXITED` or `ABORTED`.
   */
  static async connect(socket: Duplex, options: MountChannelConnectOptions = {}): Promise<MountChannel> {
    const channel = new MountChannel(socket, options.epoch ?? nodeCrypto().randomBytes(8).readBigUInt64BE());
    const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const timer = setTimeout(
      () =>
        channel.close(
          new VmError(
            "VM_BOOT_TIMEOUT",
            `the guest's mount relay did not answer HELLO within ${timeoutMs} ms`,
          ),
        ),
      timeoutMs,
    );
    const signal = options.signal;
    const onAbort = () =>
      channel.close(new AbortError("mounts channel connect aborted", { cause: signal?.reason }));
    if (signal?.aborted) onAbort();
    signal?.addEventListener("abort", onAbort, { once: true });
    try {
      channel.#sendControl(
        0,
        MessageType.HELLO,
        encodeHostHello({ version: MOUNT_PROTOCOL_VERSION, epoch: channel.#epoch }),
      );
      await channel.#hello.promise;
      return channel;
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
    }
  }

  /** The mounts currently attached. */
  get mounts(): readonly MountHandle[] {
    return [...this.#handles];
  }

  /** The error the channel closed with, once closed. */
  get closedError(): Error | undefined {
    return this.#closedError;
  }

  /**
   * Mounts in the guest at `request.guestPath`, served by the server `request.serve` starts.
   * Resolves once the guest kernel has mounted it. Rejects with `INVALID_ARGUMENT` (bad options,
   * or whatever `serve` rejects with), `GUEST_IO` (the guest could not mount: `errno` says why,
   * `ETIMEDOUT` after `timeoutMs`), `ABORTED`, or the channel's error.
   */
  async mount<S extends MountServer>(request: MountRequest<S>): Promise<MountHandle<S>> {
    this.#checkOpen();
    const guestPath = request.guestPath;
    checkGuestPath(guestPath);
    const msizeBytes = request.msizeBytes ?? DEFAULT_MSIZE;
    if (!Number.isSafeInteger(msizeBytes) || msizeBytes < 4096 || msizeBytes > 1024 * 1024) {
      throw invalid(`msizeBytes must be an integer from 4096 to 1048576, got ${msizeBytes}`);
    }
    const cache = request.cache ?? "mmap";
    if (!(MOUNT_CACHE_MODES as readonly string[]).includes(cache)) {
      throw invalid(`cache must be one of ${MOUNT_CACHE_MODES.join(", ")}, got ${JSON.stringify(cache)}`);
    }
    const timeoutMs = request.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const signal = request.signal;
    if (signal?.aborted) throw new AbortError(`mount ${guestPath} aborted`, { cause: signal.reason });
    if (this.#nextStream > MAX_STREAM_ID) throw new VmError("VM_STOPPED", "mount stream ids exhausted");

    const stream = new MountStream(this.#link, guestPath);
    const server = await request.serve(stream.pipe, { guestPath, msizeBytes });
    stream.server = server;
    if (this.#closedError) {
      server.close();
      throw this.#closedError;
    }
    // Allocated only now, and the MOUNT written at once: opening frames go out in id order.
    const id = this.#nextStream++;
    stream.open(id);
    this.#streams.set(id, stream);
    this.#written.add(id);
    this.#sendControl(
      id,
      MessageType.MOUNT,
      encodeMount({
        path: guestPath,
        msize: msizeBytes,
        readOnly: request.readOnly,
        window: GUEST_WINDOW,
        cache,
      }),
    );
    const timer = setTimeout(
      () =>
        stream.abandon(
          new GuestIoError(`mount ${guestPath} did not complete within ${timeoutMs} ms`, {
            path: guestPath,
            errno: 110, // ETIMEDOUT
          }),
        ),
      timeoutMs,
    );
    const onAbort = () =>
      stream.abandon(new AbortError(`mount ${guestPath} aborted`, { cause: signal?.reason }));
    signal?.addEventListener("abort", onAbort, { once: true });
    try {
      await stream.mounted.promise;
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
    }
    const handle = new MountHandle(stream, server, request.readOnly === true);
    this.#handles.add(handle);
    void handle.closed.then(() => this.#handles.delete(handle));
    publish("mount:attach", { guestPath, readOnly: handle.readOnly });
    return handle;
  }

  /** Unmounts every mount (before a snapshot: mounts are never part of one). */
  async unmountAll(options: { timeoutMs?: number } = {}): Promise<void> {
    const results = await Promise.allSettled(this.mounts.map((m) => m.unmount(options)));
    const failed = results.find((r): r is PromiseRejectedResult => r.status === "rejected");
    if (failed) throw failed.reason;
  }

  /**
   * Closes the channel: every mount ends (the guest cuts them once it notices) and the socket is
   * destroyed. Idempotent.
   */
  close(reason?: Error): void {
    if (this.#state === "closed") return;
    this.#closeWith(reason ?? new VmError("VM_STOPPED", "mounts channel closed"), reason === undefined);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.unmountAll().catch(() => {});
    this.close();
  }

  // ------------------------------------------------------------------------------------------

  #receive(chunk: Buffer): void {
    if (this.#state === "closed") return;
    try {
      for (const frame of this.#decoder.push(chunk)) {
        this.#dispatch(frame);
        if (this.#closedError) return;
      }
    } catch (error) {
      this.#fail(
        error instanceof SupermachineError
          ? error
          : protocolError(`host failed on a frame: ${error}`, { cause: error }),
      );
    }
  }

  #dispatch(frame: Frame): void {
    if (!GUEST_TYPES.has(frame.type)) {
      throw protocolError(`the mount relay sent ${describeType(frame.type)}, which it may not send`);
    }
    if (this.#state === "handshake") {
      this.#onHello(frame);
      return;
    }
    if (frame.stream === 0) {
      if (frame.type === MessageType.ERROR) {
        const m = decodeError(frame.payload);
        throw protocolError(
          `the mount relay reported ${agentErrorCodeName(m.code)} on the control stream${m.message ? `: ${m.message}` : ""}`,
        );
      }
      throw protocolError(`unexpected ${describeType(frame.type)} on the mounts control stream`);
    }
    const stream = this.#streams.get(frame.stream);
    if (stream) {
      stream.onFrame(frame);
      return;
    }
    if (frame.stream < this.#nextStream) return; // ended: frames may cross its end
    throw protocolError(
      `${describeType(frame.type)} for mount stream ${frame.stream}, which was never opened`,
    );
  }

  #onHello(frame: Frame): void {
    if (frame.stream === 0 && frame.type === MessageType.ERROR) {
      const m = decodeError(frame.payload);
      if (m.code === AgentErrorCode.VERSION) {
        throw new VmError(
          "AGENT_VERSION",
          `the guest's mount relay does not speak mounts protocol version ${MOUNT_PROTOCOL_VERSION}${m.message ? `: ${m.message}` : ""}`,
        );
      }
      throw protocolError(`the mount relay refused HELLO (${agentErrorCodeName(m.code)})`);
    }
    if (frame.stream !== 0 || frame.type !== MessageType.HELLO) {
      debug(
        "mounts: ignoring %s on stream %d before the HELLO answer",
        describeType(frame.type),
        frame.stream,
      );
      return;
    }
    const hello = decodeGuestHello(frame.payload);
    if (hello.version !== MOUNT_PROTOCOL_VERSION) {
      throw new VmError(
        "AGENT_VERSION",
        `the guest's mount relay speaks version ${hello.version}, the host ${MOUNT_PROTOCOL_VERSION}`,
      );
    }
    if (hello.epoch !== this.#epoch)
      throw protocolError(`mounts HELLO echoed epoch ${hello.epoch}, expected ${this.#epoch}`);
    this.#state = "open";
    this.#hello.resolve();
  }

  #fail(error: Error): void {
    if (this.#state === "closed") return;
    debug("mounts: closing: %s", error.message);
    this.#closeWith(error, false);
  }

  #closeWith(error: Error, clean: boolean): void {
    this.#state = "closed";
    this.#closedError = error;
    this.#hello.reject(error);
    const streams = [...this.#streams.values()];
    this.#streams.clear();
    this.#written.clear();
    for (const s of streams) s.onClose(error);
    this.#onDrain();
    this.#socket.off("data", this.#onData);
    this.#socket.off("end", this.#onEnd);
    this.#socket.off("close", this.#onEnd);
    this.#socket.off("drain", this.#onDrain);
    this.#socket.destroy();
    this.#resolveClosed(clean ? undefined : error);
  }

  #checkOpen(): void {
    if (this.#closedError) throw this.#closedError;
    if (this.#state !== "open") throw new VmError("VM_STOPPED", "mounts channel is not open");
  }

  #sendControl(stream: number, type: number, payload: Uint8Array = new Uint8Array(0), flags = 0): void {
    if (this.#state === "closed") return;
    this.#writeFrame(stream, type, payload, flags);
  }

  async #writable(): Promise<void> {
    while (this.#needDrain && this.#state !== "closed") {
      await new Promise<void>((resolve) => this.#drainWaiters.push(resolve));
    }
  }

  async #sendData(stream: number, type: number, payload: Uint8Array, flags = 0): Promise<void> {
    await this.#writable();
    if (this.#closedError) throw this.#closedError;
    if (!this.#streams.has(stream)) return; // ended meanwhile
    this.#writeFrame(stream, type, payload, flags);
  }

  #writeFrame(stream: number, type: number, payload: Uint8Array, flags: number): void {
    const header = encodeFrameHeader(stream, type, flags, payload.length);
    let ok: boolean;
    if (payload.length < COPY_BELOW) {
      const frame = Buffer.allocUnsafe(header.length + payload.length);
      frame.set(header, 0);
      frame.set(payload, header.length);
      ok = this.#socket.write(frame);
    } else {
      this.#socket.cork();
      this.#socket.write(header);
      ok = this.#socket.write(payload);
      this.#socket.uncork();
    }
    if (!ok) this.#needDrain = true;
  }
}
