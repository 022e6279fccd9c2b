/** The 9P2000.L server behind live host-directory mounts (docs/mounts.md). A leaf module. */

export {
  type Dirent,
  decodeDirents,
  decodeMessage,
  encodeMessage,
  HEADER_BYTES,
  IOHDRSZ,
  LAYOUTS,
  MAX_MSIZE,
  type Message,
  type MessageFields,
  type MessageName,
  MIN_MSIZE,
  messageName,
  NOFID,
  NOTAG,
  type Qid,
  QidType,
  readSize,
  VERSION_9P2000L,
} from "./codec.ts";
export { ninepProtocolError } from "./protocol-error.ts";
export {
  leavesRoot,
  type MountOwner,
  NinepServer,
  type NinepServerOptions,
  type NinepServerStats,
  SYMLINK_POLICIES,
  type SymlinkPolicy,
  serve9p,
} from "./server.ts";
