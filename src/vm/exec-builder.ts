import type { ExecOutcome } from "../errors.ts";
import { SupermachineError } from "../errors.ts";
import { checkArgv, checkExecOptions, type ExecInput, type ExecOptions, runExec, spawnExec } from "./exec.ts";
import type { ExecHandle, ExecTarget } from "./exec-handle.ts";

let makeBuilder: (target: ExecTarget) => ExecBuilder;

/** A builder for commands on `target` (internal: `vm.execBuilder()`; contract tests use any target). */
export function execBuilder(target: ExecTarget): ExecBuilder {
  return makeBuilder(target);
}

/**
 * Describes one command to run in a VM: bare-noun setters return `this` and fill one
 * {@link ExecOptions} (the same type `vm.exec(argv, options)` takes), then `output()` collects
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
  #options: ExecOptions = {};

  static {
    makeBuilder = (target) => new ExecBuilder(target);
  }

  private constructor(target: ExecTarget) {
    this.#target = target;
  }

  /** The options set so far (what `vm.exec(argv, options)` would take). */
  get options(): Readonly<ExecOptions> {
    return { ...this.#options };
  }

  #set(more: ExecOptions): this {
    this.#options = { ...this.#options, ...checkExecOptions(more) };
    return this;
  }

  /** The program and its arguments. `argv[0]` is looked up in `PATH` unless it contains a `/`. */
  argv(argv: string[]): this {
    this.#argv = checkArgv(argv);
    return this;
  }

  /** Environment variables, merged over the image's (calls accumulate). See {@link ExecOptions.env}. */
  env(vars: Record<string, string>): this {
    const env = checkExecOptions({ env: vars }).env;
    return this.#set({ env: { ...this.#options.env, ...env } });
  }

  /** See {@link ExecOptions.cwd}. */
  cwd(dir: string): this {
    return this.#set({ cwd: dir });
  }

  /** See {@link ExecOptions.user}. */
  user(user: string): this {
    return this.#set({ user });
  }

  /** See {@link ExecOptions.tty}. */
  tty(on = true): this {
    return this.#set({ tty: on });
  }

  /** See {@link ExecOptions.winsize}. */
  winsize(rows: number, cols: number): this {
    return this.#set({ winsize: { rows, cols } });
  }

  /** Kill the command after `ms` milliseconds; 0 = no timeout (the default). See {@link ExecOptions.timeoutMs}. */
  timeout(ms: number): this {
    return this.#set({ timeoutMs: ms });
  }

  /** Milliseconds between SIGTERM and SIGKILL on timeout (default 2000). */
  killGrace(ms: number): this {
    return this.#set({ killGraceMs: ms });
  }

  /** Create a file in the guest before the first step runs (calls accumulate; parents are created; mode 0644). */
  stageFile(path: string, content: string | Uint8Array, opts: { mode?: number } = {}): this {
    const [file] = checkExecOptions({ stageFiles: [{ path, content, ...opts }] }).stageFiles ?? [];
    return this.#set({ stageFiles: [...(this.#options.stageFiles ?? []), file!] });
  }

  /** A further step, run only if the previous one exited 0 (like `&&`; calls accumulate). */
  chain(argv: string[]): this {
    return this.#set({ chain: [...(this.#options.chain ?? []), checkArgv(argv, "chain argv")] });
  }

  /** See {@link ExecOptions.stdin}. */
  stdin(input: ExecInput): this {
    return this.#set({ stdin: input });
  }

  /** Most bytes collected per stream (default 64 MiB). See {@link ExecOptions.maxBufferBytes}. */
  maxBuffer(bytes: number): this {
    return this.#set({ maxBufferBytes: bytes });
  }

  /** `reject(false)`: `output()` resolves with the outcome on a non-zero exit, a signal or a timeout. */
  reject(on = true): this {
    return this.#set({ reject: on });
  }

  /** See {@link ExecOptions.signal}. */
  signal(signal: AbortSignal): this {
    return this.#set({ signal });
  }

  /** Runs the command and collects its output; see `vm.exec()`. */
  async output(): Promise<ExecOutcome> {
    return runExec(this.#target, this.#requireArgv(), this.#options);
  }

  /** Starts the command and resolves once it runs; see `vm.spawn()`. */
  async spawn(): Promise<ExecHandle> {
    return spawnExec(this.#target, this.#requireArgv(), this.#options);
  }

  #requireArgv(): string[] {
    if (!this.#argv)
      throw new SupermachineError("INVALID_ARGUMENT", "argv() is required before output() or spawn()");
    return this.#argv;
  }
}
