/**
 * supermachine: run OCI/Docker images and root filesystems as isolated microVMs.
 * This file is the whole public surface (test support is in `supermachine/testing`).
 */

export type {
  AgentCallOptions,
  ConnectTcpOptions,
  GuestWatchEvent,
  GuestWatcher,
  ReaddirOptions,
  ReadFileOptions,
  WatchOptions,
  WorkloadLogsOptions,
  WorkloadStatus,
  WriteFileOptions,
  WriteFileSource,
} from "./agent/index.ts";
export * from "./errors.ts";
export {
  Image,
  ImageBuilder,
  type ImagePullOptions,
  type ImageStartConfig,
  Store,
  type StorePruneResult,
} from "./image/index.ts";
export type { GuestDirent, GuestStats } from "./internal/index.ts";
export type { MountOwner, SymlinkPolicy } from "./ninep/index.ts";
export type {
  CredentialsOption,
  ImageConfig,
  ImageRecord,
  ImageReference,
  ImageSource,
  LayerRecord,
  PruneResult,
  PullOptions,
  PullProgress,
  RegistryCredentials,
  StoreOptions,
} from "./oci/index.ts";
export { parseReference } from "./oci/index.ts";
export {
  Pool,
  type PoolableVm,
  PoolBuilder,
  PooledVm,
  type PoolOptions,
  type PoolStats,
} from "./pool/index.ts";
export type { RootfsProgress } from "./rootfs/index.ts";
export {
  type BackingFileEntry,
  type ImageIdentity,
  Snapshot,
  type SnapshotFileEntry,
  type SnapshotInfo,
  type SnapshotManifest,
  type SnapshotNetwork,
  type SnapshotOpenOptions,
} from "./snapshot/index.ts";
export {
  ExecBuilder,
  type ExecEvent,
  ExecHandle,
  type ExecInput,
  type ExecOptions,
  type ExecStdin,
  type ExposedPort,
  type ExposeTcpOptions,
  type FsCallOptions,
  type GuestFileStream,
  GuestFileSystem,
  type MountSpec,
  type NetworkPolicy,
  type PrestartConfig,
  PrestartedVm,
  type RestoreConfig,
  type StageFile,
  Vm,
  type VmConfig,
  type VmMount,
  type VmState,
  type VmTimings,
} from "./vm/index.ts";
export {
  type Accelerator,
  type AcceleratorChoice,
  type AssetLocation,
  type AssetPaths,
  type AssetSearchOptions,
  type DirReport,
  type GuestAssets,
  type HostPaths,
  type HostReport,
  hostAccelerator,
  hostPaths,
  hostReport,
  type KvmStatus,
  locateGuestAssets,
  resolveAssetPaths,
} from "./vmm/index.ts";
