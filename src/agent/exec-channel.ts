/**
 * One exec stream (docs/protocol.md, "Exec streams"): the host side of `EXEC`, staged files,
 * stdin with the agent's credit, output with the host's credit, `STARTED` and `EXIT`.
 */

import { ExecStartError, SupermachineError } from "../errors.ts";
import { agentTimeout, timeoutOption, Watchdog } from "./deadline.ts";
import { describeType, FLAG_FIN, type Frame, MAX_PAYLOAD, MessageType } from "./frame-codec.ts";
import {
  AgentErrorCode,
  agentErrorCodeName,
  chunkPayload,
  DEFAULT_WINDOW,
  decodeError,
  decodeExit,
  decodeStarted,
  decodeWindow,
  type ExitMessage,
  encodeExec,
  encodeResize,
  encodeSignal,
} from "./messages.ts";
import { protocolError } from "./protocol-error.ts";
import { signalName, signalNumber } from "./signals.ts";
import { deferred, GuestCredit, type StreamHandler, type StreamLink } from "./stream-link.ts";

/** A file created in the guest before the first step runs. */
export interface StagedFile {
  /** Absolute path in the guest; missing parents are created. */
  path: string;
  content: Uint8Array;
  /** Permission bits, default 0o644. */
  mode?: number | undefined;
}

/** Everything `EXEC` carries, in host terms. */
export interface ExecRequest {
  argv: readonly string[];
  /** The complete environment: `KEY=VALUE` strings or a record. */
  env?: readonly string[] | Readonly<Record<string, string>> | undefined;
  cwd?: string | undefined;
  user?: string | undefined;
  tty?: boolean | undefined;
  rows?: number | undefined;
  cols?: number | undefined;
  /** Milliseconds; 0 or absent = no timeout. Enforced by the agent. */
  timeoutMs?: number | undefined;
  /** Milliseconds between SIGTERM and SIGKILL on timeout (agent default 2000). */
  graceMs?: number | undefined;
  /** Further steps, each run only if the previous one exited 0. */
  chain?: readonly (readonly string[])[] | undefined;
  stage?: readonly StagedFile[] | undefined;
  /** True: the host sends stdin with {@link ExecChannel.writeStdin}; false: `/dev/null`. */
  stdin?: boolean | undefined;
  /** Initial output credit in bytes (default 262 144). */
  windowBytes?: number | undefined;
  /**
   * Longest wait for the agent to report the first step started (`STARTED` or an error) once the
   * request and staged files are written, in milliseconds (default 30 000): then `AGENT_TIMEOUT`.
   */
  startTimeoutMs?: number | undefined;
}

/** How an exec ended, as the agent reported it. */
export interface ExecExit {
  exitCode: number | null;
  /** Signal name (`"SIGKILL"`) when killed by a signal. */
  signal: string | null;
  signalNumber: number | null;
  timedOut: boolean;
  durationMs: number;
  peakRssKiB: number;
  /** Index of the last step run (0 = `argv`, 1 = first chained step, …). */
  step: number;
}

/** One chunk of output. */
export interface ExecOutput {
  kind: "stdout" | "stderr";
  data: Uint8Array;
}

function invalid(message: string): SupermachineError {
  return new SupermachineError("INVALID_ARGUMENT", message);
}

/** `KEY=VALUE` strings from a list or a record (names must be non-empty and without `=`). */
export function envList(env: ExecRequest["env"]): string[] {
  if (!env) return [];
  if (Array.isArray(env)) return [...(env as readonly string[])];
  return Object.entries(env as Record<string, string>).map(([k, v]) => {
    if (k === "" || k.includes("="))
      throw invalid(`environment variable name ${JSON.stringify(k)} is invalid`);
    return `${k}=${v}`;
  });
}

function exitFromMessage(m: ExitMessage): ExecExit {
  return {
    exitCode: m.exitCode ?? null,
    signal: m.signal === undefined ? null : signalName(m.signal),
    signalNumber: m.signal ?? null,
    timedOut: m.timedOut,
    durationMs: m.durationUs / 1000,
    peakRssKiB: m.peakRssKiB,
    step: m.step,
  };
}

type State = "starting" | "running" | "ended";

/**
 * The host side of one exec stream. Created by `AgentClient.exec()`; the request (`EXEC`, staged
 * contents) is written at once with no round trip. Output is read with {@link read}, which grants
 * the agent credit for exactly the bytes taken, so a slow reader slows the guest process down and
 * the host never holds more than the credit window.
 */
