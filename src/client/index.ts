/**
 * `supermachine/client`: the library's API over the wire, against `supermachine serve`
 * (docs/server.md). It carries no VM code: a client install needs no QEMU.
 */

export * from "../errors.ts";
export type {
  AgentCallOptions,
  BackingFileEntry,
  ConnectTcpOptions,
  ExecEvent,
  ExecInput,
  ExecOptions,
  ExecStdin,
  ExposedPort,
  ExposeTcpOptions,
  FsCallOptions,
  GuestDirent,
  GuestFileStream,
  GuestStats,
  GuestWatchEvent,
  GuestWatcher,
  ImageConfig,
  ImageRecord,
  ImageSource,
  LayerRecord,
  NetworkPolicy,
  PoolOptions,
  PoolStats,
  ReaddirOptions,
  SnapshotFileEntry,
  SnapshotInfo,
  SnapshotManifest,
  SnapshotNetwork,
  StageFile,
  SymlinkPolicy,
  VmState,
  VmTimings,
  WatchOptions,
  WriteFileOptions,
  WriteFileSource,
} from "../index.ts";
export type {
  WireLimits as ServerLimits,
  WireMount as RemoteMount,
  WireServerInfo as ServerInfo,
  WireStartConfig,
} from "../wire/index.ts";
export { RemoteExecBuilder, RemoteExecHandle } from "./exec.ts";
export { RemoteFileSystem } from "./fs.ts";
export { RemoteImage, RemoteImageBuilder, type RemoteSnapshot, type RemoteStartConfig } from "./image.ts";
export { RemotePool, RemotePoolBuilder } from "./pool.ts";
export type { ConnectOptions, RemoteImages, RemoteStore } from "./remote.ts";
export { connect, Remote } from "./remote.ts";
export { RemotePooledVm, RemoteVm } from "./vm.ts";
