/**
 * What a running VM is made of (its QEMU, its agent session, how it was configured), and the few
 * steps boot and restore share. Internal to the library: `Vm` wraps these parts.
 */

import { AgentClient, type GuestIdentity } from "../agent/index.ts";
import { SupermachineError, VmError } from "../errors.ts";
import type { ImageIdentity, Snapshot } from "../snapshot/index.ts";
import type { LaunchMachineSpec, QemuProcess } from "../vmm/index.ts";
import type { ExecDefaults } from "./exec-handle.ts";
import type { NetworkPolicy } from "./network-policy.ts";
import type { VmTimings } from "./vm-config.ts";

/** The parts of a running VM. */
export interface VmParts {
  qemu: QemuProcess;
  agent: AgentClient;
  accelerator: "kvm" | "tcg";
  defaults: ExecDefaults;
  timings: VmTimings;
  /** How QEMU was configured, and where the VM's RAM and disk overlay live (what a snapshot needs). */
  machine: LaunchMachineSpec;
  overlayPath: string;
  /** The image the VM runs (recorded in snapshots of it). */
  image: ImageIdentity;
  /** The snapshot it was restored from, if any. */
  source: Snapshot | undefined;
  /** Whether QEMU has a network device, and the policy the VM runs under (recorded by snapshots of it). */
  network: { device: boolean; policy: NetworkPolicy };
}

/** Connects a new agent session on QEMU's agent socket (giving the guest its names), failing early when QEMU exits. */
export async function connectAgent(
  qemu: QemuProcess,
  timeoutMs: number,
  signal: AbortSignal | undefined,
  what: "boot" | "restore",
  identity: GuestIdentity,
): Promise<AgentClient> {
  const socket = await qemu.agentSocket;
  return Promise.race([
    AgentClient.connect(socket, { timeoutMs, identity, ...(signal === undefined ? {} : { signal }) }),
    qemu.exitedError(what),
  ]);
}

/**
 * Ends the QEMU of a start that failed and returns the error to throw. The error names the console
 * log, which usually says why, so the log is kept (docs/lifecycle.md: kept dirs are swept, at most
 * 16); a start the caller aborted leaves nothing.
 */
export async function endFailedStart(qemu: QemuProcess, error: unknown): Promise<unknown> {
  const aborted = error instanceof SupermachineError && error.code === "ABORTED";
  await qemu.kill({ failed: !aborted });
  return withConsoleLog(error, qemu.consoleLogPath);
}

/** Errors of a start name the console log, which usually says why. */
export function withConsoleLog(error: unknown, consoleLogPath: string): unknown {
  if (!(error instanceof SupermachineError) || error.code === "ABORTED") return error;
  if (error instanceof VmError) {
    if (error.consoleLogPath !== undefined) return error;
    return new VmError(
      error.code as ConstructorParameters<typeof VmError>[0],
      `${error.message} (console log: ${consoleLogPath})`,
      { consoleLogPath, qemuExitCode: error.qemuExitCode },
      { cause: error },
    );
  }
  if (error.code !== "VMM_FAILED") return error;
  return new VmError(
    "VMM_FAILED",
    `${error.message} (console log: ${consoleLogPath})`,
    { consoleLogPath },
    { cause: error },
  );
}
