/**
 * One supervised QEMU process: its runtime dir, its QMP connection, the agent channel socket and
 * the console log.
 *
 * Supervision model (docs/vmm.md):
 * - The host listens on two unix sockets in the VM's dir BEFORE spawning; QEMU connects to both
 *   (QMP and the agent's virtio-serial port) while it starts. `launch` resolves once QMP has
 *   greeted and accepted `qmp_capabilities`, and fails fast with QEMU's stderr when QEMU exits
 *   first. No polling anywhere.
 * - QEMU runs under `setpriv --pdeathsig SIGKILL` in its own session: it dies the moment the
 *   host process dies, even by SIGKILL, and terminal signals (Ctrl-C) reach only the host.
 *   Without setpriv, a process `exit` hook kills it, and `sweepStaleVms()` catches the rest.
 * - With a network allow-list the child is the relay `sm-net` (net-relay.ts), and QEMU is its
 *   child: QEMU dies when sm-net dies (its own PDEATHSIG), sm-net passes TERM/INT/HUP on and ends
 *   the way QEMU ended. `kill()` signals the whole process group (both at once).
 * - `stop()` asks QMP `quit`, then SIGTERM, then SIGKILL; `kill()` sends SIGKILL. Both then
 *   remove the VM's dir. When QEMU exits without being asked, the dir is kept with its console
 *   log (see state-dir.ts).
 */

import { type ChildProcess, spawn } from "node:child_process";
import { rmSync } from "node:fs";
import { chmod, chown, mkdtemp, open, rm } from "node:fs/promises";
import { connect, createServer, type Server, type Socket } from "node:net";
import { AbortError, SupermachineError, VmError } from "../errors.ts";
import { debug, memoize, publish, SocketReads } from "../internal/index.ts";
import { assertHostSupported, findQemu, hostTscKHz, qemuSupportsSandbox } from "./accelerator.ts";
import {
  confinedCommand,
  confinementTools,
  type QemuIdentity,
  qemuLimits,
  vmQemuIdentity,
} from "./confinement.ts";
import { ConsoleLog } from "./console-log.ts";
import {
  type LoadStateOptions,
  loadState,
  type MigrationTarget,
  type SaveStateOptions,
  saveState,
} from "./migration.ts";
import {
  type NetRelaySpec,
  probeNetRelay,
  type RelayStatus,
  readRelayStatus,
  relayArgs,
  relayUnsupported,
} from "./net-relay.ts";
import { buildQemuArgs, type MachineSpec } from "./qemu-args.ts";
import { FIRST_FD, grantMemoryFile, openQemuFiles, type QemuFiles } from "./qemu-files.ts";
import { QmpClient } from "./qmp-client.ts";
import { qemuName, runtimeRoot, type SweepResult, sweepStaleVms, VmStateDir } from "./state-dir.ts";

const DEFAULT_LAUNCH_TIMEOUT_MS = 30_000;
const DEFAULT_STOP_TIMEOUT_MS = 10_000;
const SIGTERM_GRACE_MS = 2_000;
/** After QEMU exits, how long its stdout/stderr may stay open (held by a descendant) before we stop reading. */
const STDIO_DRAIN_MS = 2_000;
const STDERR_TAIL_CHARS = 8 * 1024;

/** The part of a {@link MachineSpec} the caller decides; the process fills in sockets and name. */
export type LaunchMachineSpec = Omit<
  MachineSpec,
  "qmpSocketPath" | "qmpFd" | "agentSocketPath" | "agentFd" | "mountSocketPath" | "mountFd" | "name"
>;