export class ExecChannel implements StreamHandler {
  readonly stream: number;
  readonly argv: readonly string[];
  readonly tty: boolean;
  /** Resolves with the pid of the first step once `STARTED` arrives; rejects with `ExecStartError`. */
  readonly started: Promise<{ pid: number }>;
  /** Resolves with the exit report; rejects if the stream fails, is reset, or the channel closes. */
  readonly exited: Promise<ExecExit>;

  readonly #link: StreamLink;
  readonly #started = deferred<{ pid: number }>();
  readonly #exited = deferred<ExecExit>();
  readonly #stdinEnabled: boolean;
  #state: State = "starting";
  #error: Error | undefined;
  #pid: number | undefined;
  #opened: Promise<void>;
  #requestSent = false;
  readonly #startWatchdog: Watchdog;

  // Output (guest -> host), under host credit.
  readonly #credit: GuestCredit;
  /** Output not yet read, with the credit each chunk cost. */
  readonly #queue: { output: ExecOutput; cost: number }[] = [];
  #queueHead = 0;
  #queuedBytes = 0;
  #stdoutDone = false;
  #stderrDone: boolean;
  #readers: (() => void)[] = [];
  #discard = false;

  // Stdin (host -> guest), under agent credit.
  #stdinCredit = DEFAULT_WINDOW;
  #stdinChain: Promise<void> = Promise.resolve();
  #stdinEnded = false;
  #creditWaiters: (() => void)[] = [];

