/**
 * Exec on a server: `vm.exec()` and `ExecBuilder.output()` as one request (or, with a streamed
 * stdin, as a stream collected to the end), `spawn()` as a stream over a WebSocket. The server
 * returns the outcome; `reject` is applied here, as the library does it, with the same error
 * classes carrying the same outcome.
 */

import { Readable, Writable } from "node:stream";
import {
  AbortError,
  ExecError,
  type ExecOutcome,
  ExecTimeoutError,
  OutputLimitError,
  RemoteError,
  SupermachineError,
} from "../errors.ts";
import type { ExecEvent, ExecInput, ExecOptions, ExecStdin } from "../index.ts";
import {
  CHANNEL,
  type ClientMessage,
  errorFromWire,
  execOptionsToWire,
  isBufferedInput,
  outcomeFromWire,
  type PeerHandlers,
  RemoteOutcome,
  type StreamPeer,
  type WireError,
  type WireOutcome,
} from "../wire/index.ts";
import type { Endpoint } from "./endpoint.ts";

/** Where execs run: a VM on a server (or a pool, for one-shot execs that acquire and release). */
export interface ExecSite {
  readonly endpoint: Endpoint;
  /** `/v1/vms/{id}` or `/v1/pools/{id}`. */
  readonly path: string;
  /** For messages: `VM 3f2a on http://…`. */
  describe(): string;
  /** Only a VM can stream (a pool has no stream route). */
  readonly vmId: string | undefined;
  /** Throws when the site cannot take work any more (a VM this client stopped). */
  check?(): void;
}

function invalid(message: string): SupermachineError {
  return new SupermachineError("INVALID_ARGUMENT", message);
}

export function checkArgv(argv: unknown, what = "argv"): string[] {
  if (!Array.isArray(argv) || argv.length === 0 || !argv.every((a) => typeof a === "string")) {
    throw invalid(`${what} must be a non-empty array of strings`);
  }
  return [...argv];
}

function nameOf(argv: readonly string[]): string {
  const text = JSON.stringify(argv);
  return text.length > 120 ? `${text.slice(0, 117)}...` : text;
}

/** What `output()` does with an outcome: return it, or throw as the library would. */
export function settle(outcome: ExecOutcome, options: ExecOptions, where: string): ExecOutcome {
  if (options.reject === false) return outcome;
  const argv = outcome.argv;
  if (outcome.timedOut) {
    throw new ExecTimeoutError(
      `exec ${nameOf(argv)} ran past its ${options.timeoutMs ?? 0} ms timeout and was killed in ${where}`,
      { outcome, timeoutMs: options.timeoutMs ?? 0, argv },
    );
  }
  if (outcome.exitCode !== 0) {
    const text = outcome.stderrText.trimEnd();
    const tail = text === "" ? "" : `; stderr: ${text.length > 500 ? `…${text.slice(-500)}` : text}`;
    throw new ExecError(`exec ${nameOf(argv)} ${outcome.describe()} in ${where}${tail}`, { outcome, argv });
  }
  return outcome;
}

/** Runs `argv` at `site` and collects the outcome. */
export async function runExec(
  site: ExecSite,
  argv: readonly string[],
  options: ExecOptions,
): Promise<ExecOutcome> {
  site.check?.();
  checkArgv(argv);
  if (!isBufferedInput(options.stdin)) {
    if (site.vmId === undefined) throw invalid("a streamed stdin needs a VM: acquire one and exec on it");
    const handle = await spawnExec(site, argv, options);
    return settle(await handle.wait(), options, site.describe());
  }
  const { outcome } = await site.endpoint.json<{ outcome: WireOutcome }>("POST", `${site.path}/exec`, {
    json: { argv, ...execOptionsToWire({ ...options, reject: false }) },
    signal: options.signal,
  });
  return settle(outcomeFromWire(outcome), options, site.describe());
}