export interface LaunchOptions {
  /** The machine. `tscKHz` defaults to `hostTscKHz()` under TCG; `sandbox` to `"strict"` when QEMU supports it. */
  machine: LaunchMachineSpec;
  /** VM id: names its runtime dir. Default: 10 random hex digits. */
  id?: string;
  /** QEMU binary. Default `findQemu()`. */
  qemuPath?: string;
  /** Runtime root. Default `runtimeRoot()`. */
  runtimeDir?: string;
  /** Listen for the guest agent's virtio-serial port. Default true. */
  agent?: boolean;
  /**
   * Listen for the mount relay's virtio-serial port `sm.mounts` (live host-directory mounts), on
   * the agent's device after its port. Default: as `agent`. A snapshot restores only into a QEMU
   * with the same ports.
   */
  mounts?: boolean;
  /**
   * Start as the target of an incoming migration from this state file (a snapshot's device
   * state): QEMU waits (`-incoming defer`, vCPUs stopped) with the file as its fd
   * {@link INCOMING_STATE_FD} until {@link QemuProcess.loadState}.
   */
  incomingStatePath?: string;
  /**
   * Called once the VM's dirs exist, before QEMU starts: create per-VM files there (a qcow2
   * overlay in `diskDir`, on disk, say) and return machine fields to add or override (`disks`, …).
   * What it creates in the dirs is removed with them.
   */
  prepare?: (
    stateDir: string,
    context: { signal: AbortSignal | undefined; diskDir: string },
  ) => Promise<Partial<LaunchMachineSpec> | undefined> | Partial<LaunchMachineSpec> | undefined;
  /**
   * Run QEMU behind the allow-list relay (docs/network.md): in a user + network namespace of its
   * own whose only way out is sm-net, which admits `rules`. The machine should have a `network`.
   */
  netRelay?: NetRelaySpec;
  /** Cap of the console log file. Default 1 MiB. */
  consoleLogMaxBytes?: number;
  /** Time allowed until QMP is ready. Default 30 s. */
  timeoutMs?: number;
  /** Run `sweepStaleVms()` for this runtime root, once per process. Default true. */
  sweep?: boolean;
  signal?: AbortSignal;
}

/** How QEMU ended. */
export interface QemuExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** `starting` until QMP is ready, `running`, then `exited`. */
export type QemuState = "starting" | "running" | "exited";

export interface StopOptions {
  /** Time for QMP `quit` to end QEMU before SIGTERM (then 2 s before SIGKILL). Default 10 s. */
  timeoutMs?: number;
  /** Keep the VM's dir (its console log and exit.json) instead of removing it. */
  keepStateDir?: boolean;
}

const live = new Set<ChildProcess>();
let exitHookInstalled = false;

/** A running QEMU. Create with {@link QemuProcess.launch}. */
export class QemuProcess {
  /** The VM's id (its runtime dir's name). */
  readonly id: string;
  /** QEMU's pid; with a network relay, the relay's (QEMU is its only child, in its process group). */
  readonly pid: number;
  /** The argv QEMU was started with (without the executable), for diagnostics. */
  readonly args: readonly string[];
  /** The VM's runtime dir. */
  readonly stateDir: string;
  /** The guest console log file. Its path stays valid when the dir is kept after a failure. */
  readonly consoleLogPath: string;
  /** The console log, also an emitter of `"output"` chunks. */
  readonly console: ConsoleLog;
  /**
   * The connection QEMU makes to the agent listener (the guest's `sm.agent` port). Rejects with
   * `VM_EXITED` if QEMU exits before connecting, `INVALID_ARGUMENT` when launched with `agent: false`.
   */
  readonly agentSocket: Promise<Socket>;
  /**
   * The connection QEMU makes to the mounts listener (the guest's `sm.mounts` port), for a
   * `MountChannel`. Rejects with `VM_EXITED` if QEMU exits before connecting, `INVALID_ARGUMENT`
   * when launched without it.
   */
  readonly mountSocket: Promise<Socket>;
  /** Resolves when QEMU has exited and its console output is in the log. Never rejects. */
  readonly exited: Promise<QemuExit>;

