/**
 * A QMP (QEMU Machine Protocol) client over a connected stream socket.
 *
 * QMP is newline-delimited JSON. QEMU greets first (`{"QMP": {...}}`); the client answers
 * `qmp_capabilities`; then every `{"execute", "arguments", "id"}` gets exactly one reply with the
 * same id (`{"return"}` or `{"error": {"class", "desc"}}`), in order, and asynchronous events
 * (`{"event", "data", "timestamp"}`) can arrive between replies.
 */

import { EventEmitter, on } from "node:events";
import type { Socket } from "node:net";
import { StringDecoder } from "node:string_decoder";
import { AbortError, VmError } from "../errors.ts";
import { debug } from "../internal/index.ts";

/** Longest QMP message accepted from QEMU. */
const MAX_MESSAGE_BYTES = 16 * 1024 * 1024;
const DEFAULT_HANDSHAKE_TIMEOUT_MS = 10_000;

/** An asynchronous QMP event, e.g. `STOP`, `RESUME`, `SHUTDOWN`, `MIGRATION`. */
export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

/** QEMU's greeting: its version and the capabilities it offers. */
export interface QmpGreeting {
  version: { qemu: { major: number; minor: number; micro: number }; package: string };
  capabilities: string[];
}

/** Fields that errors about a closed connection carry (the VM's console log, QEMU's exit code). */
export type QmpErrorFields = () => { consoleLogPath?: string | undefined; qemuExitCode?: number | undefined };

/** QEMU answered a command with an error. `code` is `VMM_FAILED`. */
export class QmpError extends VmError {
  /** The command that failed. */
  readonly command: string;
  /** QMP's error class, e.g. `GenericError`, `CommandNotFound`, `DeviceNotFound`. */
  readonly qmpClass: string;
  /** QMP's human-readable description. */
  readonly qmpDesc: string;

  constructor(
    command: string,
    error: { class: string; desc: string },
    fields: { consoleLogPath?: string | undefined; qemuExitCode?: number | undefined } = {},
  ) {
    super("VMM_FAILED", `QMP command ${command} failed: ${error.desc} (${error.class})`, fields);
    this.command = command;
    this.qmpClass = error.class;
    this.qmpDesc = error.desc;
  }
}

export interface QmpConnectOptions {
  signal?: AbortSignal;
  /** Time allowed for the greeting and `qmp_capabilities`. Default 10 s. */
  timeoutMs?: number;
  /** Supplies fields for errors raised when the connection closes (console log path, exit code). */
  errorFields?: QmpErrorFields;
}

export interface QmpCallOptions {
  signal?: AbortSignal;
  /** Reject with `VMM_FAILED` when no reply arrives in time. Default: wait as long as the connection lives. */
  timeoutMs?: number;
}

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (error: Error) => void;
  cleanup: () => void;
}

interface QmpClientEvents {
  event: [QmpEvent];
  close: [];
}

/**
 * A QMP connection. Emits `"event"` for each QMP event and `"close"` once the connection is gone;
 * {@link QmpClient.events} and {@link QmpClient.waitForEvent} wrap those.
 */
export class QmpClient extends EventEmitter<QmpClientEvents> {
  readonly #socket: Socket;
  readonly #errorFields: QmpErrorFields;
  readonly #decoder = new StringDecoder("utf8");
  readonly #pending = new Map<number, Pending>();
  #buffer = "";
  #nextId = 1;
  #closedError: VmError | undefined;
  #greeting: QmpGreeting | undefined;
  #onGreeting: ((greeting: QmpGreeting) => void) | undefined;

  private constructor(socket: Socket, errorFields: QmpErrorFields) {
    super();
    this.#socket = socket;
    this.#errorFields = errorFields;
    socket.setNoDelay?.(true);
    socket.on("data", (chunk: Buffer) => this.#onData(chunk));
    socket.on("error", (error) => debug("qmp: socket error: %s", error.message));
    socket.on("close", () =>
      this.#shutdown(
        new VmError("VM_EXITED", "QEMU closed its QMP connection: the VM has exited", errorFields()),
      ),
    );
  }

