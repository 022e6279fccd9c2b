import type { ExecChannel, ExecRequest, StagedFile } from "../agent/exec-channel.ts";
import { ExecError, ExecStartError, ExecTimeoutError, SupermachineError } from "../errors.ts";
import { throwIfAborted } from "../internal/abort.ts";
import { ExecHandle, ExecRun, type ExecTarget } from "./exec-handle.ts";
import { type ExecOutcome, OutputCollector } from "./exec-outcome.ts";

export type { ExecDefaults, ExecEvent, ExecStdin, ExecTarget } from "./exec-handle.ts";

/** `PATH` when the image config sets none. */
export const DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/** Default cap on collected output, per stream. */
export const DEFAULT_MAX_BUFFER_BYTES = 64 * 1024 * 1024;
const U32_MAX = 0xffff_ffff;
/**
 * Output credit granted to the agent per exec. Larger than the protocol default (256 KiB, one
 * agent read) so several frames are in flight and the agent never waits a round trip for WINDOW;
 * it is also the most output the host buffers for a reader that does not keep up.
 */
const OUTPUT_WINDOW_BYTES = 2 * 1024 * 1024;

/** What {@link ExecBuilder.stdin} accepts. */
export type ExecInput = string | Uint8Array | AsyncIterable<Uint8Array> | NodeJS.ReadableStream;

function invalid(message: string): SupermachineError {
  return new SupermachineError("INVALID_ARGUMENT", message);
}

function checkArgv(argv: unknown, what: string): string[] {
  if (!Array.isArray(argv) || argv.length === 0)
    throw invalid(`${what} must be a non-empty array of strings`);
  for (const a of argv) {
    if (typeof a !== "string") throw invalid(`${what} must contain only strings, got ${typeof a}`);
    if (a.includes("\0")) throw invalid(`${what} entry ${JSON.stringify(a)} contains a NUL character`);
  }
  if ((argv[0] as string) === "") throw invalid(`${what}[0] must not be empty`);
  return [...(argv as string[])];
}

function checkMs(ms: number, what: string): number {
  if (!Number.isInteger(ms) || ms < 0 || ms > U32_MAX)
    throw invalid(`${what} must be a whole number of ms, got ${ms}`);
  return ms;
}

/**
 * Describes one command to run in a VM: bare-noun setters return `this`, then `output()` collects
 * the result or `spawn()` streams it.
 *
 * ```ts
 * const out = await vm.execBuilder()
 *   .stageFile("/tmp/main.c", src)
 *   .argv(["cc", "/tmp/main.c", "-o", "/tmp/m"])
 *   .chain(["/tmp/m"])
 *   .timeout(30_000)
 *   .output();
 * ```
 */
export class ExecBuilder {
  readonly #target: ExecTarget;
  #argv: string[] | undefined;
  readonly #env: Record<string, string> = {};
  #cwd: string | undefined;
  #user: string | undefined;
  #tty = false;
  #rows: number | undefined;
  #cols: number | undefined;
  #timeoutMs = 0;
  #killGraceMs: number | undefined;
  readonly #stage: StagedFile[] = [];
  readonly #chain: string[][] = [];
  #stdin: ExecInput | undefined;
  #maxBufferBytes = DEFAULT_MAX_BUFFER_BYTES;
  #reject = true;
  #signal: AbortSignal | undefined;

  constructor(target: ExecTarget) {
    this.#target = target;
  }

  /** The program and its arguments. `argv[0]` is looked up in `PATH` unless it contains a `/`. */
  argv(argv: string[]): this {
    this.#argv = checkArgv(argv, "argv");
    return this;
  }

  /** Environment variables, merged over the image's (calls accumulate). */
  env(vars: Record<string, string>): this {
    for (const [key, value] of Object.entries(vars)) {
      if (key === "" || key.includes("=") || key.includes("\0")) {
        throw invalid(`environment variable name ${JSON.stringify(key)} is invalid`);
      }
      if (typeof value !== "string") throw invalid(`environment variable ${key} must be a string`);
      this.#env[key] = value;
    }
    return this;
  }

  /** Working directory in the guest (default: the image's, else `/`). */
  cwd(dir: string): this {
    if (typeof dir !== "string" || dir === "") throw invalid("cwd must be a non-empty path");
    this.#cwd = dir;
    return this;
  }