  readonly #child: ChildProcess;
  readonly #dir: VmStateDir;
  readonly #listeners: Listener[];
  readonly #identity: QemuIdentity;
  readonly #finished: Promise<void>;
  #qmp: QmpClient | undefined;
  #agent: Socket | undefined;
  #mounts: Socket | undefined;
  #exit: QemuExit | undefined;
  #stderr = "";
  /** The relay's `error` line, when it failed to build its namespace. */
  #relayError: string | undefined;
  #state: QemuState = "starting";
  /** stop()/kill()/abort asked for the exit: not a failure. */
  #requested = false;
  /** Launch failed, or kill({ failed: true }): keep the dir even though we killed QEMU ourselves. */
  #failed = false;
  #keepStateDir = false;
  #stopping: Promise<void> | undefined;

  private constructor(init: {
    child: ChildProcess;
    dir: VmStateDir;
    args: string[];
    console: ConsoleLog;
    listeners: Listener[];
    agentListener: Listener | undefined;
    identity: QemuIdentity;
    mountListener: Listener | undefined;
    relayStatus: NodeJS.ReadableStream | undefined;
  }) {
    this.#identity = init.identity;
    const { child, dir } = init;
    this.#child = child;
    this.#dir = dir;
    this.#listeners = init.listeners;
    this.id = dir.id;
    this.pid = child.pid!;
    this.args = init.args;
    this.stateDir = dir.path;
    this.consoleLogPath = dir.consoleLogPath;
    this.console = init.console;

    child.stdout!.pipe(this.console);
    this.console.on("error", (error) => {
      // Keep reading, or the guest blocks on its console; the log is simply incomplete.
      debug("console log of %s: %s", this.id, error.message);
      child.stdout!.resume();
    });
    child.stderr!.setEncoding("utf8");
    child.stderr!.on("data", (text: string) => {
      debug("qemu %s stderr: %s", this.id, text.trimEnd());
      this.#stderr = (this.#stderr + text).slice(-STDERR_TAIL_CHARS);
    });
    if (init.relayStatus !== undefined) {
      readRelayStatus(init.relayStatus, (status) => this.#onRelayStatus(status));
    }
    this.exited = new Promise<QemuExit>((resolve) => {
      child.once("exit", (code, signal) => {
        this.#exit = { code, signal };
        // Normally stdout and stderr close right away; a descendant holding them must not stall us.
        setTimeout(() => {
          child.stdout?.destroy();
          child.stderr?.destroy();
          (init.relayStatus as { destroy?: () => void } | undefined)?.destroy?.();
        }, STDIO_DRAIN_MS).unref();
      });
      child.once("close", (code, signal) => {
        this.#exit ??= { code, signal };
        live.delete(child);
        this.#state = "exited";
        this.console.close().then(
          () => resolve(this.#exit!),
          () => resolve(this.#exit!),
        );
      });
    });
    this.#finished = this.exited.then(() => this.#finish());

    const agentListener = init.agentListener;
    this.agentSocket = agentListener
      ? Promise.race([
          agentListener.connection,
          this.exited.then(() => {
            throw this.#error("VM_EXITED", "QEMU exited before it connected the agent channel");
          }),
        ])
      : Promise.reject(
          new SupermachineError("INVALID_ARGUMENT", "this VM was launched without an agent channel"),
        );
    this.agentSocket.then(
      (socket) => {
        this.#agent = socket;
      },
      () => {},
    );
    const mountListener = init.mountListener;
    this.mountSocket = mountListener
      ? Promise.race([
          mountListener.connection,
          this.exited.then(() => {
            throw this.#error("VM_EXITED", "QEMU exited before it connected the mounts channel");
          }),
        ])
      : Promise.reject(
          new SupermachineError("INVALID_ARGUMENT", "this VM was launched without a mounts channel"),
        );
    this.mountSocket.then(
      (socket) => {
        this.#mounts = socket;
      },
      () => {},
    );
  }

  /**
   * Start QEMU for `options.machine` and resolve once its QMP connection is ready. Fails with
   * `VMM_FAILED` (carrying QEMU's stderr and the console log path) when QEMU exits or does not
   * connect in time, `ABORTED` on `signal`.
   */
  static async launch(options: LaunchOptions): Promise<QemuProcess> {
    assertHostSupported();
    const { signal } = options;
    throwIfAborted(signal);
    const startedAt = performance.now();
    const root = options.runtimeDir ?? runtimeRoot();
    const qemuPath = options.qemuPath ?? (await findQemu());
    const sandbox = options.machine.sandbox ?? "strict";
    const [sandboxSupported, tools] = await Promise.all([
      sandbox === "off" ? Promise.resolve(true) : qemuSupportsSandbox(qemuPath),
      confinementTools(),
      options.sweep === false ? undefined : sweepOnce(root),
    ]);
    if (!sandboxSupported) {
      throw new SupermachineError(
        "HOST_UNSUPPORTED",
        `${qemuPath} cannot run with its seccomp sandbox (-sandbox; built without seccomp, or the kernel refuses it): use a QEMU with seccomp, or opt out explicitly with sandbox "off"`,
      );
    }
    throwIfAborted(signal);

    if (options.netRelay !== undefined) {
      // Once per process: a host without user namespaces fails here, with the fix, not mid-launch.
      const why = await probeNetRelay({
        path: options.netRelay.path,
        identity: vmQemuIdentity(RELAY_PROBE_ID),
      });
      if (why !== undefined) throw relayUnsupported(why);
      throwIfAborted(signal);
    }

    const dir = await VmStateDir.create({ root, ...(options.id === undefined ? {} : { id: options.id }) });
    const identity = vmQemuIdentity(dir.id);
    const listeners: Listener[] = [];
    let consoleLog: ConsoleLog | undefined;
    let files: QemuFiles<LaunchMachineSpec> | undefined;
    let child: ChildProcess;
    let args: string[];
    let agentListener: Listener | undefined;
    let mountListener: Listener | undefined;
    let relayHandle: Awaited<ReturnType<typeof open>> | undefined;
    let relayStatus: NodeJS.ReadableStream | undefined;
    try {
      const prepared =
        options.prepare === undefined
          ? undefined
          : await options.prepare(dir.path, { signal, diskDir: dir.diskDir });
      const machine: LaunchMachineSpec = {
        ...options.machine,
        ...prepared,
        ...(options.incomingStatePath === undefined ? {} : { incoming: "defer" as const, paused: true }),
      };
      const tscKHz = machine.tscKHz ?? (machine.accel === "tcg" ? hostTscKHz() : undefined);
      const selfUid = process.getuid?.() ?? 0;
      files = await openQemuFiles(machine, options.incomingStatePath);
      if (machine.memory?.kind === "file") await grantMemoryFile(machine.memory.path, identity, selfUid);
      throwIfAborted(signal);
      const withMounts = options.agent !== false && options.mounts !== false;
      const [qmpListening, agentListening, consoleOpened, mountListening] = await Promise.allSettled([
        listenUnix(dir.qmpSocketPath),
        options.agent === false ? undefined : listenUnix(dir.agentSocketPath, { reads: true }),
        ConsoleLog.open(dir.consoleLogPath, {
          ...(options.consoleLogMaxBytes === undefined ? {} : { maxBytes: options.consoleLogMaxBytes }),
        }),
        withMounts ? listenUnix(dir.mountSocketPath) : undefined,
      ]);
      // Record what succeeded first, so that the catch below releases it.
      if (qmpListening.status === "fulfilled") listeners.push(qmpListening.value);
      if (agentListening.status === "fulfilled" && agentListening.value !== undefined) {
        agentListener = agentListening.value;
        listeners.push(agentListener);
      }
      if (consoleOpened.status === "fulfilled") consoleLog = consoleOpened.value;
      if (mountListening.status === "fulfilled" && mountListening.value !== undefined) {
        mountListener = mountListening.value;
        listeners.push(mountListener);
      }
      for (const result of [qmpListening, agentListening, consoleOpened, mountListening]) {
        if (result.status === "rejected") throw result.reason;
      }
      // The channels are sockets already connected to the host, inherited after the files.
      const socketFd = (listener: Listener) => FIRST_FD + files!.fds.length + listeners.indexOf(listener);
      args = buildQemuArgs({
        ...files.machine,
        addFds: files.addFds,
        ...(tscKHz === undefined ? {} : { tscKHz }),
        sandbox,
        name: qemuName(dir.id),
        qmpFd: socketFd(listeners[0]!),
        ...(agentListener === undefined ? {} : { agentFd: socketFd(agentListener) }),
        ...(mountListener === undefined ? {} : { mountFd: socketFd(mountListener) }),
      });
      throwIfAborted(signal);
      const inherited: (number | Socket | "pipe")[] = [
        ...files.fds,
        ...listeners.map((listener) => listener.qemuEnd),
      ];
      let program = [qemuPath, ...args];
      if (options.netRelay !== undefined) {
        // After QEMU's own descriptors: the relay's status socket, then the relay binary itself.
        relayHandle = await open(options.netRelay.path, "r");
        const statusFd = FIRST_FD + inherited.length;
        inherited.push("pipe", relayHandle.fd);
        program = [
          ...relayArgs({ exeFd: statusFd + 1, statusFd, rules: options.netRelay.rules }),
          "--",
          ...program,
        ];
      }
      child = await spawnQemu(
        confinedCommand(tools, program, identity, qemuLimits(machine.memoryMiB)),
        inherited,
      );
      if (options.netRelay !== undefined) {
        relayStatus = child.stdio[FIRST_FD + files.fds.length + listeners.length] as NodeJS.ReadableStream;
      }
      files.close();
      await relayHandle?.close();
      for (const listener of listeners) listener.qemuEnd.destroy();
    } catch (error) {
      files?.close();
      await relayHandle?.close();
      for (const listener of listeners) listener.qemuEnd.destroy();
      for (const listener of listeners) listener.server.close();
      await consoleLog?.close();
      await dir.finish({ keep: false, exit: { exitCode: null, signal: null, reason: "failed" } });
      throw error;
    }
    dir.recordQemu(child.pid!);
    live.add(child);
    installExitHook();

    const qemu = new QemuProcess({
      child,
      dir,
      args,
      console: consoleLog!,
      listeners,
      agentListener,
      identity,
      mountListener,
      relayStatus,
    });
    try {
      await qemu.#connectQmp(listeners[0]!.connection, {
        timeoutMs: options.timeoutMs ?? DEFAULT_LAUNCH_TIMEOUT_MS,
        signal,
      });
    } catch (error) {
      if (error instanceof AbortError) qemu.#requested = true;
      else qemu.#failed = true;
      qemu.#killGroup();
      await qemu.#finished;
      throw error instanceof VmError && error.code === "VM_EXITED" ? qemu.#startupError() : error;
    }
    qemu.#state = "running";
    publish("vmm:launch", { id: qemu.id, pid: qemu.pid, args, durationMs: performance.now() - startedAt });
    return qemu;
  }

  /** The QMP connection. */
  get qmp(): QmpClient {
    if (this.#qmp === undefined) throw new VmError("VM_STOPPED", "QMP is not connected yet");
    return this.#qmp;
  }

  get state(): QemuState {
    return this.#state;
  }

  /** How QEMU ended, once it has. */
  get exitInfo(): QemuExit | undefined {
    return this.#exit;
  }

  /** The last lines QEMU wrote to stderr (at most 8 KiB). */
  get stderrTail(): string {
    return this.#stderr;
  }

  /** Stop the vCPUs (QMP `stop`). */
  async pause(): Promise<void> {
    await this.qmp.execute("stop");
  }

  /** Run the vCPUs (QMP `cont`). */
  async resume(): Promise<void> {
    await this.qmp.execute("cont");
  }

  /**
   * Save the paused VM's state into `path` (created 0600; must not exist). With `ignoreShared`
   * guest RAM, which lives in a shared memory file, is left out. See migration.ts.
   */
  saveState(path: string, options: SaveStateOptions): Promise<void> {
    return saveState(this.#migrationTarget(), path, options);
  }

  /** Load the state of `LaunchOptions.incomingStatePath`; the vCPUs stay stopped. */
  loadState(options: LoadStateOptions): Promise<void> {
    return loadState(this.#migrationTarget(), options);
  }

  /** Rejects with `VM_EXITED` once QEMU exits: race it against waits on the guest. */
  exitedError(what: string): Promise<never> {
    return this.exited.then(() => {
      throw this.#error("VM_EXITED", `VM ${this.id} exited during ${what}`);
    });
  }

  #migrationTarget(): MigrationTarget {
    const self = this;
    return {
      qmp: this.qmp,
      socketDir: (use) => migrationSocketDir(this.stateDir, this.#identity, use),
      consoleLogPath: this.consoleLogPath,
      get stderrTail() {
        return self.#stderr;
      },
      exitedError: (what) => this.exitedError(what),
    };
  }

  /**
   * Stop QEMU: QMP `quit`, SIGTERM after `timeoutMs`, SIGKILL 2 s later; then close the sockets and
   * remove the VM's dir (unless `keepStateDir`, or QEMU had already failed). Idempotent: every
   * call returns the same promise.
   */
  stop(options: StopOptions = {}): Promise<void> {
    if (options.keepStateDir === true) this.#keepStateDir = true;
    this.#stopping ??= this.#stop(options.timeoutMs ?? DEFAULT_STOP_TIMEOUT_MS);
    return this.#stopping;
  }

  /**
   * SIGKILL QEMU now, then clean up like `stop()`. Resolves when done. With `failed`, the host ends
   * QEMU because the VM failed (its agent channel ended or broke the protocol): the dir is kept as
   * a failure, like when QEMU exits unasked, so the error's console log path stays valid. (A QEMU
   * killed from outside closes its sockets before the host sees it exit: without `failed`, the
   * host's own kill would count as asking.)
   */
  kill(options: { failed?: boolean } = {}): Promise<void> {
    if (this.#exit === undefined) {
      if (options.failed === true) this.#failed = true;
      else if (!this.#failed) this.#requested = true;
      this.#killGroup();
    }
    return this.#finished;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop();
  }

  async #stop(timeoutMs: number): Promise<void> {
    if (this.#exit === undefined) {
      this.#requested = true;
      const exited = this.exited.then(() => true);
      this.#qmp?.execute("quit").catch(() => {});
      if (!(await raceTimeout(exited, timeoutMs))) {
        debug("qemu %s ignored quit for %d ms: SIGTERM", this.id, timeoutMs);
        this.#child.kill("SIGTERM");
        if (!(await raceTimeout(exited, SIGTERM_GRACE_MS))) {
          this.#killGroup();
        }
      }
    }
    await this.#finished;
  }

  async #connectQmp(
    connection: Promise<Socket>,
    options: { timeoutMs: number; signal: AbortSignal | undefined },
  ): Promise<void> {
    const stopWaiting = new AbortController();
    let timer: NodeJS.Timeout | undefined;
    let onAbort: (() => void) | undefined;
    const failure = new Promise<never>((_, reject) => {
      this.exited.then(() => reject(this.#error("VM_EXITED", "QEMU exited")));
      timer = setTimeout(
        () => reject(this.#error("VMM_FAILED", `QEMU did not connect QMP within ${options.timeoutMs} ms`)),
        options.timeoutMs,
      );
      onAbort = () => reject(new AbortError("VM launch aborted", { cause: options.signal?.reason }));
      if (options.signal?.aborted) onAbort();
      options.signal?.addEventListener("abort", onAbort, { once: true });
    });
    failure.catch(() => {});
    failure.catch(() => stopWaiting.abort());
    try {
      const socket = await Promise.race([connection, failure]);
      this.#qmp = await Promise.race([
        QmpClient.fromSocket(socket, {
          signal: stopWaiting.signal,
          timeoutMs: options.timeoutMs,
          errorFields: () => ({
            consoleLogPath: this.consoleLogPath,
            qemuExitCode: this.#exit?.code ?? undefined,
          }),
        }),
        failure,
      ]);
    } finally {
      clearTimeout(timer);
      if (onAbort !== undefined) options.signal?.removeEventListener("abort", onAbort);
    }
  }

  /**
   * SIGKILL the child's process group: QEMU, and with a network relay the relay too, at once (the
   * child leads its group: it was spawned detached).
   */
  #killGroup(): void {
    killGroup(this.#child);
  }

  #onRelayStatus(status: RelayStatus): void {
    switch (status.kind) {
      case "ready":
        debug("qemu %s: the network relay is ready", this.id);
        break;
      case "deny":
        publish("net:deny", { id: this.id, address: status.address, port: status.port });
        break;
      case "fail":
        publish("net:connect-failed", {
          id: this.id,
          address: status.address,
          port: status.port,
          reason: status.reason,
        });
        break;
      case "suppressed":
        publish("net:suppressed", { id: this.id, count: status.count });
        break;
      case "error":
        this.#relayError ??= status.message;
        break;
    }
  }

  #startupError(): SupermachineError {
    const relayError = this.#relayError;
    // The namespace could not be built. (A failed exec is QEMU's own problem, below; a usage
    // error is a bug of ours: both keep the generic error, which carries the relay's stderr.)
    if (relayError !== undefined && !/^(exec|usage) /.test(relayError)) return relayUnsupported(relayError);
    const exit = this.#exit;
    const how = exit?.signal ? `was killed by ${exit.signal}` : `exited with code ${exit?.code}`;
    const stderr = this.#stderr.trim();
    return this.#error(
      "VMM_FAILED",
      `QEMU ${how} during startup${stderr === "" ? "" : `: ${stderr.split("\n").slice(-10).join("\n")}`}`,
    );
  }

  #error(code: "VMM_FAILED" | "VM_EXITED", message: string): VmError {
    return new VmError(code, `${message} (console log: ${this.consoleLogPath})`, {
      consoleLogPath: this.consoleLogPath,
      qemuExitCode: this.#exit?.code ?? undefined,
    });
  }

