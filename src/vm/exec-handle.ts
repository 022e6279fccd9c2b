import { Readable, Writable } from "node:stream";
import type { AgentClient, ExecChannel, ExecExit } from "../agent/index.ts";
import {
  AbortError,
  type ExecOutcome,
  ExecTimeoutError,
  OutputLimitError,
  SupermachineError,
  VmError,
} from "../errors.ts";
import { publish } from "../internal/index.ts";
import { ExecOutcomeRecord, OutputCollector } from "./exec-outcome.ts";

/** What an exec runs on: a VM, seen through the few things the exec API needs. */
export interface ExecTarget {
  agent(): AgentClient;
  defaults(): ExecDefaults;
  /** Called when an exec was killed by its timeout (pools discard such VMs). */
  onExecTimedOut?(): void;
  /** For error messages, e.g. `VM 3f2a (console log: /path)`. */
  describe(): string;
}

/** Defaults from the image config, applied under what the builder sets. Fixed for a VM's life. */
export interface ExecDefaults {
  env: Record<string, string>;
  cwd: string;
  user: string;
}

/** One event of a spawned exec. */
export type ExecEvent =
  | { kind: "stdout"; data: Uint8Array }
  | { kind: "stderr"; data: Uint8Array }
  | { kind: "exit"; exitCode: number | null; signal: string | null };

/** The stdin of a spawned exec. Writes respect the agent's credit and the channel's backpressure. */
export interface ExecStdin {
  /** Resolves once the bytes are handed to the channel (after the exec ended they are dropped). */
  write(chunk: Uint8Array | string): Promise<void>;
  /** Closes stdin (the process reads end of file). Idempotent. */
  end(): Promise<void>;
}

/** Extra time the host waits past timeout + grace before giving up on the agent's EXIT. */
export const TIMEOUT_BACKSTOP_MS = 10_000;
const DISPOSE_KILL_WAIT_MS = 5_000;
const DEFAULT_GRACE_MS = 2_000;

/** Settings an exec run shares between `output()` and `spawn()`. */
export interface ExecRunInit {
  channel: ExecChannel;
  target: ExecTarget;
  argv: readonly string[];
  maxBufferBytes: number;
  timeoutMs: number;
  graceMs: number | undefined;
  signal: AbortSignal | undefined;
}

/**
 * Bookkeeping of one exec, whatever consumes it: diagnostics events, `onExecTimedOut`, the abort
 * signal, and a host-side backstop in case the agent never reports the end of a timed-out exec.
 */
export class ExecRun {
  readonly channel: ExecChannel;
  readonly target: ExecTarget;
  readonly argv: readonly string[];
  readonly maxBufferBytes: number;
  readonly timeoutMs: number;
  #cleanup: (() => void)[] = [];
  #timedOutReported = false;

  constructor(init: ExecRunInit) {
    this.channel = init.channel;
    this.target = init.target;
    this.argv = init.argv;
    this.maxBufferBytes = init.maxBufferBytes;
    this.timeoutMs = init.timeoutMs;
    const { channel, signal } = init;

    if (signal) {
      const onAbort = () =>
        channel.reset(new AbortError(`exec ${this.name} aborted`, { cause: signal.reason }));
      if (signal.aborted) onAbort();
      else {
        signal.addEventListener("abort", onAbort, { once: true });
        this.#cleanup.push(() => signal.removeEventListener("abort", onAbort));
      }
    }
    if (init.timeoutMs > 0) {
      const limit = init.timeoutMs + (init.graceMs ?? DEFAULT_GRACE_MS) + TIMEOUT_BACKSTOP_MS;
      const timer = setTimeout(() => {
        const outcome = new ExecOutcomeRecord({
          argv: this.argv,
          exitCode: null,
          signal: "SIGKILL",
          timedOut: true,
          durationMs: limit,
          peakRssKiB: 0,
          stdout: new Uint8Array(0),
          stderr: new Uint8Array(0),
          step: 0,
        });
        this.reportTimedOut();
        channel.reset(
          new ExecTimeoutError(
            `exec ${this.name} ran past its ${init.timeoutMs} ms timeout and the agent did not end it within ${limit} ms; the process group was killed in ${this.target.describe()}`,
            { outcome, timeoutMs: init.timeoutMs, argv: this.argv },
          ),
        );
      }, limit);
      this.#cleanup.push(() => clearTimeout(timer));
    }
    channel.started.then(
      ({ pid }) => publish("exec:start", () => ({ argv: this.argv, pid, target: this.target.describe() })),
      () => {},
    );
    channel.exited.then(
      (exit) => {
        this.#finish();
        if (exit.timedOut) this.reportTimedOut();
        publish("exec:exit", () => ({
          argv: this.argv,
          pid: channel.pid,
          exitCode: exit.exitCode,
          signal: exit.signal,
          timedOut: exit.timedOut,
          durationMs: exit.durationMs,
          peakRssKiB: exit.peakRssKiB,
          target: this.target.describe(),
        }));
      },
      () => this.#finish(),
    );
  }