  /** `name`, `uid`, `name:group` or `uid:gid` (default: the image's user, else root). */
  user(user: string): this {
    if (typeof user !== "string" || user === "") throw invalid("user must be a non-empty string");
    this.#user = user;
    return this;
  }

  /** Run on a pseudo-terminal; stdout and stderr arrive merged on stdout. */
  tty(on = true): this {
    this.#tty = on;
    return this;
  }

  /** Initial terminal size (tty only; default 24×80). */
  winsize(rows: number, cols: number): this {
    for (const [name, n] of [
      ["rows", rows],
      ["cols", cols],
    ] as const) {
      if (!Number.isInteger(n) || n < 1 || n > 0xffff)
        throw invalid(`winsize ${name} must be 1–65535, got ${n}`);
    }
    this.#rows = rows;
    this.#cols = cols;
    return this;
  }

  /**
   * Kill the command after `ms` milliseconds (SIGTERM to its process group, then SIGKILL after the
   * grace period). Covers staging and every step. 0 = no timeout (the default).
   */
  timeout(ms: number): this {
    this.#timeoutMs = checkMs(ms, "timeout");
    return this;
  }

  /** Milliseconds between SIGTERM and SIGKILL on timeout (default 2000). */
  killGrace(ms: number): this {
    this.#killGraceMs = checkMs(ms, "killGrace");
    return this;
  }

  /** Create a file in the guest before the first step runs (parents are created; mode 0644). */
  stageFile(path: string, content: string | Uint8Array, opts: { mode?: number } = {}): this {
    if (typeof path !== "string" || !path.startsWith("/")) {
      throw invalid(`staged file path ${JSON.stringify(path)} must be absolute`);
    }
    const bytes = typeof content === "string" ? new TextEncoder().encode(content) : content;
    if (!(bytes instanceof Uint8Array)) throw invalid("staged file content must be a string or a Uint8Array");
    if (opts.mode !== undefined && (!Number.isInteger(opts.mode) || opts.mode < 0 || opts.mode > 0o7777)) {
      throw invalid(`staged file mode ${opts.mode} is not a permission mode`);
    }
    this.#stage.push({ path, content: bytes, mode: opts.mode });
    return this;
  }

  /** A further step, run only if the previous one exited 0 (like `&&`). */
  chain(argv: string[]): this {
    this.#chain.push(checkArgv(argv, "chain argv"));
    return this;
  }

  /**
   * Input for `output()` (and, with `spawn()`, piped in before stdin is closed). Without it
   * `output()` gives the command `/dev/null`.
   */
  stdin(input: ExecInput): this {
    const ok =
      typeof input === "string" ||
      input instanceof Uint8Array ||
      (typeof input === "object" && input !== null && Symbol.asyncIterator in input);
    if (!ok) throw invalid("stdin must be a string, a Uint8Array, an async iterable or a readable stream");
    this.#stdin = input;
    return this;
  }

  /** Most bytes collected per stream (default 64 MiB); more kills the command (`OutputLimitError`). */
  maxBuffer(bytes: number): this {
    if (!Number.isSafeInteger(bytes) || bytes < 0)
      throw invalid(`maxBuffer must be a byte count, got ${bytes}`);
    this.#maxBufferBytes = bytes;
    return this;
  }

  /** `reject(false)`: `output()` resolves on a non-zero exit or a signal instead of throwing. */
  reject(on = true): this {
    this.#reject = on;
    return this;
  }

  /** Cancel: the command's process group is killed and the call rejects with `AbortError`. */
  signal(signal: AbortSignal): this {
    this.#signal = signal;
    return this;
  }