/** Starts `argv` on the VM at `site` and resolves once it runs. */
export async function spawnExec(
  site: ExecSite,
  argv: readonly string[],
  options: ExecOptions,
): Promise<RemoteExecHandle> {
  site.check?.();
  checkArgv(argv);
  if (site.vmId === undefined) throw invalid("spawn() needs a VM: acquire one and spawn on it");
  const buffered = isBufferedInput(options.stdin);
  const wire = execOptionsToWire({ ...options, stdin: buffered ? options.stdin : undefined });
  const handle = new RemoteExecHandle(
    argv,
    options.maxBufferBytes ?? 64 * 1024 * 1024,
    site.describe(),
    site.endpoint.url,
  );
  const peer = await site.endpoint.openStream(
    `${site.path}/exec`,
    undefined,
    internals.handlers(handle),
    () => site.endpoint.json("GET", site.path),
    options.signal,
  );
  internals.attach(handle, peer, options.signal);
  peer.sendControl({ type: "start", argv: [...argv], options: wire } satisfies ClientMessage);
  await internals.started(handle);
  if (!buffered && options.stdin !== undefined) void internals.pump(handle, options.stdin).catch(() => {});
  return handle;
}

type Mode = "none" | "iterate" | "streams" | "collect" | "discard";

/** What this module may do with a handle that users cannot (set by the class's static block). */
let internals: {
  handlers(handle: RemoteExecHandle): PeerHandlers;
  attach(handle: RemoteExecHandle, peer: StreamPeer, signal: AbortSignal | undefined): void;
  /** Resolves once the server says the command runs. */
  started(handle: RemoteExecHandle): Promise<void>;
  /** Feeds `input` into stdin, then ends it (`spawn` with a streamed stdin). */
  pump(handle: RemoteExecHandle, input: ExecInput): Promise<void>;
};
type Item = { event: ExecEvent; taken: () => void } | { error: Error };

/**
 * A running exec on a server, from `spawn()`: the same surface as the library's `ExecHandle`.
 * Consume its output one way — iterate it, read `stdout`/`stderr`, or `wait()` (which collects
 * it, up to `maxBuffer`). Output not consumed holds back the guest process.
 */
export class RemoteExecHandle implements AsyncIterable<ExecEvent>, AsyncDisposable {
  readonly argv: readonly string[];
  #pid = 0;
  readonly #maxBufferBytes: number;
  readonly #where: string;
  readonly #endpoint: string;
  #peer: StreamPeer | undefined;
  readonly #started = Promise.withResolvers<void>();
  /** Output and the end, in order, one item at a time (the stream's window holds the rest). */
  #items: Item[] = [];
  #waiters: (() => void)[] = [];
  #exit: WireOutcome | undefined;
  #failure: Error | undefined;
  #ended = false;
  #mode: Mode = "none";
  #wait: Promise<ExecOutcome> | undefined;
  #stdout: Readable | undefined;
  #stderr: Readable | undefined;
  #stdinStream: Writable | undefined;
  #stdinChain: Promise<void> = Promise.resolve();
  #disposing: Promise<void> | undefined;
  readonly stdin: ExecStdin;

