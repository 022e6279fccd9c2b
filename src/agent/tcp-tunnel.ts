/**
 * TCP tunnels (docs/protocol.md, "TCP tunnels"): a Node `Duplex` over one stream that the agent
 * connects to `address:port` inside the guest. Backpressure holds both ways: the host grants the
 * agent credit only as the duplex's reader takes bytes, and writes wait for the agent's credit,
 * which it grants as it writes into the guest socket. `end()` half-closes (`FIN`); `destroy()`
 * resets the connection (the agent closes its socket with an RST).
 */

import { Duplex } from "node:stream";
import { AbortError } from "../errors.ts";
import { type AgentCallOptions, agentTimeout, timeoutOption, Watchdog } from "./deadline.ts";
import { describeType, FLAG_FIN, type Frame, MAX_PAYLOAD, MessageType } from "./frame-codec.ts";
import {
  DEFAULT_WINDOW,
  decodeError,
  decodeOk,
  decodeTcpConnected,
  decodeWindow,
  encodeTcpConnect,
} from "./messages.ts";
import { protocolError } from "./protocol-error.ts";
import {
  deferred,
  GuestCredit,
  type StreamHandler,
  type StreamHost,
  type StreamLink,
} from "./stream-link.ts";
import { syscallError } from "./syscall-error.ts";

/** Options of `AgentClient.connectTcp`. */
export interface ConnectTcpOptions extends AgentCallOptions {
  /** IPv4 or IPv6 literal inside the guest; default `127.0.0.1`. */
  address?: string | undefined;
  /** Credit for guest→host bytes the host may hold for this tunnel; default 262 144. */
  windowBytes?: number | undefined;
}

const EMPTY = new Uint8Array(0);
type State = "connecting" | "open" | "ended";

/** Opens a tunnel and resolves with its duplex once the agent has connected. */
export async function connectTcp(
  host: StreamHost,
  port: number,
  opts: ConnectTcpOptions = {},
): Promise<Duplex> {
  const address = opts.address ?? "127.0.0.1";
  const window = opts.windowBytes ?? DEFAULT_WINDOW;
  const timeoutMs = timeoutOption(opts.timeoutMs);
  const payload = encodeTcpConnect({ port, address: opts.address, window: opts.windowBytes });
  const signal = opts.signal;
  if (signal?.aborted)
    throw new AbortError(`connectTcp ${address}:${port} aborted`, { cause: signal.reason });
  const { handler } = host.open(
    MessageType.TCP_CONNECT,
    payload,
    (stream) => new TcpTunnel(host.link, stream, address, port, window, timeoutMs),
  );
  const onAbort = () =>
    handler.duplex.destroy(new AbortError(`tunnel to ${address}:${port} aborted`, { cause: signal?.reason }));
  signal?.addEventListener("abort", onAbort, { once: true });
  handler.duplex.once("close", () => signal?.removeEventListener("abort", onAbort));
  await handler.connected;
  return handler.duplex;
}

class TcpTunnel implements StreamHandler {
  readonly duplex: Duplex;
  readonly #connected = deferred<void>();
  readonly #link: StreamLink;
  readonly #stream: number;
  readonly #address: string;
  readonly #port: number;
  readonly #credit: GuestCredit;
  readonly #connectWatchdog: Watchdog;
  #state: State = "connecting";
  #error: Error | undefined;
  // guest -> host
  readonly #queue: { data: Uint8Array; cost: number }[] = [];
  #wanting = false;
  #guestFin = false;
  #pushedEnd = false;
  // host -> guest
  #sendCredit = DEFAULT_WINDOW;
  #creditWaiters: (() => void)[] = [];
  #hostFin = false;

