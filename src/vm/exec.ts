/**
 * Running a command in a VM: the one options type ({@link ExecOptions}) that `vm.exec()`,
 * `vm.spawn()` and the {@link ExecBuilder} all produce, its validation, and the two ways to run it
 * (collect the output, or stream it through an {@link ExecHandle}).
 */

import { type ExecChannel, type ExecRequest, envList, type StagedFile } from "../agent/index.ts";
import {
  ExecError,
  type ExecOutcome,
  ExecStartError,
  ExecTimeoutError,
  SupermachineError,
} from "../errors.ts";
import { throwIfAborted } from "../internal/index.ts";
import { type ExecDefaults, type ExecHandle, ExecRun, type ExecTarget, execHandle } from "./exec-handle.ts";
import { OutputCollector } from "./exec-outcome.ts";

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

/** What {@link ExecOptions.stdin} accepts. */
export type ExecInput = string | Uint8Array | AsyncIterable<Uint8Array> | NodeJS.ReadableStream;

/** A file created in the guest before the command runs. */
export interface StageFile {
  /** Absolute path in the guest; missing parents are created. */
  path: string;
  content: string | Uint8Array;
  /** Permission bits, default 0o644. */
  mode?: number;
}

/**
 * How to run a command: everything `vm.exec(argv, options)` accepts, and exactly what an
 * {@link ExecBuilder} sets (`vm.execBuilder().env(…).timeout(…)`).
 */
export interface ExecOptions {
  /** Environment variables, merged over the VM's (the image's env and `PATH`). */
  env?: Record<string, string>;
  /** Working directory in the guest (default: the image's, else `/`). */
  cwd?: string;
  /** `name`, `uid`, `name:group` or `uid:gid` (default: the image's user, else root). */
  user?: string;
  /** Run on a pseudo-terminal; stdout and stderr arrive merged on stdout. */
  tty?: boolean;
  /** Initial terminal size (tty only; default 24×80). */
  winsize?: { rows: number; cols: number };
  /**
   * Kill the command after this many milliseconds (SIGTERM to its process group, then SIGKILL
   * after `killGraceMs`). Covers staging and every step. 0 or absent: no timeout.
   */
  timeoutMs?: number;
  /** Milliseconds between SIGTERM and SIGKILL on timeout (default 2000). */
  killGraceMs?: number;
  /** Files created before the first step runs (parents are created). */
  stageFiles?: readonly StageFile[];
  /** Further steps, each run only if the previous one exited 0 (like `&&`). */
  chain?: readonly (readonly string[])[];
  /**
   * Input: given to `exec()` in full, or piped into a spawned command before its stdin closes.
   * Without it `exec()` gives the command `/dev/null`.
   */
  stdin?: ExecInput;
  /** Most bytes collected per stream (default 64 MiB); more kills the command (`OutputLimitError`). */
  maxBufferBytes?: number;
  /**
   * Default true: `exec()` rejects with `ExecError` on a non-zero exit or a signal, and with
   * `ExecTimeoutError` on a timeout. False: it resolves with the outcome in every such case
   * (check `outcome.ok`, `exitCode`, `timedOut`).
   */
  reject?: boolean;
  /** Cancel: the command's process group is killed and the call rejects with `AbortError`. */
  signal?: AbortSignal;
}

function invalid(message: string): SupermachineError {
  return new SupermachineError("INVALID_ARGUMENT", message);
}

/** Checks an argv (also of chained steps); returns a copy. */
export function checkArgv(argv: unknown, what = "argv"): string[] {
  if (!Array.isArray(argv) || argv.length === 0)
    throw invalid(`${what} must be a non-empty array of strings`);
  for (const a of argv) {
    if (typeof a !== "string") throw invalid(`${what} must contain only strings, got ${typeof a}`);
    if (a.includes("\0")) throw invalid(`${what} entry ${JSON.stringify(a)} contains a NUL character`);
  }
  if ((argv[0] as string) === "") throw invalid(`${what}[0] must not be empty`);
  return [...(argv as string[])];
}

