/**
 * Small helpers every module uses: paths, cancellation, diagnostics, memos; and plain values the
 * library and the client share (guest file stats, exec outcomes, the host side of exposed ports). No VM code: the client and the wire use it too.
 */
export { mapAbort, raceAbort, throwIfAborted } from "./abort.ts";
export { nodeCrypto, nodeDns, nodeZlib, yieldToLoop } from "./builtins.ts";
export { debug, publish } from "./diagnostics.ts";
export { type ExecOutcomeInit, ExecOutcomeRecord } from "./exec-outcome.ts";
export {
  checkPort,
  type ExposedPort,
  type ExposeTcpOptions,
  exposeTcp,
  type GuestConnector,
  splice,
} from "./expose-tcp.ts";
export { GuestDirent, GuestStats, type GuestStatsInit, guestStats } from "./guest-stats.ts";
export { hostError, typedErrors } from "./host-error.ts";
export { Lazy, memoize, once } from "./memo.ts";
export { cacheDir, dataDir, runtimeDir } from "./paths.ts";
export { SocketReads, socketReads } from "./socket-reads.ts";
