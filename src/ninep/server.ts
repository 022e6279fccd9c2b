/**
 * A 9P2000.L file server for one mount: it serves a host directory to the Linux 9p client in a
 * guest over any byte stream, and enforces the mount's policy on the host (docs/mounts.md).
 *
 * Security model: the guest is hostile. Every path is resolved beneath the mount root one
 * component at a time through descriptors (beneath.ts), never as a path string checked and then
 * opened; under the `deny` and `opaque` policies nothing is ever opened through a symlink, so a
 * symlink swapped in by a racing host process is at worst not found. Each fid holds an `O_PATH`
 * descriptor of its file; descriptors are reference-counted so a `Tclunk` racing a `Tread` can
 * never let a recycled descriptor number reach another file. Every count and size the guest
 * controls is bounded (message size ≤ msize, fids, requests and bytes in flight); a malformed
 * message ends the mount with `AGENT_PROTOCOL`, never the host process.
 */

import type { BigIntStats, Dir } from "node:fs";
import { constants as os } from "node:os";
import type { Duplex } from "node:stream";
import { SupermachineError } from "../errors.ts";
import { debug } from "../internal/index.ts";
import * as b from "./beneath.ts";
import {
  type Dirent,
  decodeMessage,
  direntSize,
  encodeDirent,
  encodeMessage,
  HEADER_BYTES,
  IOHDRSZ,
  LAYOUTS,
  MAX_MSIZE,
  type Message,
  type MessageFields,
  type MessageName,
  MIN_MSIZE,
  NOFID,
  type Qid,
  QidType,
  readSize,
  VERSION_9P2000L,
  writeHeader,
} from "./codec.ts";
import { ninepProtocolError } from "./protocol-error.ts";

/**
 * What symlinks may do on a mount.
 * - `deny`: the guest cannot create symlinks (`EPERM`); host symlinks whose target leaves the
 *   mount root cannot be read (`EACCES`), so no path lookup in the guest goes through them.
 * - `opaque` (default): the guest may create symlinks, stored verbatim and never resolved by the
 *   host; host symlinks leaving the root are refused as under `deny`.
 * - `follow`: the host follows every symlink wherever it points, outside the root too. Trusted,
 *   single-tenant use only.
 */
export type SymlinkPolicy = "deny" | "opaque" | "follow";

export const SYMLINK_POLICIES: readonly SymlinkPolicy[] = ["deny", "opaque", "follow"];

/** Owner given to files the guest creates. */
export interface MountOwner {
  uid: number;
  gid: number;
}

export interface NinepServerOptions {
  /** The host directory served as the mount's root (symlinks in this path are resolved once, now). */
  root: string;
  /** Every write, create, rename, chmod, truncate and xattr set fails with `EROFS`. */
  readOnly?: boolean;
  /** Default `"opaque"`. */
  symlinks?: SymlinkPolicy;
  /**
   * Owner of the files the guest creates, when the host process runs as root. Default: the owner
   * of `root`, which must not be root itself (pass `{ uid: 0, gid: 0 }` to mean it). Without root
   * privileges files belong to the host process and `owner` must be absent or equal to it.
   */
  owner?: MountOwner;
  /** Largest message size to negotiate. Default and maximum 1 MiB. */
  maxMsize?: number;
  /** Most fids the guest may hold at once. Default 8192. */
  maxFids?: number;
  /** Most requests served concurrently. Default 64. */
  maxInFlight?: number;
  /** Names the mount in debug traces and errors, e.g. the guest path. */
  label?: string;
}

/** Counters of a running server. */
export interface NinepServerStats {
  fids: number;
  inFlight: number;
  requests: number;
}

const DEFAULT_MAX_FIDS = 8192;
const DEFAULT_MAX_IN_FLIGHT = 64;
/** Bytes of requests and expected replies in flight at once (besides one msize-sized pair). */
const IN_FLIGHT_BYTES = 8 * 1024 * 1024;
const NAME_MAX = 255;
const PATH_MAX = 4096;
/** Rgetattr `valid`: mode, nlink, uid, gid, rdev, atime, mtime, ctime, ino, size, blocks. */
const STATS_BASIC = 0x7ffn;
const SETATTR = {
  MODE: 0x1,
  UID: 0x2,
  GID: 0x4,
  SIZE: 0x8,
  ATIME: 0x10,
  MTIME: 0x20,
  ATIME_SET: 0x80,
  MTIME_SET: 0x100,
} as const;
const AT_REMOVEDIR = 0x200;
const LOCK_SUCCESS = 0;
const LOCK_TYPE_UNLCK = 2;
const S_IFMT = 0o170000;
const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;
/** Permission bits a guest may set: no setuid, no setgid. */
const SAFE_MODE_BITS = 0o1777;
const E = os.errno;

/** A failure the guest hears about as `Rlerror(errno)`. */
class Errno extends Error {
  readonly errno: number;
  constructor(errno: number, message = "") {
    super(message);
    this.errno = errno;
  }
}

function fail(errno: number, message = ""): never {
  throw new Errno(errno, message);
}

