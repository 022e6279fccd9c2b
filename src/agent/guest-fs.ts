/**
 * File-system operations in the guest (docs/protocol.md, "File-system operations"), shaped like
 * `node:fs/promises`: each is one `FS` round trip, results are plain objects (a `Stats`-like
 * {@link GuestStats}, `Dirent`-like {@link GuestDirent}), and failures are {@link GuestIoError}s
 * with Node's `code` (`ENOENT`, …), `errno`, `syscall` and `path`. Paths are absolute guest paths.
 */

import { AbortError, GuestIoError, OutputLimitError, SupermachineError } from "../errors.ts";
import { GuestDirent, type GuestStats, guestStats } from "../internal/index.ts";
import { type AgentCallOptions, agentTimeout, timeoutOption, Watchdog } from "./deadline.ts";
import { describeType, type Frame, MessageType } from "./frame-codec.ts";
import {
  DEFAULT_WINDOW,
  type DirentMessage,
  decodeDirents,
  decodeError,
  decodeStat,
  encodeFs,
  FsFlag,
  type FsMessage,
  FsOp,
} from "./messages.ts";
import { protocolError } from "./protocol-error.ts";
import { request } from "./request-stream.ts";
import {
  deferred,
  GuestCredit,
  type StreamHandler,
  type StreamHost,
  type StreamLink,
} from "./stream-link.ts";
import { syscallError } from "./syscall-error.ts";

const names = new TextDecoder("utf-8"); // non-UTF-8 names decode with U+FFFD, like Node's default

/** `fs.constants`-style access modes. */
export const F_OK = 0;
export const X_OK = 1;
export const W_OK = 2;
export const R_OK = 4;

/** Default cap on what one directory listing may hold on the host. */
export const DEFAULT_READDIR_MAX_BYTES = 16 * 1024 * 1024;
/** Host memory charged per directory entry on top of its name. */
const ENTRY_OVERHEAD = 64;

/** Options of {@link GuestFs.readdir}. */
export interface ReaddirOptions extends AgentCallOptions {
  withFileTypes?: boolean | undefined;
  /**
   * Cap on what the listing may hold on the host (names plus 64 bytes per entry), default 16 MiB:
   * beyond it the call fails with `OUTPUT_LIMIT`.
   */
  maxBufferBytes?: number | undefined;
}

function invalid(message: string): SupermachineError {
  return new SupermachineError("INVALID_ARGUMENT", message);
}

function absolute(path: string, what = "path"): string {
  if (typeof path !== "string" || !path.startsWith("/")) {
    throw invalid(`${what} ${JSON.stringify(path)} must be an absolute guest path`);
  }
  return path;
}

function modeOption(mode: number | string, what: string): number {
  const n = typeof mode === "string" ? Number.parseInt(mode, 8) : mode;
  if (!Number.isInteger(n) || n < 0 || n > 0o7777)
    throw invalid(`${what} ${String(mode)} is not a mode (0–0o7777)`);
  return n;
}

function idOption(id: number, what: string): number {
  if (id === -1) return 0xffff_ffff; // leave unchanged, like chown(2)
  if (!Number.isInteger(id) || id < 0 || id >= 0xffff_ffff) throw invalid(`${what} ${id} is not a uid/gid`);
  return id;
}

/** A time as Node's `utimes` takes it (seconds since the epoch, or a Date) in nanoseconds. */
function timeOption(t: number | Date, what: string): bigint {
  const ms = t instanceof Date ? t.getTime() : t * 1000;
  if (!Number.isFinite(ms) || ms < 0) throw invalid(`${what} ${String(t)} is not a time at or after 1970`);
  return BigInt(Math.round(ms * 1e6));
}

/**
 * The guest's file system, like `node:fs/promises`. Every method takes `signal` and `timeoutMs`
 * (default 30 000 ms; `AGENT_TIMEOUT` when the agent does not answer in time).
 */
export class GuestFs {
  readonly #host: StreamHost;

  constructor(host: StreamHost) {
    this.#host = host;
  }