  constructor(
    link: StreamLink,
    stream: number,
    address: string,
    port: number,
    window: number,
    timeoutMs: number,
  ) {
    this.#link = link;
    this.#stream = stream;
    this.#address = address;
    this.#port = port;
    this.#credit = new GuestCredit(link, stream, window, () => this.#state !== "ended" && !this.#guestFin);
    const where = `connectTcp ${this.#peer}`;
    this.#connectWatchdog = new Watchdog(timeoutMs, () =>
      this.#abandon(agentTimeout(link, where, timeoutMs)),
    );
    this.#connectWatchdog.arm();
    this.duplex = new Duplex({
      highWaterMark: 64 * 1024,
      read: () => {
        this.#wanting = true;
        this.#pump();
      },
      write: (chunk: Uint8Array, _encoding, callback) => {
        this.#write(chunk).then(
          () => callback(),
          (error: Error) => callback(this.duplex.destroyed ? undefined : error),
        );
      },
      final: (callback) => {
        this.#hostFin = true;
        this.#link.sendData(this.#stream, MessageType.TCP_DATA, EMPTY, FLAG_FIN).then(
          () => callback(),
          (error: Error) => callback(error),
        );
      },
      destroy: (error, callback) => {
        this.#abandon(error ?? new AbortError(`tunnel to ${this.#peer} destroyed`));
        callback(error);
      },
    });
  }

  get #peer(): string {
    return this.#address.includes(":")
      ? `[${this.#address}]:${this.#port}`
      : `${this.#address}:${this.#port}`;
  }

  /** Resolves once the agent connected; rejects with `GuestIoError` (`ECONNREFUSED`, ...) otherwise. */
  get connected(): Promise<void> {
    return this.#connected.promise;
  }

  onFrame(frame: Frame): void {
    switch (frame.type) {
      case MessageType.TCP_CONNECTED:
        if (this.#state !== "connecting") throw this.#unexpected(frame);
        decodeTcpConnected(frame.payload);
        this.#state = "open";
        this.#connectWatchdog.stop();
        this.#connected.resolve();
        return;
      case MessageType.TCP_DATA: {
        if (this.#state !== "open" || this.#guestFin) throw this.#unexpected(frame);
        const cost = this.#credit.take(frame, `tunnel ${this.#peer} (stream ${this.#stream})`);
        if (frame.payload.length > 0) this.#queue.push({ data: frame.payload, cost });
        else this.#credit.grant(cost);
        if ((frame.flags & FLAG_FIN) !== 0) this.#guestFin = true;
        this.#pump();
        return;
      }
      case MessageType.WINDOW:
        this.#sendCredit = Math.min(this.#sendCredit + decodeWindow(frame.payload), Number.MAX_SAFE_INTEGER);
        this.#wakeWriters();
        return;
      case MessageType.OK:
        // Both directions are finished: the agent read EOF (its FIN came first) and has our FIN.
        if (this.#state !== "open" || !this.#guestFin || !this.#hostFin) throw this.#unexpected(frame);
        decodeOk(frame.payload);
        this.#end();
        return;
      case MessageType.ERROR: {
        const m = decodeError(frame.payload);
        const syscall = this.#state === "connecting" ? "connect" : m.errno === 32 ? "write" : "read";
        this.#fail(syscallError(m, { syscall, path: this.#peer, address: this.#address, port: this.#port }));
        return;
      }
      default:
        throw this.#unexpected(frame);
    }
  }

  onClose(error: Error): void {
    this.#fail(error);
  }

  #unexpected(frame: Frame): Error {
    return protocolError(
      `tunnel ${this.#peer} (stream ${this.#stream}, ${this.#state}): unexpected ${describeType(frame.type)}${(frame.flags & FLAG_FIN) !== 0 ? " with FIN" : ""}`,
    );
  }

  async #write(chunk: Uint8Array): Promise<void> {
    let offset = 0;
    while (offset < chunk.length) {
      while (this.#sendCredit === 0 && this.#state !== "ended") {
        await new Promise<void>((resolve) => this.#creditWaiters.push(resolve));
      }
      if (this.#state === "ended") throw this.#error ?? new AbortError(`tunnel to ${this.#peer} closed`);
      const n = Math.min(this.#sendCredit, MAX_PAYLOAD, chunk.length - offset);
      this.#sendCredit -= n;
      await this.#link.sendData(this.#stream, MessageType.TCP_DATA, chunk.subarray(offset, offset + n));
      offset += n;
    }
  }

  #pump(): void {
    while (this.#wanting && this.#queue.length > 0) {
      const { data, cost } = this.#queue.shift()!;
      this.#credit.grant(cost);
      this.#wanting = this.duplex.push(data);
    }
    if (this.#guestFin && this.#queue.length === 0 && !this.#pushedEnd) {
      this.#pushedEnd = true;
      this.duplex.push(null);
    }
  }

  #wakeWriters(): void {
    const waiters = this.#creditWaiters;
    this.#creditWaiters = [];
    for (const wake of waiters) wake();
  }

  /** The host gives up on the tunnel (destroy, abort, deadline): RESET, and the agent sends RST. */
  #abandon(reason: Error): void {
    if (this.#state === "ended") return;
    this.#link.reset(this.#stream, this.#credit.outstanding);
    this.#fail(reason);
  }

  #end(): void {
    if (this.#state === "ended") return;
    this.#state = "ended";
    this.#connectWatchdog.stop();
    this.#link.release(this.#stream);
    this.#wakeWriters();
  }

  #fail(error: Error): void {
    if (this.#state === "ended") return;
    this.#error = error;
    this.#end();
    this.#queue.length = 0;
    this.#connected.reject(error);
    if (this.duplex.destroyed) return;
    // An 'error' nobody listens to would crash the host process: emit it only to listeners.
    if (this.duplex.listenerCount("error") > 0) this.duplex.destroy(error);
    else this.duplex.destroy();
  }
}
