/**
 * The VMM layer: everything QEMU. Its argv, launch and supervision, QMP, the migration protocol
 * (pause, resume, save and load state), disk overlays, accelerator detection, runtime state.
 * No module above this one sends a QMP command.
 */

export {
  type AcceleratorChoice,
  assertHostSupported,
  detectAccelerator,
  findQemu,
  hostAccelerator,
  hostQemuVersion,
  hostTscKHz,
  type QemuVersion,
  qemuSupportsSandbox,
  qemuVersion,
} from "./accelerator.ts";
export * from "./asset-paths.ts";
export { ConsoleLog, type ConsoleLogOptions, DEFAULT_CONSOLE_LOG_MAX_BYTES } from "./console-log.ts";
export { createBootOverlay, OverlayTemplate } from "./disk-overlay.ts";
export {
  type DirReport,
  type HostPaths,
  type HostReport,
  hostPaths,
  hostReport,
  type KvmStatus,
} from "./host-report.ts";
export { INCOMING_STATE_FD, type LoadStateOptions, type SaveStateOptions } from "./migration.ts";
export {
  type NetRelaySpec,
  parseRelayStatus,
  probeNetRelay,
  RELAY_CONNECT_TIMEOUT_MS,
  RELAY_MAX_CONNECTIONS,
  type RelayStatus,
  relayArgs,
  relayUnsupported,
} from "./net-relay.ts";
export {
  type Accelerator,
  AGENT_PORT_NAME,
  BASE_KERNEL_ARGS,
  buildQemuArgs,
  type DiskSpec,
  type GuestMemory,
  type HostForward,
  type IncomingMigration,
  kernelCommandLine,
  type MachineSpec,
  MOUNTS_PORT_NAME,
  type NetworkSpec,
  type SandboxMode,
} from "./qemu-args.ts";
export {
  type LaunchMachineSpec,
  type LaunchOptions,
  type QemuExit,
  QemuProcess,
  type QemuState,
  type StopOptions,
} from "./qemu-process.ts";
export {
  type QmpCallOptions,
  QmpClient,
  type QmpConnectOptions,
  QmpError,
  type QmpEvent,
  type QmpGreeting,
} from "./qmp-client.ts";
export {
  DEFAULT_MAX_KEPT_DIRS,
  type ExitRecord,
  type OwnerRecord,
  runtimeRoot,
  type SweepResult,
  sweepStaleVms,
  VmStateDir,
} from "./state-dir.ts";