/** A descriptor shared by fids and operations in flight; closed when the last holder lets go. */
class FdRef {
  readonly fd: number;
  #refs = 1;
  constructor(fd: number) {
    this.fd = fd;
  }
  hold(): this {
    this.#refs++;
    return this;
  }
  release(): void {
    if (--this.#refs === 0) b.close(this.fd).catch((error) => debug("9p: close(%d): %s", this.fd, error));
  }
}

type FileKind = "dir" | "file" | "symlink" | "other";

/** An `O_PATH` descriptor of one file and where the guest found it. */
interface Node {
  ref: FdRef;
  kind: FileKind;
  qid: Qid;
  /** Names from the root to this file (empty for the root). */
  path: Buffer[];
}

interface DirCursor {
  dir: Dir;
  /** Number of the next entry `dir` yields, counting `.` and `..` as 0 and 1. */
  pos: number;
  /** Entries read (with their qids) but not sent yet. */
  queued: Dirent[];
  /** Readdirs of one fid run one after the other. */
  queue: Promise<void>;
}

interface Fid {
  node: Node;
  /** Set by `Tlopen`/`Tlcreate` on a regular file. */
  open: { ref: FdRef; accmode: number } | undefined;
  /** Set by `Tlopen` on a directory. */
  dir: DirCursor | undefined;
}

interface Request {
  tag: number;
  done: Promise<void>;
  cost: number;
}

type Policy = {
  readOnly: boolean;
  symlinks: SymlinkPolicy;
  /** Files the guest creates are given to this owner (root host process only). */
  owner: MountOwner | undefined;
  /** The host process is root: guest chown to uid/gid 0 needs an owner of 0. */
  root: boolean;
};

/**
 * Serves the 9P2000.L connection on `stream` from the host directory `options.root`. Resolves
 * once the root is open (`INVALID_ARGUMENT` if it is not a usable directory); the server then runs
 * until the stream ends or the guest breaks the protocol — see {@link NinepServer.closed}.
 */
export async function serve9p(stream: Duplex, options: NinepServerOptions): Promise<NinepServer> {
  const root = await openRoot(options);
  return new NinepServer(stream, options, root.ref, root.stats, root.policy);
}

async function openRoot(
  options: NinepServerOptions,
): Promise<{ ref: FdRef; stats: BigIntStats; policy: Policy }> {
  const symlinks = options.symlinks ?? "opaque";
  if (!SYMLINK_POLICIES.includes(symlinks)) {
    throw invalid(`symlink policy ${JSON.stringify(symlinks)} must be one of ${SYMLINK_POLICIES.join(", ")}`);
  }
  for (const [name, value, max] of [
    ["maxMsize", options.maxMsize, MAX_MSIZE],
    ["maxFids", options.maxFids, 1 << 20],
    ["maxInFlight", options.maxInFlight, 4096],
  ] as const) {
    if (value !== undefined && (!Number.isSafeInteger(value) || value < 1 || value > max)) {
      throw invalid(`${name} must be an integer from 1 to ${max}, got ${value}`);
    }
  }
  if (options.maxMsize !== undefined && options.maxMsize < MIN_MSIZE) {
    throw invalid(`maxMsize must be at least ${MIN_MSIZE}, got ${options.maxMsize}`);
  }
  let fd: number;
  try {
    fd = await b.open(options.root, b.O_PATH | b.O_DIRECTORY);
  } catch (error) {
    throw invalid(
      `mount source ${options.root} is not a directory the host can open (${(error as NodeJS.ErrnoException).code}): give an existing host directory`,
      error,
    );
  }
  const ref = new FdRef(fd);
  try {
    const stats = await b.fstat(fd);
    const readOnly = options.readOnly === true;
    const euid = process.geteuid?.() ?? 0;
    const egid = process.getegid?.() ?? 0;
    let owner: MountOwner | undefined;
    if (options.owner !== undefined) {
      const { uid, gid } = options.owner;
      for (const [name, id] of [
        ["uid", uid],
        ["gid", gid],
      ] as const) {
        if (!Number.isSafeInteger(id) || id < 0 || id >= 0xffff_ffff) {
          throw invalid(`owner.${name} ${id} is not a uid/gid`);
        }
      }
      if (euid !== 0 && (uid !== euid || gid !== egid)) {
        throw invalid(
          `owner ${uid}:${gid} needs root: files the guest creates belong to this process (${euid}:${egid})`,
        );
      }
    }
    if (euid === 0) {
      owner = options.owner ?? { uid: Number(stats.uid), gid: Number(stats.gid) };
      if (options.owner === undefined && !readOnly && (owner.uid === 0 || owner.gid === 0)) {
        throw invalid(
          `mount source ${options.root} is owned by ${owner.uid}:${owner.gid} and supermachine runs as root: pass owner { uid, gid } for the files the guest creates ({ uid: 0, gid: 0 } if they should belong to root)`,
        );
      }
    }
    return { ref, stats, policy: { readOnly, symlinks, owner, root: euid === 0 } };
  } catch (error) {
    ref.release();
    throw error;
  }
}

function invalid(message: string, cause?: unknown): SupermachineError {
  return new SupermachineError("INVALID_ARGUMENT", message, cause === undefined ? undefined : { cause });
}

/** A running 9P server; create with {@link serve9p}. */
export class NinepServer {
  /**
   * Settles when the connection ends: `undefined` when the stream ended or {@link close} was called
   * without a reason, else the error (`AGENT_PROTOCOL` for a malformed message). Never rejects.
   */
  readonly closed: Promise<Error | undefined>;

  readonly #stream: Duplex;
  readonly #label: string;
  readonly #rootRef: FdRef;
  readonly #rootDev: bigint;
  readonly #rootQid: Qid;
  readonly #policy: Policy;
  readonly #maxMsize: number;
  readonly #maxFids: number;
  readonly #maxInFlight: number;
  readonly #fids = new Map<number, Fid>();
  readonly #inFlight = new Map<number, Request>();
  #inFlightBytes = 0;
  #msize = 0;
  #requests = 0;
  #chunks: Buffer[] = [];
  #buffered = 0;
  /** A whole message that waits for room in flight (or for Tversion's barrier). */
  #held: Buffer | undefined;
  #needDrain = false;
  #ended = false;
  #closedWith: Error | undefined | null = null;
  #resolveClosed!: (value: Error | undefined) => void;