  /** `["sh","-c",...]` shortened for messages. */
  get name(): string {
    const text = JSON.stringify(this.argv);
    return text.length > 120 ? `${text.slice(0, 117)}...` : text;
  }

  reportTimedOut(): void {
    if (this.#timedOutReported) return;
    this.#timedOutReported = true;
    this.target.onExecTimedOut?.();
  }

  /** Reads all output into a collector; on overflow kills the exec and throws `OutputLimitError`. */
  async collect(collector: OutputCollector): Promise<void> {
    for (;;) {
      const chunk = await this.channel.read();
      if (chunk === null) return;
      if (!collector.add(chunk.kind, chunk.data)) {
        const error = new OutputLimitError(
          `exec ${this.name} wrote more than ${collector.maxBytes} bytes to ${chunk.kind}; it was killed (raise maxBuffer() or stream the output with spawn()) in ${this.target.describe()}`,
          { maxBufferBytes: collector.maxBytes },
        );
        this.channel.reset(error);
        throw error;
      }
    }
  }

  outcome(exit: ExecExit, collector: OutputCollector | undefined): ExecOutcome {
    return new ExecOutcomeRecord({
      argv: this.argv,
      exitCode: exit.exitCode,
      signal: exit.signal,
      timedOut: exit.timedOut,
      durationMs: exit.durationMs,
      peakRssKiB: exit.peakRssKiB,
      stdout: collector?.bytes("stdout") ?? new Uint8Array(0),
      stderr: collector?.bytes("stderr") ?? new Uint8Array(0),
      step: exit.step,
    });
  }

  #finish(): void {
    for (const undo of this.#cleanup.splice(0)) undo();
  }
}

type Mode = "none" | "iterate" | "streams" | "collect" | "discard";

let makeHandle: (run: ExecRun, pid: number) => ExecHandle;

/** The handle of a started exec (internal: `spawn()`). */
export function execHandle(run: ExecRun, pid: number): ExecHandle {
  return makeHandle(run, pid);
}

/**
 * A running exec from `ExecBuilder.spawn()`. Consume its output one way: iterate it
 * (`for await (const event of handle)`), or read {@link stdout}/{@link stderr}, or just
 * {@link wait} (which then collects the output into the outcome, up to `maxBuffer`). Output not
 * consumed holds back the guest process, like a pipe nobody reads.
 */
export class ExecHandle implements AsyncIterable<ExecEvent>, AsyncDisposable {
  /** Pid of the first step in the guest. */
  readonly pid: number;
  readonly argv: readonly string[];
  /** The process's stdin (see also {@link stdinStream}). */
  readonly stdin: ExecStdin;

  readonly #run: ExecRun;
  readonly #channel: ExecChannel;
  #mode: Mode = "none";
  #collector: OutputCollector | undefined;
  #collecting: Promise<void> | undefined;
  #wait: Promise<ExecOutcome> | undefined;
  #stdout: Readable | undefined;
  #stderr: Readable | undefined;
  #stdinStream: Writable | undefined;
  #disposing: Promise<void> | undefined;

  static {
    makeHandle = (run, pid) => new ExecHandle(run, pid);
  }

  private constructor(run: ExecRun, pid: number) {
    this.#run = run;
    this.#channel = run.channel;
    this.pid = pid;
    this.argv = run.argv;
    const channel = this.#channel;
    this.stdin = {
      write: (chunk) =>
        channel.writeStdin(typeof chunk === "string" ? new TextEncoder().encode(chunk) : chunk),
      end: () => channel.endStdin(),
    };
  }

  /** True once the exec has ended (exited, failed or was abandoned). */
  get exited(): boolean {
    return this.#channel.ended;
  }

