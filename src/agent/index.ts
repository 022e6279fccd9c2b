/**
 * The host side of the guest agent protocol (docs/protocol.md): the frame codec, the messages,
 * and the client that multiplexes exec and file streams over one channel.
 */

export {
  AgentClient,
  type AgentConnectOptions,
  type AgentRehelloOptions,
  type GuestFile,
  type GuestIdentity,
  type ReadFileBytesOptions,
  type ReadFileOptions,
  type WriteFileOptions,
  type WriteFileSource,
} from "./agent-client.ts";
export type { AgentCallOptions } from "./deadline.ts";
export {
  ExecChannel,
  type ExecExit,
  type ExecOutput,
  type ExecRequest,
  envList,
  type StagedFile,
} from "./exec-channel.ts";
export type { GuestFileInfo } from "./file-streams.ts";
export { MAX_PAYLOAD } from "./frame-codec.ts";
export {
  F_OK,
  GuestFs,
  R_OK,
  type ReaddirOptions,
  W_OK,
  X_OK,
} from "./guest-fs.ts";
export type { GuestWatchEvent, GuestWatcher, WatchOptions } from "./guest-watch.ts";
export { hostClock } from "./host-clock.ts";
export { DEFAULT_GRACE_MS, HOSTNAME_PATTERN, PROTOCOL_VERSION } from "./messages.ts";
// The mounts channel (the sm.mounts port): live host-directory mounts, served by src/ninep.
export {
  MountChannel,
  type MountChannelConnectOptions,
  MountHandle,
  type MountRequest,
  type MountServer,
  type MountState,
} from "./mount-channel.ts";
export { MOUNT_CACHE_MODES, MOUNT_PROTOCOL_VERSION, type MountCacheMode } from "./mount-messages.ts";
export { signalName, signalNumber } from "./signals.ts";
export type { ConnectTcpOptions } from "./tcp-tunnel.ts";
export type { WorkloadLogsOptions, WorkloadSpec, WorkloadStatus } from "./workload.ts";