  /**
   * Take over a socket connected to QEMU's QMP chardev: wait for the greeting, negotiate
   * capabilities, resolve when commands can be sent.
   */
  static async fromSocket(socket: Socket, options: QmpConnectOptions = {}): Promise<QmpClient> {
    const client = new QmpClient(socket, options.errorFields ?? (() => ({})));
    const timeoutMs = options.timeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT_MS;
    const greeting = new Promise<QmpGreeting>((resolve, reject) => {
      client.#onGreeting = resolve;
      client.once("close", () => reject(client.#closedError));
    });
    try {
      client.#greeting = await withDeadline(greeting, "waiting for the QMP greeting", {
        signal: options.signal,
        timeoutMs,
        errorFields: client.#errorFields,
      });
      await client.execute("qmp_capabilities", undefined, { signal: options.signal, timeoutMs });
      return client;
    } catch (error) {
      client.close();
      throw error;
    }
  }

  /** QEMU's greeting. */
  get greeting(): QmpGreeting {
    return this.#greeting!;
  }

  /** True once the connection is gone; every call then rejects. */
  get closed(): boolean {
    return this.#closedError !== undefined;
  }

  /**
   * Run a QMP command; resolves with its `return` value, rejects with {@link QmpError} when QEMU
   * reports an error, `VM_EXITED` when the connection closes first, `ABORTED` on `signal`.
   */
  execute<T = unknown>(
    command: string,
    args?: Record<string, unknown>,
    options: QmpCallOptions = {},
  ): Promise<T> {
    if (this.#closedError !== undefined) return Promise.reject(this.#closedError);
    if (options.signal?.aborted) return Promise.reject(abortError(options.signal));
    const id = this.#nextId++;
    const message = JSON.stringify(
      args === undefined ? { execute: command, id } : { execute: command, arguments: args, id },
    );
    return new Promise<T>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const onAbort = () => {
        this.#pending.get(id)?.cleanup();
        reject(abortError(options.signal!));
      };
      const cleanup = () => {
        this.#pending.delete(id);
        if (timer !== undefined) clearTimeout(timer);
        options.signal?.removeEventListener("abort", onAbort);
      };
      if (options.timeoutMs !== undefined) {
        timer = setTimeout(() => {
          cleanup();
          reject(
            new VmError(
              "VMM_FAILED",
              `QMP command ${command} got no reply within ${options.timeoutMs} ms`,
              this.#errorFields(),
            ),
          );
        }, options.timeoutMs);
      }
      options.signal?.addEventListener("abort", onAbort, { once: true });
      this.#pending.set(id, { command, resolve: resolve as (value: unknown) => void, reject, cleanup });
      debug("qmp: -> %s", message);
      this.#socket.write(`${message}\n`);
    });
  }

  /**
   * Wait for the next event called `name` (and matching `filter`). Call it BEFORE the action
   * that causes the event: events are not buffered.
   */
  waitForEvent(
    name: string,
    options: { signal?: AbortSignal; timeoutMs?: number; filter?: (event: QmpEvent) => boolean } = {},
  ): Promise<QmpEvent> {
    if (this.#closedError !== undefined) return Promise.reject(this.#closedError);
    let listener: ((event: QmpEvent) => void) | undefined;
    let onClose: (() => void) | undefined;
    const waiting = new Promise<QmpEvent>((resolve, reject) => {
      listener = (event) => {
        if (event.event === name && (options.filter === undefined || options.filter(event))) resolve(event);
      };
      onClose = () => reject(this.#closedError);
      this.on("event", listener);
      this.once("close", onClose);
    });
    return withDeadline(waiting, `waiting for QMP event ${name}`, {
      signal: options.signal,
      timeoutMs: options.timeoutMs,
      errorFields: this.#errorFields,
    }).finally(() => {
      this.off("event", listener!);
      this.off("close", onClose!);
    });
  }

  /** Every event from now until the connection closes (or `signal` aborts). */
  async *events(options: { signal?: AbortSignal } = {}): AsyncGenerator<QmpEvent, void, undefined> {
    if (this.#closedError !== undefined) return;
    const iterator = on(this, "event", { signal: options.signal, close: ["close"] });
    try {
      for await (const [event] of iterator) yield event as QmpEvent;
    } catch (error) {
      if (options.signal?.aborted) throw abortError(options.signal);
      throw error;
    }
  }

  /** Close the connection. Pending and later calls reject with `reason` (default `VM_STOPPED`). */
  close(reason?: VmError): void {
    this.#shutdown(reason ?? new VmError("VM_STOPPED", "the QMP connection was closed", this.#errorFields()));
    this.#socket.destroy();
  }

  #onData(chunk: Buffer): void {
    this.#buffer += this.#decoder.write(chunk);
    let newline = this.#buffer.indexOf("\n");
    while (newline !== -1) {
      const line = this.#buffer.slice(0, newline).trim();
      this.#buffer = this.#buffer.slice(newline + 1);
      if (line !== "") this.#onMessage(line);
      newline = this.#buffer.indexOf("\n");
    }
    if (this.#buffer.length > MAX_MESSAGE_BYTES) {
      this.#shutdown(
        new VmError("VMM_FAILED", "QEMU sent a QMP message larger than 16 MiB", this.#errorFields()),
      );
      this.#socket.destroy();
    }
  }

  #onMessage(line: string): void {
    debug("qmp: <- %s", line.length > 2000 ? `${line.slice(0, 2000)}…` : line);
    let message: Record<string, unknown>;
    try {
      message = JSON.parse(line) as Record<string, unknown>;
    } catch (error) {
      this.#shutdown(
        new VmError("VMM_FAILED", "QEMU sent a QMP message that is not JSON", this.#errorFields(), {
          cause: error,
        }),
      );
      this.#socket.destroy();
      return;
    }
    if (typeof message.event === "string") {
      this.emit("event", message as unknown as QmpEvent);
      return;
    }
    if (message.QMP !== undefined) {
      this.#onGreeting?.(message.QMP as QmpGreeting);
      this.#onGreeting = undefined;
      return;
    }
    const pending = typeof message.id === "number" ? this.#pending.get(message.id) : undefined;
    if (pending === undefined) {
      debug("qmp: reply without a pending call: %s", line);
      return;
    }
    pending.cleanup();
    if (message.error !== undefined) {
      const error = message.error as { class?: unknown; desc?: unknown };
      pending.reject(
        new QmpError(
          pending.command,
          { class: String(error.class ?? "GenericError"), desc: String(error.desc ?? "unknown error") },
          this.#errorFields(),
        ),
      );
    } else {
      pending.resolve(message.return);
    }
  }

  #shutdown(error: VmError): void {
    if (this.#closedError !== undefined) return;
    this.#closedError = error;
    for (const pending of [...this.#pending.values()]) {
      pending.cleanup();
      pending.reject(error);
    }
    this.emit("close");
  }
}