  readonly #onData = (chunk: Buffer) => {
    this.#chunks.push(chunk);
    this.#buffered += chunk.length;
    this.#pump();
  };
  readonly #onEnd = () => {
    this.#ended = true;
    this.#maybeFinish();
  };
  readonly #onClose = () => this.close();
  readonly #onError = (error: Error) => this.close(error);
  readonly #onDrain = () => {
    this.#needDrain = false;
    this.#pump();
  };

  /** @internal Use {@link serve9p}. */
  constructor(
    stream: Duplex,
    options: NinepServerOptions,
    root: FdRef,
    rootStats: BigIntStats,
    policy: Policy,
  ) {
    this.#stream = stream;
    this.#label = options.label ?? options.root;
    this.#rootRef = root;
    this.#rootDev = rootStats.dev;
    this.#policy = policy;
    this.#maxMsize = options.maxMsize ?? MAX_MSIZE;
    this.#maxFids = options.maxFids ?? DEFAULT_MAX_FIDS;
    this.#maxInFlight = options.maxInFlight ?? DEFAULT_MAX_IN_FLIGHT;
    this.#rootQid = this.#qid(rootStats);
    this.closed = new Promise((resolve) => {
      this.#resolveClosed = resolve;
    });
    stream.on("data", this.#onData);
    stream.on("end", this.#onEnd);
    stream.on("close", this.#onClose);
    stream.on("error", this.#onError);
    stream.on("drain", this.#onDrain);
  }

  get stats(): NinepServerStats {
    return { fids: this.#fids.size, inFlight: this.#inFlight.size, requests: this.#requests };
  }

  /**
   * Stops serving: drops every fid (their descriptors close once requests in flight finish) and
   * destroys the stream. Idempotent.
   */
  close(reason?: Error): void {
    if (this.#closedWith !== null) return;
    this.#closedWith = reason;
    if (reason !== undefined) debug("9p %s: closing: %s", this.#label, reason.message);
    this.#stream.off("data", this.#onData);
    this.#stream.off("end", this.#onEnd);
    this.#stream.off("close", this.#onClose);
    this.#stream.off("drain", this.#onDrain);
    this.#stream.destroy();
    this.#chunks = [];
    this.#held = undefined;
    this.#dropFids();
    this.#rootRef.release();
    this.#resolveClosed(reason);
  }

  // ------------------------------------------------------------------------------------------
  // Input: split the stream into messages, admit them within the in-flight bounds.

  #pump(): void {
    try {
      while (this.#closedWith === null) {
        const message = this.#held ?? this.#nextMessage();
        if (message === undefined) break;
        this.#held = message;
        if (!this.#admit(message)) break;
        this.#held = undefined;
        this.#dispatch(message);
      }
    } catch (error) {
      this.close(error as Error);
      return;
    }
    if (this.#closedWith !== null) return;
    // Stop reading while a message waits: what the guest sends next stays in the stream (and its
    // credit is not given back), so the host buffers a bounded amount.
    if (this.#held !== undefined) this.#stream.pause();
    else this.#stream.resume();
    this.#maybeFinish();
  }

  #nextMessage(): Buffer | undefined {
    if (this.#buffered < 4) return undefined;
    const first = this.#chunks[0]!;
    const size =
      first.length >= 4
        ? readSize(first)
        : readSize(Buffer.concat(this.#chunks, Math.min(this.#buffered, 4)));
    const limit = this.#msize || this.#maxMsize;
    if (size < HEADER_BYTES || size > limit) {
      throw ninepProtocolError(`message of ${size} bytes (limit ${limit})`);
    }
    if (this.#buffered < size) return undefined;
    let message: Buffer;
    if (first.length >= size) {
      message = first.subarray(0, size);
      if (first.length === size) this.#chunks.shift();
      else this.#chunks[0] = first.subarray(size);
    } else {
      message = Buffer.allocUnsafe(size);
      let filled = 0;
      while (filled < size) {
        const chunk = this.#chunks[0]!;
        const take = Math.min(chunk.length, size - filled);
        message.set(chunk.subarray(0, take), filled);
        filled += take;
        if (take === chunk.length) this.#chunks.shift();
        else this.#chunks[0] = chunk.subarray(take);
      }
    }
    this.#buffered -= size;
    return message;
  }

  /** Can `message` start now? Tversion waits for every request in flight; others for room. */
  #admit(message: Buffer): boolean {
    if (this.#needDrain) return false;
    const type = message[4]!;
    if (type === LAYOUTS.Tversion.type) return this.#inFlight.size === 0;
    if (this.#inFlight.size === 0) return true;
    return (
      this.#inFlight.size < this.#maxInFlight && this.#inFlightBytes + this.#cost(message) <= IN_FLIGHT_BYTES
    );
  }

  /** Bytes a request holds while in flight: itself and, for reads, the reply it may produce. */
  #cost(message: Buffer): number {
    const type = message[4]!;
    if ((type === LAYOUTS.Tread.type || type === LAYOUTS.Treaddir.type) && message.length >= 23) {
      return message.length + Math.min(message.readUInt32LE(19), this.#msize || this.#maxMsize);
    }
    return message.length + 256;
  }

  #dispatch(bytes: Buffer): void {
    const message = decodeMessage(bytes);
    const tag = message.tag;
    if (this.#inFlight.has(tag)) throw ninepProtocolError(`tag ${tag} is already in use`);
    this.#requests++;
    if (message.op === "Tversion") {
      this.#version(message);
      return;
    }
    const cost = this.#cost(bytes);
    const request: Request = { tag, cost, done: Promise.resolve() };
    this.#inFlight.set(tag, request);
    this.#inFlightBytes += cost;
    request.done = this.#serve(message).then(
      (reply) => this.#finish(request, reply),
      (error: unknown) => this.#finish(request, this.#errorReply(tag, error, message)),
    );
  }

  #finish(request: Request, reply: Buffer | undefined): void {
    this.#inFlight.delete(request.tag);
    this.#inFlightBytes -= request.cost;
    if (this.#closedWith !== null) return;
    if (reply !== undefined) this.#send(reply);
    this.#pump();
  }

  #send(reply: Buffer): void {
    if (!this.#stream.write(reply)) this.#needDrain = true;
  }

  #maybeFinish(): void {
    if (this.#ended && this.#closedWith === null && this.#held === undefined && this.#inFlight.size === 0) {
      this.close();
    }
  }

  #errorReply(tag: number, error: unknown, message: { op: string | undefined }): Buffer {
    let errno: number;
    if (error instanceof Errno) errno = error.errno;
    else if (typeof (error as NodeJS.ErrnoException)?.errno === "number") errno = b.errnoOf(error);
    else {
      debug("9p %s: %s failed: %s", this.#label, message.op, (error as Error)?.stack ?? error);
      errno = E.EIO;
    }
    return encodeMessage("Rlerror", tag, { ecode: errno });
  }

  // ------------------------------------------------------------------------------------------
  // Session

  #version(m: Message<"Tversion">): void {
    this.#dropFids();
    const known = m.version.equals(Buffer.from(VERSION_9P2000L));
    const msize = Math.min(m.msize, this.#maxMsize);
    if (!known || msize < MIN_MSIZE) {
      this.#msize = 0;
      this.#send(encodeMessage("Rversion", m.tag, { msize, version: Buffer.from("unknown") }));
      return;
    }
    this.#msize = msize;
    this.#send(encodeMessage("Rversion", m.tag, { msize, version: Buffer.from(VERSION_9P2000L) }));
  }

  #dropFids(): void {
    for (const fid of this.#fids.values()) this.#releaseFid(fid);
    this.#fids.clear();
  }

  #releaseFid(fid: Fid): void {
    fid.node.ref.release();
    fid.open?.ref.release();
    const cursor = fid.dir;
    if (cursor !== undefined) cursor.queue.finally(() => cursor.dir.close()).catch(() => {});
  }

  // ------------------------------------------------------------------------------------------
  // Requests

  async #serve(m: Message | { op: undefined; type: number; tag: number }): Promise<Buffer | undefined> {
    if (m.op === undefined || m.op[0] !== "T")
      return encodeMessage("Rlerror", m.tag, { ecode: E.EOPNOTSUPP });
    if (this.#msize === 0) fail(E.EPROTO, "no Tversion yet");
    const tag = m.tag;
    const reply = <N extends MessageName>(name: N, fields: MessageFields<N>) =>
      encodeMessage(name, tag, fields);
    switch (m.op) {
      case "Tauth":
        fail(E.EOPNOTSUPP);
        break;
      case "Tattach":
        return reply("Rattach", { qid: this.#attach(m) });
      case "Tflush": {
        const other = this.#inFlight.get(m.oldtag);
        if (other !== undefined) await other.done;
        return reply("Rflush", {});
      }
      case "Twalk":
        return reply("Rwalk", { qids: await this.#walk(m) });
      case "Tgetattr":
        return this.#getattr(m);
      case "Tsetattr":
        await this.#setattr(m);
        return reply("Rsetattr", {});
      case "Tstatfs":
        return this.#statfs(m);
      case "Tlopen":
        return reply("Rlopen", { qid: await this.#lopen(m), iounit: this.#iounit() });
      case "Tlcreate":
        return reply("Rlcreate", { qid: await this.#lcreate(m), iounit: this.#iounit() });
      case "Tread":
        return this.#read(m);
      case "Twrite":
        return reply("Rwrite", { count: await this.#write(m) });
      case "Treaddir":
        return this.#readdir(m);
      case "Tmkdir":
        return reply("Rmkdir", { qid: await this.#mkdir(m) });
      case "Tsymlink":
        return reply("Rsymlink", { qid: await this.#symlink(m) });
      case "Tmknod":
        return reply("Rmknod", { qid: await this.#mknod(m) });
      case "Treadlink":
        return reply("Rreadlink", { target: await this.#readlink(m) });
      case "Tlink":
        await this.#link(m);
        return reply("Rlink", {});
      case "Trename":
        await this.#rename(m);
        return reply("Rrename", {});
      case "Trenameat":
        await this.#renameat(m);
        return reply("Rrenameat", {});
      case "Tunlinkat":
        await this.#unlinkat(m);
        return reply("Runlinkat", {});
      case "Tremove":
        await this.#remove(m);
        return reply("Rremove", {});
      case "Tclunk":
        this.#clunk(m.fid);
        return reply("Rclunk", {});
      case "Tfsync":
        await this.#fsync(m);
        return reply("Rfsync", {});
      case "Tlock":
        this.#fid(m.fid);
        return reply("Rlock", { status: LOCK_SUCCESS });
      case "Tgetlock":
        this.#fid(m.fid);
        return reply("Rgetlock", {
          lockType: LOCK_TYPE_UNLCK,
          start: m.start,
          length: m.length,
          procId: m.procId,
          clientId: m.clientId,
        });
      case "Txattrwalk":
        this.#fid(m.fid);
        fail(E.EOPNOTSUPP);
        break;
      case "Txattrcreate":
        this.#fid(m.fid);
        this.#writable();
        fail(E.EOPNOTSUPP);
        break;
      default:
        fail(E.EOPNOTSUPP);
    }
  }

  #iounit(): number {
    return this.#msize - IOHDRSZ;
  }

  #fid(id: number): Fid {
    const fid = this.#fids.get(id);
    if (fid === undefined) fail(E.EBADF, `fid ${id} is not in use`);
    return fid;
  }

  #dirFid(id: number): Fid {
    const fid = this.#fid(id);
    if (fid.node.kind !== "dir") fail(E.ENOTDIR);
    return fid;
  }

  #newFid(id: number, node: Node, replacing?: number): void {
    if (id === NOFID) fail(E.EBADF, "NOFID");
    if (this.#fids.has(id) && id !== replacing) fail(E.EBADF, `fid ${id} is already in use`);
    if (!this.#fids.has(id) && this.#fids.size >= this.#maxFids) fail(E.EMFILE, "too many fids");
    const old = this.#fids.get(id);
    this.#fids.set(id, { node, open: undefined, dir: undefined });
    if (old !== undefined) this.#releaseFid(old);
  }

  #writable(): void {
    if (this.#policy.readOnly) fail(E.EROFS);
  }

  #attach(m: Message<"Tattach">): Qid {
    if (m.afid !== NOFID) fail(E.EINVAL, "authentication is not supported");
    this.#newFid(m.fid, { ref: this.#rootRef.hold(), kind: "dir", qid: this.#rootQid, path: [] });
    return this.#rootQid;
  }

  #clunk(id: number): void {
    const fid = this.#fid(id);
    this.#fids.delete(id);
    this.#releaseFid(fid);
  }

  // ------------------------------------------------------------------------------------------
  // Resolution beneath the root

  #qid(stats: BigIntStats): Qid {
    const type = kindOf(stats.mode);
    const qtype = type === "dir" ? QidType.DIR : type === "symlink" ? QidType.SYMLINK : QidType.FILE;
    // Inode numbers are unique per filesystem; fold in the device for mounts inside the root.
    const path = stats.dev === this.#rootDev ? stats.ino : stats.ino ^ (stats.dev << 48n);
    return { type: qtype, version: 0, path: BigInt.asUintN(64, path) };
  }

  /** Opens `name` in the directory `dir` as an `O_PATH` node. `dirOnly`: it must be a directory. */
  async #lookup(dir: Node, name: Buffer, dirOnly: boolean): Promise<Node> {
    checkName(name);
    const flags = b.O_PATH | (dirOnly ? b.O_DIRECTORY : 0);
    let fd: number;
    if (this.#policy.symlinks === "follow") {
      try {
        fd = await b.open(b.at(dir.ref.fd, name), flags);
      } catch (error) {
        // A dangling symlink: show the link itself.
        const errno = b.errnoOf(error);
        if (dirOnly || (errno !== E.ENOENT && errno !== E.ELOOP)) throw error;
        fd = await b.open(b.at(dir.ref.fd, name), flags | b.O_NOFOLLOW);
      }
    } else {
      fd = await b.open(b.at(dir.ref.fd, name), flags | b.O_NOFOLLOW);
    }
    return this.#node(fd, [...dir.path, Buffer.from(name)]); // a copy: `name` is a view of the message
  }

  async #node(fd: number, path: Buffer[]): Promise<Node> {
    const ref = new FdRef(fd);
    try {
      const stats = await b.fstat(fd);
      return { ref, kind: kindOf(stats.mode), qid: this.#qid(stats), path };
    } catch (error) {
      ref.release();
      throw error;
    }
  }

  /** The directory at `path` (names from the root), resolved afresh one component at a time. */
  async #resolveDir(path: readonly Buffer[]): Promise<Node> {
    let cur: Node = { ref: this.#rootRef.hold(), kind: "dir", qid: this.#rootQid, path: [] };
    try {
      for (const name of path) {
        const next = await this.#lookup(cur, name, true);
        cur.ref.release();
        cur = next;
      }
      return cur;
    } catch (error) {
      cur.ref.release();
      throw error;
    }
  }

  /**
   * The parent directory of `node` and its name there, checked to still hold `node` (a file
   * renamed meanwhile gives `ENOENT`, never another file).
   */
  async #parentOf(node: Node): Promise<{ parent: Node; name: Buffer }> {
    if (node.path.length === 0) fail(E.EBUSY, "the mount root has no parent in the mount");
    const parent = await this.#resolveDir(node.path.slice(0, -1));
    const name = node.path[node.path.length - 1]!;
    try {
      const path = b.at(parent.ref.fd, name);
      let found = this.#qid(await b.lstat(path)).path;
      if (found !== node.qid.path && this.#policy.symlinks === "follow") {
        found = this.#qid(await b.stat(path)).path;
      }
      if (found !== node.qid.path) fail(E.ENOENT, "the file was renamed or replaced");
      return { parent, name };
    } catch (error) {
      parent.ref.release();
      throw error;
    }
  }

  async #walk(m: Message<"Twalk">): Promise<Qid[]> {
    const fid = this.#fid(m.fid);
    if (m.names.length === 0) {
      // A clone (onto itself: nothing to do).
      if (m.newfid !== m.fid) this.#newFid(m.newfid, { ...fid.node, ref: fid.node.ref.hold() });
      return [];
    }
    if (m.newfid !== m.fid && this.#fids.has(m.newfid)) fail(E.EBADF, `fid ${m.newfid} is already in use`);
    if (fid.node.kind !== "dir") fail(E.ENOTDIR);
    const qids: Qid[] = [];
    let cur: Node = { ...fid.node, ref: fid.node.ref.hold() };
    let handedOver = false;
    try {
      for (const [i, name] of m.names.entries()) {
        let next: Node;
        try {
          if (cur.kind !== "dir") fail(E.ENOTDIR);
          next = isDotDot(name)
            ? await this.#resolveDir(cur.path.slice(0, -1))
            : await this.#lookup(cur, name, i < m.names.length - 1);
        } catch (error) {
          if (i === 0) throw error;
          return qids; // a partial walk: newfid stays unused
        }
        cur.ref.release();
        cur = next;
        qids.push(cur.qid);
      }
      this.#newFid(m.newfid, cur, m.fid);
      handedOver = true;
      return qids;
    } finally {
      if (!handedOver) cur.ref.release();
    }
  }

  // ------------------------------------------------------------------------------------------
  // Attributes

  async #getattr(m: Message<"Tgetattr">): Promise<Buffer> {
    const node = this.#fid(m.fid).node;
    const ref = node.ref.hold();
    try {
      const s = await b.fstat(ref.fd);
      const sec = (ns: bigint) => ns / 1_000_000_000n;
      const nsec = (ns: bigint) => ns % 1_000_000_000n;
      return encodeMessage("Rgetattr", m.tag, {
        valid: STATS_BASIC,
        qid: this.#qid(s),
        mode: Number(s.mode),
        uid: Number(s.uid),
        gid: Number(s.gid),
        nlink: s.nlink,
        rdev: s.rdev,
        size: s.size,
        blksize: s.blksize,
        blocks: s.blocks,
        atimeSec: sec(s.atimeNs),
        atimeNsec: nsec(s.atimeNs),
        mtimeSec: sec(s.mtimeNs),
        mtimeNsec: nsec(s.mtimeNs),
        ctimeSec: sec(s.ctimeNs),
        ctimeNsec: nsec(s.ctimeNs),
        btimeSec: 0n,
        btimeNsec: 0n,
        gen: 0n,
        dataVersion: 0n,
      });
    } finally {
      ref.release();
    }
  }

  async #setattr(m: Message<"Tsetattr">): Promise<void> {
    const node = this.#fid(m.fid).node;
    if (m.valid === 0) return;
    this.#writable();
    const ref = node.ref.hold();
    const path = b.self(ref.fd);
    try {
      if (m.valid & SETATTR.MODE) {
        if (node.kind === "symlink") fail(E.EOPNOTSUPP);
        await b.chmod(path, m.mode & SAFE_MODE_BITS);
      }
      if (m.valid & (SETATTR.UID | SETATTR.GID)) {
        const uid = m.valid & SETATTR.UID ? m.uid : -1;
        const gid = m.valid & SETATTR.GID ? m.gid : -1;
        if (uid >= 0x7fff_ffff || gid >= 0x7fff_ffff) fail(E.EINVAL);
        const owner = this.#policy.owner;
        if (this.#policy.root && ((uid === 0 && owner?.uid !== 0) || (gid === 0 && owner?.gid !== 0))) {
          fail(E.EPERM, "files on this mount cannot be given to root");
        }
        await b.chown(path, uid, gid);
      }
      if (m.valid & SETATTR.SIZE) {
        if (node.kind !== "file") fail(node.kind === "dir" ? E.EISDIR : E.EINVAL);
        if (m.size > BigInt(Number.MAX_SAFE_INTEGER)) fail(E.EFBIG);
        await b.truncate(path, Number(m.size));
      }
      if (m.valid & (SETATTR.ATIME | SETATTR.MTIME)) {
        const now = Date.now() / 1000;
        const current = await b.fstat(ref.fd);
        const seconds = (sec: bigint, nsec: bigint) => Number(sec) + Number(nsec % 1_000_000_000n) / 1e9;
        const atime =
          m.valid & SETATTR.ATIME
            ? m.valid & SETATTR.ATIME_SET
              ? seconds(m.atimeSec, m.atimeNsec)
              : now
            : Number(current.atimeNs) / 1e9;
        const mtime =
          m.valid & SETATTR.MTIME
            ? m.valid & SETATTR.MTIME_SET
              ? seconds(m.mtimeSec, m.mtimeNsec)
              : now
            : Number(current.mtimeNs) / 1e9;
        await b.utimes(path, atime, mtime);
      }
    } finally {
      ref.release();
    }
  }

  async #statfs(m: Message<"Tstatfs">): Promise<Buffer> {
    const ref = this.#fid(m.fid).node.ref.hold();
    try {
      const s = await b.statfs(b.self(ref.fd), { bigint: true });
      return encodeMessage("Rstatfs", m.tag, {
        fsType: Number(s.type & 0xffff_ffffn),
        bsize: Number(s.bsize),
        blocks: s.blocks,
        bfree: s.bfree,
        bavail: s.bavail,
        files: s.files,
        ffree: s.ffree,
        fsid: 0n,
        namelen: NAME_MAX,
      });
    } finally {
      ref.release();
    }
  }

  // ------------------------------------------------------------------------------------------
  // Open, create, read, write

  async #lopen(m: Message<"Tlopen">): Promise<Qid> {
    const fid = this.#fid(m.fid);
    if (fid.open !== undefined || fid.dir !== undefined) fail(E.EBADF, "fid is already open");
    const node = fid.node;
    const accmode = m.flags & b.O_ACCMODE;
    const ref = node.ref.hold();
    try {
      if (node.kind === "dir") {
        if (accmode !== b.O_RDONLY) fail(E.EISDIR);
        const dir = await b.opendir(b.self(ref.fd));
        if (fid.open !== undefined || fid.dir !== undefined || this.#fids.get(m.fid) !== fid) {
          await dir.close();
          fail(E.EBADF);
        }
        fid.dir = { dir, pos: 0, queued: [], queue: Promise.resolve() };
        return node.qid;
      }
      // Devices, fifos and sockets are the guest kernel's own business (it never opens them here).
      if (node.kind !== "file") fail(E.EACCES, "only regular files and directories can be opened");
      if (accmode === 3) fail(E.EINVAL);
      if (accmode !== b.O_RDONLY || m.flags & b.O_TRUNC) this.#writable();
      const flags = accmode | (m.flags & (b.O_TRUNC | b.O_APPEND | b.O_SYNC | b.O_DSYNC));
      const fd = await b.open(b.self(ref.fd), flags);
      if (fid.open !== undefined || this.#fids.get(m.fid) !== fid) {
        await b.close(fd);
        fail(E.EBADF);
      }
      fid.open = { ref: new FdRef(fd), accmode };
      return node.qid;
    } finally {
      ref.release();
    }
  }

  /** After creating `name` in `dir`: give it to the owner when the host process is root. */
  async #own(dir: Node, name: Buffer, fd?: number): Promise<void> {
    const owner = this.#policy.owner;
    if (owner === undefined) return;
    if (fd !== undefined) await b.fchown(fd, owner.uid, owner.gid);
    else await b.lchown(b.at(dir.ref.fd, name), owner.uid, owner.gid);
  }

  async #lcreate(m: Message<"Tlcreate">): Promise<Qid> {
    const fid = this.#dirFid(m.fid);
    if (fid.open !== undefined || fid.dir !== undefined) fail(E.EBADF, "fid is already open");
    this.#writable();
    checkName(m.name);
    const accmode = m.flags & b.O_ACCMODE;
    if (accmode === 3) fail(E.EINVAL);
    const dir = fid.node;
    const dirRef = dir.ref.hold();
    let fd: number | undefined;
    try {
      // O_EXCL: never opens an existing file, never follows a symlink planted at the name.
      const flags =
        b.O_CREAT | b.O_EXCL | b.O_NOFOLLOW | accmode | (m.flags & (b.O_APPEND | b.O_SYNC | b.O_DSYNC));
      const mode = m.mode & SAFE_MODE_BITS;
      fd = await b.open(b.at(dirRef.fd, m.name), flags, mode);
      await b.fchmod(fd, mode); // the host process's umask does not apply to the guest's files
      await this.#own(dir, m.name, fd);
      const node = await this.#node(await b.open(b.self(fd), b.O_PATH), [...dir.path, Buffer.from(m.name)]);
      if (this.#fids.get(m.fid) !== fid || fid.open !== undefined) {
        node.ref.release();
        fail(E.EBADF);
      }
      fid.node.ref.release();
      fid.node = node;
      fid.open = { ref: new FdRef(fd), accmode };
      fd = undefined;
      return node.qid;
    } finally {
      dirRef.release();
      if (fd !== undefined) await b.close(fd).catch(() => {});
    }
  }

  async #read(m: Message<"Tread">): Promise<Buffer> {
    const fid = this.#fid(m.fid);
    const open = fid.open;
    if (open === undefined || open.accmode === b.O_WRONLY) fail(E.EBADF, "fid is not open for reading");
    const count = Math.min(m.count, this.#msize - HEADER_BYTES - 4);
    const reply = Buffer.allocUnsafe(HEADER_BYTES + 4 + count);
    const ref = open.ref.hold();
    try {
      const n = await b.read(ref.fd, reply, HEADER_BYTES + 4, count, m.offset);
      writeHeader(reply, HEADER_BYTES + 4 + n, LAYOUTS.Rread.type, m.tag);
      reply.writeUInt32LE(n, HEADER_BYTES);
      return reply.subarray(0, HEADER_BYTES + 4 + n);
    } finally {
      ref.release();
    }
  }

  async #write(m: Message<"Twrite">): Promise<number> {
    const fid = this.#fid(m.fid);
    this.#writable();
    const open = fid.open;
    if (open === undefined || open.accmode === b.O_RDONLY) fail(E.EBADF, "fid is not open for writing");
    if (m.offset + BigInt(m.data.length) > BigInt(Number.MAX_SAFE_INTEGER)) fail(E.EFBIG);
    const ref = open.ref.hold();
    try {
      return await b.write(ref.fd, m.data, Number(m.offset));
    } finally {
      ref.release();
    }
  }

  async #fsync(m: Message<"Tfsync">): Promise<void> {
    const open = this.#fid(m.fid).open;
    if (open === undefined) return;
    const ref = open.ref.hold();
    try {
      await (m.datasync ? b.fdatasync(ref.fd) : b.fsync(ref.fd));
    } finally {
      ref.release();
    }
  }

  // ------------------------------------------------------------------------------------------
  // Directories

  #readdir(m: Message<"Treaddir">): Promise<Buffer> {
    const fid = this.#fid(m.fid);
    const cursor = fid.dir;
    if (cursor === undefined) fail(E.EBADF, "directory is not open");
    const run = cursor.queue.then(() => this.#readdirNow(fid.node, cursor, m));
    cursor.queue = run.then(
      () => {},
      () => {},
    );
    return run;
  }

  /**
   * Entries are numbered in the order the host lists them, `.` and `..` first; an entry's offset
   * is its number + 1, so a `Treaddir` at the offset of the last entry sent continues the listing
   * and any other offset starts over and skips to it.
   */
  async #readdirNow(node: Node, cursor: DirCursor, m: Message<"Treaddir">): Promise<Buffer> {
    const limit = Math.min(m.count, this.#msize - HEADER_BYTES - 4);
    const reply = Buffer.allocUnsafe(HEADER_BYTES + 4 + limit);
    let pos = HEADER_BYTES + 4;
    if (m.offset > 0xffff_ffffn) fail(E.EINVAL);
    const offset = Number(m.offset);
    const ref = node.ref.hold();
    try {
      const next = cursor.queued[0] !== undefined ? Number(cursor.queued[0].offset) - 1 : cursor.pos;
      if (offset < next) {
        await cursor.dir.close().catch(() => {});
        cursor.dir = await b.opendir(b.self(ref.fd));
        cursor.pos = 0;
        cursor.queued = [];
      } else if (offset > next) {
        cursor.queued = cursor.queued.filter((e) => Number(e.offset) - 1 >= offset);
      }
      if (cursor.queued.length === 0) await this.#skipEntries(cursor, offset);
      for (;;) {
        if (cursor.queued.length === 0) cursor.queued = await this.#nextEntries(node, ref, cursor);
        const e = cursor.queued[0];
        if (e === undefined || pos + direntSize(e.name.length) > reply.length) break;
        pos = encodeDirent(reply, pos, e);
        cursor.queued.shift();
      }
      writeHeader(reply, pos, LAYOUTS.Rreaddir.type, m.tag);
      reply.writeUInt32LE(pos - HEADER_BYTES - 4, HEADER_BYTES);
      return reply.subarray(0, pos);
    } finally {
      ref.release();
    }
  }

  /** Advances the cursor to entry number `to` (without stat calls). */
  async #skipEntries(cursor: DirCursor, to: number): Promise<void> {
    while (cursor.pos < to) {
      if (cursor.pos >= 2 && (await cursor.dir.read()) === null) return;
      cursor.pos++;
    }
  }

  /** The next few entries with their qids (entries removed meanwhile are left out). */
  async #nextEntries(dirNode: Node, ref: FdRef, cursor: DirCursor): Promise<Dirent[]> {
    const names: { name: Buffer; index: number }[] = [];
    while (names.length < 32) {
      const index = cursor.pos;
      if (index < 2) {
        names.push({ name: Buffer.from(index === 0 ? "." : ".."), index });
        cursor.pos++;
        continue;
      }
      const entry = await cursor.dir.read();
      if (entry === null) break;
      cursor.pos++;
      names.push({ name: entry.name as unknown as Buffer, index });
    }
    const follow = this.#policy.symlinks === "follow";
    const qids = await Promise.all(
      names.map(async ({ name, index }): Promise<Qid | undefined> => {
        if (index === 0) return dirNode.qid;
        if (index === 1) return dirNode.path.length === 0 ? this.#rootQid : dirNode.qid;
        const path = b.at(ref.fd, name);
        try {
          return this.#qid(follow ? await b.stat(path).catch(() => b.lstat(path)) : await b.lstat(path));
        } catch {
          return undefined;
        }
      }),
    );
    const out: Dirent[] = [];
    for (const [i, { name, index }] of names.entries()) {
      const qid = qids[i];
      if (qid !== undefined) out.push({ qid, offset: BigInt(index + 1), type: dtype(qid), name });
    }
    return out;
  }

  async #mkdir(m: Message<"Tmkdir">): Promise<Qid> {
    const dir = this.#dirFid(m.dfid).node;
    this.#writable();
    checkName(m.name);
    const ref = dir.ref.hold();
    try {
      const path = b.at(ref.fd, m.name);
      await b.mkdir(path, m.mode & SAFE_MODE_BITS);
      const node = await this.#node(await b.open(path, b.O_PATH | b.O_NOFOLLOW | b.O_DIRECTORY), []);
      try {
        await b.chmod(b.self(node.ref.fd), m.mode & SAFE_MODE_BITS);
        await this.#own(dir, m.name);
        return node.qid;
      } finally {
        node.ref.release();
      }
    } finally {
      ref.release();
    }
  }

  async #symlink(m: Message<"Tsymlink">): Promise<Qid> {
    const dir = this.#dirFid(m.fid).node;
    this.#writable();
    if (this.#policy.symlinks === "deny") fail(E.EPERM, "symlinks are denied on this mount");
    checkName(m.name);
    if (m.target.length === 0 || m.target.length >= PATH_MAX || m.target.includes(0)) fail(E.EINVAL);
    const ref = dir.ref.hold();
    try {
      const path = b.at(ref.fd, m.name);
      // Stored verbatim, as symlink(2) does; never resolved here.
      await b.symlink(Buffer.from(m.target), path);
      await this.#own(dir, m.name);
      return this.#qid(await b.lstat(path));
    } finally {
      ref.release();
    }
  }

  async #mknod(m: Message<"Tmknod">): Promise<Qid> {
    const dir = this.#dirFid(m.dfid).node;
    this.#writable();
    checkName(m.name);
    const type = m.mode & S_IFMT;
    // Device nodes never; fifos and sockets need mknod(2), which Node does not have.
    if (type !== 0 && type !== S_IFREG) fail(E.EPERM, "only regular files can be made with mknod");
    const ref = dir.ref.hold();
    try {
      const mode = m.mode & SAFE_MODE_BITS;
      const fd = await b.open(b.at(ref.fd, m.name), b.O_CREAT | b.O_EXCL | b.O_NOFOLLOW | b.O_RDONLY, mode);
      try {
        await b.fchmod(fd, mode);
        await this.#own(dir, m.name, fd);
        return this.#qid(await b.fstat(fd));
      } finally {
        await b.close(fd);
      }
    } finally {
      ref.release();
    }
  }

  async #readlink(m: Message<"Treadlink">): Promise<Buffer> {
    const node = this.#fid(m.fid).node;
    if (node.kind !== "symlink") fail(E.EINVAL);
    const { parent, name } = await this.#parentOf(node);
    try {
      const target = await b.readlink(b.at(parent.ref.fd, name));
      if (this.#policy.symlinks !== "follow" && leavesRoot(target, node.path.length - 1)) {
        fail(E.EACCES, "the symlink points outside the mount");
      }
      return target;
    } finally {
      parent.ref.release();
    }
  }

  async #link(m: Message<"Tlink">): Promise<void> {
    const dir = this.#dirFid(m.dfid).node;
    const node = this.#fid(m.fid).node;
    this.#writable();
    checkName(m.name);
    if (node.kind === "dir") fail(E.EPERM);
    const dirRef = dir.ref.hold();
    try {
      const { parent, name } = await this.#parentOf(node);
      try {
        // link(2) does not follow the old name: it links exactly the entry inside the mount.
        await b.link(b.at(parent.ref.fd, name), b.at(dirRef.fd, m.name));
      } finally {
        parent.ref.release();
      }
    } finally {
      dirRef.release();
    }
  }

  async #rename(m: Message<"Trename">): Promise<void> {
    const fid = this.#fid(m.fid);
    const dir = this.#dirFid(m.dfid).node;
    this.#writable();
    checkName(m.name);
    const dirRef = dir.ref.hold();
    try {
      const { parent, name } = await this.#parentOf(fid.node);
      try {
        await b.rename(b.at(parent.ref.fd, name), b.at(dirRef.fd, m.name));
      } finally {
        parent.ref.release();
      }
      fid.node.path = [...dir.path, Buffer.from(m.name)];
    } finally {
      dirRef.release();
    }
  }

  async #renameat(m: Message<"Trenameat">): Promise<void> {
    const from = this.#dirFid(m.olddirfid).node;
    const to = this.#dirFid(m.newdirfid).node;
    this.#writable();
    checkName(m.oldname);
    checkName(m.newname);
    const fromRef = from.ref.hold();
    const toRef = to.ref.hold();
    try {
      await b.rename(b.at(fromRef.fd, m.oldname), b.at(toRef.fd, m.newname));
    } finally {
      fromRef.release();
      toRef.release();
    }
  }

  async #unlinkat(m: Message<"Tunlinkat">): Promise<void> {
    const dir = this.#dirFid(m.dirfid).node;
    this.#writable();
    checkName(m.name);
    const ref = dir.ref.hold();
    try {
      const path = b.at(ref.fd, m.name);
      await (m.flags & AT_REMOVEDIR ? b.rmdir(path) : b.unlink(path));
    } finally {
      ref.release();
    }
  }

  async #remove(m: Message<"Tremove">): Promise<void> {
    const fid = this.#fid(m.fid);
    // The fid is clunked whether or not the remove succeeds.
    this.#fids.delete(m.fid);
    try {
      this.#writable();
      const { parent, name } = await this.#parentOf(fid.node);
      try {
        const path = b.at(parent.ref.fd, name);
        await (fid.node.kind === "dir" ? b.rmdir(path) : b.unlink(path));
      } finally {
        parent.ref.release();
      }
    } finally {
      this.#releaseFid(fid);
    }
  }
}

function kindOf(mode: bigint | number): FileKind {
  const type = Number(mode) & S_IFMT;
  return type === S_IFDIR ? "dir" : type === S_IFREG ? "file" : type === S_IFLNK ? "symlink" : "other";
}

function dtype(qid: Qid): number {
  return qid.type === QidType.DIR ? 4 : qid.type === QidType.SYMLINK ? 10 : 8;
}

function isDotDot(name: Uint8Array): boolean {
  return name.length === 2 && name[0] === 0x2e && name[1] === 0x2e;
}

/** One directory entry name: not empty, `.` or `..`, no `/` or NUL, at most 255 bytes. */
function checkName(name: Uint8Array): void {
  if (name.length === 0 || name.length > NAME_MAX) fail(name.length === 0 ? E.EINVAL : E.ENAMETOOLONG);
  if ((name.length === 1 && name[0] === 0x2e) || isDotDot(name)) fail(E.EINVAL);
  if (name.includes(0x2f) || name.includes(0)) fail(E.EINVAL);
}

/**
 * Would a symlink with `target`, in a directory `depth` names below the mount root, lead out of
 * the root when resolved inside the mount? Absolute targets always do; relative ones when `..`
 * climbs above the root (a lexical check: it never looks at the files involved).
 */
export function leavesRoot(target: Uint8Array, depth: number): boolean {
  if (target[0] === 0x2f) return true;
  let level = depth;
  for (const part of Buffer.from(target.buffer, target.byteOffset, target.byteLength)
    .toString("latin1")
    .split("/")) {
    if (part === "" || part === ".") continue;
    if (part === "..") {
      if (--level < 0) return true;
    } else level++;
  }
  return false;
}
