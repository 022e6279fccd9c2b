/** Runs the real `bin/supermachine` launcher and collects what it prints. */
import { type ChildProcessWithoutNullStreams, spawn } from "node:child_process";

export const cliPath = new URL("../../bin/supermachine", import.meta.url).pathname;

export interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

export interface CliOptions {
  env?: NodeJS.ProcessEnv;
  input?: string;
  command?: string;
  cwd?: string;
}

export function runCli(args: string[], options: CliOptions = {}): Promise<CliResult> {
  return startCli(args, options).exit;
}

/** A CLI process that runs while the test talks to it. */
export interface RunningCli {
  readonly child: ChildProcessWithoutNullStreams;
  /** Everything printed so far. */
  readonly stdout: string;
  readonly stderr: string;
  /** Resolves with the first match of `pattern` in what `stream` printed, now or later; rejects if the process ends first. */
  waitFor(stream: "stdout" | "stderr", pattern: RegExp): Promise<RegExpMatchArray>;
  /** Resolves when the process has exited and its output is read. */
  readonly exit: Promise<CliResult>;
}

export function startCli(args: string[], options: CliOptions = {}): RunningCli {
  const child = spawn(options.command ?? cliPath, args, {
    env: options.env ?? process.env,
    stdio: ["pipe", "pipe", "pipe"],
    ...(options.cwd === undefined ? {} : { cwd: options.cwd }),
  });
  const text = { stdout: "", stderr: "" };
  let exited = false;
  const waiters = new Set<() => void>();
  const notify = () => {
    for (const waiter of waiters) waiter();
  };
  child.stdout.setEncoding("utf8").on("data", (d: string) => {
    text.stdout += d;
    notify();
  });
  child.stderr.setEncoding("utf8").on("data", (d: string) => {
    text.stderr += d;
    notify();
  });
  const exit = new Promise<CliResult>((resolve, reject) => {
    child.on("error", reject);
    child.on("close", (code) => {
      exited = true;
      resolve({ code, ...text });
      notify();
    });
  });
  child.stdin.end(options.input ?? "");
  return {
    child,
    get stdout() {
      return text.stdout;
    },
    get stderr() {
      return text.stderr;
    },
    exit,
    waitFor(stream, pattern) {
      return new Promise((resolve, reject) => {
        const check = () => {
          const match = text[stream].match(pattern);
          if (match !== null) {
            waiters.delete(check);
            resolve(match);
          } else if (exited) {
            waiters.delete(check);
            reject(
              new Error(
                `the CLI exited before printing ${pattern} on ${stream}:\n${described({ code: child.exitCode, ...text })}`,
              ),
            );
          }
        };
        waiters.add(check);
        check();
      });
    },
  };
}

/** A result's exit code and output, for assertion messages. */
export function described(result: CliResult): string {
  return `exit ${result.code}\nstdout: ${result.stdout}\nstderr: ${result.stderr}`;
}
