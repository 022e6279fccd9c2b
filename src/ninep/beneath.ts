/**
 * Race-free file operations beneath a directory descriptor, in plain Node.
 *
 * Node has no `openat`, but Linux resolves `/proc/self/fd/<fd>` as a magic link: the path walk
 * jumps to the inode the descriptor holds, without looking at any path string, and never follows a
 * symlink it lands on. So `/proc/self/fd/<dirfd>/<name>` resolves exactly one `<name>` inside the
 * directory `dirfd` holds — with `O_NOFOLLOW` (and `O_DIRECTORY` for intermediate components) it
 * is `openat(dirfd, name, …)`. The same path gives `mkdirat`, `unlinkat`, `renameat`,
 * `symlinkat`, `linkat` (which does not follow `name`), `readlinkat`, `fchownat(…,
 * AT_SYMLINK_NOFOLLOW)`; and `/proc/self/fd/<fd>` alone gives `fchmod`, `fchown`, `futimens`,
 * `ftruncate`, `fstatfs` on an `O_PATH` descriptor (acting on the inode itself, even a symlink).
 * Names are raw bytes (Buffers): Linux names need not be UTF-8.
 */

import fs from "node:fs";
import fsp from "node:fs/promises";
import { promisify } from "node:util";

/** `O_PATH` (not in `fs.constants`; Node passes numeric flags through to open(2)). */
export const O_PATH = 0o10000000;
export const { O_NOFOLLOW, O_DIRECTORY, O_CREAT, O_EXCL, O_RDONLY, O_WRONLY, O_RDWR, O_TRUNC, O_APPEND } =
  fs.constants;
export const O_SYNC = fs.constants.O_SYNC;
export const O_DSYNC = fs.constants.O_DSYNC;
export const O_ACCMODE = 3;

const PREFIX = "/proc/self/fd/";

/** `/proc/self/fd/<fd>`: the inode `fd` holds. */
export function self(fd: number): string {
  return `${PREFIX}${fd}`;
}

/** `/proc/self/fd/<dirFd>/<name>`: `name` resolved inside the directory `dirFd` holds. */
export function at(dirFd: number, name: Uint8Array): Buffer {
  const prefix = `${PREFIX}${dirFd}/`;
  const out = Buffer.allocUnsafe(prefix.length + name.length);
  out.write(prefix, 0, "latin1");
  out.set(name, prefix.length);
  return out;
}

export const open = promisify(fs.open) as (
  path: fs.PathLike,
  flags: number,
  mode?: number,
) => Promise<number>;
export const close = promisify(fs.close);
export const fstat = (fd: number): Promise<fs.BigIntStats> =>
  new Promise((resolve, reject) =>
    fs.fstat(fd, { bigint: true }, (error, stats) => (error ? reject(error) : resolve(stats))),
  );
export const read = (
  fd: number,
  buffer: Buffer,
  offset: number,
  length: number,
  position: bigint,
): Promise<number> =>
  new Promise((resolve, reject) =>
    fs.read(fd, buffer, offset, length, position, (error, n) => (error ? reject(error) : resolve(n))),
  );
/** pwrite(2). `position` must be a safe integer: `fs.write` silently treats a bigint as "current position". */
export const write = (fd: number, data: Uint8Array, position: number): Promise<number> =>
  new Promise((resolve, reject) =>
    fs.write(fd, data, 0, data.length, position, (error, n) => (error ? reject(error) : resolve(n))),
  );
export const fsync = promisify(fs.fsync);
export const fdatasync = promisify(fs.fdatasync);
export const fchmod = promisify(fs.fchmod);
export const fchown = promisify(fs.fchown);

export const lstat = (path: Buffer): Promise<fs.BigIntStats> => fsp.lstat(path, { bigint: true });
export const stat = (path: Buffer): Promise<fs.BigIntStats> => fsp.stat(path, { bigint: true });
export const { mkdir, rename, unlink, rmdir, symlink, link, chmod, chown, lchown, truncate, utimes, statfs } =
  fsp;
export const readlink = (path: Buffer): Promise<Buffer> => fsp.readlink(path, { encoding: "buffer" });
export const opendir = (path: string): Promise<fs.Dir> =>
  fsp.opendir(path, { encoding: "buffer" as BufferEncoding, bufferSize: 64 });

/** The positive errno of a failed system call (`EIO` for anything else). */
export function errnoOf(error: unknown): number {
  const e = error as NodeJS.ErrnoException;
  if (typeof e?.errno === "number" && e.errno < 0) return -e.errno;
  if (typeof e?.errno === "number" && e.errno > 0) return e.errno;
  return 5; // EIO
}