  #claim(mode: Mode): void {
    if (this.#mode === mode) return;
    if (this.#mode !== "none") {
      throw new SupermachineError(
        "INVALID_ARGUMENT",
        `this exec's output is already consumed by ${this.#mode === "collect" ? "wait()" : this.#mode === "iterate" ? "iteration" : this.#mode === "streams" ? "stdout/stderr" : "disposal"}; use one way`,
      );
    }
    this.#mode = mode;
  }

  /** Output and exit as events, in order; the last event is `exit`. */
  [Symbol.asyncIterator](): AsyncIterator<ExecEvent> {
    this.#claim("iterate");
    return this.#events();
  }

  async *#events(): AsyncGenerator<ExecEvent> {
    let complete = false;
    try {
      for (;;) {
        const chunk = await this.#channel.read();
        if (chunk === null) break;
        yield chunk.kind === "stdout"
          ? { kind: "stdout", data: chunk.data }
          : { kind: "stderr", data: chunk.data };
      }
      const exit = await this.#channel.exited;
      complete = true;
      yield { kind: "exit", exitCode: exit.exitCode, signal: exit.signal };
    } finally {
      // A consumer that stops early no longer holds the process back.
      if (!complete) this.#channel.discardOutput();
    }
  }

  /** stdout as a Node stream (instead of iterating; not both). On a tty it carries all output. */
  get stdout(): Readable {
    this.#startStreams();
    return this.#stdout!;
  }

  /** stderr as a Node stream (empty on a tty). */
  get stderr(): Readable {
    this.#startStreams();
    return this.#stderr!;
  }

  /** stdin as a Node `Writable` (same stream as {@link stdin}). */
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

  /**
   * Waits for the exec to end. Never rejects for a non-zero exit, a signal or a timeout (see the
   * outcome's fields); rejects if the exec was aborted, its output exceeded `maxBuffer` (when
   * `wait()` collects it), or the VM failed.
   */
  wait(): Promise<ExecOutcome> {
    if (this.#mode === "none") {
      this.#mode = "collect";
      this.#collector = new OutputCollector(this.#run.maxBufferBytes);
      this.#collecting = this.#run.collect(this.#collector);
    }
    this.#wait ??= (async () => {
      await this.#collecting;
      const exit = await this.#channel.exited;
      return this.#run.outcome(exit, this.#collector);
    })();
    return this.#wait;
  }

  /** Sends a signal (default SIGTERM) to the current step's process group. */
  kill(signal: string | number = "SIGTERM"): void {
    this.#channel.signal(signal);
  }

  /** Changes the terminal size (tty execs only). */
  resize(rows: number, cols: number): void {
    this.#channel.resize(rows, cols);
  }

  /** Kills the process group if it is still running, drops unread output, waits for the end. */
  [Symbol.asyncDispose](): Promise<void> {
    this.#disposing ??= this.#dispose();
    return this.#disposing;
  }

  async #dispose(): Promise<void> {
    const channel = this.#channel;
    if (!channel.ended) {
      if (this.#mode === "none") this.#mode = "discard";
      channel.discardOutput();
      channel.signal("SIGKILL");
      const timer = setTimeout(
        () =>
          channel.reset(
            new VmError(
              "AGENT_PROTOCOL",
              `exec ${this.#run.name} did not end after SIGKILL: the agent does not answer`,
            ),
          ),
        DISPOSE_KILL_WAIT_MS,
      );
      await channel.exited.catch(() => {});
      clearTimeout(timer);
    }
    await this.#wait?.catch(() => {});
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
        destroy: (error, callback) => {
          const wake = waiters.get(stream);
          waiters.delete(stream);
          wake?.();
          callback(error);
        },
      });
      return stream;
    };
    const stdout = make();
    const stderr = make();
    this.#stdout = stdout;
    this.#stderr = stderr;
    const end = (error?: Error) => {
      for (const s of [stdout, stderr]) {
        if (s.destroyed) continue;
        // Only fail a stream someone listens to for errors: an unheard 'error' would crash the host.
        if (error && s.listenerCount("error") > 0) s.destroy(error);
        else s.push(null);
      }
    };
    void (async () => {
      try {
        for (;;) {
          const chunk = await this.#channel.read();
          if (chunk === null) break;
          const target = chunk.kind === "stdout" ? stdout : stderr;
          if (target.destroyed) continue;
          if (!target.push(chunk.data)) {
            await new Promise<void>((resolve) => waiters.set(target, resolve));
          }
        }
        end();
      } catch (error) {
        end(error as Error);
      }
    })();
  }
}
