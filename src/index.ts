/**
 * supermachine: run OCI/Docker images and root filesystems as isolated microVMs.
 * This file is the whole public surface.
 */

export * from "./errors.ts";
export type { ImageRecord, PruneResult } from "./oci/content-store.ts";
export type { ImageConfig } from "./oci/image-config.ts";
export type { PullProgress } from "./oci/progress.ts";
export type { PullOptions } from "./oci/pull.ts";
export { type ImageReference, parseReference } from "./oci/reference.ts";
export {
  coldBootSource,
  DEFAULT_POOL_OPTIONS,
  ManualClock,
  Pool,
  type PoolableVm,
  PoolBuilder,
  type PoolClock,
  PooledVm,
  type PoolOptions,
  type PoolStats,
  type PrestartedVmHandle,
  type VmSource,
} from "./pool/index.ts";
export type { RootfsProgress } from "./rootfs/index.ts";
export type { SnapshotManifest } from "./snapshot/manifest.ts";
export { Snapshot, type SnapshotOpenOptions } from "./snapshot/snapshot.ts";
export type { SnapshotInfo } from "./snapshot/store.ts";
export { ExecBuilder, type ExecDefaults } from "./vm/exec-builder.ts";
export { type ExecEvent, ExecHandle } from "./vm/exec-handle.ts";
export { ExecOutcome } from "./vm/exec-outcome.ts";
export {
  dockerCommand,
  Image,
  ImageBuilder,
  type ImagePullOptions,
  type ImageStartConfig,
} from "./vm/image.ts";
export { hostAccelerator, PrestartedVm, type RestoreConfig, Vm, type VmState } from "./vm/vm.ts";
export type { VmConfig, VmTimings } from "./vm/vm-config.ts";
export type { AssetPaths } from "./vmm/asset-paths.ts";
export { resolveAssetPaths } from "./vmm/asset-paths.ts";