  constructor(argv: readonly string[], maxBufferBytes: number, where: string, endpoint: string) {
    this.argv = Object.freeze([...argv]);
    this.#maxBufferBytes = maxBufferBytes;
    this.#where = where;
    this.#endpoint = endpoint;
    this.#started.promise.catch(() => {});
    this.stdin = {
      write: (chunk) => this.#stdinStep(() => this.#peer!.sendData(CHANNEL.stdin, bytesOf(chunk))),
      end: () =>
        this.#stdinStep(async () => {
          this.#peer?.sendControl({ type: "stdin-end" });
        }),
    };
  }

  /** Pid of the first step in the guest. */
  get pid(): number {
    return this.#pid;
  }

  /** True once the exec has ended (exited, failed or was abandoned). */
  get exited(): boolean {
    return this.#ended || this.#exit !== undefined;
  }

  static {
    internals = {
      handlers: (handle) => handle.#handlers,
      attach: (handle, peer, signal) => handle.#attach(peer, signal),
      started: (handle) => handle.#started.promise,
      pump: (handle, input) => handle.#pump(input),
    };
  }

  readonly #handlers: PeerHandlers = {
    control: (message: { type: string } & Record<string, unknown>) => {
      if (message.type === "started") {
        this.#pid = typeof message.pid === "number" ? message.pid : 0;
        this.#started.resolve();
      } else if (message.type === "exit") {
        this.#exit = message.outcome as WireOutcome;
        this.#push({
          event: {
            kind: "exit",
            exitCode: typeof message.exitCode === "number" ? message.exitCode : null,
            signal: typeof message.signal === "string" ? message.signal : null,
          },
          taken: () => {},
        });
      } else if (message.type === "error") {
        this.#end(errorFromWire(message.error as WireError, { endpoint: this.#endpoint }));
      }
    },
    data: (channel: number, data: Uint8Array) =>
      new Promise<void>((taken) => {
        this.#push({ event: { kind: channel === CHANNEL.stderr ? "stderr" : "stdout", data }, taken });
      }),
  };

  #attach(peer: StreamPeer, signal: AbortSignal | undefined): void {
    this.#peer = peer;
    void peer.ended.then(({ code, reason }) => {
      if (this.#exit !== undefined || this.#failure !== undefined) return this.#end(undefined);
      if (signal?.aborted) {
        return this.#end(new AbortError(`exec ${nameOf(this.argv)} aborted`, { cause: signal.reason }));
      }
      this.#end(
        new RemoteError(
          "SERVER_UNAVAILABLE",
          `the stream of exec ${nameOf(this.argv)} in ${this.#where} broke (${code}${reason ? `: ${reason}` : ""})`,
          { endpoint: this.#endpoint },
        ),
      );
    });
  }

  #push(item: Item): void {
    this.#items.push(item);
    this.#notify();
  }

  #notify(): void {
    for (const wake of this.#waiters.splice(0)) wake();
  }

  /** Resolves at the next item or end. */
  #changed(): Promise<void> {
    return new Promise((resolve) => this.#waiters.push(resolve));
  }

  #end(error: Error | undefined): void {
    if (error !== undefined && this.#failure === undefined && this.#exit === undefined) {
      this.#failure = error;
      this.#started.reject(error);
      this.#push({ error });
    }
    this.#ended = true;
    this.#notify();
  }

  /** The next item, or undefined once the stream is over. */
  async #next(): Promise<Item | undefined> {
    for (;;) {
      const item = this.#items.shift();
      if (item !== undefined) return item;
      if (this.#ended) return undefined;
      await this.#changed();
    }
  }

  #claim(mode: Mode): void {
    if (this.#mode === mode) return;
    if (this.#mode !== "none")
      throw invalid(`this exec's output is already consumed (${this.#mode}); use one way`);
    this.#mode = mode;
  }

  [Symbol.asyncIterator](): AsyncIterator<ExecEvent> {
    this.#claim("iterate");
    return this.#events();
  }

  async *#events(): AsyncGenerator<ExecEvent> {
    for (;;) {
      const item = await this.#next();
      if (item === undefined) {
        if (this.#failure) throw this.#failure;
        return;
      }
      if ("error" in item) throw item.error;
      item.taken();
      yield item.event;
      if (item.event.kind === "exit") return;
    }
  }

  get stdout(): Readable {
    this.#startStreams();
    return this.#stdout!;
  }

  get stderr(): Readable {
    this.#startStreams();
    return this.#stderr!;
  }

  stdinStream(): Writable {
    this.#stdinStream ??= new Writable({
      write: (chunk: Uint8Array, _encoding, callback) => {
        this.stdin.write(chunk).then(() => callback(), callback);
      },
      final: (callback) => {
        this.stdin.end().then(() => callback(), callback);
      },
    });
    return this.#stdinStream;
  }

  /** Waits for the end; collects the output unless it is consumed another way. */
  wait(): Promise<ExecOutcome> {
    if (this.#mode === "none") this.#mode = "collect";
    this.#wait ??= this.#collect();
    return this.#wait;
  }

  async #collect(): Promise<ExecOutcome> {
    const out: Uint8Array[] = [];
    const err: Uint8Array[] = [];
    let outSize = 0;
    let errSize = 0;
    const collecting = this.#mode === "collect";
    if (collecting) {
      for (;;) {
        const item = await this.#next();
        if (item === undefined) break;
        if ("error" in item) throw item.error;
        item.taken();
        const event = item.event;
        if (event.kind === "exit") break;
        const size = (event.kind === "stdout" ? outSize : errSize) + event.data.length;
        if (size > this.#maxBufferBytes) {
          this.kill("SIGKILL");
          throw new OutputLimitError(
            `exec ${nameOf(this.argv)} wrote more than ${this.#maxBufferBytes} bytes to ${event.kind}; it was killed (raise maxBuffer() or stream the output) in ${this.#where}`,
            { maxBufferBytes: this.#maxBufferBytes },
          );
        }
        if (event.kind === "stdout") {
          out.push(event.data.slice());
          outSize = size;
        } else {
          err.push(event.data.slice());
          errSize = size;
        }
      }
    } else {
      while (!this.#ended && this.#exit === undefined) await this.#changed();
    }
    if (this.#exit === undefined) throw this.#failure ?? invalid("the exec ended without an exit");
    const base = outcomeFromWire(this.#exit);
    return new RemoteOutcome({ ...fields(base), stdout: join(out, outSize), stderr: join(err, errSize) });
  }

  kill(signal: string | number = "SIGTERM"): void {
    this.#peer?.sendControl({ type: "signal", signal });
  }

  resize(rows: number, cols: number): void {
    this.#peer?.sendControl({ type: "resize", rows, cols });
  }

  async #pump(input: ExecInput): Promise<void> {
    for await (const chunk of input as AsyncIterable<Uint8Array | string>) {
      if (this.#ended) return;
      await this.stdin.write(chunk);
    }
    await this.stdin.end();
  }

  #stdinStep(step: () => Promise<void>): Promise<void> {
    const next = this.#stdinChain.then(async () => {
      if (this.#ended || this.#peer === undefined) return;
      await step().catch(() => {});
    });
    this.#stdinChain = next;
    return next;
  }

  [Symbol.asyncDispose](): Promise<void> {
    this.#disposing ??= (async () => {
      if (!this.#ended) {
        if (this.#mode === "none") this.#mode = "discard";
        this.kill("SIGKILL");
        // Drop unread output until the end arrives.
        for (let item = await this.#next(); item !== undefined; item = await this.#next()) {
          if ("taken" in item) item.taken();
        }
      }
      this.#peer?.close(1000, "done");
      await this.#wait?.catch(() => {});
    })();
    return this.#disposing;
  }

  #startStreams(): void {
    if (this.#mode === "streams") return;
    this.#claim("streams");
    const waiters = new Map<Readable, () => void>();
    const make = () => {
      const stream: Readable = new Readable({
        read: () => {
          const wake = waiters.get(stream);
          waiters.delete(stream);
          wake?.();
        },
      });
      return stream;
    };
    const stdout = make();
    const stderr = make();
    this.#stdout = stdout;
    this.#stderr = stderr;
    void (async () => {
      let failure: Error | undefined;
      for (;;) {
        const item = await this.#next();
        if (item === undefined) break;
        if ("error" in item) {
          failure = item.error;
          break;
        }
        const event = item.event;
        if (event.kind === "exit") break;
        const target = event.kind === "stdout" ? stdout : stderr;
        if (!target.destroyed && !target.push(event.data)) {
          await new Promise<void>((resolve) => waiters.set(target, resolve));
        }
        item.taken();
      }
      for (const s of [stdout, stderr]) {
        if (s.destroyed) continue;
        if (failure && s.listenerCount("error") > 0) s.destroy(failure);
        else s.push(null);
      }
    })();
  }
}

