import { createWriteStream } from "node:fs";
import { open } from "node:fs/promises";
import { createServer } from "node:net";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { pipeline } from "node:stream/promises";
import { AgentClient, type WriteFileOptions, type WriteFileSource } from "../agent/agent-client.ts";
import { SupermachineError, VmError } from "../errors.ts";
import { throwIfAborted } from "../internal/abort.ts";
import { debug, publish } from "../internal/diagnostics.ts";
import type { Snapshot } from "../snapshot/snapshot.ts";
import { type AcceleratorChoice, detectAccelerator, hostTscKHz } from "../vmm/accelerator.ts";
import { resolveAssetPaths } from "../vmm/asset-paths.ts";
import { createDiskOverlay } from "../vmm/disk-overlay.ts";
import type { GuestMemory } from "../vmm/qemu-args.ts";
import { type LaunchMachineSpec, QemuProcess } from "../vmm/qemu-process.ts";
import { ExecBuilder, type ExecDefaults, type ExecTarget } from "./exec-builder.ts";
import type { ExecOutcome } from "./exec-outcome.ts";
import { resolveRootfs } from "./rootfs-source.ts";
import {
  DEFAULT_BOOT_TIMEOUT_MS,
  DEFAULT_MEMORY_MIB,
  DEFAULT_VCPUS,
  type VmConfig,
  type VmTimings,
} from "./vm-config.ts";

/** `created` while starting, `running` once the agent answered, `stopped` for good. */
export type VmState = "created" | "running" | "stopped";

const DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/** Kernel arguments of every VM, before `VmConfig.kernelArgs`. */
const BOOT_KERNEL_ARGS = ["quiet", "sm.root=/dev/vda", "sm.rootfstype=ext4"];
/** Migration capabilities of saving and restoring: RAM in a shared file is not copied; MIGRATION events. */
const MIGRATION_CAPABILITIES = {
  capabilities: [
    { capability: "x-ignore-shared", state: true },
    { capability: "events", state: true },
  ],
};

/** What `Vm.restore`/`Vm.prestart` accept: exec defaults and limits (the machine is the snapshot's). */
export interface RestoreConfig {
  /** Must equal the snapshot's if given. */
  memoryMiB?: number;
  /** Must equal the snapshot's if given. */
  vcpus?: number;
  /** Environment of every exec (merged over the snapshot's). */
  env?: Record<string, string>;
  cwd?: string;
  user?: string;
  /** Time allowed from the state load to the agent's answer. Default 60 000 ms. */
  bootTimeoutMs?: number;
  signal?: AbortSignal;
}

/** What `Vm.prestart` accepts. */
export interface PrestartConfig extends RestoreConfig {
  /**
   * Default true: restore, warm up and pause now, so `activate()` only resumes the guest and
   * starts a new agent session. False: only start QEMU; `activate()` loads the state.
   */
  warm?: boolean;
}

interface VmInit {
  qemu: QemuProcess;
  agent: AgentClient;
  accelerator: "kvm" | "tcg";
  defaults: ExecDefaults;
  timings: VmTimings;
  machine: LaunchMachineSpec;
  overlayPath: string;
  source?: Snapshot | undefined;
}
const SHUTDOWN_TIMEOUT_MS = 5_000;

let acceleratorChoice: Promise<AcceleratorChoice> | undefined;

/** The accelerator VMs of this process use (KVM when `/dev/kvm` is usable, else TCG), detected once. */
export function hostAccelerator(): Promise<AcceleratorChoice> {
  acceleratorChoice ??= detectAccelerator().then((choice) => {
    // Once per process: the CLI renders it, users may subscribe.
    publish("vm:accelerator", choice);
    return choice;
  });
  return acceleratorChoice;
}

/**
 * A running microVM: a QEMU process, the guest agent it boots, and the host side of their channel.
 * Create with {@link Vm.start}; end with {@link Vm.stop} (graceful), {@link Vm.kill} (forced) or
 * `await using`.
 */
export class Vm implements ExecTarget {
  /** The VM's id (also the name of its runtime dir). */
  readonly id: string;
  /** `kvm` or `tcg` (software emulation: slower, and not hardware isolation). */
  readonly accelerator: "kvm" | "tcg";
  /** How long each phase of the start took. */
  readonly timings: VmTimings;

