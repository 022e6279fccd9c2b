/**
 * `vm.fs`: the guest's files, with `node:fs/promises` names and semantics where they apply. Each
 * call is one round trip to the guest agent; a failed system call is a `GuestIoError` whose `code`
 * is the errno name (`ENOENT`, `EEXIST`, `ENOTDIR` …), like Node's own errors.
 */

import type { Readable } from "node:stream";
import type {
  AgentCallOptions,
  AgentClient,
  GuestWatcher,
  ReaddirOptions,
  WatchOptions,
  WriteFileOptions,
  WriteFileSource,
} from "../agent/index.ts";
import type { GuestDirent, GuestStats } from "../internal/index.ts";

/** Options of every `vm.fs` call: cancellation and a deadline (default: the agent's per call). */
export type FsCallOptions = AgentCallOptions;

let makeFs: (agent: () => AgentClient) => GuestFileSystem;

/** The file system of the guest whose agent `agent` returns (internal: the Vm's). */
export function guestFileSystem(agent: () => AgentClient): GuestFileSystem {
  return makeFs(agent);
}

/** The guest's file system, seen from the host. Get it as `vm.fs`. */
export class GuestFileSystem {
  readonly #agent: () => AgentClient;

  static {
    makeFs = (agent) => new GuestFileSystem(agent);
  }

  private constructor(agent: () => AgentClient) {
    this.#agent = agent;
  }

  /** Reads the whole file; with `encoding: "utf8"` as a string. */
  readFile(path: string, options: FsCallOptions & { encoding: "utf8" }): Promise<string>;
  readFile(
    path: string,
    options?: FsCallOptions & { encoding?: undefined; maxBytes?: number },
  ): Promise<Uint8Array>;
  async readFile(
    path: string,
    options: FsCallOptions & { encoding?: "utf8"; maxBytes?: number } = {},
  ): Promise<Uint8Array | string> {
    const { encoding, ...rest } = options;
    const bytes = await this.#agent().readFileBytes(path, rest);
    return encoding === "utf8" ? new TextDecoder().decode(bytes) : bytes;
  }

  /** Writes (atomically replaces; a mount point such as `/etc/hosts` in place) the file, streamed at any size. Default mode 0644. */
  async writeFile(path: string, data: WriteFileSource, options: WriteFileOptions = {}): Promise<void> {
    return this.#agent().writeFile(path, data, options);
  }

  /** The file's bytes as a stream, under backpressure (destroying it abandons the read). */
  async createReadStream(path: string, options: FsCallOptions = {}): Promise<Readable> {
    return (await this.#agent().readFile(path, options)).stream;
  }

  stat(path: string, options?: FsCallOptions): Promise<GuestStats> {
    return this.#agent().fs.stat(path, options);
  }

  lstat(path: string, options?: FsCallOptions): Promise<GuestStats> {
    return this.#agent().fs.lstat(path, options);
  }

  /** Names in the directory; with `withFileTypes: true`, `Dirent`-like entries. */
  readdir(path: string, options: ReaddirOptions & { withFileTypes: true }): Promise<GuestDirent[]>;
  readdir(path: string, options?: ReaddirOptions & { withFileTypes?: false | undefined }): Promise<string[]>;
  readdir(path: string, options?: ReaddirOptions): Promise<string[] | GuestDirent[]> {
    return this.#agent().fs.readdir(path, options);
  }

  /** Creates a directory (`recursive`: and its parents; resolves to the first one created). */
  mkdir(
    path: string,
    options?: FsCallOptions & { recursive?: boolean; mode?: number },
  ): Promise<string | undefined> {
    return this.#agent().fs.mkdir(path, options);
  }

  /** Removes a file or (with `recursive`) a tree, never following symlinks; `force` ignores a missing path. */
  rm(path: string, options?: FsCallOptions & { recursive?: boolean; force?: boolean }): Promise<void> {
    return this.#agent().fs.rm(path, options);
  }

  rename(oldPath: string, newPath: string, options?: FsCallOptions): Promise<void> {
    return this.#agent().fs.rename(oldPath, newPath, options);
  }

  chmod(path: string, mode: number | string, options?: FsCallOptions): Promise<void> {
    return this.#agent().fs.chmod(path, mode, options);
  }

  chown(path: string, uid: number, gid: number, options?: FsCallOptions): Promise<void> {
    return this.#agent().fs.chown(path, uid, gid, options);
  }

  lchown(path: string, uid: number, gid: number, options?: FsCallOptions): Promise<void> {
    return this.#agent().fs.lchown(path, uid, gid, options);
  }

  symlink(target: string, path: string, options?: FsCallOptions): Promise<void> {
    return this.#agent().fs.symlink(target, path, options);
  }

  readlink(path: string, options?: FsCallOptions): Promise<string> {
    return this.#agent().fs.readlink(path, options);
  }

  realpath(path: string, options?: FsCallOptions): Promise<string> {
    return this.#agent().fs.realpath(path, options);
  }

  truncate(path: string, length?: number, options?: FsCallOptions): Promise<void> {
    return this.#agent().fs.truncate(path, length, options);
  }

  utimes(path: string, atime: number | Date, mtime: number | Date, options?: FsCallOptions): Promise<void> {
    return this.#agent().fs.utimes(path, atime, mtime, options);
  }

  lutimes(path: string, atime: number | Date, mtime: number | Date, options?: FsCallOptions): Promise<void> {
    return this.#agent().fs.lutimes(path, atime, mtime, options);
  }

  /** Rejects unless the path is accessible in `mode` (`F_OK` 0, `R_OK` 4, `W_OK` 2, `X_OK` 1). */
  access(path: string, mode?: number, options?: FsCallOptions): Promise<void> {
    return this.#agent().fs.access(path, mode, options);
  }

  exists(path: string, options?: FsCallOptions): Promise<boolean> {
    return this.#agent().fs.exists(path, options);
  }

  /**
   * Changes under `path` as an async iterable (`for await (const event of vm.fs.watch("/app"))`),
   * from inotify in the guest; `recursive` watches the whole tree. Close it with `close()` or by
   * leaving the loop.
   */
  watch(path: string, options?: WatchOptions): GuestWatcher {
    return this.#agent().watch(path, options);
  }
}