function abortError(signal: AbortSignal): AbortError {
  return new AbortError("QMP call aborted", { cause: signal.reason });
}

/** Race `promise` against `signal` and `timeoutMs` (VMM_FAILED). */
async function withDeadline<T>(
  promise: Promise<T>,
  what: string,
  options: { signal?: AbortSignal | undefined; timeoutMs?: number | undefined; errorFields: QmpErrorFields },
): Promise<T> {
  const { signal, timeoutMs } = options;
  if (signal === undefined && timeoutMs === undefined) return promise;
  let timer: NodeJS.Timeout | undefined;
  let onAbort: (() => void) | undefined;
  const deadline = new Promise<never>((_, reject) => {
    if (signal?.aborted) reject(abortError(signal));
    onAbort = () => reject(abortError(signal!));
    signal?.addEventListener("abort", onAbort, { once: true });
    if (timeoutMs !== undefined) {
      timer = setTimeout(
        () =>
          reject(new VmError("VMM_FAILED", `timed out after ${timeoutMs} ms ${what}`, options.errorFields())),
        timeoutMs,
      );
    }
  });
  promise.catch(() => {});
  try {
    return await Promise.race([promise, deadline]);
  } finally {
    if (timer !== undefined) clearTimeout(timer);
    if (onAbort !== undefined) signal?.removeEventListener("abort", onAbort);
  }
}