  #call<T>(
    m: FsMessage,
    syscall: string,
    opts: AgentCallOptions,
    finish: (result: Uint8Array | undefined, path: Uint8Array | undefined) => T,
  ): Promise<T> {
    const payload = encodeFs(m);
    const target = { syscall, path: m.path, dest: m.path2 };
    return request(
      this.#host,
      MessageType.FS,
      payload,
      {
        operation: `${syscall} ${m.path}`,
        result: m.op === FsOp.STAT ? MessageType.STAT : undefined,
        finish: (result, ok) => finish(result, ok.path),
        fail: (e) => syscallError(e, target),
      },
      opts,
    );
  }

  async stat(path: string, opts: AgentCallOptions = {}): Promise<GuestStats> {
    return this.#stat(path, false, opts);
  }

  /** Like {@link stat}, but a symbolic link is reported itself, not followed. */
  async lstat(path: string, opts: AgentCallOptions = {}): Promise<GuestStats> {
    return this.#stat(path, true, opts);
  }

  #stat(path: string, noFollow: boolean, opts: AgentCallOptions): Promise<GuestStats> {
    const m = { op: FsOp.STAT, path: absolute(path), flags: noFollow ? FsFlag.NO_FOLLOW : undefined };
    return this.#call(m, noFollow ? "lstat" : "stat", opts, (result) => {
      if (result === undefined) throw protocolError(`stat ${path}: OK without STAT`);
      const m = decodeStat(result);
      return guestStats({ ...m, dev: Number(m.dev), ino: Number(m.ino), rdev: Number(m.rdev) });
    });
  }

  /** Names in a directory (without `.` and `..`), or {@link GuestDirent}s with `withFileTypes`. */
  readdir(path: string, opts: ReaddirOptions & { withFileTypes: true }): Promise<GuestDirent[]>;
  readdir(path: string, opts?: ReaddirOptions & { withFileTypes?: false | undefined }): Promise<string[]>;
  readdir(path: string, opts?: ReaddirOptions): Promise<string[] | GuestDirent[]>;
  async readdir(path: string, opts: ReaddirOptions = {}): Promise<string[] | GuestDirent[]> {
    absolute(path);
    const maxBytes = opts.maxBufferBytes ?? DEFAULT_READDIR_MAX_BYTES;
    if (!Number.isSafeInteger(maxBytes) || maxBytes <= 0)
      throw invalid(`maxBufferBytes ${maxBytes} is not a byte count`);
    const timeoutMs = timeoutOption(opts.timeoutMs);
    const signal = opts.signal;
    if (signal?.aborted) throw abortError(`readdir ${path}`, signal);
    const payload = encodeFs({ op: FsOp.READDIR, path, window: DEFAULT_WINDOW });
    const { handler } = this.#host.open(
      MessageType.FS,
      payload,
      (stream) => new DirectoryListing(this.#host.link, stream, path, DEFAULT_WINDOW, maxBytes, timeoutMs),
    );
    const onAbort = () => handler.reset(abortError(`readdir ${path}`, signal));
    signal?.addEventListener("abort", onAbort, { once: true });
    try {
      const entries = await handler.result;
      return opts.withFileTypes
        ? entries.map((e) => new GuestDirent(names.decode(e.name), path, e.type))
        : entries.map((e) => names.decode(e.name));
    } finally {
      signal?.removeEventListener("abort", onAbort);
    }
  }

  /**
   * Creates a directory (`mode` default 0o777, less the agent's umask 022). With `recursive`, creates
   * missing parents and resolves with the first directory it created (`undefined` if none).
   */
  async mkdir(
    path: string,
    opts: AgentCallOptions & { recursive?: boolean | undefined; mode?: number | string | undefined } = {},
  ): Promise<string | undefined> {
    const m = {
      op: FsOp.MKDIR,
      path: absolute(path),
      mode: opts.mode === undefined ? undefined : modeOption(opts.mode, "mode"),
      flags: opts.recursive ? FsFlag.RECURSIVE : undefined,
    };
    return this.#call(m, "mkdir", opts, (_, created) => (created ? names.decode(created) : undefined));
  }

  /**
   * Removes a file, symlink or (with `recursive`) a directory tree, never following symbolic links.
   * With `force`, a missing path is not an error. A directory without `recursive` fails with `EISDIR`.
   */
  async rm(
    path: string,
    opts: AgentCallOptions & { recursive?: boolean | undefined; force?: boolean | undefined } = {},
  ): Promise<void> {
    const flags = (opts.recursive ? FsFlag.RECURSIVE : 0) | (opts.force ? FsFlag.FORCE : 0);
    return this.#call({ op: FsOp.RM, path: absolute(path), flags: flags || undefined }, "rm", opts, () => {});
  }

  async rename(oldPath: string, newPath: string, opts: AgentCallOptions = {}): Promise<void> {
    const m = { op: FsOp.RENAME, path: absolute(oldPath, "oldPath"), path2: absolute(newPath, "newPath") };
    return this.#call(m, "rename", opts, () => {});
  }

  async chmod(path: string, mode: number | string, opts: AgentCallOptions = {}): Promise<void> {
    const m = { op: FsOp.CHMOD, path: absolute(path), mode: modeOption(mode, "mode") };
    return this.#call(m, "chmod", opts, () => {});
  }

  /** Changes owner and group (-1 leaves one unchanged), following a symbolic link. */
  async chown(path: string, uid: number, gid: number, opts: AgentCallOptions = {}): Promise<void> {
    return this.#chown(path, uid, gid, false, opts);
  }

  /** Like {@link chown}, on a symbolic link itself. */
  async lchown(path: string, uid: number, gid: number, opts: AgentCallOptions = {}): Promise<void> {
    return this.#chown(path, uid, gid, true, opts);
  }

  #chown(path: string, uid: number, gid: number, noFollow: boolean, opts: AgentCallOptions): Promise<void> {
    const m = {
      op: FsOp.CHOWN,
      path: absolute(path),
      flags: noFollow ? FsFlag.NO_FOLLOW : undefined,
      uid: idOption(uid, "uid"),
      gid: idOption(gid, "gid"),
    };
    return this.#call(m, noFollow ? "lchown" : "chown", opts, () => {});
  }

  /** Creates a symbolic link at `path` pointing to `target` (any string, relative or absolute). */
  async symlink(target: string, path: string, opts: AgentCallOptions = {}): Promise<void> {
    if (typeof target !== "string" || target === "")
      throw invalid("symlink target must be a non-empty string");
    const m = { op: FsOp.SYMLINK, path: absolute(path), path2: target };
    return this.#call(m, "symlink", opts, () => {});
  }

  async readlink(path: string, opts: AgentCallOptions = {}): Promise<string> {
    return this.#call({ op: FsOp.READLINK, path: absolute(path) }, "readlink", opts, (_, target) => {
      if (target === undefined) throw protocolError(`readlink ${path}: OK without a path`);
      return names.decode(target);
    });
  }

  async realpath(path: string, opts: AgentCallOptions = {}): Promise<string> {
    return this.#call({ op: FsOp.REALPATH, path: absolute(path) }, "realpath", opts, (_, real) => {
      if (real === undefined) throw protocolError(`realpath ${path}: OK without a path`);
      return names.decode(real);
    });
  }

  async truncate(path: string, len = 0, opts: AgentCallOptions = {}): Promise<void> {
    if (!Number.isSafeInteger(len) || len < 0) throw invalid(`truncate length ${len} is not a byte count`);
    return this.#call({ op: FsOp.TRUNCATE, path: absolute(path), size: len }, "truncate", opts, () => {});
  }

  /** Sets access and modification times (seconds since the epoch, or Dates), following a symlink. */
  async utimes(
    path: string,
    atime: number | Date,
    mtime: number | Date,
    opts: AgentCallOptions = {},
  ): Promise<void> {
    return this.#utimes(path, atime, mtime, false, opts);
  }

  /** Like {@link utimes}, on a symbolic link itself. */
  async lutimes(
    path: string,
    atime: number | Date,
    mtime: number | Date,
    opts: AgentCallOptions = {},
  ): Promise<void> {
    return this.#utimes(path, atime, mtime, true, opts);
  }

  #utimes(
    path: string,
    atime: number | Date,
    mtime: number | Date,
    noFollow: boolean,
    opts: AgentCallOptions,
  ): Promise<void> {
    const m = {
      op: FsOp.UTIMES,
      path: absolute(path),
      flags: noFollow ? FsFlag.NO_FOLLOW : undefined,
      atimeNs: timeOption(atime, "atime"),
      mtimeNs: timeOption(mtime, "mtime"),
    };
    return this.#call(m, noFollow ? "lutime" : "utime", opts, () => {});
  }

  /** Checks that `path` exists (`F_OK`, default) or is readable/writable/executable (`R_OK`, ...). */
  async access(path: string, mode = F_OK, opts: AgentCallOptions = {}): Promise<void> {
    if (!Number.isInteger(mode) || mode < 0 || mode > 7)
      throw invalid(`access mode ${mode} is not F_OK..R_OK|W_OK|X_OK`);
    return this.#call({ op: FsOp.ACCESS, path: absolute(path), mode }, "access", opts, () => {});
  }

  /** True if `path` exists (a dangling symlink does not); errors other than the guest's are thrown. */
  async exists(path: string, opts: AgentCallOptions = {}): Promise<boolean> {
    try {
      await this.access(path, F_OK, opts);
      return true;
    } catch (error) {
      if (error instanceof GuestIoError && error.errno !== undefined) return false;
      throw error;
    }
  }
}

