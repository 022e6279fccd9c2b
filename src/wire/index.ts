/**
 * The protocol between `supermachine serve` (src/server/) and `supermachine/client`
 * (src/client/): JSON shapes, errors with the library's codes, and the WebSocket stream framing
 * with its flow control. Both sides import it; it imports only `errors.ts`, `internal/` (and types
 * from the public API), so the client carries no VM code.
 */

// An outcome from a server is the library's own class (src/internal/exec-outcome.ts); the client
// knows it by this name.
export { ExecOutcomeRecord as RemoteOutcome } from "../internal/index.ts";
export { fromBase64, toBase64 } from "./base64.ts";
export { errorFromWire, errorToWire, httpStatusOf, type WireError, type WireErrorBody } from "./errors.ts";
export {
  execOptionsFromWire,
  execOptionsToWire,
  isBufferedInput,
  type WireExecOptions,
  type WireExecRequest,
  type WireStageFile,
} from "./exec-options.ts";
export { outcomeFromWire, outcomeToWire, type WireOutcome } from "./outcome.ts";
export { MAX_QUEUED, type PeerHandlers, type PeerTransport, StreamPeer } from "./peer.ts";
export {
  CHANNEL,
  CLOSE_NORMAL,
  CLOSE_PROTOCOL,
  type ClientMessage,
  decodeData,
  encodeData,
  MAX_CHUNK_BYTES,
  parseControl,
  ReceiveWindow,
  SendWindow,
  type ServerMessage,
  TCP_CHANNEL,
  WINDOW_BYTES,
} from "./stream.ts";
export * from "./types.ts";