  constructor(link: StreamLink, stream: number, request: ExecRequest) {
    this.#link = link;
    this.stream = stream;
    this.argv = [...request.argv];
    this.tty = request.tty === true;
    this.#stdinEnabled = request.stdin === true;
    this.#stderrDone = this.tty;
    this.#credit = new GuestCredit(
      link,
      stream,
      request.windowBytes ?? DEFAULT_WINDOW,
      () => this.#state === "running" && !(this.#stdoutDone && this.#stderrDone),
    );
    this.started = this.#started.promise;
    this.exited = this.#exited.promise;
    const startTimeoutMs = timeoutOption(request.startTimeoutMs);
    this.#startWatchdog = new Watchdog(startTimeoutMs, () =>
      this.reset(agentTimeout(link, `exec ${JSON.stringify(this.argv[0] ?? "")}: start`, startTimeoutMs)),
    );

    const stage = request.stage ?? [];
    for (const s of stage) {
      if (!s.path.startsWith("/"))
        throw invalid(`staged file path ${JSON.stringify(s.path)} must be absolute`);
    }
    const payload = encodeExec({
      argv: request.argv,
      env: envList(request.env),
      cwd: request.cwd,
      user: request.user,
      tty: request.tty ? true : undefined,
      rows: request.rows,
      cols: request.cols,
      timeoutMs: request.timeoutMs ? request.timeoutMs : undefined,
      graceMs: request.graceMs,
      chain: request.chain,
      stdin: this.#stdinEnabled ? true : undefined,
      window: request.windowBytes,
      stage: stage.map((s) => ({ path: s.path, mode: s.mode, size: s.content.length })),
    });
    // Queued now, so that opening frames go out in stream id order; written once the client has
    // registered the stream (the link writes nothing for unknown streams).
    const execSent = link.sendOpen(stream, MessageType.EXEC, payload);
    this.#opened = this.#open(execSent, stage);
    this.#opened.catch(() => {});
  }

  /** The first step's pid once started. */
  get pid(): number | undefined {
    return this.#pid;
  }

  /** True once `EXIT` or `ERROR` arrived, or the stream was reset or the channel closed. */
  get ended(): boolean {
    return this.#state === "ended";
  }

  /** Output bytes received and not yet taken by {@link read}. Never more than the credit window. */
  get bufferedBytes(): number {
    return this.#queuedBytes;
  }

  async #open(execSent: Promise<void>, stage: readonly StagedFile[]): Promise<void> {
    try {
      await execSent;
      this.#requestSent = true;
      for (const file of stage) {
        if (this.ended) return;
        if (file.content.length === 0) {
          await this.#link.sendData(this.stream, MessageType.STAGE_DATA, file.content, FLAG_FIN);
          continue;
        }
        for (const chunk of chunkPayload(file.content)) {
          if (this.ended) return;
          const last = chunk.byteOffset + chunk.length === file.content.byteOffset + file.content.length;
          await this.#link.sendData(this.stream, MessageType.STAGE_DATA, chunk, last ? FLAG_FIN : 0);
        }
      }
      if (this.#state === "starting") this.#startWatchdog.arm();
    } catch (error) {
      this.#fail(error as Error);
      throw error;
    }
  }

  // ------------------------------------------------------------------------------------------
  // Frames from the agent

  onFrame(frame: Frame): void {
    switch (frame.type) {
      case MessageType.STARTED: {
        if (this.#state !== "starting") throw protocolError(`exec stream ${this.stream}: STARTED twice`);
        const { pid } = decodeStarted(frame.payload);
        this.#startWatchdog.stop();
        this.#state = "running";
        this.#pid = pid;
        this.#started.resolve({ pid });
        return;
      }
      case MessageType.STDOUT:
      case MessageType.STDERR:
        this.#onOutput(frame);
        return;
      case MessageType.WINDOW: {
        const increment = decodeWindow(frame.payload);
        this.#stdinCredit = Math.min(this.#stdinCredit + increment, Number.MAX_SAFE_INTEGER);
        this.#wakeCredit();
        return;
      }
      case MessageType.EXIT: {
        if (this.#state !== "running") throw protocolError(`exec stream ${this.stream}: EXIT before STARTED`);
        const exit = exitFromMessage(decodeExit(frame.payload));
        this.#end();
        this.#exited.resolve(exit);
        return;
      }
      case MessageType.ERROR: {
        const m = decodeError(frame.payload);
        const argv0 = this.argv[0] ?? "";
        const detail = m.message ? `: ${m.message}` : "";
        let error: Error;
        if (this.#state === "starting") {
          error =
            m.code === AgentErrorCode.NOT_FOUND
              ? new ExecStartError("EXEC_NOT_FOUND", `program ${JSON.stringify(argv0)} not found${detail}`, {
                  argv: this.argv,
                  errno: m.errno,
                })
              : new ExecStartError(
                  "EXEC_START",
                  `cannot start ${JSON.stringify(argv0)} (${agentErrorCodeName(m.code)})${detail}`,
                  { argv: this.argv, errno: m.errno },
                );
        } else {
          error = new ExecStartError(
            "EXEC_START",
            `exec ${JSON.stringify(argv0)} failed in the agent (${agentErrorCodeName(m.code)})${detail}`,
            { argv: this.argv, errno: m.errno },
          );
        }
        this.#fail(error);
        return;
      }
      default:
        throw protocolError(
          `exec stream ${this.stream}: unexpected ${describeType(frame.type)} from the agent`,
        );
    }
  }

  #onOutput(frame: Frame): void {
    const kind = frame.type === MessageType.STDOUT ? "stdout" : "stderr";
    if (this.#state !== "running") throw protocolError(`exec stream ${this.stream}: ${kind} before STARTED`);
    const done = kind === "stdout" ? this.#stdoutDone : this.#stderrDone;
    if (done) {
      throw protocolError(
        `exec stream ${this.stream}: ${kind} data after its end${this.tty ? " (tty)" : ""}`,
      );
    }
    const size = frame.payload.length;
    const cost = this.#credit.take(frame, `exec stream ${this.stream}: ${kind}`);
    if (size > 0 && !this.#discard) {
      this.#queue.push({ output: { kind, data: frame.payload }, cost });
      this.#queuedBytes += size;
    } else {
      this.#credit.grant(cost);
    }
    if ((frame.flags & FLAG_FIN) !== 0) {
      if (kind === "stdout") this.#stdoutDone = true;
      else this.#stderrDone = true;
    }
    this.#wakeReaders();
  }

  onClose(error: Error): void {
    this.#fail(error);
  }

  // ------------------------------------------------------------------------------------------
  // Output

  /**
   * The next chunk of output in arrival order, or `null` when output is over (both streams closed,
   * or the exec ended). Taking a chunk grants the agent credit for its bytes. Rejects with the
   * stream's error once it failed and nothing is left.
   */
  async read(): Promise<ExecOutput | null> {
    for (;;) {
      if (this.#queueHead < this.#queue.length) {
        const { output, cost } = this.#queue[this.#queueHead]!;
        this.#queue[this.#queueHead++] = undefined as unknown as { output: ExecOutput; cost: number };
        if (this.#queueHead > 1024 && this.#queueHead * 2 > this.#queue.length) {
          this.#queue.splice(0, this.#queueHead);
          this.#queueHead = 0;
        }
        this.#queuedBytes -= output.data.length;
        this.#credit.grant(cost);
        return output;
      }
      if (this.#error) throw this.#error;
      if (this.#outputOver()) return null;
      await new Promise<void>((resolve) => this.#readers.push(resolve));
    }
  }

  /** Drops all output from now on, granting credit as it arrives (used when nobody will read). */
  discardOutput(): void {
    this.#discard = true;
    let bytes = 0;
    for (let i = this.#queueHead; i < this.#queue.length; i++) bytes += this.#queue[i]!.cost;
    this.#queue.length = 0;
    this.#queueHead = 0;
    this.#queuedBytes = 0;
    this.#credit.grant(bytes);
    this.#wakeReaders();
  }

  #outputOver(): boolean {
    return this.#state === "ended" || this.#discard || (this.#stdoutDone && this.#stderrDone);
  }

  #wakeReaders(): void {
    const readers = this.#readers;
    this.#readers = [];
    for (const wake of readers) wake();
  }

  // ------------------------------------------------------------------------------------------
  // Stdin

  /**
   * Sends `data` to the process's stdin, within the agent's credit (waits for `WINDOW` when it runs
   * out) and the socket's backpressure. Writes are ordered. Once the exec has ended the data is
   * dropped, like writing into a pipe nobody reads.
   */
  writeStdin(data: Uint8Array): Promise<void> {
    if (!this.#stdinEnabled) return Promise.reject(invalid("this exec was started without stdin"));
    if (this.#stdinEnded) return Promise.reject(invalid("stdin was already ended"));
    return this.#queueStdin(data, false);
  }

  /** Closes stdin (`STDIN` with `FIN`). Idempotent. */
  endStdin(): Promise<void> {
    if (!this.#stdinEnabled || this.#stdinEnded) return this.#stdinChain;
    this.#stdinEnded = true;
    return this.#queueStdin(new Uint8Array(0), true);
  }

  #queueStdin(data: Uint8Array, fin: boolean): Promise<void> {
    const p = this.#stdinChain.then(() => this.#sendStdin(data, fin));
    this.#stdinChain = p.catch(() => {});
    return p;
  }

  async #sendStdin(data: Uint8Array, fin: boolean): Promise<void> {
    await this.#opened;
    if (data.length === 0) {
      if (fin && this.#state !== "ended") {
        await this.#link.sendData(this.stream, MessageType.STDIN, data, FLAG_FIN);
      }
      return;
    }
    let offset = 0;
    while (offset < data.length) {
      while (this.#stdinCredit === 0 && this.#state !== "ended") {
        await new Promise<void>((resolve) => this.#creditWaiters.push(resolve));
      }
      if (this.#state === "ended") {
        if (this.#error) throw this.#error;
        return;
      }
      const n = Math.min(this.#stdinCredit, MAX_PAYLOAD, data.length - offset);
      this.#stdinCredit -= n;
      const last = offset + n === data.length;
      await this.#link.sendData(
        this.stream,
        MessageType.STDIN,
        data.subarray(offset, offset + n),
        fin && last ? FLAG_FIN : 0,
      );
      offset += n;
    }
  }

  #wakeCredit(): void {
    const waiters = this.#creditWaiters;
    this.#creditWaiters = [];
    for (const wake of waiters) wake();
  }

  // ------------------------------------------------------------------------------------------
  // Control

  /** Sends a signal (name like `"SIGTERM"` or Linux number) to the current step's process group. */
  signal(signal: string | number): void {
    const signo = signalNumber(signal);
    if (signo === undefined) throw invalid(`unknown signal ${JSON.stringify(signal)}`);
    if (this.#state === "ended") return;
    this.#afterOpen(() => this.#link.sendControl(this.stream, MessageType.SIGNAL, encodeSignal(signo)));
  }

  /** Changes the terminal size (tty execs only). */
  resize(rows: number, cols: number): void {
    if (!this.tty) throw invalid("resize() needs an exec started with a tty");
    const payload = encodeResize({ rows, cols });
    if (this.#state === "ended") return;
    this.#afterOpen(() => this.#link.sendControl(this.stream, MessageType.RESIZE, payload));
  }

  /**
   * Abandons the stream: the agent SIGKILLs the process group and sends nothing more. Pending
   * promises reject with `reason`. A no-op once the stream has ended.
   */
  reset(reason: Error): void {
    if (this.#state === "ended") return;
    // If the request is still queued behind socket backpressure, it is never sent: the link drops
    // data for released streams, and sends RESET only for streams the agent has seen.
    this.#link.reset(this.stream, this.#credit.outstanding);
    this.#fail(reason);
  }

  #afterOpen(action: () => void): void {
    if (this.#requestSent) action();
    else this.#opened.then(action, () => {});
  }

  #end(): void {
    if (this.#state === "ended") return;
    this.#state = "ended";
    this.#startWatchdog.stop();
    this.#link.release(this.stream);
    this.#wakeReaders();
    this.#wakeCredit();
  }

  #fail(error: Error): void {
    if (this.#state === "ended") return;
    this.#error = error;
    this.#started.reject(error);
    this.#exited.reject(error);
    this.#end();
  }
}
