import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { AgentClient } from "../agent/agent-client.ts";
import { SupermachineError, VmError } from "../errors.ts";
import { throwIfAborted } from "../internal/abort.ts";
import { debug, publish } from "../internal/diagnostics.ts";
import { type AcceleratorChoice, detectAccelerator } from "../vmm/accelerator.ts";
import { resolveAssetPaths } from "../vmm/asset-paths.ts";
import { createDiskOverlay } from "../vmm/disk-overlay.ts";
import { QemuProcess } from "../vmm/qemu-process.ts";
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

  private constructor(init: {
    qemu: QemuProcess;
    agent: AgentClient;
    accelerator: "kvm" | "tcg";
    defaults: ExecDefaults;
    timings: VmTimings;
  }) {
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
  static async start(config: VmConfig): Promise<Vm> {
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

    const qemu = await QemuProcess.launch({
      machine: {
        accel: choice.accel,
        memoryMiB: config.memoryMiB ?? DEFAULT_MEMORY_MIB,
        vcpus: config.vcpus ?? DEFAULT_VCPUS,
        kernelPath: assets.kernel,
        initramfsPath: assets.initramfs,
        kernelArgs: ["quiet", "sm.root=/dev/vda", "sm.rootfstype=ext4", ...(config.kernelArgs ?? [])],
      },
      prepare: async (stateDir) => {
        const overlay = join(stateDir, "rootfs.qcow2");
        await createDiskOverlay(rootfs.imagePath, overlay, { baseFormat: "raw", signal });
        return { disks: [{ name: "root", path: overlay, format: "qcow2" }] };
      },
      ...(signal === undefined ? {} : { signal }),
    });
    const spawnMs = performance.now() - started;
    try {
      const socket = await qemu.agentSocket;
      const bootTimeoutMs = config.bootTimeoutMs ?? DEFAULT_BOOT_TIMEOUT_MS;
      const agent = await Promise.race([
        AgentClient.connect(socket, {
          timeoutMs: bootTimeoutMs,
          ...(signal === undefined ? {} : { signal }),
        }),
        qemu.exited.then((exit) => {
          throw new VmError(
            "VM_EXITED",
            `VM ${qemu.id} exited during boot (console log: ${qemu.consoleLogPath})`,
            { consoleLogPath: qemu.consoleLogPath, qemuExitCode: exit.code ?? undefined },
          );
        }),
      ]);
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
        timings: { rootfsMs, spawnMs, agentReadyMs, totalMs: performance.now() - started },
      });
      publish("vm:start", { id: vm.id, accelerator: vm.accelerator, timings: vm.timings });
      return vm;
    } catch (error) {
      await qemu.kill();
      throw withConsoleLog(error, qemu.consoleLogPath);
    }
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
  writeFile(
    path: string,
    data: Uint8Array | string | AsyncIterable<Uint8Array> | NodeJS.ReadableStream,
    options: {
      mode?: number;
      uid?: number;
      gid?: number;
      mkdirs?: boolean;
      sizeBytes?: number;
      signal?: AbortSignal;
    } = {},
  ): Promise<void> {
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