  /**
   * Runs the command and collects its output.
   * Rejects with `ExecStartError` (`EXEC_NOT_FOUND`, `EXEC_START`), `ExecTimeoutError`, `ExecError`
   * (non-zero exit or killed by a signal, unless `reject(false)`), `OutputLimitError`,
   * `AbortError`, or a `VmError` if the VM fails.
   */
  async output(): Promise<ExecOutcome> {
    const run = this.#start(false);
    const { channel, target } = run;
    const pump = this.#stdin === undefined ? undefined : pumpStdin(channel, this.#stdin);
    try {
      await this.#started(run);
      const collector = new OutputCollector(this.#maxBufferBytes);
      await run.collect(collector);
      const exit = await channel.exited;
      const outcome = run.outcome(exit, collector);
      if (outcome.timedOut) {
        throw new ExecTimeoutError(
          `exec ${run.name} ran past its ${this.#timeoutMs} ms timeout and was killed in ${target.describe()}`,
          { outcome, timeoutMs: this.#timeoutMs, argv: run.argv },
        );
      }
      if (this.#reject && outcome.exitCode !== 0) {
        throw new ExecError(
          `exec ${run.name} ${outcome.describe()} in ${target.describe()}${stderrTail(outcome)}`,
          {
            outcome,
            argv: run.argv,
          },
        );
      }
      return outcome;
    } catch (error) {
      if (!channel.ended) channel.reset(error as Error);
      throw error;
    } finally {
      // Not awaited: a source that never yields again must not hold up the result.
      pump?.catch(() => {});
    }
  }

  /**
   * Starts the command and resolves once it is running (so a missing program rejects here with
   * `ExecStartError`). The handle streams output, takes stdin, and reports the exit.
   */
  async spawn(): Promise<ExecHandle> {
    const run = this.#start(true);
    const pid = await this.#started(run);
    const handle = new ExecHandle(run, pid);
    if (this.#stdin !== undefined) void pumpStdin(run.channel, this.#stdin).catch(() => {});
    return handle;
  }

  #start(forSpawn: boolean): ExecRun {
    if (!this.#argv) throw invalid("argv() is required before output() or spawn()");
    throwIfAborted(this.#signal, "exec");
    const target = this.#target;
    const defaults = target.defaults();
    const env: Record<string, string> = { PATH: DEFAULT_PATH, ...defaults.env, ...this.#env };
    const request: ExecRequest = {
      argv: this.#argv,
      env,
      cwd: this.#cwd ?? (defaults.cwd || undefined),
      user: this.#user ?? (defaults.user || undefined),
      tty: this.#tty,
      rows: this.#tty ? this.#rows : undefined,
      cols: this.#tty ? this.#cols : undefined,
      timeoutMs: this.#timeoutMs,
      graceMs: this.#killGraceMs,
      chain: this.#chain,
      stage: this.#stage,
      stdin: forSpawn || this.#stdin !== undefined,
      windowBytes: OUTPUT_WINDOW_BYTES,
    };
    const channel = target.agent().exec(request);
    return new ExecRun({
      channel,
      target,
      argv: this.#argv,
      maxBufferBytes: this.#maxBufferBytes,
      timeoutMs: this.#timeoutMs,
      graceMs: this.#killGraceMs,
      signal: this.#signal,
    });
  }

  /** Waits for `STARTED`; start errors get the target's description. */
  async #started(run: ExecRun): Promise<number> {
    try {
      return (await run.channel.started).pid;
    } catch (error) {
      if (error instanceof ExecStartError) {
        throw new ExecStartError(
          error.code as "EXEC_NOT_FOUND" | "EXEC_START",
          `${error.message} in ${run.target.describe()}`,
          {
            argv: error.argv,
            errno: error.errno,
          },
        );
      }
      throw error;
    }
  }
}

/** Feeds `input` into the exec's stdin, then closes it. Stops once the exec has ended. */
async function pumpStdin(channel: ExecChannel, input: ExecInput): Promise<void> {
  try {
    if (typeof input === "string") input = new TextEncoder().encode(input);
    if (input instanceof Uint8Array) {
      if (input.length > 0) await channel.writeStdin(input);
    } else {
      const source = input as AsyncIterable<Uint8Array | string>;
      for await (const chunk of source) {
        if (channel.ended) break;
        const bytes = typeof chunk === "string" ? new TextEncoder().encode(chunk) : chunk;
        if (bytes.length > 0) await channel.writeStdin(bytes);
      }
    }
    await channel.endStdin();
  } catch (error) {
    if (channel.ended) return;
    const cause = error as Error;
    channel.reset(
      cause instanceof SupermachineError
        ? cause
        : new SupermachineError(
            "INVALID_ARGUMENT",
            `reading the exec's stdin input failed: ${cause.message}`,
            {
              cause,
            },
          ),
    );
    throw error;
  }
}

function stderrTail(outcome: ExecOutcome): string {
  const text = outcome.stderrText.trimEnd();
  if (text === "") return "";
  return `; stderr: ${text.length > 500 ? `…${text.slice(-500)}` : text}`;
}
