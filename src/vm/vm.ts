/**
 * A running microVM and its life cycle: `running` from the moment the agent answered until it is
 * `stopped` (by `stop()`, `kill()`, its QEMU dying, or the guest breaking the protocol).
 */

import type { Duplex, Readable } from "node:stream";
import type {
  AgentCallOptions,
  AgentClient,
  ConnectTcpOptions,
  WorkloadLogsOptions,
  WorkloadStatus,
  WriteFileOptions,
  WriteFileSource,
} from "../agent/index.ts";
import { type ExecOutcome, SupermachineError, VmError } from "../errors.ts";
import { debug, publish, typedErrors } from "../internal/index.ts";
import type { Snapshot } from "../snapshot/index.ts";
import type { LaunchMachineSpec } from "../vmm/index.ts";
import { type BootOptions, bootVm } from "./boot.ts";
import { checkArgv, checkExecOptions, type ExecOptions, runExec, spawnExec } from "./exec.ts";
import { type ExecBuilder, execBuilder } from "./exec-builder.ts";
import type { ExecHandle, ExecTarget } from "./exec-handle.ts";
import { type GuestFileSystem, guestFileSystem } from "./fs.ts";
import { type MountSpec, type VmMount, VmMounts } from "./mounts.ts";
import { EXPOSED_CONNECT_TIMEOUT_MS, type ExposedPort, type ExposeTcpOptions, exposeTcp } from "./ports.ts";
import { activateRestore, activateWarm, type LaunchedRestore, launchRestore, warmUp } from "./restore.ts";
import { saveSnapshot } from "./save-snapshot.ts";
import {
  DEFAULT_BOOT_TIMEOUT_MS,
  type PrestartConfig,
  type RestoreConfig,
  type VmConfig,
  type VmTimings,
} from "./vm-config.ts";
import { type VmParts, withConsoleLog } from "./vm-parts.ts";

/** `running` once the agent answered, `stopped` for good. */
export type VmState = "running" | "stopped";

/** A file read from the guest: its metadata, and its bytes as a stream. */
export interface GuestFileStream {
  /** Size in bytes when the read started. */
  readonly size: number;
  /** The full `st_mode`. */
  readonly mode: number;
  readonly uid: number;
  readonly gid: number;
  readonly stream: Readable;
}

const SHUTDOWN_TIMEOUT_MS = 5_000;

/** What the rest of the library may do with a Vm that users cannot (set by the class's static block). */
let internals: {
  make(parts: VmParts): Vm;
  saveBaked(vm: Vm, statePath: string, signal: AbortSignal | undefined): Promise<void>;
  parts(vm: Vm): VmParts;
  withMounts(vm: Vm, mounts: readonly MountSpec[] | undefined): Promise<Vm>;
};

/**
 * A running microVM: a QEMU process, the guest agent it boots, and the host side of their channel.
 * Create with {@link Vm.start} (or `image.start()`); end with {@link Vm.stop} (graceful),
 * {@link Vm.kill} (forced) or `await using`.
 */
export class Vm {
  /** The VM's id (also the name of its runtime dir). */
  readonly id: string;
  /** `kvm` or `tcg` (software emulation: slower, and not hardware isolation). */
  readonly accelerator: "kvm" | "tcg";
  /** How long each phase of the start took. */
  readonly timings: VmTimings;
  /** The guest's files, like `node:fs/promises` (`vm.fs.readdir(path, { withFileTypes: true })`). */
  readonly fs: GuestFileSystem;

  readonly #parts: VmParts;
  readonly #mounts: VmMounts;
  readonly #ports = new Set<ExposedPort>();
  readonly #target: ExecTarget;
  #state: VmState = "running";
  #stopping: Promise<void> | undefined;
  #failure: Error | undefined;
  #tainted = false;
  readonly #done: Promise<Error | undefined>;
  #resolveDone!: (error: Error | undefined) => void;