  /** After exit: close every socket and remove or keep the dir. Runs once. */
  async #finish(): Promise<void> {
    this.#qmp?.close(this.#error("VM_EXITED", "QEMU has exited"));
    this.#agent?.destroy();
    this.#mounts?.destroy();
    for (const listener of this.#listeners) listener.server.close();
    const failed = this.#failed || !this.#requested;
    const keep = failed || this.#keepStateDir;
    const exit = this.#exit!;
    try {
      await this.#dir.finish({
        keep,
        exit: { exitCode: exit.code, signal: exit.signal, reason: failed ? "failed" : "kept" },
      });
    } catch (error) {
      debug("qemu %s: cleaning up %s failed: %s", this.id, this.stateDir, error);
    }
    publish("vmm:exit", {
      id: this.id,
      pid: this.pid,
      code: exit.code,
      signal: exit.signal,
      requested: this.#requested,
      consoleLogPath: keep ? this.consoleLogPath : undefined,
    });
  }
}

function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw new AbortError("VM launch aborted", { cause: signal.reason });
}

/** A channel to QEMU: a connected socket pair, made through a unix socket in the VM's private dir. */
interface Listener {
  path: string;
  server: Server;
  /** The host's end (resolved at once: the pair is connected before QEMU starts). */
  connection: Promise<Socket>;
  /** QEMU's end, inherited by QEMU as a descriptor and closed here once it started. */
  qemuEnd: Socket;
}

