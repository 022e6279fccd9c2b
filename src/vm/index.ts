/**
 * A VM's life cycle: boot, restore and pre-started VMs, the state machine, exec, files and
 * snapshots of a running VM.
 */

export { type BootOptions, bootCommandLine } from "./boot.ts";
export {
  checkArgv,
  checkExecOptions,
  DEFAULT_PATH,
  type ExecInput,
  type ExecOptions,
  type StageFile,
} from "./exec.ts";
export { ExecBuilder, execBuilder } from "./exec-builder.ts";
export {
  type ExecDefaults,
  type ExecEvent,
  ExecHandle,
  type ExecStdin,
  type ExecTarget,
} from "./exec-handle.ts";
export { type FsCallOptions, GuestFileSystem } from "./fs.ts";
export { checkMountSpec, type MountSpec, type VmMount } from "./mounts.ts";
export {
  copyNetworkPolicy,
  type NetworkKind,
  type NetworkPolicy,
  networkKind,
  parseNetworkPolicy,
} from "./network-policy.ts";
export type { ExposedPort, ExposeTcpOptions } from "./ports.ts";
export { restoreMachineSpec } from "./restore.ts";
export {
  bootForBake,
  type GuestFileStream,
  PrestartedVm,
  saveBakedVm,
  Vm,
  type VmState,
  vmMachine,
} from "./vm.ts";
export {
  DEFAULT_BOOT_TIMEOUT_MS,
  DEFAULT_MEMORY_MIB,
  DEFAULT_VCPUS,
  type PrestartConfig,
  type RestoreConfig,
  type VmConfig,
  type VmTimings,
} from "./vm-config.ts";