function checkMs(ms: unknown, what: string): number {
  if (typeof ms !== "number" || !Number.isInteger(ms) || ms < 0 || ms > U32_MAX)
    throw invalid(`${what} must be a whole number of ms, got ${String(ms)}`);
  return ms;
}

/**
 * Validates `options` (throws `INVALID_ARGUMENT` naming the bad field) and returns a normalised
 * copy: staged contents as bytes, argvs copied.
 */
export function checkExecOptions(options: ExecOptions): ExecOptions {
  const out: ExecOptions = {};
  if (options.env !== undefined) {
    if (typeof options.env !== "object" || options.env === null) throw invalid("env must be an object");
    const env: Record<string, string> = {};
    for (const [key, value] of Object.entries(options.env)) {
      if (key === "" || key.includes("=") || key.includes("\0")) {
        throw invalid(`environment variable name ${JSON.stringify(key)} is invalid`);
      }
      if (typeof value !== "string") throw invalid(`environment variable ${key} must be a string`);
      env[key] = value;
    }
    out.env = env;
  }
  if (options.cwd !== undefined) {
    if (typeof options.cwd !== "string" || options.cwd === "") throw invalid("cwd must be a non-empty path");
    out.cwd = options.cwd;
  }
  if (options.user !== undefined) {
    if (typeof options.user !== "string" || options.user === "")
      throw invalid("user must be a non-empty string");
    out.user = options.user;
  }
  if (options.tty !== undefined) out.tty = options.tty === true;
  if (options.winsize !== undefined) {
    const { rows, cols } = options.winsize;
    for (const [name, n] of [
      ["rows", rows],
      ["cols", cols],
    ] as const) {
      if (!Number.isInteger(n) || n < 1 || n > 0xffff)
        throw invalid(`winsize ${name} must be 1–65535, got ${n}`);
    }
    out.winsize = { rows, cols };
  }
  if (options.timeoutMs !== undefined) out.timeoutMs = checkMs(options.timeoutMs, "timeoutMs");
  if (options.killGraceMs !== undefined) out.killGraceMs = checkMs(options.killGraceMs, "killGraceMs");
  if (options.stageFiles !== undefined) {
    out.stageFiles = options.stageFiles.map((file) => {
      if (typeof file?.path !== "string" || !file.path.startsWith("/")) {
        throw invalid(`staged file path ${JSON.stringify(file?.path)} must be absolute`);
      }
      const content =
        typeof file.content === "string" ? new TextEncoder().encode(file.content) : file.content;
      if (!(content instanceof Uint8Array))
        throw invalid("staged file content must be a string or a Uint8Array");
      if (file.mode !== undefined && (!Number.isInteger(file.mode) || file.mode < 0 || file.mode > 0o7777)) {
        throw invalid(`staged file mode ${file.mode} is not a permission mode`);
      }
      return { path: file.path, content, ...(file.mode === undefined ? {} : { mode: file.mode }) };
    });
  }
  if (options.chain !== undefined) out.chain = options.chain.map((argv) => checkArgv(argv, "chain argv"));
  if (options.stdin !== undefined) {
    const input = options.stdin;
    const ok =
      typeof input === "string" ||
      input instanceof Uint8Array ||
      (typeof input === "object" && input !== null && Symbol.asyncIterator in input);
    if (!ok) throw invalid("stdin must be a string, a Uint8Array, an async iterable or a readable stream");
    out.stdin = input;
  }
  if (options.maxBufferBytes !== undefined) {
    if (!Number.isSafeInteger(options.maxBufferBytes) || options.maxBufferBytes < 0)
      throw invalid(`maxBufferBytes must be a byte count, got ${options.maxBufferBytes}`);
    out.maxBufferBytes = options.maxBufferBytes;
  }
  if (options.reject !== undefined) out.reject = options.reject !== false;
  if (options.signal !== undefined) out.signal = options.signal;
  return out;
}

/**
 * Runs `argv` and collects its output. Rejects with `ExecStartError` (`EXEC_NOT_FOUND`,
 * `EXEC_START`), `ExecTimeoutError` and `ExecError` (unless `reject: false`),
 * `OutputLimitError`, `AbortError`, or a `VmError` if the VM fails.
 */
