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
export { signalName, signalNumber } from "./signals.ts";