  readonly #qemu: QemuProcess;
  readonly #agent: AgentClient;
  readonly #defaults: ExecDefaults;
  #state: VmState = "running";
  #stopping: Promise<void> | undefined;
  #failure: Error | undefined;
  #tainted = false;
  readonly #done: Promise<Error | undefined>;
  #resolveDone!: (error: Error | undefined) => void;

  /** How the VM's QEMU was configured, and where its RAM and disk live: what `snapshot()` needs. */
  readonly #machine: LaunchMachineSpec;
  readonly #overlayPath: string;
  readonly #source: Snapshot | undefined;

  private constructor(init: VmInit) {
    this.#machine = init.machine;
    this.#overlayPath = init.overlayPath;
    this.#source = init.source;
    this.#qemu = init.qemu;
    this.#agent = init.agent;
    this.id = init.qemu.id;
    this.accelerator = init.accelerator;
    this.#defaults = init.defaults;
    this.timings = init.timings;
    this.#done = new Promise((resolve) => {
      this.#resolveDone = resolve;
    });

    // QEMU gone: every pending and future operation fails with VM_EXITED.
    void this.#qemu.exited.then((exit) => {
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
    // The guest broke the protocol: it is not trusted any more, so the VM goes.
    void this.#agent.closed.then((error) => {
      if (error !== undefined && this.#stopping === undefined) {
        this.#fail(error);
        void this.#qemu.kill();
      }
    });
  }

  /** Boot a VM from `config.rootfs` and wait until its agent answers. */
  static start(config: VmConfig): Promise<Vm> {
    return Vm.#boot(config, {});
  }

  /**
   * Boot for baking a snapshot: guest RAM in `memoryPath` (`share=on`, so the file IS the RAM)
   * and the root disk overlay at `overlayPath` (kept after the VM ends).
   * @internal Used by the snapshot module.
   */
  static bootForSnapshot(config: VmConfig, files: { memoryPath: string; overlayPath: string }): Promise<Vm> {
    return Vm.#boot(config, files);
  }

  /** @internal The kernel arguments (after the base ones) and TSC frequency this VM booted with. */
  get bootArgs(): { kernelArgs: readonly string[]; tscKHz: number | undefined } {
    return { kernelArgs: this.#machine.kernelArgs ?? [], tscKHz: this.#machine.tscKHz };
  }

  static async #boot(config: VmConfig, files: { memoryPath?: string; overlayPath?: string }): Promise<Vm> {
    const started = performance.now();
    const signal = config.signal;
    validateConfig(config);
    throwIfAborted(signal, "VM start");
    const [choice, assets, rootfs] = await Promise.all([
      hostAccelerator(),
      resolveAssetPaths(config.assets),
      resolveRootfs(config.rootfs, { signal }),
    ]);
    const rootfsMs = performance.now() - started;
    throwIfAborted(signal, "VM start");

    const memoryMiB = config.memoryMiB ?? DEFAULT_MEMORY_MIB;
    const memory: GuestMemory =
      files.memoryPath === undefined
        ? { kind: "anonymous" }
        : { kind: "file", path: files.memoryPath, share: true };
    const machine: LaunchMachineSpec = {
      accel: choice.accel,
      memoryMiB,
      vcpus: config.vcpus ?? DEFAULT_VCPUS,
      kernelPath: assets.kernel,
      initramfsPath: assets.initramfs,
      kernelArgs: [
        ...BOOT_KERNEL_ARGS,
        // Under TCG the guest's TSC runs at the host's rate, but on a busy host the clocksource
        // watchdog may demote it and the guest clock then runs on 4 ms jiffies, slow (and so do
        // the clones of a bake).
        ...(choice.accel === "tcg" ? ["tsc=reliable"] : []),
        ...(config.kernelArgs ?? []),
      ],
      memory,
    };
    if (choice.accel === "tcg") {
      const tscKHz = hostTscKHz();
      if (tscKHz !== undefined) machine.tscKHz = tscKHz;
    }
    let overlayPath = files.overlayPath ?? "";
    const qemu = await QemuProcess.launch({
      machine,
      prepare: async (stateDir) => {
        overlayPath = files.overlayPath ?? join(stateDir, "rootfs.qcow2");
        await createDiskOverlay(rootfs.imagePath, overlayPath, { baseFormat: "raw", signal });
        const disks = [{ name: "root", path: overlayPath, format: "qcow2" as const }];
        machine.disks = disks;
        return { disks };
      },
      ...(signal === undefined ? {} : { signal }),
    });
    const spawnMs = performance.now() - started;
    try {
      const agent = await connectAgent(qemu, config.bootTimeoutMs ?? DEFAULT_BOOT_TIMEOUT_MS, signal, "boot");
      const agentReadyMs = performance.now() - started;
      const vm = new Vm({
        qemu,
        agent,
        accelerator: choice.accel,
        defaults: {
          env: { PATH: DEFAULT_PATH, ...config.env },
          cwd: config.cwd ?? "/",
          user: config.user ?? "root",
        },
        timings: { kind: "boot", rootfsMs, spawnMs, agentReadyMs, totalMs: performance.now() - started },
        machine,
        overlayPath,
      });
      publish("vm:start", { id: vm.id, accelerator: vm.accelerator, timings: vm.timings });
      return vm;
    } catch (error) {
      await qemu.kill();
      throw withConsoleLog(error, qemu.consoleLogPath);
    }
  }

  /**
   * A new VM restored from `snapshot`: its own QEMU mapping the snapshot's memory copy-on-write,
   * its own disk overlay on the snapshot's disk state, a new agent session (new epoch, the host's
   * time, fresh entropy). The snapshot's files are never written.
   */
  static async restore(snapshot: Snapshot, config: RestoreConfig = {}): Promise<Vm> {
    const started = performance.now();
    const launched = await launchRestore(snapshot, config);
    return activateRestore(launched, config, started, "restore");
  }

  /**
   * Start QEMU for `snapshot` ahead of time, for pools. By default (`warm`) the state is loaded,
   * the guest runs one `true` through its agent (so the emulator has translated the hot paths)
   * and is paused: {@link PrestartedVm.activate} resumes it and opens a new agent session (new
   * epoch, the host's time, fresh entropy). With `warm: false` QEMU waits for its state instead,
   * and `activate()` loads it (slower activation, nothing of the guest ran before).
   */
  static async prestart(snapshot: Snapshot, config: PrestartConfig = {}): Promise<PrestartedVm> {
    const started = performance.now();
    const launched = await launchRestore(snapshot, config);
    const agent = config.warm === false ? undefined : await warmUp(launched, config);
    return new PrestartedVm(launched, config, performance.now() - started, agent);
  }

  /** @internal Builds the Vm of a restore; only this module calls it. */
  static fromRestore(init: VmInit): Vm {
    return new Vm(init);
  }

  /** `running` until stopped or dead. */
  get state(): VmState {
    return this.#state;
  }

  /** The guest's serial console log on the host (kept, bounded, when the VM fails). */
  get consoleLogPath(): string {
    return this.#qemu.consoleLogPath;
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
   * timed out and was killed, or the VM failed. Pools discard tainted VMs.
   */
  get tainted(): boolean {
    return this.#tainted || this.#failure !== undefined || this.#state !== "running";
  }

  /** The guest agent's name and version. */
  get agentVersion(): string {
    return this.#agent.agentVersion;
  }

  /** A builder for one command: set argv, env, … then `output()` or `spawn()`. */
  execBuilder(): ExecBuilder {
    return new ExecBuilder(this);
  }

  /** Run `argv` and collect its output. Rejects on a non-zero exit (see {@link ExecBuilder.reject}). */
  exec(argv: string[], options: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<ExecOutcome> {
    const builder = this.execBuilder().argv(argv);
    if (options.timeoutMs !== undefined) builder.timeout(options.timeoutMs);
    if (options.signal !== undefined) builder.signal(options.signal);
    return builder.output();
  }

  /** Write `data` to `path` in the guest (streamed; any size). Default mode 0644. */
  writeFile(path: string, data: WriteFileSource, options: WriteFileOptions = {}): Promise<void> {
    return this.agent().writeFile(path, data, options);
  }

  /** Read the whole file at `path` in the guest. */
  readFile(path: string, options: { signal?: AbortSignal } = {}): Promise<Uint8Array> {
    return this.agent().readFileBytes(path, options);
  }

  /** Stream the file at `path` in the guest, with its size and mode. */
  readFileStream(path: string, options: { signal?: AbortSignal } = {}) {
    return this.agent().readFile(path, options);
  }

  /** Round trip to the guest agent, in milliseconds. */
  ping(): Promise<number> {
    return this.agent().ping();
  }

  /**
   * Stop the VM: the agent ends every process and syncs the disks, then QEMU exits. Idempotent;
   * resolves when QEMU is gone and its runtime dir removed.
   */
  stop(): Promise<void> {
    this.#stopping ??= this.#stop();
    return this.#stopping;
  }

  /** Kill QEMU now. */
  async kill(): Promise<void> {
    this.#stopping ??= Promise.resolve();
    this.#state = "stopped";
    this.#agent.close(new VmError("VM_STOPPED", `VM ${this.id} was killed`));
    await this.#qemu.kill();
    this.#resolveDone(this.#failure);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop();
  }

  // ExecTarget
  agent(): AgentClient {
    if (this.#failure) throw this.#failure;
    if (this.#state === "stopped") throw new VmError("VM_STOPPED", `VM ${this.id} is stopped`);
    return this.#agent;
  }

  defaults(): ExecDefaults {
    return this.#defaults;
  }

  onExecTimedOut(): void {
    this.#tainted = true;
  }

  describe(): string {
    return `VM ${this.id} (console log: ${this.consoleLogPath})`;
  }

  /**
   * Bake step: pause the guest, save its device state to `statePath` (RAM stays in the shared
   * memory file, `x-ignore-shared`), then end QEMU without shutting the guest down, so memory
   * file, device state and disk overlay describe the same instant.
   * @internal Used by the snapshot module.
   */
  async saveStateAndQuit(statePath: string, options: { signal?: AbortSignal } = {}): Promise<void> {
    const agent = this.agent();
    if (this.#machine.memory?.kind !== "file" || !this.#machine.memory.share) {
      throw new SupermachineError(
        "INVALID_ARGUMENT",
        "saveStateAndQuit needs a VM booted with bootForSnapshot",
      );
    }
    // The channel must be idle: a round trip drains what the guest had to say.
    await agent.ping();
    this.#stopping ??= Promise.resolve();
    this.#state = "stopped";
    try {
      const qmp = this.#qemu.qmp;
      await qmp.execute("stop");
      await qmp.execute("migrate-set-capabilities", MIGRATION_CAPABILITIES);
      await migrateToFile(this.#qemu, statePath, options.signal);
    } catch (error) {
      await this.kill();
      throw error;
    }
    this.#agent.close(new VmError("VM_STOPPED", `VM ${this.id} was saved to a snapshot`));
    await this.#qemu.stop({ timeoutMs: SHUTDOWN_TIMEOUT_MS });
    publish("vm:exit", { id: this.id });
    this.#resolveDone(this.#failure);
  }

  /**
   * Save this running VM as a snapshot in `dir` (which must not exist yet) and keep it running.
   * The guest pauses for the time of one full RAM migration; the snapshot then restores like a
   * baked one. Its disk state is a copy of this VM's overlay, whose backing chain (the snapshot
   * this VM was restored from, or the image's root filesystem) is recorded in the manifest: those
   * files must stay in place. See docs/snapshots.md.
   */
  async snapshot(dir: string, options: { name?: string; signal?: AbortSignal } = {}): Promise<Snapshot> {
    const { saveRunningVm } = await import("../snapshot/save-running.ts");
    const agent = this.agent();
    await agent.ping();
    return saveRunningVm(
      {
        qemu: this.#qemu,
        machine: this.#machine,
        overlayPath: this.#overlayPath,
        source: this.#source,
        defaults: this.#defaults,
      },
      dir,
      options,
    );
  }

  async #stop(): Promise<void> {
    const wasRunning = this.#state === "running" && this.#failure === undefined;
    this.#state = "stopped";
    if (wasRunning) {
      try {
        await this.#agent.shutdown({ timeoutMs: SHUTDOWN_TIMEOUT_MS });
      } catch (error) {
        debug("VM %s: graceful shutdown failed: %s", this.id, (error as Error).message);
      }
    }
    this.#agent.close(new VmError("VM_STOPPED", `VM ${this.id} is stopped`));
    await this.#qemu.stop({ timeoutMs: SHUTDOWN_TIMEOUT_MS });
    publish("vm:exit", { id: this.id });
    this.#resolveDone(this.#failure);
  }

  #fail(error: Error): void {
    if (this.#failure) return;
    this.#failure = error;
    this.#state = "stopped";
    this.#agent.close(error);
    publish("vm:exit", { id: this.id, error });
    this.#resolveDone(error);
  }
}

function validateConfig(config: VmConfig): void {
  if (typeof config.rootfs !== "string" || config.rootfs === "") {
    throw new SupermachineError("INVALID_ARGUMENT", "VmConfig.rootfs must name an image file or a directory");
  }
  const positiveInt = (value: number | undefined, name: string, max: number) => {
    if (value !== undefined && (!Number.isSafeInteger(value) || value < 1 || value > max)) {
      throw new SupermachineError("INVALID_ARGUMENT", `VmConfig.${name} must be an integer from 1 to ${max}`);
    }
  };
  positiveInt(config.memoryMiB, "memoryMiB", 1024 * 1024);
  positiveInt(config.vcpus, "vcpus", 255);
  positiveInt(config.bootTimeoutMs, "bootTimeoutMs", 24 * 3600 * 1000);
}

/** Errors from the boot name the console log, which usually says why. */
function withConsoleLog(error: unknown, consoleLogPath: string): unknown {
  if (error instanceof VmError || !(error instanceof SupermachineError)) return error;
  if (error.code === "ABORTED") return error;
  return new VmError(
    "VMM_FAILED",
    `${error.message} (console log: ${consoleLogPath})`,
    { consoleLogPath },
    {
      cause: error,
    },
  );
}

/** Connects the agent on QEMU's agent socket, failing early when QEMU exits. */
async function connectAgent(
  qemu: QemuProcess,
  timeoutMs: number,
  signal: AbortSignal | undefined,
  what: "boot" | "restore",
): Promise<AgentClient> {
  const socket = await qemu.agentSocket;
  return Promise.race([
    AgentClient.connect(socket, { timeoutMs, ...(signal === undefined ? {} : { signal }) }),
    qemu.exited.then((exit) => {
      throw new VmError(
        "VM_EXITED",
        `VM ${qemu.id} exited during ${what} (console log: ${qemu.consoleLogPath})`,
        { consoleLogPath: qemu.consoleLogPath, qemuExitCode: exit.code ?? undefined },
      );
    }),
  ]);
}

/**
 * Migrate the (stopped) VM's state into `path`: QEMU connects to a unix socket the host listens
 * on, and the host writes the stream to the file (no `exec:`, so the strict sandbox holds).
 * @internal
 */
export async function migrateToFile(qemu: QemuProcess, path: string, signal?: AbortSignal): Promise<void> {
  const socketPath = join(qemu.stateDir, "migrate.sock");
  const server = createServer();
  server.maxConnections = 1;
  const written = new Promise<void>((resolve, reject) => {
    server.once("connection", (socket) => {
      server.close();
      pipeline(socket, createWriteStream(path, { flags: "wx" })).then(resolve, reject);
    });
  });
  written.catch(() => {});
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(socketPath, () => resolve());
  });
  try {
    const qmp = qemu.qmp;
    const finished = qmp.waitForEvent("MIGRATION", {
      filter: (event) => ["completed", "failed", "cancelled"].includes(String(event.data?.status)),
      ...(signal === undefined ? {} : { signal }),
    });
    finished.catch(() => {});
    await qmp.execute("migrate", { uri: `unix:${socketPath}` });
    const event = await finished;
    if (event.data?.status !== "completed") {
      const info = await qmp
        .execute<{ "error-desc"?: string }>("query-migrate")
        .catch((): { "error-desc"?: string } => ({}));
      throw new VmError(
        "VMM_FAILED",
        `saving the VM state failed: ${String(event.data?.status)}${info["error-desc"] ? ` (${info["error-desc"]})` : ""}`,
        { consoleLogPath: qemu.consoleLogPath },
      );
    }
    await written;
  } finally {
    server.close();
  }
}

/** A QEMU started for a snapshot, waiting (`-incoming defer`, vCPUs stopped) for its state. */
interface LaunchedRestore {
  snapshot: Snapshot;
  qemu: QemuProcess;
  machine: LaunchMachineSpec;
  overlayPath: string;
  rootfsMs: number;
  spawnMs: number;
}

/**
 * The machine a snapshot restores into: the baked machine (same devices, memory, kernel and
 * arguments) with its RAM file mapped copy-on-write, waiting for its state (`-incoming defer`,
 * then `migrate-incoming fd:3`) with its vCPUs stopped. The caller adds the disks.
 */
export function restoreMachineSpec(snapshot: Snapshot): LaunchMachineSpec {
  const m = snapshot.manifest;
  const machine: LaunchMachineSpec = {
    accel: m.accelerator,
    memoryMiB: m.memoryMiB,
    vcpus: m.vcpus,
    kernelPath: snapshot.assets.kernel,
    initramfsPath: snapshot.assets.initramfs,
    kernelArgs: m.kernelArgs,
    memory: {
      kind: "file",
      path: snapshot.memoryPath,
      share: false,
      ...(m.memoryBackendId === undefined ? {} : { backendId: m.memoryBackendId }),
    },
    // `-incoming defer` waits for `migrate-incoming fd:3` (the state file is QEMU's fd 3):
    // `-incoming fd:3` would read the stream before `x-ignore-shared` can be set.
    incoming: "defer",
    paused: true,
  };
  if (m.tscKHz !== undefined) machine.tscKHz = m.tscKHz;
  return machine;
}

async function launchRestore(snapshot: Snapshot, config: RestoreConfig): Promise<LaunchedRestore> {
  const started = performance.now();
  const m = snapshot.manifest;
  if (config.memoryMiB !== undefined && config.memoryMiB !== m.memoryMiB) {
    throw new SupermachineError(
      "INVALID_ARGUMENT",
      `snapshot ${snapshot.name} has ${m.memoryMiB} MiB of guest RAM; a restore cannot change it (asked for ${config.memoryMiB})`,
    );
  }
  if (config.vcpus !== undefined && config.vcpus !== m.vcpus) {
    throw new SupermachineError(
      "INVALID_ARGUMENT",
      `snapshot ${snapshot.name} has ${m.vcpus} vCPUs; a restore cannot change it (asked for ${config.vcpus})`,
    );
  }
  const signal = config.signal;
  throwIfAborted(signal, "VM restore");
  const machine = restoreMachineSpec(snapshot);
  let overlayPath = "";
  let rootfsMs = 0;
  const state = await open(snapshot.statePath, "r");
  let qemu: QemuProcess;
  try {
    qemu = await QemuProcess.launch({
      machine,
      extraFds: [state.fd],
      prepare: async (stateDir) => {
        overlayPath = join(stateDir, "rootfs.qcow2");
        await snapshot.createOverlay(overlayPath);
        rootfsMs = performance.now() - started;
        const disks = [{ name: "root", path: overlayPath, format: "qcow2" as const }];
        machine.disks = disks;
        return { disks };
      },
      ...(signal === undefined ? {} : { signal }),
    });
  } finally {
    await state.close();
  }
  try {
    await qemu.qmp.execute("migrate-set-capabilities", MIGRATION_CAPABILITIES);
  } catch (error) {
    await qemu.kill();
    throw error;
  }
  return { snapshot, qemu, machine, overlayPath, rootfsMs, spawnMs: performance.now() - started };
}

/** Load the state into a launched QEMU, run it, open a new agent session, and make the Vm. */
async function activateRestore(
  launched: LaunchedRestore,
  config: RestoreConfig,
  started: number,
  kind: "restore" | "prestarted",
  prestartMs?: number,
): Promise<Vm> {
  const { qemu } = launched;
  const signal = config.signal;
  const timeoutMs = config.bootTimeoutMs ?? DEFAULT_BOOT_TIMEOUT_MS;
  try {
    throwIfAborted(signal, "VM restore");
    await loadState(launched, timeoutMs, signal);
    await qemu.qmp.execute("cont");
    const stateLoadedMs = performance.now() - started;
    // A new session: new epoch, the host's time, fresh entropy (clone correctness).
    const agent = await connectAgent(qemu, timeoutMs, signal, "restore");
    const agentReadyMs = performance.now() - started;
    return restoredVm(launched, agent, config, { kind, stateLoadedMs, agentReadyMs, started, prestartMs });
  } catch (error) {
    await qemu.kill();
    throw withConsoleLog(error, qemu.consoleLogPath);
  }
}

/** Load the snapshot's state (QEMU's fd 3) into a launched QEMU; vCPUs stay stopped. */
async function loadState(launched: LaunchedRestore, timeoutMs: number, signal: AbortSignal | undefined) {
  const { qemu, snapshot } = launched;
  const qmp = qemu.qmp;
  const loaded = qmp.waitForEvent("MIGRATION", {
    filter: (event) => ["completed", "failed", "cancelled"].includes(String(event.data?.status)),
    timeoutMs,
    ...(signal === undefined ? {} : { signal }),
  });
  loaded.catch(() => {});
  await qmp.execute("migrate-incoming", { uri: "fd:3" });
  const event = await Promise.race([
    loaded,
    qemu.exited.then((exit) => {
      throw new VmError(
        "VM_EXITED",
        `QEMU exited while loading snapshot ${snapshot.dir}: ${qemu.stderrTail.trim().split("\n").slice(-5).join("\n")}`,
        { consoleLogPath: qemu.consoleLogPath, qemuExitCode: exit.code ?? undefined },
      );
    }),
  ]);
  if (event.data?.status !== "completed") {
    throw new VmError(
      "VMM_FAILED",
      `loading snapshot ${snapshot.dir} failed (${String(event.data?.status)}): ${qemu.stderrTail.trim().split("\n").slice(-5).join("\n")}`,
      { consoleLogPath: qemu.consoleLogPath },
    );
  }
}

/** The Vm of a restored QEMU whose agent session is open. */
function restoredVm(
  launched: LaunchedRestore,
  agent: AgentClient,
  config: RestoreConfig,
  t: {
    kind: "restore" | "prestarted";
    stateLoadedMs: number;
    agentReadyMs: number;
    started: number;
    prestartMs: number | undefined;
  },
): Vm {
  const { snapshot, qemu } = launched;
  const { kind, stateLoadedMs, agentReadyMs, started, prestartMs } = t;
  const m = snapshot.manifest;
  const vm = Vm.fromRestore({
    qemu,
    agent,
    accelerator: m.accelerator,
    defaults: {
      env: { PATH: DEFAULT_PATH, ...m.execDefaults.env, ...config.env },
      cwd: config.cwd ?? m.execDefaults.cwd,
      user: config.user ?? m.execDefaults.user,
    },
    timings: {
      kind,
      rootfsMs: kind === "restore" ? launched.rootfsMs : 0,
      spawnMs: kind === "restore" ? launched.spawnMs : 0,
      stateLoadedMs,
      agentReadyMs,
      totalMs: performance.now() - started,
      ...(prestartMs === undefined ? {} : { prestartMs }),
    },
    machine: launched.machine,
    overlayPath: launched.overlayPath,
    source: snapshot,
  });
  publish("vm:start", {
    id: vm.id,
    accelerator: vm.accelerator,
    timings: vm.timings,
    snapshot: snapshot.dir,
  });
  return vm;
}

/** Fails when QEMU exits: raced against the steps of a restore so they do not wait for nothing. */
function qemuExit(qemu: QemuProcess, what: string): Promise<never> {
  return qemu.exited.then((exit) => {
    throw new VmError(
      "VM_EXITED",
      `VM ${qemu.id} exited during ${what} (console log: ${qemu.consoleLogPath})`,
      {
        consoleLogPath: qemu.consoleLogPath,
        qemuExitCode: exit.code ?? undefined,
      },
    );
  });
}

/**
 * Pre-warm a launched QEMU: load the state, run, open an agent session, run `true` once (the
 * emulator translates the guest's exec paths and the pages it touches fault in), then pause the
 * vCPUs (QMP `stop`). The agent connection stays open and idle. Kills QEMU on failure.
 */
async function warmUp(launched: LaunchedRestore, config: RestoreConfig): Promise<AgentClient> {
  const { qemu, snapshot } = launched;
  const signal = config.signal;
  const timeoutMs = config.bootTimeoutMs ?? DEFAULT_BOOT_TIMEOUT_MS;
  let agent: AgentClient | undefined;
  try {
    throwIfAborted(signal, "VM prestart");
    await loadState(launched, timeoutMs, signal);
    await qemu.qmp.execute("cont");
    agent = await connectAgent(qemu, timeoutMs, signal, "restore");
    const m = snapshot.manifest;
    const channel = agent.exec({
      argv: ["true"],
      env: { PATH: DEFAULT_PATH, ...m.execDefaults.env, ...config.env },
      cwd: config.cwd ?? m.execDefaults.cwd,
      user: config.user ?? m.execDefaults.user,
      timeoutMs,
    });
    // An image without `true` still warms the fork/exec paths: only a dead channel counts.
    await Promise.race([channel.exited.catch(() => {}), qemuExit(qemu, "prestart")]);
    if (agent.closedError) throw agent.closedError;
    throwIfAborted(signal, "VM prestart");
    await qemu.qmp.execute("stop");
    return agent;
  } catch (error) {
    agent?.close();
    await qemu.kill();
    throw withConsoleLog(error, qemu.consoleLogPath);
  }
}

/**
 * A QEMU process started ahead of time for a snapshot, so that {@link activate} is fast:
 * pre-warmed and paused (default; see {@link Vm.prestart}) or waiting for its state. Activate it
 * once, or dispose of it. Pools keep some ready.
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

  /** @internal Made by {@link Vm.prestart}. */
  constructor(launched: LaunchedRestore, config: RestoreConfig, prestartMs: number, agent?: AgentClient) {
    this.#launched = launched;
    this.#config = config;
    this.#agent = agent;
    this.id = launched.qemu.id;
    this.prestartMs = prestartMs;
    this.warm = agent !== undefined;
  }

  /** False once activated or disposed, or when its QEMU died (or its agent channel broke) while waiting. */
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
      throw new VmError("VM_EXITED", `prestarted VM ${this.id} exited while waiting`, {
        consoleLogPath: qemu.consoleLogPath,
      });
    }
    const config = { ...this.#config, ...options };
    const started = performance.now();
    const agent = this.#agent;
    if (agent === undefined) {
      return activateRestore(this.#launched, config, started, "prestarted", this.prestartMs);
    }
    const signal = config.signal;
    const timeoutMs = config.bootTimeoutMs ?? DEFAULT_BOOT_TIMEOUT_MS;
    try {
      throwIfAborted(signal, "VM activation");
      // HELLO goes out with `cont`: the paused guest reads it as soon as it runs.
      const resumed = qemu.qmp.execute("cont").then(() => performance.now() - started);
      const session = agent.rehello({ timeoutMs, ...(signal === undefined ? {} : { signal }) });
      const [stateLoadedMs] = await Promise.race([
        Promise.all([resumed, session]),
        qemuExit(qemu, "activation"),
      ]);
      const agentReadyMs = performance.now() - started;
      return restoredVm(this.#launched, agent, config, {
        kind: "prestarted",
        stateLoadedMs,
        agentReadyMs,
        started,
        prestartMs: this.prestartMs,
      });
    } catch (error) {
      agent.close();
      await qemu.kill();
      throw withConsoleLog(error, qemu.consoleLogPath);
    }
  }

  /** End the QEMU (if not activated) and remove its files. Idempotent. */
  async dispose(): Promise<void> {
    if (this.#used) return;
    this.#used = true;
    this.#agent?.close();
    await this.#launched.qemu.kill();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.dispose();
  }
}