export async function runExec(
  target: ExecTarget,
  argv: readonly string[],
  options: ExecOptions,
): Promise<ExecOutcome> {
  const run = startExec(target, argv, options, false);
  const { channel } = run;
  const pump = options.stdin === undefined ? undefined : pumpStdin(channel, options.stdin);
  try {
    await started(run);
    const collector = new OutputCollector(run.maxBufferBytes);
    await run.collect(collector);
    const exit = await channel.exited;
    const outcome = run.outcome(exit, collector);
    if (options.reject === false) return outcome;
    if (outcome.timedOut) {
      throw new ExecTimeoutError(
        `exec ${run.name} ran past its ${run.timeoutMs} ms timeout and was killed in ${target.describe()}`,
        { outcome, timeoutMs: run.timeoutMs, argv: run.argv },
      );
    }
    if (outcome.exitCode !== 0) {
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
    // The host's backstop ended a timed-out exec the agent did not: still an outcome.
    if (options.reject === false && error instanceof ExecTimeoutError) return error.outcome;
    throw error;
  } finally {
    // Not awaited: a source that never yields again must not hold up the result.
    pump?.catch(() => {});
  }
}

/**
 * Starts `argv` and resolves once it is running (so a missing program rejects here with
 * `ExecStartError`). The handle streams output, takes stdin, and reports the exit.
 */
export async function spawnExec(
  target: ExecTarget,
  argv: readonly string[],
  options: ExecOptions,
): Promise<ExecHandle> {
  const run = startExec(target, argv, options, true);
  const pid = await started(run);
  const handle = execHandle(run, pid);
  if (options.stdin !== undefined) void pumpStdin(run.channel, options.stdin).catch(() => {});
  return handle;
}

function startExec(
  target: ExecTarget,
  argv: readonly string[],
  options: ExecOptions,
  forSpawn: boolean,
): ExecRun {
  throwIfAborted(options.signal, "exec");
  const defaults = target.defaults();
  const env =
    options.env === undefined
      ? defaultEnv(defaults)
      : { PATH: DEFAULT_PATH, ...defaults.env, ...options.env };
  const tty = options.tty === true;
  const stage: StagedFile[] = (options.stageFiles ?? []).map((file) => ({
    path: file.path,
    content: typeof file.content === "string" ? new TextEncoder().encode(file.content) : file.content,
    mode: file.mode,
  }));
  const request: ExecRequest = {
    argv,
    env,
    cwd: options.cwd ?? (defaults.cwd || undefined),
    user: options.user ?? (defaults.user || undefined),
    tty,
    rows: tty ? options.winsize?.rows : undefined,
    cols: tty ? options.winsize?.cols : undefined,
    timeoutMs: options.timeoutMs ?? 0,
    graceMs: options.killGraceMs,
    chain: options.chain ?? [],
    stage,
    stdin: forSpawn || options.stdin !== undefined,
    windowBytes: OUTPUT_WINDOW_BYTES,
  };
  const channel = target.agent().exec(request);
  return new ExecRun({
    channel,
    target,
    argv,
    maxBufferBytes: options.maxBufferBytes ?? DEFAULT_MAX_BUFFER_BYTES,
    timeoutMs: options.timeoutMs ?? 0,
    graceMs: options.killGraceMs,
    signal: options.signal,
  });
}

/** The environment of execs that set none, per VM (its defaults never change): made once. */
const defaultEnvs = new WeakMap<ExecDefaults, readonly string[]>();

function defaultEnv(defaults: ExecDefaults): readonly string[] {
  let env = defaultEnvs.get(defaults);
  if (env === undefined) {
    env = Object.freeze(envList({ PATH: DEFAULT_PATH, ...defaults.env }));
    defaultEnvs.set(defaults, env);
  }
  return env;
}

/** Waits for `STARTED`; start errors get the target's description. */
async function started(run: ExecRun): Promise<number> {
  try {
    return (await run.channel.started).pid;
  } catch (error) {
    if (error instanceof ExecStartError) {
      throw new ExecStartError(
        error.code as "EXEC_NOT_FOUND" | "EXEC_START",
        `${error.message} in ${run.target.describe()}`,
        { argv: error.argv, errno: error.errno },
      );
    }
    throw error;
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
