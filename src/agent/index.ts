/**
 * The host side of the guest agent protocol (docs/protocol.md): the frame codec, the messages,
 * and the client that multiplexes exec and file streams over one channel.
 */

export {
  AgentClient,
  type AgentConnectOptions,
  type AgentRehelloOptions,
  type GuestFile,
  type WriteFileOptions,
  type WriteFileSource,
} from "./agent-client.ts";
export {
  ExecChannel,
  type ExecExit,
  type ExecOutput,
  type ExecRequest,
  type StagedFile,
} from "./exec-channel.ts";
export type { GuestFileInfo } from "./file-streams.ts";
export { MAX_PAYLOAD } from "./frame-codec.ts";
export { hostClock } from "./host-clock.ts";
export { DEFAULT_GRACE_MS, PROTOCOL_VERSION } from "./messages.ts";
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
