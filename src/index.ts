/**
 * supermachine: run OCI/Docker images and root filesystems as isolated microVMs.
 * This file is the whole public surface.
 */

export * from "./errors.ts";
export type { AssetPaths } from "./vmm/asset-paths.ts";
export { resolveAssetPaths } from "./vmm/asset-paths.ts";
export { ExecBuilder, type ExecDefaults } from "./vm/exec-builder.ts";
export { ExecHandle, type ExecEvent } from "./vm/exec-handle.ts";
export { ExecOutcome } from "./vm/exec-outcome.ts";
export { hostAccelerator, Vm, type VmState } from "./vm/vm.ts";
export type { VmConfig, VmTimings } from "./vm/vm-config.ts";