function bytesOf(chunk: Uint8Array | string): Uint8Array {
  return typeof chunk === "string" ? new TextEncoder().encode(chunk) : chunk;
}

function join(chunks: Uint8Array[], size: number): Uint8Array {
  if (chunks.length === 1) return chunks[0]!;
  const out = new Uint8Array(size);
  let offset = 0;
  for (const c of chunks) {
    out.set(c, offset);
    offset += c.length;
  }
  return out;
}

function fields(outcome: ExecOutcome) {
  return {
    argv: outcome.argv,
    exitCode: outcome.exitCode,
    signal: outcome.signal,
    timedOut: outcome.timedOut,
    durationMs: outcome.durationMs,
    peakRssKiB: outcome.peakRssKiB,
    step: outcome.step,
  };
}

let makeBuilder: (site: ExecSite) => RemoteExecBuilder;

/** Internal: a builder for commands at `site`. */
export function execBuilder(site: ExecSite): RemoteExecBuilder {
  return makeBuilder(site);
}

/**
 * The library's `ExecBuilder` against a server: the same bare-noun setters filling one
 * `ExecOptions`, then `output()` or `spawn()`. Options are checked by the server (a bad one
 * rejects `output()`/`spawn()` with `INVALID_ARGUMENT`).
 */
export class RemoteExecBuilder {
  readonly #site: ExecSite;
  #argv: string[] | undefined;
  #options: ExecOptions = {};