  static {
    internals = {
      make: (parts) => new Vm(parts),
      saveBaked: (vm, statePath, signal) => vm.#saveBaked(statePath, signal),
      parts: (vm) => vm.#parts,
      withMounts: (vm, mounts) => vm.#withMounts(mounts),
    };
  }

  private constructor(parts: VmParts) {
    this.#parts = parts;
    const { qemu, agent } = parts;
    this.#mounts = new VmMounts(qemu);
    this.fs = guestFileSystem(() => this.#agent());
    this.id = qemu.id;
    this.accelerator = parts.accelerator;
    this.timings = parts.timings;
    this.#done = new Promise((resolve) => {
      this.#resolveDone = resolve;
    });
    this.#target = {
      agent: () => this.#agent(),
      defaults: () => parts.defaults,
      onExecTimedOut: () => {
        this.#tainted = true;
      },
      describe: () => `VM ${this.id} (console log: ${this.consoleLogPath})`,
    };

    // QEMU gone: every pending and future operation fails with VM_EXITED.
    void qemu.exited.then((exit) => {
      if (this.#stopping === undefined) {
        this.#fail(
          new VmError(
            "VM_EXITED",
            `VM ${this.id} exited unexpectedly (console log: ${this.consoleLogPath})`,
            {
              consoleLogPath: this.consoleLogPath,
              qemuExitCode: exit.code ?? undefined,
            },
          ),
        );
      }
    });
    // The agent channel ended (QEMU is going: its socket closes before the host sees it exit) or
    // the guest broke the protocol (it is not trusted any more): the VM goes, as a failure, so its
    // console log is kept.
    void agent.closed.then((error) => {
      if (error !== undefined && this.#stopping === undefined) {
        this.#fail(withConsoleLog(error, this.consoleLogPath) as Error);
        void qemu.kill({ failed: true });
      }
    });
    agent.onWorkloadExit((status) => publish("vm:workload-exit", { id: this.id, status }));
    publish("vm:start", {
      id: this.id,
      accelerator: this.accelerator,
      timings: this.timings,
      ...(parts.source === undefined ? {} : { snapshot: parts.source.dir }),
    });
  }

  /** Boot a VM from `config.rootfs` and wait until its agent answers. */
  static async start(config: VmConfig): Promise<Vm> {
    const vm = new Vm(await typedErrors("VMM_FAILED", "starting a VM", () => bootVm(config)));
    return vm.#withMounts(config.mounts);
  }

  /**
   * A new VM restored from `snapshot`: its own QEMU mapping the snapshot's memory copy-on-write,
   * its own disk overlay on the snapshot's disk state, a new agent session (new epoch, the host's
   * time, fresh entropy) before the guest runs. The snapshot's files are never written.
   */
  static async restore(snapshot: Snapshot, config: RestoreConfig = {}): Promise<Vm> {
    const started = performance.now();
    const vm = await typedErrors("VMM_FAILED", `restoring ${snapshot.dir}`, async () => {
      const launched = await launchRestore(snapshot, config);
      return new Vm(await activateRestore(launched, config, started));
    });
    return vm.#withMounts(config.mounts);
  }

  /**
   * Start QEMU for `snapshot` ahead of time, for pools. By default (`warm`) the state is loaded,
   * the guest runs one `true` through its agent (so the emulator has translated the hot paths)
   * and is paused: {@link PrestartedVm.activate} resumes it and opens a new agent session. With
   * `warm: false` QEMU waits for its state instead, and `activate()` loads it.
   */
  static async prestart(snapshot: Snapshot, config: PrestartConfig = {}): Promise<PrestartedVm> {
    const started = performance.now();
    return typedErrors("VMM_FAILED", `pre-starting ${snapshot.dir}`, async () => {
      const launched = await launchRestore(snapshot, config);
      const agent = config.warm === false ? undefined : await warmUp(launched, config);
      return makePrestarted(launched, config, performance.now() - started, agent);
    });
  }

  /** `running` until stopped or dead. */
  get state(): VmState {
    return this.#state;
  }

  /** The guest's serial console log on the host (kept, bounded, when the VM fails). */
  get consoleLogPath(): string {
    return this.#parts.qemu.consoleLogPath;
  }

  /**
   * Settles when the VM is over: `undefined` after `stop()`/`kill()`, the error when it died
   * (`VM_EXITED`) or broke the protocol (`AGENT_PROTOCOL`). Never rejects.
   */
  get done(): Promise<Error | undefined> {
    return this.#done;
  }

  /**
   * True once something happened that makes the guest's state untrustworthy for reuse: an exec
   * timed out and was killed, a call waited on the guest agent past its deadline
   * (`AGENT_TIMEOUT`: the guest stopped answering, or is too busy to), or the VM failed. Pools
   * discard tainted VMs.
   */
  get tainted(): boolean {
    return (
      this.#tainted || this.#parts.agent.timedOut || this.#failure !== undefined || this.#state !== "running"
    );
  }

  /** The guest agent's name and version. */
  get agentVersion(): string {
    return this.#parts.agent.agentVersion;
  }

  /** A builder for one command: set argv, env, ... then `output()` or `spawn()`. */
  execBuilder(): ExecBuilder {
    return execBuilder(this.#target);
  }

  /**
   * Run `argv` and collect its output. Rejects with `ExecError` on a non-zero exit or a signal and
   * `ExecTimeoutError` on a timeout, unless `reject: false`; with `ExecStartError` when it cannot
   * start, `OutputLimitError`, `AbortError`, or a `VmError` when the VM fails.
   */
  async exec(argv: readonly string[], options: ExecOptions = {}): Promise<ExecOutcome> {
    return runExec(this.#target, checkArgv(argv), checkExecOptions(options));
  }

  /** Start `argv` and resolve once it runs: stream its output, write its stdin, wait for its exit. */
  async spawn(argv: readonly string[], options: ExecOptions = {}): Promise<ExecHandle> {
    return spawnExec(this.#target, checkArgv(argv), checkExecOptions(options));
  }

  /** Write `data` to `path` in the guest (streamed; any size; atomically replaced, or in place where `path` is a mount point such as `/etc/hosts`). Default mode 0644. */
  async writeFile(path: string, data: WriteFileSource, options: WriteFileOptions = {}): Promise<void> {
    const agent = this.#agent();
    return typedErrors("STORE_ERROR", `writing ${path} in VM ${this.id}`, () =>
      agent.writeFile(path, data, options),
    );
  }

  /** Read the whole file at `path` in the guest. */
  async readFile(path: string, options: { signal?: AbortSignal } = {}): Promise<Uint8Array> {
    return this.#agent().readFileBytes(path, options);
  }

  /** Stream the file at `path` in the guest, with its size and mode. */
  async readFileStream(path: string, options: { signal?: AbortSignal } = {}): Promise<GuestFileStream> {
    return this.#agent().readFile(path, options);
  }

  /** Round trip to the guest agent, in milliseconds. */
  async ping(): Promise<number> {
    return this.#agent().ping();
  }

  /**
   * A connection to `port` inside the guest (`127.0.0.1` by default), tunnelled over the agent
   * channel: works without a network device, after restores, under every network policy.
   * Backpressure and half-close both ways; a refused port rejects with `GuestIoError`
   * `ECONNREFUSED`.
   */
  async connect(port: number, options: ConnectTcpOptions = {}): Promise<Duplex> {
    return this.#agent().connectTcp(port, options);
  }

  /**
   * Listens on the host (`127.0.0.1` unless `host` says otherwise; `hostPort` 0 picks a free port,
   * see `.hostPort`) and carries every connection to `guestPort` through {@link connect}. Closed
   * by `close()`, `await using`, or the VM's end.
   */
  async exposeTcp(hostPort: number, guestPort: number, options: ExposeTcpOptions = {}): Promise<ExposedPort> {
    this.#agent();
    const connect = (port: number) => this.connect(port, { timeoutMs: EXPOSED_CONNECT_TIMEOUT_MS });
    const exposed = await exposeTcp(connect, hostPort, guestPort, {
      ...options,
      vmId: this.id,
    });
    this.#ports.add(exposed);
    const close = exposed.close;
    exposed.close = () => {
      this.#ports.delete(exposed);
      return close();
    };
    return exposed;
  }

  /** Mounts a host directory in the guest, live (docs/mounts.md). */
  async mount(spec: MountSpec, options: { signal?: AbortSignal; timeoutMs?: number } = {}): Promise<VmMount> {
    this.#agent();
    return this.#mounts.mount(spec, options);
  }

  /** Unmounts the host directory mounted at `guestPath`. */
  async unmount(guestPath: string): Promise<void> {
    this.#agent();
    return this.#mounts.unmount(guestPath);
  }

  /** The host directories mounted now. */
  get mounts(): readonly VmMount[] {
    return this.#mounts.list;
  }

  /**
   * Starts the VM's workload: a long-lived process (an image's Entrypoint + Cmd) that belongs to
   * the VM rather than to one call - it survives restores of a snapshot taken while it runs, its
   * output is kept (bounded) in the guest for {@link workloadLogs}, and its exit is reported. One
   * at a time.
   */
  async startWorkload(
    argv: readonly string[],
    options: { env?: Record<string, string>; cwd?: string; user?: string } & AgentCallOptions = {},
  ): Promise<WorkloadStatus> {
    const { env, cwd, user, ...call } = options;
    const d = this.#parts.defaults;
    return this.#agent().startWorkload(
      { argv: checkArgv([...argv]), env: { ...d.env, ...env }, cwd: cwd ?? d.cwd, user: user ?? d.user },
      call,
    );
  }

  /** Whether the workload runs, its pid, and how it ended. */
  async workloadStatus(options: AgentCallOptions = {}): Promise<WorkloadStatus> {
    return this.#agent().workloadStatus(options);
  }

  /** Sends `signal` (a name like `"SIGTERM"` or a number) to the workload's process group. */
  async workloadSignal(signal: string | number, options: AgentCallOptions = {}): Promise<void> {
    return this.#agent().signalWorkload(signal, options);
  }

  /** The workload's output the guest holds, and with `follow` what comes until it exits. */
  workloadLogs(options: WorkloadLogsOptions = {}): Readable {
    return this.#agent().workloadLogs(options);
  }

  /**
   * Save this running VM as a snapshot in `dir` (which must not exist yet) and keep it running.
   * The guest pauses for the time of one full RAM migration; the snapshot then restores like a
   * baked one. Its disk state is a copy of this VM's overlay, whose backing chain (the snapshot
   * this VM was restored from, or the image's root filesystem) is recorded in the manifest: those
   * files must stay in place. See docs/snapshots.md.
   */
  async snapshot(dir: string, options: { name?: string; signal?: AbortSignal } = {}): Promise<Snapshot> {
    const agent = this.#agent();
    // A snapshot never captures a mount: detach them, save, attach them again.
    const mounts = await this.#mounts.detachAll();
    let frozen = false;
    try {
      // The channel must be idle: a round trip drains what the guest had to say.
      await agent.ping();
      // Saved frozen: a clone's processes run again only after its HELLO (clock, RNG, names).
      await agent.freeze(true);
      frozen = true;
      return await typedErrors("STORE_ERROR", `saving VM ${this.id} as a snapshot in ${dir}`, () =>
        saveSnapshot(this.#parts, dir, options),
      );
    } finally {
      if (frozen && this.#state === "running") await agent.freeze(false);
      for (const spec of mounts) await this.#mounts.mount(spec);
    }
  }

  /**
   * Stop the VM: the agent ends every process and syncs the disks, then QEMU exits. Idempotent;
   * resolves when QEMU is gone and its runtime dir removed.
   */
  stop(): Promise<void> {
    this.#stopping ??= this.#stop();
    return this.#stopping;
  }

  /** Kill QEMU now. Idempotent. */
  async kill(): Promise<void> {
    this.#stopping ??= Promise.resolve();
    this.#state = "stopped";
    this.#closeEdges();
    this.#parts.agent.close(new VmError("VM_STOPPED", `VM ${this.id} was killed`));
    await this.#parts.qemu.kill();
    this.#resolveDone(this.#failure);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop();
  }

  async #saveBaked(statePath: string, signal: AbortSignal | undefined): Promise<void> {
    const { qemu, agent, machine } = this.#parts;
    await this.#mounts.detachAll();
    if (machine.memory?.kind !== "file" || !machine.memory.share) {
      throw new SupermachineError("INVALID_ARGUMENT", "only a VM booted for baking can be saved this way");
    }
    // The channel must be idle: a round trip drains what the guest had to say.
    await this.#agent().ping();
    // Saved frozen: a clone's processes run again only after its HELLO (clock, RNG, names).
    await this.#agent().freeze(true);
    this.#stopping ??= Promise.resolve();
    this.#state = "stopped";
    try {
      await qemu.pause();
      await qemu.saveState(statePath, { ignoreShared: true, ...(signal === undefined ? {} : { signal }) });
    } catch (error) {
      await this.kill();
      throw error;
    }
    agent.close(new VmError("VM_STOPPED", `VM ${this.id} was saved to a snapshot`));
    await qemu.stop({ timeoutMs: SHUTDOWN_TIMEOUT_MS });
    publish("vm:exit", { id: this.id });
    this.#resolveDone(this.#failure);
  }

  /** Mounts `mounts` on a new VM; a failure ends the VM. */
  async #withMounts(mounts: readonly MountSpec[] | undefined): Promise<Vm> {
    try {
      for (const spec of mounts ?? []) await this.#mounts.mount(spec);
    } catch (error) {
      await this.kill();
      throw error;
    }
    return this;
  }

  /** Ports and mounts end with the VM. */
  #closeEdges(): void {
    for (const port of [...this.#ports]) void port.close();
    this.#ports.clear();
    this.#mounts.close();
  }

  #agent(): AgentClient {
    if (this.#failure) throw this.#failure;
    if (this.#state === "stopped") throw new VmError("VM_STOPPED", `VM ${this.id} is stopped`);
    return this.#parts.agent;
  }

  async #stop(): Promise<void> {
    const { agent, qemu } = this.#parts;
    const wasRunning = this.#state === "running" && this.#failure === undefined;
    this.#state = "stopped";
    this.#closeEdges();
    if (wasRunning) {
      try {
        await agent.shutdown({ timeoutMs: SHUTDOWN_TIMEOUT_MS });
      } catch (error) {
        debug("VM %s: graceful shutdown failed: %s", this.id, (error as Error).message);
      }
    }
    agent.close(new VmError("VM_STOPPED", `VM ${this.id} is stopped`));
    await qemu.stop({ timeoutMs: SHUTDOWN_TIMEOUT_MS });
    publish("vm:exit", { id: this.id });
    this.#resolveDone(this.#failure);
  }

  #fail(error: Error): void {
    if (this.#failure) return;
    this.#failure = error;
    this.#state = "stopped";
    this.#closeEdges();
    this.#parts.agent.close(error);
    publish("vm:exit", { id: this.id, error });
    this.#resolveDone(error);
  }
}

/**
 * Boots a VM for a bake (guest RAM in a shared file, the disk overlay kept). Internal: used by
 * the image module, with {@link saveBakedVm}.
 */
export async function bootForBake(config: VmConfig, options: BootOptions): Promise<Vm> {
  return internals.make(await bootVm(config, options));
}

/**
 * Bake step: pause the guest, save its device state to `statePath` (RAM stays in the shared
 * memory file, `x-ignore-shared`), then end QEMU without shutting the guest down, so memory file,
 * device state and disk overlay describe the same instant. Internal: used by the image module.
 */
export function saveBakedVm(vm: Vm, statePath: string, signal?: AbortSignal): Promise<void> {
  return internals.saveBaked(vm, statePath, signal);
}

/** How QEMU was configured for `vm` (internal: bakes record it in the manifest). */
export function vmMachine(vm: Vm): Readonly<LaunchMachineSpec> {
  return internals.parts(vm).machine;
}

let makePrestarted: (
  launched: LaunchedRestore,
  config: RestoreConfig,
  prestartMs: number,
  agent: AgentClient | undefined,
) => PrestartedVm;

/**
 * A QEMU process started ahead of time for a snapshot, so that {@link activate} is fast:
 * pre-warmed and paused (default; see {@link Vm.prestart}) or waiting for its state. Activate it
 * once, or end it with {@link stop}/{@link kill}. Pools keep some ready.
 */
export class PrestartedVm {
  /** The QEMU's id (the Vm it becomes keeps it). */
  readonly id: string;
  /** How long the prestart took (QEMU started, overlay made, QMP ready; warm: restored, warmed, paused), in ms. */
  readonly prestartMs: number;
  /** True when pre-warmed and paused; false when QEMU waits for its state. */
  readonly warm: boolean;
  readonly #launched: LaunchedRestore;
  readonly #config: RestoreConfig;
  readonly #agent: AgentClient | undefined;
  #used = false;

  static {
    makePrestarted = (launched, config, prestartMs, agent) =>
      new PrestartedVm(launched, config, prestartMs, agent);
  }

  private constructor(
    launched: LaunchedRestore,
    config: RestoreConfig,
    prestartMs: number,
    agent: AgentClient | undefined,
  ) {
    this.#launched = launched;
    this.#config = config;
    this.#agent = agent;
    this.id = launched.qemu.id;
    this.prestartMs = prestartMs;
    this.warm = agent !== undefined;
  }

  /** False once activated or ended, or when its QEMU died (or its agent channel broke) while waiting. */
  get ready(): boolean {
    return !this.#used && this.#launched.qemu.state === "running" && this.#agent?.closedError === undefined;
  }

  /** Settles when the QEMU exits (for whatever reason). Never rejects. */
  get exited(): Promise<void> {
    return this.#launched.qemu.exited.then(() => undefined);
  }

  /**
   * Make the running VM: warm, resume the vCPUs and open a new agent session (the guest clock is
   * stepped to the host's, fresh entropy reseeds its RNG); otherwise load the state first. Once only.
   */
  async activate(options: { signal?: AbortSignal; bootTimeoutMs?: number } = {}): Promise<Vm> {
    if (this.#used)
      throw new SupermachineError("INVALID_ARGUMENT", `prestarted VM ${this.id} was already used`);
    this.#used = true;
    const qemu = this.#launched.qemu;
    if (qemu.state !== "running" || this.#agent?.closedError !== undefined) {
      this.#agent?.close();
      await qemu.kill();
      throw new VmError(
        "VM_EXITED",
        `prestarted VM ${this.id} exited while waiting (console log: ${qemu.consoleLogPath})`,
        {
          consoleLogPath: qemu.consoleLogPath,
        },
      );
    }
    const config = {
      ...this.#config,
      ...options,
      bootTimeoutMs: options.bootTimeoutMs ?? this.#config.bootTimeoutMs ?? DEFAULT_BOOT_TIMEOUT_MS,
    };
    const agent = this.#agent;
    const parts = await typedErrors("VMM_FAILED", `activating prestarted VM ${this.id}`, () =>
      agent === undefined
        ? activateRestore(this.#launched, config, performance.now(), this.prestartMs)
        : activateWarm(this.#launched, agent, config, this.prestartMs),
    );
    return internals.withMounts(internals.make(parts), config.mounts);
  }

  /** End the QEMU (if not activated) and remove its files. Idempotent. */
  async stop(): Promise<void> {
    await this.kill();
  }

  /** End the QEMU now (if not activated) and remove its files. Idempotent. */
  async kill(): Promise<void> {
    if (this.#used) return;
    this.#used = true;
    this.#agent?.close();
    await this.#launched.qemu.kill();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop();
  }
}