function abortError(operation: string, signal: AbortSignal | undefined): Error {
  return new AbortError(`${operation} aborted`, { cause: signal?.reason });
}

/**
 * A directory listing: `DIRENTS` frames within the credit the host grants as it takes them, then
 * `OK`. What the listing holds is capped ({@link ReaddirOptions.maxBufferBytes}).
 */
class DirectoryListing implements StreamHandler {
  readonly #link: StreamLink;
  readonly #stream: number;
  readonly #path: string;
  readonly #credit: GuestCredit;
  readonly #maxBytes: number;
  readonly #watchdog: Watchdog;
  readonly #done = deferred<DirentMessage[]>();
  readonly #entries: DirentMessage[] = [];
  #bytes = 0;
  #ended = false;

  constructor(
    link: StreamLink,
    stream: number,
    path: string,
    window: number,
    maxBytes: number,
    timeoutMs: number,
  ) {
    this.#link = link;
    this.#stream = stream;
    this.#path = path;
    this.#maxBytes = maxBytes;
    this.#credit = new GuestCredit(link, stream, window, () => !this.#ended);
    this.#watchdog = new Watchdog(timeoutMs, () =>
      this.reset(agentTimeout(link, `readdir ${path}`, timeoutMs)),
    );
    this.#watchdog.arm();
  }

  get result(): Promise<DirentMessage[]> {
    return this.#done.promise;
  }

  onFrame(frame: Frame): void {
    this.#watchdog.progress();
    switch (frame.type) {
      case MessageType.DIRENTS: {
        const cost = this.#credit.take(frame, `readdir ${this.#path} (stream ${this.#stream})`);
        for (const e of decodeDirents(frame.payload)) {
          this.#bytes += e.name.length + ENTRY_OVERHEAD;
          if (this.#bytes > this.#maxBytes) {
            this.reset(
              new OutputLimitError(
                `readdir ${this.#path}: the listing exceeds maxBufferBytes (${this.#maxBytes}); pass a larger maxBufferBytes`,
                { maxBufferBytes: this.#maxBytes },
              ),
            );
            return;
          }
          this.#entries.push({ name: e.name.slice(), type: e.type });
        }
        this.#credit.grant(cost);
        return;
      }
      case MessageType.OK:
        this.#end();
        this.#done.resolve(this.#entries);
        return;
      case MessageType.ERROR: {
        const error = syscallError(decodeError(frame.payload), { syscall: "scandir", path: this.#path });
        this.#end();
        this.#done.reject(error);
        return;
      }
      default:
        throw protocolError(
          `readdir (stream ${this.#stream}): unexpected ${describeType(frame.type)} from the agent`,
        );
    }
  }

  onClose(error: Error): void {
    this.#ended = true;
    this.#watchdog.stop();
    this.#done.reject(error);
  }

  reset(reason: Error): void {
    if (this.#ended) return;
    this.#link.reset(this.#stream, this.#credit.outstanding);
    this.#end();
    this.#done.reject(reason);
  }

  #end(): void {
    this.#ended = true;
    this.#watchdog.stop();
    this.#link.release(this.#stream);
  }
}
