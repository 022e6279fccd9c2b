/**
 * Watches (docs/protocol.md, "Watches"): file-system change events under a guest path, as an async
 * iterable shaped like `fs.promises.watch`'s. The host grants the agent credit as the iterator
 * takes events, so a consumer that does not read makes the agent drop events (and report one
 * `overflow`), never buffer without bound.
 */

import { posix } from "node:path";
import { AbortError, SupermachineError } from "../errors.ts";
import { type AgentCallOptions, agentTimeout, timeoutOption, Watchdog } from "./deadline.ts";
import { describeType, type Frame, MessageType } from "./frame-codec.ts";
import { decodeError, decodeOk, decodeWatchEvent, encodeWatch, WatchEventKind } from "./messages.ts";
import { protocolError } from "./protocol-error.ts";
import {
  deferred,
  GuestCredit,
  type StreamHandler,
  type StreamHost,
  type StreamLink,
} from "./stream-link.ts";
import { syscallError } from "./syscall-error.ts";

/** One change under a watched path. */
export interface GuestWatchEvent {
  /**
   * `create`, `modify` (contents or attributes), `delete`, `rename` (reported for the old and
   * the new name), or `overflow`: events were dropped (the consumer fell behind, or a recursive
   * watch reached its limit of 8192 directories).
   */
  eventType: "create" | "modify" | "delete" | "rename" | "overflow";
  /** Path relative to the watched path (the watched path's own name for itself); null for `overflow`. */
  filename: string | null;
  /** True when the entry is a directory. */
  isDirectory: boolean;
}

/** Options of `AgentClient.watch`. */
export interface WatchOptions extends AgentCallOptions {
  /** Watch every directory below the path too (directories that appear later included). */
  recursive?: boolean | undefined;
  /** Credit for events held on the host; default 65 536 bytes (each event costs its size + 64). */
  windowBytes?: number | undefined;
}

const DEFAULT_WATCH_WINDOW = 65_536;
const KINDS = ["ready", "create", "modify", "delete", "rename", "overflow"] as const;
const names = new TextDecoder("utf-8");

/** Opens a watch; events start once {@link GuestWatcher.ready} resolves. */
export function watch(host: StreamHost, path: string, opts: WatchOptions = {}): GuestWatcher {
  if (typeof path !== "string" || !path.startsWith("/")) {
    throw new SupermachineError(
      "INVALID_ARGUMENT",
      `watch path ${JSON.stringify(path)} must be an absolute guest path`,
    );
  }
  const timeoutMs = timeoutOption(opts.timeoutMs);
  const window = opts.windowBytes ?? DEFAULT_WATCH_WINDOW;
  const payload = encodeWatch({ path, recursive: opts.recursive ? true : undefined, window });
  const signal = opts.signal;
  if (signal?.aborted) throw new AbortError(`watch ${path} aborted`, { cause: signal.reason });
  const { handler } = host.open(
    MessageType.WATCH,
    payload,
    (stream) => new Watcher(host.link, stream, path, window, timeoutMs, signal),
  );
  return handler;
}

/**
 * A running watch. Iterate it for events; iteration ends when the watched path is deleted, throws
 * `AbortError` when the signal aborts, and stops quietly after `close()`.
 */
export interface GuestWatcher extends AsyncIterable<GuestWatchEvent> {
  /** Resolves once the agent has its watches in place: changes from then on are reported. */
  readonly ready: Promise<void>;
  /** Stops watching; iteration ends after the events already received. Idempotent. */
  close(): void;
}

/** The host side of a watch stream. */
class Watcher implements GuestWatcher, StreamHandler {
  /** Resolves once the agent has its watches in place: changes from then on are reported. */
  readonly ready: Promise<void>;
  readonly #ready = deferred<void>();
  readonly #link: StreamLink;
  readonly #stream: number;
  readonly #path: string;
  readonly #credit: GuestCredit;
  readonly #watchdog: Watchdog;
  readonly #signal: AbortSignal | undefined;
  readonly #onAbort = () =>
    this.#abandon(new AbortError(`watch ${this.#path} aborted`, { cause: this.#signal?.reason }));
  readonly #queue: { event: GuestWatchEvent; cost: number }[] = [];
  #waiters: (() => void)[] = [];
  #ended = false;
  #closed = false;
  #error: Error | undefined;

  constructor(
    link: StreamLink,
    stream: number,
    path: string,
    window: number,
    timeoutMs: number,
    signal: AbortSignal | undefined,
  ) {
    this.#link = link;
    this.#stream = stream;
    this.#path = path;
    this.#signal = signal;
    this.ready = this.#ready.promise;
    this.#credit = new GuestCredit(link, stream, window, () => !this.#ended);
    this.#watchdog = new Watchdog(timeoutMs, () =>
      this.#abandon(agentTimeout(link, `watch ${path}`, timeoutMs)),
    );
    this.#watchdog.arm();
    signal?.addEventListener("abort", this.#onAbort, { once: true });
  }

  /** Stops watching (`RESET`); iteration ends after the events already received. Idempotent. */
  close(): void {
    this.#closed = true;
    this.#abandon(undefined);
  }

  async *[Symbol.asyncIterator](): AsyncIterator<GuestWatchEvent> {
    for (;;) {
      const next = this.#queue.shift();
      if (next) {
        this.#credit.grant(next.cost);
        yield next.event;
        continue;
      }
      if (this.#error) throw this.#error;
      if (this.#ended) return;
      await new Promise<void>((resolve) => this.#waiters.push(resolve));
    }
  }

  onFrame(frame: Frame): void {
    switch (frame.type) {
      case MessageType.WATCH_EVENT: {
        const cost = this.#credit.take(frame, `watch ${this.#path} (stream ${this.#stream})`);
        const m = decodeWatchEvent(frame.payload);
        if (m.event === WatchEventKind.READY) {
          if (this.#ready.settled()) throw protocolError(`watch ${this.#path}: ready twice`);
          this.#watchdog.stop();
          this.#credit.grant(cost);
          this.#ready.resolve();
          return;
        }
        if (!this.#ready.settled())
          throw protocolError(`watch ${this.#path}: an event before the watch was ready`);
        const eventType = KINDS[m.event] as GuestWatchEvent["eventType"];
        const filename =
          eventType === "overflow"
            ? null
            : m.name?.length
              ? names.decode(m.name)
              : posix.basename(this.#path);
        this.#queue.push({ event: { eventType, filename, isDirectory: m.dir === true }, cost });
        this.#wake();
        return;
      }
      case MessageType.OK: // the watched path is gone
        decodeOk(frame.payload);
        this.#end(undefined);
        return;
      case MessageType.ERROR:
        this.#end(syscallError(decodeError(frame.payload), { syscall: "watch", path: this.#path }));
        return;
      default:
        throw protocolError(
          `watch (stream ${this.#stream}): unexpected ${describeType(frame.type)} from the agent`,
        );
    }
  }

  onClose(error: Error): void {
    this.#end(this.#closed ? undefined : error);
  }

  #abandon(reason: Error | undefined): void {
    if (this.#ended) return;
    this.#link.reset(this.#stream, this.#credit.outstanding);
    this.#end(reason);
  }

  #end(error: Error | undefined): void {
    if (this.#ended) return;
    this.#ended = true;
    this.#error = error;
    this.#watchdog.stop();
    this.#signal?.removeEventListener("abort", this.#onAbort);
    this.#link.release(this.#stream);
    if (error) this.#ready.reject(error);
    else this.#ready.resolve();
    this.#wake();
  }

  #wake(): void {
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const wake of waiters) wake();
  }
}
