/**
 * The host side of the guest agent protocol (docs/protocol.md) over one byte stream: the `HELLO`
 * handshake, multiplexed streams with credit both ways — execs, file transfers, file-system
 * operations ({@link AgentClient.fs}), watches, TCP tunnels, the workload — ping and shutdown.
 *
 * The guest is untrusted: every frame is bounded and validated, and anything malformed closes the
 * connection with a `VmError` `AGENT_PROTOCOL` (reported through {@link AgentClient.closed} and to
 * every pending operation) — never a crash, a hang or an unhandled rejection on the host.
 */

import { createReadStream, createWriteStream } from "node:fs";
import { mkdtemp, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Duplex, Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { AbortError, GuestIoError, SupermachineError, VmError } from "../errors.ts";
import { debug, nodeCrypto, socketReads } from "../internal/index.ts";
import {
  type AgentCallOptions,
  agentTimeout,
  DEFAULT_PING_TIMEOUT_MS,
  timeoutOption,
  Watchdog,
} from "./deadline.ts";
import { ExecChannel, type ExecRequest } from "./exec-channel.ts";
import { FileReadStream, FileWriteStream, type GuestFileInfo } from "./file-streams.ts";
import {
  describeType,
  encodeFrameHeader,
  FLAG_FIN,
  FRAME_COST,
  type Frame,
  FrameDecoder,
  MAX_PAYLOAD,
  MAX_STREAM_ID,
  MessageType,
} from "./frame-codec.ts";
import { GuestFs } from "./guest-fs.ts";
import { type GuestWatcher, type WatchOptions, watch } from "./guest-watch.ts";
import { hostClock } from "./host-clock.ts";
import {
  AgentErrorCode,
  agentErrorCodeName,
  chunkPayload,
  decodeError,
  decodeGuestHello,
  decodeOk,
  decodeWorkloadStatus,
  encodeFreeze,
  encodeHostHello,
  encodeReadFile,
  encodeWriteFile,
  PROTOCOL_VERSION,
  WorkloadState,
} from "./messages.ts";
import { protocolError } from "./protocol-error.ts";
import { request } from "./request-stream.ts";
import { deferred, type StreamHandler, type StreamHost, type StreamLink } from "./stream-link.ts";
import { syscallError } from "./syscall-error.ts";
import { type ConnectTcpOptions, connectTcp } from "./tcp-tunnel.ts";
import {
  signalWorkload,
  startWorkload,
  type WorkloadLogsOptions,
  type WorkloadSpec,
  type WorkloadStatus,
  workloadLogs,
  workloadStatus,
  workloadStatusFrom,
} from "./workload.ts";

/** A VM's own names (docs/protocol.md, `HELLO`). */
export interface GuestIdentity {
  /** `/etc/machine-id`: 32 lowercase hex digits. */
  machineId: string;
  /** The hostname, also in `/etc/hostname` and on `/etc/hosts`' 127.0.1.1 line. */
  hostname: string;
}

/** Options of {@link AgentClient.connect}. */
export interface AgentConnectOptions {
  /** Restore epoch sent in `HELLO`; default random. */
  epoch?: bigint;
  /** Host `CLOCK_REALTIME` in ns for the guest clock; default now. */
  timeNs?: bigint;
  /** 32–512 bytes mixed into the guest's RNG; default 64 random bytes. */
  entropy?: Uint8Array;
  /** The VM's names, applied before the agent answers; default: the guest keeps its own. */
  identity?: GuestIdentity;
  /** How long to wait for the agent's `HELLO`; default 30 000 ms. */
  timeoutMs?: number;
  signal?: AbortSignal;
}

/** Options of {@link AgentClient.rehello}. */
export interface AgentRehelloOptions {
  /** Epoch of the new session; default random (never the current one). */
  epoch?: bigint;
  /** Host `CLOCK_REALTIME` in ns for the guest clock; default now. */
  timeNs?: bigint;
  /** 32–512 bytes mixed into the guest's RNG; default 64 random bytes. */
  entropy?: Uint8Array;
  /** The VM's names, applied before the agent answers; default: the guest keeps its own. */
  identity?: GuestIdentity;
  /** How long to wait for the agent's `HELLO`; default 30 000 ms. */
  timeoutMs?: number;
  signal?: AbortSignal;
}

/** Options of {@link AgentClient.writeFile}. */
export interface WriteFileOptions {
  /** Permission bits, default 0o644. */
  mode?: number;
  uid?: number;
  gid?: number;
  /** Create missing parent directories. */
  mkdirs?: boolean;
  /**
   * Exact length of a stream source. Without it a stream is first spooled to a temporary file on
   * the host (the protocol needs the size up front).
   */
  sizeBytes?: number;
  signal?: AbortSignal;
  /**
   * Longest the host waits on the guest without progress — for the channel to take more data, or
   * for the agent's answer — in milliseconds (default 30 000): then `AGENT_TIMEOUT`.
   */
  timeoutMs?: number;
}

/** Options of {@link AgentClient.readFile}. */
export interface ReadFileOptions {
  signal?: AbortSignal;
  /**
   * Longest the host waits on the guest without progress while its consumer wants data, in
   * milliseconds (default 30 000): then `AGENT_TIMEOUT`.
   */
  timeoutMs?: number;
}

/** Options of {@link AgentClient.readFileBytes}. */
export interface ReadFileBytesOptions extends ReadFileOptions {
  /** Largest file accepted, default 1 GiB: a larger one fails with `EFBIG` before any data is held. */
  maxBytes?: number;
}

/** A file being read from the guest. */
export interface GuestFile extends GuestFileInfo {
  stream: Readable;
}

/** Sources {@link AgentClient.writeFile} accepts. */
export type WriteFileSource = Uint8Array | string | AsyncIterable<Uint8Array> | NodeJS.ReadableStream;

const DEFAULT_CONNECT_TIMEOUT_MS = 30_000;
const DEFAULT_SHUTDOWN_TIMEOUT_MS = 10_000;
const READ_WINDOW = 1_048_576;
/** Default cap of {@link AgentClient.readFileBytes}. */
const DEFAULT_READ_MAX_BYTES = 1024 * 1024 * 1024;
/** {@link AgentClient.readFileBytes} allocates at most this much up front, whatever the guest announces. */
const READ_PREALLOCATE_MAX = 64 * 1024 * 1024;
/**
 * Frames for streams that have ended: the host accepts (and drops) what the agent may have had in
 * flight when the host reset them — their outstanding credit plus this much for their last
 * control frames — and a small base; beyond that they are `AGENT_PROTOCOL` (docs/protocol.md).
 */
const STRAY_BASE_BYTES = 64 * 1024;
const STRAY_PER_RESET_BYTES = 8 * 1024 + 16 * FRAME_COST;
const STRAY_MAX_BYTES = 256 * 1024 * 1024;
/** Small frames are copied into one buffer (one write); larger payloads are written as is. */
const COPY_BELOW = 16 * 1024;

type State = "handshake" | "open" | "closed";

function invalid(message: string): SupermachineError {
  return new SupermachineError("INVALID_ARGUMENT", message);
}

/** Guest → host message types; the guest may send nothing else. */
const GUEST_TYPES: ReadonlySet<number> = new Set([
  MessageType.HELLO,
  MessageType.PONG,
  MessageType.ERROR,
  MessageType.STDOUT,
  MessageType.STDERR,
  MessageType.WINDOW,
  MessageType.STARTED,
  MessageType.EXIT,
  MessageType.FILE_DATA,
  MessageType.FILE_INFO,
  MessageType.OK,
  MessageType.WORKLOAD_STATUS,
  MessageType.STAT,
  MessageType.DIRENTS,
  MessageType.WATCH_EVENT,
  MessageType.TCP_CONNECTED,
  MessageType.TCP_DATA,
]);

export class AgentClient {
  /** The restore epoch of the current session (changes with {@link AgentClient.rehello}). */
  get epoch(): bigint {
    return this.#epoch;
  }
  /** Settles when the connection ends: `undefined` for a clean end, else the error. Never rejects. */
  readonly closed: Promise<Error | undefined>;
  /** The guest's file system, like `node:fs/promises` (docs/protocol.md, "File-system operations"). */
  readonly fs: GuestFs;

  #epoch: bigint;
  #rehelloing = false;
  #agentVersion = "";
  #bootNs = 0n;
  readonly #socket: Duplex;
  readonly #decoder = new FrameDecoder();
  readonly #streams = new Map<number, StreamHandler>();
  /** Open streams whose opening frame has been written. */
  readonly #written = new Set<number>();
  /** Opening frames go out in stream id order. */
  #openChain: Promise<void> = Promise.resolve();
  readonly #link: StreamLink;
  readonly #host: StreamHost;
  /** Bytes of frames for ended streams the host will still drop quietly (see STRAY_BASE_BYTES). */
  #strayAllowance = STRAY_BASE_BYTES;
  readonly #workloadExitListeners = new Set<(status: WorkloadStatus) => void>();
  #state: State = "handshake";
  #closedError: Error | undefined;
  #timedOut = false;
  #resolveClosed!: (value: Error | undefined) => void;
  #nextStream = 1;
  #needDrain = false;
  #drainWaiters: (() => void)[] = [];
  #hello = deferred<void>();
  #pingSeq = 0n;
  readonly #pings = new Map<
    bigint,
    { resolve: (ms: number) => void; reject: (e: Error) => void; t0: number }
  >();
  readonly #expiredPings = new Set<bigint>();
  #shutdown: ReturnType<typeof deferred<void>> | undefined;
  #shutdownPromise: Promise<void> | undefined;
  #shutdownAcked = false;
  readonly #onData = (chunk: Uint8Array) => this.#receive(chunk);
  readonly #onEnd = () => this.#channelEnded();
  readonly #onError = (error: Error) =>
    this.#fail(new VmError("VM_EXITED", `agent channel failed: ${error.message}`, {}, { cause: error }));
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
      sendOpen: (stream, type, payload) => this.#sendOpen(stream, type, payload),
      writable: () => this.#writable(),
      reset: (stream, inFlightBytes = 0) => {
        if (!this.#written.has(stream)) return;
        this.#sendControl(stream, MessageType.RESET);
        this.#strayAllowance = Math.min(
          this.#strayAllowance + inFlightBytes + STRAY_PER_RESET_BYTES,
          STRAY_MAX_BYTES,
        );
      },
      release: (stream) => {
        this.#streams.delete(stream);
        this.#written.delete(stream);
      },
      get closedError() {
        return self.#closedError;
      },
      timedOut: () => {
        this.#timedOut = true;
      },
    };
    this.#host = {
      link: this.#link,
      open: (type, payload, create) => {
        this.#checkOpen();
        const stream = this.#allocate();
        const handler = create(stream);
        this.#streams.set(stream, handler);
        const sent = this.#sendOpen(stream, type, payload);
        sent.catch(() => {});
        return { handler, sent };
      },
    };
    this.fs = new GuestFs(this.#host);
    // A VM's channel is read without the stream machinery (chunks of a reused buffer: the decoder
    // copies what it keeps); any other stream through `data` events.
    const reads = socketReads(socket);
    if (reads) reads.read(this.#onData);
    else socket.on("data", this.#onData);
    socket.on("end", this.#onEnd);
    socket.on("close", this.#onEnd);
    socket.on("error", this.#onError);
    socket.on("drain", this.#onDrain);
  }

  /**
   * Sends `HELLO` on `socket` and waits for the agent's. From then on the client owns the socket:
   * it is destroyed when the client closes, including when the handshake fails.
   * Rejects with `AGENT_VERSION`, `AGENT_PROTOCOL`, `VM_BOOT_TIMEOUT`, `VM_EXITED` or `AbortError`.
   */
  static async connect(socket: Duplex, opts: AgentConnectOptions = {}): Promise<AgentClient> {
    const epoch = opts.epoch ?? nodeCrypto().randomBytes(8).readBigUInt64BE();
    const client = new AgentClient(socket, epoch);
    await client.#handshake(opts, "connect");
    return client;
  }

  /**
   * Starts a new session on the same connection: sends `HELLO` (new epoch, the host's time, fresh
   * entropy) and waits for the agent's answer echoing the new epoch. Frames of the previous session
   * that arrive before the answer are ignored (docs/protocol.md "Sessions"). Every stream, ping and
   * shutdown of the previous session must be over: otherwise it rejects with `INVALID_ARGUMENT`
   * and the connection stays as it was. A timeout or abort closes the connection (the agent's
   * session state is then unknown): `VM_BOOT_TIMEOUT`, `AbortError`; also `AGENT_VERSION`,
   * `AGENT_PROTOCOL`, `VM_EXITED` like {@link AgentClient.connect}.
   */
  async rehello(opts: AgentRehelloOptions = {}): Promise<void> {
    if (this.#closedError) throw this.#closedError;
    if (this.#state !== "open" || this.#rehelloing) {
      throw new VmError("VM_STOPPED", "agent connection is not open");
    }
    if (this.#streams.size > 0 || this.#pings.size > 0 || this.#shutdown !== undefined) {
      throw invalid(
        `cannot start a new agent session with ${this.#streams.size} stream(s) and ${this.#pings.size} ping(s) of the current one open${this.#shutdown ? " after SHUTDOWN" : ""}`,
      );
    }
    let epoch = opts.epoch ?? nodeCrypto().randomBytes(8).readBigUInt64BE();
    while (opts.epoch === undefined && epoch === this.#epoch)
      epoch = nodeCrypto().randomBytes(8).readBigUInt64BE();
    this.#epoch = epoch;
    this.#state = "handshake";
    this.#hello = deferred<void>();
    this.#rehelloing = true;
    try {
      await this.#handshake(opts, "rehello");
    } finally {
      this.#rehelloing = false;
    }
  }

  async #handshake(opts: AgentRehelloOptions, what: "connect" | "rehello"): Promise<void> {
    const payload = encodeHostHello({
      version: PROTOCOL_VERSION,
      epoch: this.#epoch,
      timeNs: opts.timeNs ?? hostClock.nowNs(),
      entropy: opts.entropy ?? new Uint8Array(nodeCrypto().randomBytes(64)),
      machineId: opts.identity?.machineId,
      hostname: opts.identity?.hostname,
    });
    const timeoutMs = opts.timeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    const signal = opts.signal;
    const timer = setTimeout(() => {
      this.close(new VmError("VM_BOOT_TIMEOUT", `guest agent did not answer HELLO within ${timeoutMs} ms`));
    }, timeoutMs);
    const onAbort = () => this.close(new AbortError(`agent ${what} aborted`, { cause: signal?.reason }));
    if (signal?.aborted) onAbort();
    signal?.addEventListener("abort", onAbort, { once: true });
    try {
      this.#sendControl(0, MessageType.HELLO, payload);
      await this.#hello.promise;
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
    }
  }

  /** Name and version the agent reported, e.g. `sm-init 0.1.0`. */
  get agentVersion(): string {
    return this.#agentVersion;
  }

  /** Guest `CLOCK_BOOTTIME` (ns) when the agent answered `HELLO`. */
  get bootNs(): bigint {
    return this.#bootNs;
  }

  /** The error the connection closed with, once closed. */
  get closedError(): Error | undefined {
    return this.#closedError;
  }

  /**
   * True once a call waited on the agent past its deadline (`AGENT_TIMEOUT`): the guest kept the
   * host waiting, so what it is doing is unknown.
   */
  get timedOut(): boolean {
    return this.#timedOut;
  }

  /** Number of open streams (execs and file transfers). */
  get openStreams(): number {
    return this.#streams.size;
  }

  // ------------------------------------------------------------------------------------------
  // Operations

  /** Opens an exec stream. The request goes out at once; see {@link ExecChannel}. */
  exec(request: ExecRequest): ExecChannel {
    this.#checkOpen();
    const stream = this.#allocate();
    const channel = new ExecChannel(this.#link, stream, request);
    this.#streams.set(stream, channel);
    return channel;
  }

  /**
   * Writes a file in the guest (atomically: a temporary file renamed into place; a mount point,
   * which refuses the rename, is written in place), streamed at any size. Rejects with
   * `GuestIoError` if the guest cannot write it.
   */
  async writeFile(path: string, data: WriteFileSource, opts: WriteFileOptions = {}): Promise<void> {
    if (!path.startsWith("/")) throw invalid(`writeFile path ${JSON.stringify(path)} must be absolute`);
    this.#checkOpen();
    const signal = opts.signal;
    if (signal?.aborted) throw new AbortError("writeFile aborted", { cause: signal.reason });
    if (typeof data === "string") data = new TextEncoder().encode(data);
    if (data instanceof Uint8Array) {
      return this.#writeFile(path, data.length, [data], opts);
    }
    if (opts.sizeBytes !== undefined) {
      if (!Number.isSafeInteger(opts.sizeBytes) || opts.sizeBytes < 0) {
        throw invalid(`sizeBytes ${opts.sizeBytes} is not a byte count`);
      }
      return this.#writeFile(path, opts.sizeBytes, data as AsyncIterable<Uint8Array>, opts);
    }
    // Unknown length: spool to a temporary file so the size can be sent first.
    const dir = await mkdtemp(join(tmpdir(), "supermachine-upload-"));
    try {
      const file = join(dir, "data");
      await pipeline(data as AsyncIterable<Uint8Array>, createWriteStream(file), { signal });
      const { size } = await stat(file);
      return await this.#writeFile(path, size, createReadStream(file, { highWaterMark: MAX_PAYLOAD }), opts);
    } catch (error) {
      if ((error as Error).name === "AbortError" && !(error instanceof AbortError)) {
        throw new AbortError("writeFile aborted", { cause: error });
      }
      throw error;
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }

  async #writeFile(
    path: string,
    size: number,
    source: Iterable<Uint8Array> | AsyncIterable<Uint8Array>,
    opts: WriteFileOptions,
  ): Promise<void> {
    const payload = encodeWriteFile({
      path,
      mode: opts.mode,
      uid: opts.uid,
      gid: opts.gid,
      size,
      mkdirs: opts.mkdirs ? true : undefined,
    });
    const timeoutMs = timeoutOption(opts.timeoutMs);
    this.#checkOpen();
    const stream = this.#allocate();
    const op = new FileWriteStream(this.#link, stream, path, size);
    this.#streams.set(stream, op);
    const signal = opts.signal;
    const onAbort = () => op.reset(new AbortError("writeFile aborted", { cause: signal?.reason }));
    signal?.addEventListener("abort", onAbort, { once: true });
    // Time spent waiting on the guest (the channel to drain, the answer) is bounded; time the
    // source takes is not. A reset (deadline, abort, agent error) ends every wait at once.
    const watchdog = new Watchdog(timeoutMs, () =>
      op.reset(agentTimeout(this.#link, `writeFile ${path}`, timeoutMs)),
    );
    const failed = new Promise<never>((_, reject) => op.result.catch(reject));
    failed.catch(() => {});
    const guest = async <T>(wait: Promise<T>): Promise<T> => {
      watchdog.arm();
      try {
        return await Promise.race([wait, failed]);
      } finally {
        watchdog.disarm();
      }
    };
    try {
      await guest(this.#sendOpen(stream, MessageType.WRITE_FILE, payload));
      let sent = 0;
      if (size === 0) await guest(this.#sendData(stream, MessageType.FILE_DATA, new Uint8Array(0), FLAG_FIN));
      for await (let chunk of source) {
        if (op.ended) break;
        if (typeof chunk === "string") chunk = Buffer.from(chunk);
        if (!(chunk instanceof Uint8Array))
          throw invalid("writeFile source yielded something other than bytes");
        if (sent + chunk.length > size) {
          op.reset(invalid(`writeFile source for ${path} produced more than the ${size} bytes announced`));
          break;
        }
        for (const part of chunkPayload(chunk)) {
          if (op.ended) break;
          sent += part.length;
          await guest(this.#sendData(stream, MessageType.FILE_DATA, part, sent === size ? FLAG_FIN : 0));
        }
      }
      if (!op.ended && sent < size) {
        op.reset(invalid(`writeFile source for ${path} ended after ${sent} of the ${size} bytes announced`));
      }
      await guest(op.result);
    } catch (error) {
      op.reset(error as Error);
      // If the agent had already refused the write, its error says more.
      throw await op.result.then(
        () => error,
        (reason: unknown) => reason,
      );
    } finally {
      watchdog.stop();
      signal?.removeEventListener("abort", onAbort);
    }
  }

  /**
   * Opens a file in the guest for reading. Resolves once the agent has sent its metadata; the bytes
   * follow on `stream`, under backpressure (destroying the stream early abandons the read). The
   * data must match the size announced (`AGENT_PROTOCOL` otherwise).
   */
  async readFile(path: string, opts: ReadFileOptions = {}): Promise<GuestFile> {
    const { info, op } = await this.#readFile(path, opts);
    return { ...info, stream: op.readable };
  }

  async #readFile(path: string, opts: ReadFileOptions): Promise<{ info: GuestFileInfo; op: FileReadStream }> {
    const timeoutMs = timeoutOption(opts.timeoutMs);
    this.#checkOpen();
    const signal = opts.signal;
    if (signal?.aborted) throw new AbortError("readFile aborted", { cause: signal.reason });
    const payload = encodeReadFile({ path, window: READ_WINDOW });
    const stream = this.#allocate();
    const op = new FileReadStream(this.#link, stream, path, READ_WINDOW, timeoutMs);
    this.#streams.set(stream, op);
    const onAbort = () => op.reset(new AbortError("readFile aborted", { cause: signal?.reason }));
    signal?.addEventListener("abort", onAbort, { once: true });
    op.readable.once("close", () => signal?.removeEventListener("abort", onAbort));
    try {
      await this.#sendOpen(stream, MessageType.READ_FILE, payload);
      return { info: await op.info, op };
    } catch (error) {
      op.reset(error as Error);
      signal?.removeEventListener("abort", onAbort);
      throw error;
    }
  }

  /**
   * Reads a whole file from the guest into memory. A file larger than `maxBytes` (default 1 GiB)
   * fails with a `GuestIoError` `EFBIG` (the read is abandoned before any data is held).
   */
  async readFileBytes(path: string, opts: ReadFileBytesOptions = {}): Promise<Uint8Array> {
    const maxBytes = opts.maxBytes ?? DEFAULT_READ_MAX_BYTES;
    if (!Number.isSafeInteger(maxBytes) || maxBytes < 0)
      throw invalid(`maxBytes ${maxBytes} is not a byte count`);
    const { info, op } = await this.#readFile(path, opts);
    const file = { ...info, stream: op.readable };
    try {
      if (file.size > maxBytes) {
        throw new GuestIoError(
          `readFile ${path}: the guest file has ${file.size} bytes, more than maxBytes (${maxBytes}); pass a larger maxBytes or read it as a stream`,
          { path, code: "EFBIG", errno: 27, syscall: "read" },
        );
      }
      // The announced size, up to a bound: the guest says it, so it is only a hint until data arrives
      // (the stream fails if more arrives than announced).
      let out = Buffer.allocUnsafeSlow(Math.min(file.size, READ_PREALLOCATE_MAX));
      let length = 0;
      for await (const chunk of file.stream as AsyncIterable<Uint8Array>) {
        if (length + chunk.length > out.length) {
          const bigger = Buffer.allocUnsafeSlow(
            Math.min(Math.max(out.length * 2, length + chunk.length), file.size),
          );
          bigger.set(out.subarray(0, length));
          out = bigger;
        }
        out.set(chunk, length);
        length += chunk.length;
      }
      return new Uint8Array(out.buffer, out.byteOffset, length);
    } catch (error) {
      throw op.failure ?? error;
    } finally {
      if (!file.stream.destroyed) file.stream.destroy();
    }
  }

  /**
   * Round trip to the agent in milliseconds (high resolution). Rejects with `AGENT_TIMEOUT` after
   * `timeoutMs` (default 10 000) without a `PONG`.
   */
  ping(opts: { timeoutMs?: number } = {}): Promise<number> {
    if (this.#closedError) return Promise.reject(this.#closedError);
    this.#checkOpen();
    const timeoutMs = timeoutOption(opts.timeoutMs, DEFAULT_PING_TIMEOUT_MS);
    const seq = this.#pingSeq++;
    const payload = new Uint8Array(8);
    new DataView(payload.buffer).setBigUint64(0, seq);
    const d = deferred<number>();
    const timer = setTimeout(() => {
      // A late PONG is then dropped, not taken for one nobody asked for.
      this.#pings.delete(seq);
      this.#expiredPings.add(seq);
      if (this.#expiredPings.size > 1024)
        this.#expiredPings.delete(this.#expiredPings.values().next().value!);
      d.reject(agentTimeout(this.#link, "ping", timeoutMs));
    }, timeoutMs);
    this.#pings.set(seq, {
      resolve: (ms) => {
        clearTimeout(timer);
        d.resolve(ms);
      },
      reject: (e) => {
        clearTimeout(timer);
        d.reject(e);
      },
      t0: performance.now(),
    });
    this.#sendControl(0, MessageType.PING, payload);
    return d.promise;
  }

  // ------------------------------------------------------------------------------------------
  // TCP tunnels, watches, the workload

  /**
   * Opens a TCP connection to `port` on `opts.address` (an IPv4 or IPv6 literal, default
   * 127.0.0.1) inside the guest, made by the agent, and resolves with it as a Node `Duplex` once
   * connected. Backpressure holds both ways; `end()` half-closes, `destroy()` resets the guest
   * connection. A failed connect rejects with a `GuestIoError` named for its errno
   * (`ECONNREFUSED`, `ENETUNREACH`, ...); no answer within `timeoutMs` (default 30 000) with
   * `AGENT_TIMEOUT`.
   */
  connectTcp(port: number, opts: ConnectTcpOptions = {}): Promise<Duplex> {
    return connectTcp(this.#host, port, opts);
  }

  /**
   * Watches `path` in the guest (with `recursive`, every directory below it too) and yields change
   * events like `fs.promises.watch`. Await `ready` before making changes that must be seen.
   */
  watch(path: string, opts: WatchOptions = {}): GuestWatcher {
    return watch(this.#host, path, opts);
  }

  /**
   * Starts the workload (the image's entrypoint): stdin `/dev/null`, stdout and stderr kept by the
   * agent in a 1 MiB ring. It belongs to the VM: a new session leaves it running, `SHUTDOWN` ends
   * it. Resolves once it runs; `EXEC_NOT_FOUND`/`EXEC_START` if it cannot start or one already runs.
   */
  startWorkload(spec: WorkloadSpec, opts: AgentCallOptions = {}): Promise<WorkloadStatus> {
    return startWorkload(this.#host, spec, opts);
  }

  /**
   * Freezes (`true`) or thaws every process the agent started (execs, the workload): frozen, none
   * runs a user instruction. A snapshot is saved frozen, so a clone's processes run again only
   * after its `HELLO` stepped the clock, reseeded the RNG and gave it its names (the agent thaws
   * them then). A `GuestIoError` if the guest cannot.
   */
  freeze(frozen: boolean, opts: AgentCallOptions = {}): Promise<void> {
    return request(
      this.#host,
      MessageType.FREEZE,
      encodeFreeze(frozen),
      {
        operation: frozen ? "freeze" : "thaw",
        finish: () => {},
        fail: (m) => syscallError(m, { syscall: "write", path: "/sys/fs/cgroup/sm/cgroup.freeze" }),
      },
      opts,
    );
  }

  /** The workload's status: `none`, `running` (pid) or `exited` (exit code or signal). */
  workloadStatus(opts: AgentCallOptions = {}): Promise<WorkloadStatus> {
    return workloadStatus(this.#host, opts);
  }

  /** Signals the workload's process group; a `GuestIoError` `ESRCH` if none is running. */
  signalWorkload(signal: string | number, opts: AgentCallOptions = {}): Promise<void> {
    return signalWorkload(this.#host, signal, opts);
  }

  /** The workload's recent output (and with `follow`, what comes until it exits) as bytes. */
  workloadLogs(opts: WorkloadLogsOptions = {}): Readable {
    return workloadLogs(this.#host, opts);
  }

  /**
   * Calls `listener` when the agent reports that the workload exited (only while connected; ask
   * {@link workloadStatus} after a reconnect). Returns a function that removes the listener.
   */
  onWorkloadExit(listener: (status: WorkloadStatus) => void): () => void {
    this.#workloadExitListeners.add(listener);
    return () => this.#workloadExitListeners.delete(listener);
  }

  /**
   * Asks the agent to stop every process, sync and power off (`SHUTDOWN`), and waits for its `OK`.
   * Idempotent. After the `OK`, the end of the channel counts as a clean close.
   */
  shutdown(opts: { timeoutMs?: number } = {}): Promise<void> {
    if (this.#shutdownPromise) return this.#shutdownPromise;
    if (this.#closedError) return Promise.reject(this.#closedError);
    if (this.#state !== "open")
      return Promise.reject(new VmError("VM_STOPPED", "agent connection is not open"));
    const timeoutMs = opts.timeoutMs ?? DEFAULT_SHUTDOWN_TIMEOUT_MS;
    const d = deferred<void>();
    this.#shutdown = d;
    const timer = setTimeout(
      () =>
        d.reject(new VmError("AGENT_PROTOCOL", `guest agent did not answer SHUTDOWN within ${timeoutMs} ms`)),
      timeoutMs,
    );
    this.#sendControl(0, MessageType.SHUTDOWN);
    this.#shutdownPromise = d.promise.finally(() => clearTimeout(timer));
    this.#shutdownPromise.catch(() => {});
    return this.#shutdownPromise;
  }

  /**
   * Closes the connection: every pending operation fails with `reason` (default `VM_STOPPED`), the
   * socket is destroyed, and {@link closed} settles with `reason` (or `undefined` if none given).
   * Idempotent.
   */
  close(reason?: Error): void {
    if (this.#state === "closed") return;
    this.#closeWith(reason ?? new VmError("VM_STOPPED", "agent connection closed"), reason === undefined);
  }

  // ------------------------------------------------------------------------------------------
  // Receiving

  #receive(chunk: Uint8Array): void {
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
      throw protocolError(`the agent sent ${describeType(frame.type)}, a host-to-guest message`);
    }
    if (this.#state === "handshake") {
      this.#onHello(frame);
      return;
    }
    if (frame.stream === 0) {
      this.#onControl(frame);
      return;
    }
    const handler = this.#streams.get(frame.stream);
    if (handler) {
      handler.onFrame(frame);
      return;
    }
    if (frame.stream >= this.#nextStream) {
      throw protocolError(`${describeType(frame.type)} for stream ${frame.stream}, which was never opened`);
    }
    // Ended or reset: frames may cross its end, up to what the agent could have had in flight.
    this.#strayAllowance -= frame.payload.length + FRAME_COST;
    if (this.#strayAllowance < 0) {
      throw protocolError(
        `${describeType(frame.type)} for stream ${frame.stream}, which has ended: more frames for ended streams than were in flight`,
      );
    }
  }

  #onHello(frame: Frame): void {
    if (frame.stream === 0 && frame.type === MessageType.ERROR) {
      const m = decodeError(frame.payload);
      const text = m.message ? `: ${m.message}` : "";
      if (m.code === AgentErrorCode.VERSION) {
        throw new VmError(
          "AGENT_VERSION",
          `guest agent does not speak protocol version ${PROTOCOL_VERSION}${text}`,
        );
      }
      throw protocolError(`agent refused HELLO (${agentErrorCodeName(m.code)})${text}`);
    }
    if (frame.stream !== 0 || frame.type !== MessageType.HELLO) {
      // Left over from before a restore (output of a process that ran at snapshot time): the agent
      // learns that the host changed only from our HELLO. Frames stay bounded by the decoder and
      // the wait by the handshake timeout.
      debug(
        "agent: ignoring %s on stream %d before the HELLO answer",
        describeType(frame.type),
        frame.stream,
      );
      return;
    }
    const hello = decodeGuestHello(frame.payload);
    if (hello.version !== PROTOCOL_VERSION) {
      throw new VmError(
        "AGENT_VERSION",
        `guest agent speaks protocol version ${hello.version}, the host speaks ${PROTOCOL_VERSION}`,
      );
    }
    if (hello.epoch !== this.#epoch) {
      throw protocolError(`HELLO echoed epoch ${hello.epoch}, expected ${this.#epoch}`);
    }
    this.#agentVersion = hello.agent;
    this.#bootNs = hello.bootNs;
    this.#state = "open";
    debug("agent: connected to %s (epoch %s)", hello.agent, this.epoch);
    this.#hello.resolve();
  }

  #onControl(frame: Frame): void {
    switch (frame.type) {
      case MessageType.PONG: {
        if (frame.payload.length !== 8) {
          throw protocolError(`PONG of ${frame.payload.length} bytes does not match any PING`);
        }
        const seq = new DataView(frame.payload.buffer, frame.payload.byteOffset, 8).getBigUint64(0);
        const ping = this.#pings.get(seq);
        if (!ping && this.#expiredPings.delete(seq)) return;
        if (!ping) throw protocolError(`PONG ${seq} does not match any PING`);
        this.#pings.delete(seq);
        ping.resolve(performance.now() - ping.t0);
        return;
      }
      case MessageType.OK: {
        decodeOk(frame.payload);
        if (!this.#shutdown || this.#shutdownAcked) throw protocolError("OK on stream 0 without a SHUTDOWN");
        this.#shutdownAcked = true;
        this.#shutdown.resolve();
        return;
      }
      case MessageType.ERROR: {
        const m = decodeError(frame.payload);
        throw protocolError(
          `agent reported ${agentErrorCodeName(m.code)} on the control stream${m.message ? `: ${m.message}` : ""}`,
        );
      }
      case MessageType.WORKLOAD_STATUS: {
        const m = decodeWorkloadStatus(frame.payload);
        if (m.state !== WorkloadState.EXITED) {
          throw protocolError("WORKLOAD_STATUS on the control stream for a workload that has not exited");
        }
        const status = workloadStatusFrom(m);
        for (const listener of [...this.#workloadExitListeners]) {
          try {
            listener(status);
          } catch (error) {
            queueMicrotask(() => {
              throw error;
            });
          }
        }
        return;
      }
      default:
        throw protocolError(`unexpected ${describeType(frame.type)} on the control stream`);
    }
  }

  #channelEnded(): void {
    if (this.#state === "closed") return;
    if (this.#shutdownAcked) {
      this.#closeWith(new VmError("VM_STOPPED", "the guest shut down"), true);
      return;
    }
    const partial = this.#decoder.idle ? "" : " in the middle of a frame";
    this.#fail(new VmError("VM_EXITED", `agent channel ended${partial} (the VM exited?)`));
  }

  #fail(error: Error): void {
    if (this.#state === "closed") return;
    debug("agent: closing: %s", error.message);
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
    for (const p of [...this.#pings.values()]) p.reject(error);
    this.#pings.clear();
    this.#shutdown?.reject(error);
    this.#onDrain();
    this.#socket.off("data", this.#onData);
    this.#socket.off("end", this.#onEnd);
    this.#socket.off("close", this.#onEnd);
    this.#socket.off("drain", this.#onDrain);
    // Keep an error listener: a destroyed socket may still report EPIPE and the like.
    this.#socket.destroy();
    this.#resolveClosed(clean ? undefined : error);
  }

  // ------------------------------------------------------------------------------------------
  // Sending

  #checkOpen(): void {
    if (this.#closedError) throw this.#closedError;
    if (this.#state !== "open") throw new VmError("VM_STOPPED", "agent connection is not open");
  }

  #allocate(): number {
    if (this.#nextStream > MAX_STREAM_ID) throw new VmError("VM_STOPPED", "agent stream ids exhausted");
    return this.#nextStream++;
  }

  #sendControl(stream: number, type: number, payload: Uint8Array = new Uint8Array(0), flags = 0): void {
    if (this.#state === "closed") return;
    this.#writeFrame(stream, type, payload, flags);
  }

  #sendOpen(stream: number, type: number, payload: Uint8Array): Promise<void> {
    const sent = this.#openChain.then(() => this.#sendData(stream, type, payload));
    this.#openChain = sent.catch(() => {});
    return sent;
  }

  async #writable(): Promise<void> {
    while (this.#needDrain && this.#state !== "closed") {
      await new Promise<void>((resolve) => this.#drainWaiters.push(resolve));
    }
  }

  async #sendData(stream: number, type: number, payload: Uint8Array, flags = 0): Promise<void> {
    if (this.#needDrain) await this.#writable();
    if (this.#closedError) throw this.#closedError;
    if (stream !== 0 && !this.#streams.has(stream)) return; // reset or ended meanwhile
    this.#writeFrame(stream, type, payload, flags);
    if (stream !== 0) this.#written.add(stream);
  }

  #writeFrame(stream: number, type: number, payload: Uint8Array, flags: number): void {
    const header = encodeFrameHeader(stream, type, flags, payload.length);
    let ok: boolean;
    if (payload.length === 0) {
      ok = this.#socket.write(header);
    } else if (payload.length < COPY_BELOW) {
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
