/** Detached VMs from the command line: run -d, ps, port, exec, logs, stop, rm (see detached.ts). */
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { open, writeFile } from "node:fs/promises";
import { type Cli, CliError, envPairs, exitCodeFor, UsageError } from "./cli.ts";
import { type ControlReply, connectControl, decode, encode } from "./control.ts";
import {
  DetachedDir,
  type DetachedSpec,
  type DetachedState,
  findDetached,
  listDetached,
  processStartTime,
} from "./detached.ts";
import { ago, json, table } from "./output.ts";
import { hostAddress, portColumn, portLine } from "./ports.ts";
import type { SupervisorReport } from "./supervisor.ts";
import { readLog } from "./supervisor.ts";
import { attachTerminal, shellExitCode, terminalSize, write } from "./terminal.ts";

/** How long `stop` waits for a supervisor to stop its VM before killing it. */
const STOP_TIMEOUT_MS = 30_000;

/** `run -d`: starts the supervisor and returns once the VM runs (0) or failed to start. */
export async function startDetached(cli: Cli, spec: DetachedSpec, name: string | undefined): Promise<number> {
  const dir = new DetachedDir(name ?? `vm-${randomBytes(3).toString("hex")}`);
  await dir.create();
  let started = false;
  try {
    await writeFile(dir.specPath, JSON.stringify(spec), { mode: 0o600 });
    const log = await open(dir.supervisorLogPath, "a", 0o600);
    // Its own session (detached): our terminal's signals do not reach it, and it outlives us.
    const child = spawn(process.execPath, [...process.execArgv, process.argv[1]!, "__supervise", dir.path], {
      detached: true,
      stdio: ["ignore", log.fd, log.fd, "ipc"],
    });
    await log.close();
    const onAbort = () => child.kill("SIGTERM");
    cli.signal.addEventListener("abort", onAbort, { once: true });
    const report = await new Promise<SupervisorReport>((resolve) => {
      child.once("message", (message) => resolve(message as SupervisorReport));
      child.once("exit", (code, signal) =>
        resolve({
          type: "error",
          code: "VMM_FAILED",
          message: `the supervisor of ${dir.name} exited (${code ?? signal}) before the VM ran; see ${dir.supervisorLogPath}`,
        }),
      );
      child.once("error", (error) => resolve({ type: "error", code: "VMM_FAILED", message: error.message }));
    });
    cli.signal.removeEventListener("abort", onAbort);
    if (child.connected) child.disconnect();
    child.unref();
    if (report.type === "error") throw new CliError(report.message, exitCodeFor(report.code));
    started = true;
    cli.out(dir.name);
    for (const port of report.ports) cli.note(portLine(port));
    return 0;
  } finally {
    if (!started) await dir.remove();
  }
}

export async function psCommand(cli: Cli, flags: { all?: boolean; json?: boolean }): Promise<number> {
  const states = (await listDetached()).filter((s) => flags.all || s.status !== "exited");
  if (flags.json) {
    json(cli, states);
    return 0;
  }
  table(
    cli,
    ["NAME", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS"],
    states.map((s) => [
      s.name,
      s.image,
      commandText(s.command),
      ago(s.createdAt),
      statusText(s),
      s.status === "exited" ? "" : (s.ports ?? []).map(portColumn).join(", "),
    ]),
  );
  return 0;
}

/**
 * `port NAME [GUEST_PORT[/tcp]]`: the published ports of a running VM, as `docker port` prints
 * them (`8080/tcp -> 127.0.0.1:49153`), or the host addresses of one guest port.
 */
export async function portCommand(cli: Cli, name: string, guest: string | undefined): Promise<number> {
  const { state } = await findDetached(name);
  if (state.status !== "running") throw new UsageError(`VM ${name} is not running`);
  const ports = state.ports ?? [];
  if (guest === undefined) {
    for (const port of ports) cli.out(portLine(port));
    return 0;
  }
  const match = /^(\d{1,5})(?:\/tcp)?$/.exec(guest);
  if (match === null) throw new UsageError(`port expects GUEST_PORT[/tcp], got ${JSON.stringify(guest)}`);
  const found = ports.filter((p) => p.guestPort === Number(match[1]));
  if (found.length === 0) throw new UsageError(`VM ${name} does not publish guest port ${match[1]}`);
  for (const port of found) cli.out(hostAddress(port));
  return 0;
}

function commandText(argv: readonly string[]): string {
  if (argv.length === 0) return "(baked workload)";
  const text = argv.map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : JSON.stringify(a))).join(" ");
  return text.length > 40 ? `${text.slice(0, 39)}…` : text;
}

function statusText(state: DetachedState): string {
  if (state.status === "starting") return "Starting";
  if (state.status === "running") return `Up ${ago(state.createdAt).replace(/ ago$/, "")}`;
  const when = state.finishedAt ? ` ${ago(state.finishedAt)}` : "";
  const code = state.exitCode === undefined || state.exitCode === null ? undefined : String(state.exitCode);
  if (state.error === "stopped") return `Stopped${code === undefined ? "" : ` (${code})`}${when}`;
  return `Exited (${code ?? "-"})${when}${state.error ? `: ${state.error}` : ""}`;
}

export interface ExecFlags {
  interactive?: boolean;
  tty?: boolean;
  env: string[];
  workdir?: string;
  user?: string;
}

