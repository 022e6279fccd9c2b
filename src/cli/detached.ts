/**
 * Detached VMs (`run -d`): each is a supervisor process that holds the `Vm` and serves later CLI
 * invocations over a unix socket. Its state lives in the runtime dir, private to the user:
 *
 * ```
 * <runtime dir>/detached/<name>/
 *   spec.json        what `run -d` asked for (read once by the supervisor)
 *   state.json       {name, vmId, image, command, status, supervisorPid, supervisorStartTime, …}
 *   control.sock     the supervisor listens: exec, logs, stop (src/cli/control.ts)
 *   workload.log     the command's (or baked workload's) output, stdout and stderr; rotated to
 *                    workload.log.1 at LOG_MAX_BYTES, so at most twice that is kept
 *   supervisor.log   the supervisor's own errors
 * ```
 *
 * Life cycle: `run -d` makes the dir, starts the supervisor (a detached Node process in its own
 * session) and waits for its `ready`; the supervisor boots or restores the VM, starts the command
 * and reports. QEMU dies with its supervisor (`setpriv --pdeathsig`, see src/vmm/qemu-process.ts),
 * and the supervisor ends when the command exits, on `stop`, or on SIGTERM — stopping the VM
 * first. Nothing restarts a supervisor, so after a reboot nothing runs; a state that says
 * `running` whose supervisor is gone (its pid dead or reused: the start time in /proc tells) is
 * shown and recorded as `exited` by the next command that lists it. `rm` removes the dir of an
 * exited VM; `rm -f` stops a running one first and kills its supervisor if it does not answer.
 */