/**
 * A connected socket pair (Node has no `socketpair()`): listen on `path`, connect to it, accept,
 * remove the path. QEMU gets the accepted end as an inherited descriptor (`-chardev socket,fd=N`),
 * so it needs no path to the host's dirs. With `reads`, the host's end is read without Node's stream
 * machinery (`SocketReads`: the agent channel).
 */
async function listenUnix(path: string, opts: { reads?: boolean } = {}): Promise<Listener> {
  const server = createServer();
  server.maxConnections = 1;
  const accepted = new Promise<Socket>((resolve) => {
    server.once("connection", (socket) => {
      socket.on("error", (error) => debug("QEMU's end of %s: %s", path, error.message));
      server.close();
      resolve(socket);
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen({ path, backlog: 1 }, () => {
      server.off("error", reject);
      server.on("error", (error) => debug("listener %s: %s", path, error.message));
      resolve();
    });
  });
  const host = opts.reads ? SocketReads.connect(path).socket : connect(path);
  host.on("error", (error) => debug("connection on %s: %s", path, error.message));
  await new Promise<void>((resolve, reject) => {
    host.once("connect", resolve);
    host.once("error", reject);
  });
  const qemuEnd = await accepted;
  // The path is no longer needed once connected (a sync unlink: a request through the thread pool
  // would cost more than the call).
  rmSync(path, { force: true });
  return { path, server, connection: Promise.resolve(host), qemuEnd };
}

/** Starts the confined command with an empty environment and `inherited` as its fds 3, 4, … */
async function spawnQemu(
  confined: { command: string; argv: string[] },
  inherited: readonly (number | Socket | "pipe")[],
): Promise<ChildProcess> {
  const child = spawn(confined.command, confined.argv, {
    stdio: ["ignore", "pipe", "pipe", ...inherited],
    env: {},
    // Own session: terminal signals go to the host only; the host decides how QEMU ends.
    detached: true,
  });
  return await new Promise((resolve, reject) => {
    child.once("spawn", () => resolve(child));
    child.once("error", (error) => {
      const notFound = (error as NodeJS.ErrnoException).code === "ENOENT";
      const message = `cannot start ${confined.command}: ${error.message}`;
      reject(
        notFound
          ? new SupermachineError("HOST_UNSUPPORTED", `${message} (install util-linux)`, { cause: error })
          : new VmError("VMM_FAILED", message, {}, { cause: error }),
      );
    });
  });
}

/** Sweeps a runtime root once per process. */
const sweepOnce: (root: string) => Promise<SweepResult | undefined> = memoize((root) =>
  sweepStaleVms({ root }).then(
    (result) => {
      publish("vmm:sweep", { root, ...result });
      return result;
    },
    (error: unknown) => {
      debug("sweeping %s failed: %s", root, error);
      return undefined;
    },
  ),
);

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on("exit", () => {
    for (const child of live) killGroup(child);
  });
}

/** SIGKILL a spawned (detached, so group-leading) child and its process group. */
function killGroup(child: ChildProcess): void {
  try {
    if (child.pid !== undefined) process.kill(-child.pid, "SIGKILL");
  } catch {
    child.kill("SIGKILL");
  }
}

/** The VM id whose QEMU identity probes the relay (any per-VM uid would do; one id keeps it once per process). */
const RELAY_PROBE_ID = "sm-net-probe";

/** True if `promise` settles within `ms`. */
async function raceTimeout(promise: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<false>((resolve) => {
    timer = setTimeout(() => resolve(false), ms);
  });
  try {
    return (await Promise.race([promise.then(() => true as const), timeout])) === true;
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Runs `use` with a dir for a migration socket QEMU connects to by path: the VM's own dir when
 * QEMU runs as this user, else a fresh dir under /tmp (traversable by everyone, unlistable) with
 * the socket given to QEMU's user alone; removed afterwards.
 */
async function migrationSocketDir<T>(
  stateDir: string,
  identity: QemuIdentity,
  use: (dir: string, grant: (socketPath: string) => Promise<void>) => Promise<T>,
): Promise<T> {
  if (identity.uid === (process.getuid?.() ?? 0)) return use(stateDir, async () => {});
  const dir = await mkdtemp("/tmp/supermachine-migrate-");
  try {
    await chmod(dir, 0o711);
    return await use(dir, async (socketPath) => {
      await chown(socketPath, identity.uid, identity.gid);
      await chmod(socketPath, 0o600);
    });
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