/** `exec NAME CMD...`: runs a command in a detached VM; returns its exit status. */
export async function execCommand(cli: Cli, words: readonly string[], flags: ExecFlags): Promise<number> {
  const [name, ...rest] = words;
  const argv = rest[0] === "--" ? rest.slice(1) : rest;
  if (name === undefined || argv.length === 0) throw new UsageError("exec needs a NAME and a COMMAND");
  const tty = flags.tty === true;
  if (tty && process.stdin.isTTY !== true) throw new UsageError("-t needs standard input to be a terminal");
  const forwardStdin = flags.interactive === true;
  const { dir, state } = await findDetached(name);
  if (state.status !== "running") throw new UsageError(`VM ${name} is not running`);
  const channel = await connectControl(dir.socketPath, name);
  channel.send({
    op: "exec",
    argv,
    env: envPairs(flags.env),
    ...(flags.workdir === undefined ? {} : { cwd: flags.workdir }),
    ...(flags.user === undefined ? {} : { user: flags.user }),
    tty,
    ...(tty ? { winsize: terminalSize() } : {}),
    stdin: forwardStdin,
  });
  const onAbort = () => channel.socket.destroy();
  cli.signal.addEventListener("abort", onAbort, { once: true });
  const detach = attachTerminal(tty, (rows, cols) => channel.send({ op: "resize", rows, cols }));
  if (forwardStdin) {
    process.stdin.on("data", (data: Buffer) => channel.send({ op: "stdin", data: encode(data) }));
    process.stdin.once("end", () => channel.send({ op: "stdin-end" }));
  }
  try {
    const exit = await relay(channel);
    if (exit === undefined) throw new CliError(`the connection to VM ${name} ended during the command`);
    return shellExitCode(exit.exitCode, exit.signal);
  } finally {
    detach();
    cli.signal.removeEventListener("abort", onAbort);
    if (forwardStdin) process.stdin.destroy();
    channel.socket.destroy();
  }
}

/** Writes output replies to ours until the exit (returned) or the end; an error reply throws. */
async function relay(
  channel: AsyncIterable<ControlReply>,
): Promise<Extract<ControlReply, { type: "exit" }> | undefined> {
  for await (const reply of channel) {
    if (reply.type === "stdout") await write(process.stdout, decode(reply.data));
    else if (reply.type === "stderr") await write(process.stderr, decode(reply.data));
    else if (reply.type === "exit") return reply;
    else if (reply.type === "error") throw new CliError(reply.message, exitCodeFor(reply.code));
    else return undefined;
  }
  return undefined;
}

/** `logs [-f] NAME`: the workload's output so far, and with -f what follows until it ends. */
export async function logsCommand(cli: Cli, name: string, flags: { follow?: boolean }): Promise<number> {
  let { dir, state } = await findDetached(name);
  const channel =
    state.status === "running"
      ? await connectControl(dir.socketPath, name).catch(async (error: unknown) => {
          // It ended between reading its state and connecting: the state says so now.
          ({ dir, state } = await findDetached(name));
          if (state.status === "running") throw error;
          return undefined;
        })
      : undefined;
  if (channel !== undefined) {
    const onAbort = () => channel.socket.destroy();
    cli.signal.addEventListener("abort", onAbort, { once: true });
    try {
      channel.send({ op: "logs", follow: flags.follow === true });
      await relay(channel);
    } finally {
      cli.signal.removeEventListener("abort", onAbort);
    }
    return 0;
  }
  for (const chunk of readLog(dir.logPath)) await write(process.stdout, chunk);
  return 0;
}

/**
 * `stop NAME...`: stops each VM gracefully: its command (or baked workload) gets the image's
 * StopSignal and 10 s to exit, then SIGKILL, then the VM stops.
 */
export async function stopCommand(cli: Cli, names: readonly string[]): Promise<number> {
  for (const name of names) {
    const { dir, state } = await findDetached(name);
    if (state.status !== "exited") await stopDetached(dir, state);
    cli.out(name);
  }
  return 0;
}

/** `rm [-f] NAME...`: removes exited VMs; with -f stops running ones first. */
export async function rmCommand(
  cli: Cli,
  names: readonly string[],
  flags: { force?: boolean },
): Promise<number> {
  for (const name of names) {
    const { dir, state } = await findDetached(name);
    if (state.status !== "exited") {
      if (!flags.force)
        throw new UsageError(
          `VM ${name} is running: stop it first ('supermachine stop ${name}') or use rm -f`,
        );
      await stopDetached(dir, state);
    }
    await dir.remove();
    cli.out(name);
  }
  return 0;
}

/**
 * Asks the supervisor to stop and waits until it answers and its process is gone; one that does
 * not answer in STOP_TIMEOUT_MS is killed (its QEMU dies with it).
 */
async function stopDetached(dir: DetachedDir, state: DetachedState): Promise<void> {
  const alive = () => processStartTime(state.supervisorPid) === state.supervisorStartTime;
  const asked = (async () => {
    const channel = await connectControl(dir.socketPath, dir.name);
    channel.send({ op: "stop" });
    for await (const _ of channel) {
      // "stopped", then the supervisor closes the connection and exits.
    }
  })().catch(() => {});
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<boolean>((resolve) => {
    timer = setTimeout(() => resolve(true), STOP_TIMEOUT_MS);
  });
  const gaveUp = await Promise.race([asked.then(() => false), timedOut]);
  clearTimeout(timer);
  if (alive()) {
    if (gaveUp) process.kill(state.supervisorPid, "SIGKILL");
    await waitForExit(state.supervisorPid, state.supervisorStartTime);
  }
}

/** Resolves once the process is gone: its pidfd-less equivalent, /proc, checked on each tick of a short timer. */
async function waitForExit(pid: number, startTime: string): Promise<void> {
  const { setTimeout: sleep } = await import("node:timers/promises");
  for (let waited = 0; processStartTime(pid) === startTime; waited += 20) {
    if (waited > STOP_TIMEOUT_MS) {
      process.kill(pid, "SIGKILL");
      waited = 0;
    }
    await sleep(20);
  }
}