import { readFileSync } from "node:fs";
import { mkdir, readdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { hostPaths, type MountSpec } from "../index.ts";
import { UsageError } from "./cli.ts";
import type { PortSpec, PublishedPort } from "./ports.ts";

/** Each workload log file is rotated at this size. */
export const LOG_MAX_BYTES = 8 * 1024 * 1024;
const NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;
/** `sun_path` holds 107 bytes and a NUL. */
const MAX_SOCKET_PATH_BYTES = 107;

/** What `run -d` hands its supervisor. */
export interface DetachedSpec {
  /** Root filesystem to boot, or an image reference / snapshot name to start. */
  readonly rootfs?: string;
  readonly image?: string;
  readonly snapshot?: boolean;
  readonly pull?: { platform?: string; insecureRegistries?: string[] };
  /** The command; undefined: the image's Entrypoint + Cmd (or, for a snapshot, its baked workload). */
  readonly argv?: string[];
  readonly entrypoint?: string;
  readonly env: Record<string, string>;
  readonly cwd?: string;
  readonly user?: string;
  readonly memoryMiB?: number;
  readonly vcpus?: number;
  /** Ports to publish (the supervisor holds the listeners). */
  readonly ports?: readonly PortSpec[];
  /** Host directories to mount, in order. */
  readonly mounts?: readonly MountSpec[];
  /** Remove the dir when the VM ends. */
  readonly rm: boolean;
}

export type DetachedStatus = "starting" | "running" | "exited";

export interface DetachedState {
  readonly name: string;
  readonly vmId?: string;
  /** The image reference, snapshot name or `rootfs:PATH`. */
  readonly image: string;
  /** The command; empty for a snapshot's baked workload (started by its bake, not by us). */
  readonly command: readonly string[];
  readonly status: DetachedStatus;
  readonly supervisorPid: number;
  readonly supervisorStartTime: string;
  readonly createdAt: string;
  readonly exitCode?: number | null;
  readonly finishedAt?: string;
  /**
   * Why it ended, when not by its command's exit alone: `stopped` (by stop, rm -f or SIGTERM; the
   * command's exit code, if it reported one, is `exitCode`), or what failed.
   */
  readonly error?: string;
  /** The published ports, as bound. */
  readonly ports?: readonly PublishedPort[];
}

/** Where the detached VMs' dirs are. */
export function detachedRoot(): string {
  return join(hostPaths().runtimeDir, "detached");
}

export function checkName(name: string): string {
  if (!NAME.test(name))
    throw new UsageError(
      `invalid name ${JSON.stringify(name)}: use 1-63 letters, digits, '_', '.' or '-', starting with a letter or digit`,
    );
  return name;
}

export class DetachedDir {
  readonly name: string;
  readonly path: string;

  constructor(name: string, root = detachedRoot()) {
    this.name = checkName(name);
    this.path = join(root, name);
  }

  get specPath(): string {
    return join(this.path, "spec.json");
  }
  get statePath(): string {
    return join(this.path, "state.json");
  }
  get socketPath(): string {
    return join(this.path, "control.sock");
  }
  get logPath(): string {
    return join(this.path, "workload.log");
  }
  get supervisorLogPath(): string {
    return join(this.path, "supervisor.log");
  }

  /** Makes the dir; a name in use is an error (remove the old one with `rm`). */
  async create(): Promise<void> {
    if (Buffer.byteLength(this.socketPath) > MAX_SOCKET_PATH_BYTES)
      throw new UsageError(
        `${this.socketPath} is too long for a unix socket: use a shorter --name or SUPERMACHINE_RUNTIME_DIR`,
      );
    await mkdir(join(this.path, ".."), { recursive: true, mode: 0o700 });
    try {
      await mkdir(this.path, { mode: 0o700 });
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "EEXIST")
        throw new UsageError(
          `the name ${this.name} is in use: remove that VM with 'supermachine rm -f ${this.name}' or choose another --name`,
        );
      throw error;
    }
  }

  async readState(): Promise<DetachedState | undefined> {
    try {
      return JSON.parse(await readFile(this.statePath, "utf8")) as DetachedState;
    } catch {
      return undefined;
    }
  }

  /** Writes state.json atomically (temp file + rename). */
  async writeState(state: DetachedState): Promise<void> {
    const tmp = `${this.statePath}.${process.pid}.tmp`;
    await writeFile(tmp, `${JSON.stringify(state, null, 2)}\n`, { mode: 0o600 });
    await rename(tmp, this.statePath);
  }

  /**
   * The state, with a `running` or `starting` one whose supervisor is gone recorded as exited.
   * Undefined when the dir holds no state (being created, or not a VM's dir).
   */
  async currentState(): Promise<DetachedState | undefined> {
    const state = await this.readState();
    if (state === undefined || state.status === "exited") return state;
    if (processStartTime(state.supervisorPid) === state.supervisorStartTime) return state;
    const ended: DetachedState = {
      ...state,
      status: "exited",
      exitCode: state.exitCode ?? null,
      finishedAt: new Date().toISOString(),
      error: "its supervisor is gone (killed, or the host restarted)",
    };
    await this.writeState(ended).catch(() => {});
    return ended;
  }

  async remove(): Promise<void> {
    await rm(this.path, { recursive: true, force: true });
  }
}

/** Every detached VM with its current state, oldest first. */
export async function listDetached(root = detachedRoot()): Promise<DetachedState[]> {
  let names: string[];
  try {
    names = await readdir(root);
  } catch {
    return [];
  }
  const states: DetachedState[] = [];
  for (const name of names) {
    if (!NAME.test(name)) continue;
    const state = await new DetachedDir(name, root).currentState();
    if (state !== undefined) states.push(state);
  }
  return states.sort((a, b) => a.createdAt.localeCompare(b.createdAt));
}

/** A detached VM by name, or a one-line error saying there is none. */
export async function findDetached(name: string): Promise<{ dir: DetachedDir; state: DetachedState }> {
  const dir = new DetachedDir(name);
  const state = await dir.currentState();
  if (state === undefined)
    throw new UsageError(
      `no VM named ${name} (see 'supermachine ps -a'; 'run -d --name ${name}' starts one)`,
    );
  return { dir, state };
}

/**
 * The start time of a process (field 22 of /proc/PID/stat, clock ticks since boot), or undefined
 * when it is gone or a zombie. A pid and its start time name one process across pid reuse.
 */
export function processStartTime(pid: number): string | undefined {
  let stat: string;
  try {
    stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  } catch {
    return undefined;
  }
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  if (fields[0] === "Z" || fields[0] === "X") return undefined;
  return fields[19];
}