  static {
    makeBuilder = (site) => new RemoteExecBuilder(site);
  }

  private constructor(site: ExecSite) {
    this.#site = site;
  }

  get options(): Readonly<ExecOptions> {
    return { ...this.#options };
  }

  #set(more: ExecOptions): this {
    this.#options = { ...this.#options, ...more };
    return this;
  }

  argv(argv: string[]): this {
    this.#argv = checkArgv(argv);
    return this;
  }

  env(vars: Record<string, string>): this {
    return this.#set({ env: { ...this.#options.env, ...vars } });
  }

  cwd(dir: string): this {
    return this.#set({ cwd: dir });
  }

  user(user: string): this {
    return this.#set({ user });
  }

  tty(on = true): this {
    return this.#set({ tty: on });
  }

  winsize(rows: number, cols: number): this {
    return this.#set({ winsize: { rows, cols } });
  }

  timeout(ms: number): this {
    return this.#set({ timeoutMs: ms });
  }

  killGrace(ms: number): this {
    return this.#set({ killGraceMs: ms });
  }

  stageFile(path: string, content: string | Uint8Array, opts: { mode?: number } = {}): this {
    return this.#set({ stageFiles: [...(this.#options.stageFiles ?? []), { path, content, ...opts }] });
  }

  chain(argv: string[]): this {
    return this.#set({ chain: [...(this.#options.chain ?? []), checkArgv(argv, "chain argv")] });
  }

  stdin(input: ExecInput): this {
    return this.#set({ stdin: input });
  }

  maxBuffer(bytes: number): this {
    return this.#set({ maxBufferBytes: bytes });
  }

  reject(on = true): this {
    return this.#set({ reject: on });
  }

  signal(signal: AbortSignal): this {
    return this.#set({ signal });
  }

  async output(): Promise<ExecOutcome> {
    return runExec(this.#site, this.#requireArgv(), this.#options);
  }

  async spawn(): Promise<RemoteExecHandle> {
    return spawnExec(this.#site, this.#requireArgv(), this.#options);
  }

  #requireArgv(): string[] {
    if (!this.#argv) throw invalid("argv() is required before output() or spawn()");
    return this.#argv;
  }
}
