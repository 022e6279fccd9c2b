/**
 * Reads a plain host directory into a {@link FileTree} (for `--rootfs DIR` builds). Nothing is
 * followed: symlinks become symlinks, special files stay special files. Files owned by the
 * invoking (non-root) user become root-owned in the model, like a rootless container runtime
 * maps its user to root; other owners are kept as they are.
 *
 * Race-free against a directory that changes under it: each directory is opened with
 * O_NOFOLLOW | O_DIRECTORY, checked to be the inode `lstat` saw, and then listed and its entries
 * `lstat`ed through that descriptor (`/proc/self/fd/N/name`), so a directory swapped for a
 * symlink is never followed. Regular files keep the (device, inode) seen here; the writer opens
 * them with O_NOFOLLOW and refuses one that is not that inode any more.
 */
import {
  closeSync,
  constants,
  fstatSync,
  lstatSync,
  openSync,
  readdirSync,
  readlinkSync,
  type Stats,
} from "node:fs";
import { SupermachineError } from "../errors.ts";
import { throwIfAborted, yieldToLoop } from "../internal/index.ts";
import { type DirNode, FileTree, type TreeNode } from "./file-tree.ts";

function devMajor(rdev: number): number {
  return ((rdev >>> 8) & 0xfff) | (Math.floor(rdev / 2 ** 32) & ~0xfff);
}

function devMinor(rdev: number): number {
  return (rdev & 0xff) | ((rdev >>> 12) & ~0xff & 0xfffff);
}

export interface ScanOptions {
  /** Owner mapped to root (default: the effective uid/gid when not root; nothing when root). */
  mapUid?: number | undefined;
  mapGid?: number | undefined;
  signal?: AbortSignal | undefined;
}

export async function scanDirectory(dir: string, options: ScanOptions = {}): Promise<FileTree> {
  const euid = process.geteuid?.() ?? 0;
  const egid = process.getegid?.() ?? 0;
  const mapUid = options.mapUid ?? (euid === 0 ? undefined : euid);
  const mapGid = options.mapGid ?? (euid === 0 ? undefined : egid);
  const uid = (u: number): number => (u === mapUid ? 0 : u);
  const gid = (g: number): number => (g === mapGid ? 0 : g);

  let rootStat: Stats;
  try {
    rootStat = lstatSync(dir);
  } catch (cause) {
    throw new SupermachineError("INVALID_ARGUMENT", `cannot read root filesystem directory ${dir}`, {
      cause,
    });
  }
  if (!rootStat.isDirectory()) {
    throw new SupermachineError("INVALID_ARGUMENT", `root filesystem ${dir} is not a directory`);
  }
  const tree = new FileTree();
  const root = tree.root;
  root.mode = rootStat.mode & 0o7777;
  root.uid = uid(rootStat.uid);
  root.gid = gid(rootStat.gid);
  root.mtime = Math.floor(rootStat.mtimeMs / 1000);

  const links = new Map<string, TreeNode>();
  let ops = 0;
  const changed = (path: Buffer, cause?: unknown): SupermachineError =>
    new SupermachineError(
      "ROOTFS_BUILD",
      `${path.toString()} changed while it was read (a directory swapped for something else); build again from a directory nobody changes`,
      cause === undefined ? undefined : { cause },
    );
  /** Lists the directory `path`, which lstat saw as `seen`, through a descriptor; calls `each` with it open. */
  const withDir = async (
    path: Buffer,
    seen: Stats,
    each: (fdPath: string, names: Buffer[]) => Promise<void>,
  ) => {
    let fd: number;
    try {
      fd = openSync(path, constants.O_RDONLY | constants.O_DIRECTORY | constants.O_NOFOLLOW);
    } catch (cause) {
      if (
        (cause as NodeJS.ErrnoException).code === "ELOOP" ||
        (cause as NodeJS.ErrnoException).code === "ENOTDIR"
      )
        throw changed(path, cause);
      throw new SupermachineError("ROOTFS_BUILD", `cannot read directory ${path.toString()}`, { cause });
    }
    try {
      const st = fstatSync(fd);
      if (st.ino !== seen.ino || st.dev !== seen.dev) throw changed(path);
      const fdPath = `/proc/self/fd/${fd}`;
      let names: Buffer[];
      try {
        names = readdirSync(fdPath, { encoding: "buffer" });
      } catch (cause) {
        throw new SupermachineError("ROOTFS_BUILD", `cannot read directory ${path.toString()}`, { cause });
      }
      await each(fdPath, names);
    } finally {
      closeSync(fd);
    }
  };
  const visit = (node: DirNode, path: Buffer, seen: Stats): Promise<void> =>
    withDir(path, seen, async (fdPath, names) => {
      for (const nameBuf of names) {
        if (++ops % 512 === 0) {
          await yieldToLoop();
          throwIfAborted(options.signal, "reading the root filesystem directory");
        }
        const childPath = Buffer.concat([path, Buffer.from("/"), nameBuf]);
        const viaFd = Buffer.concat([Buffer.from(`${fdPath}/`), nameBuf]);
        const name = nameBuf.toString("latin1");
        const st = lstatSync(viaFd);
        const meta = {
          mode: st.mode & 0o7777,
          uid: uid(st.uid),
          gid: gid(st.gid),
          mtime: Math.floor(st.mtimeMs / 1000),
          xattrs: undefined,
        };
        const key = `${st.dev}:${st.ino}`;
        if (!st.isDirectory() && !st.isSymbolicLink() && st.nlink > 1) {
          const seen = links.get(key);
          if (seen !== undefined) {
            tree.place(node, name, seen);
            continue;
          }
        }
        let child: TreeNode;
        if (st.isDirectory()) {
          child = { kind: "dir", ...meta, children: new Map() };
        } else if (st.isFile()) {
          child = {
            kind: "file",
            ...meta,
            size: st.size,
            source: { path: childPath, offset: 0, identity: { dev: st.dev, ino: st.ino } },
            nlink: 0,
          };
        } else if (st.isSymbolicLink()) {
          child = {
            kind: "symlink",
            ...meta,
            target: readlinkSync(viaFd, { encoding: "buffer" }).toString("latin1"),
            nlink: 0,
          };
        } else if (st.isCharacterDevice() || st.isBlockDevice()) {
          const kind = st.isCharacterDevice() ? "char" : "block";
          child = { kind, ...meta, major: devMajor(st.rdev), minor: devMinor(st.rdev), nlink: 0 };
        } else if (st.isFIFO()) {
          child = { kind: "fifo", ...meta, nlink: 0 };
        } else {
          child = { kind: "socket", ...meta, nlink: 0 };
        }
        tree.place(node, name, child);
        if (st.nlink > 1 && child.kind !== "dir" && child.kind !== "symlink") links.set(key, child);
        if (child.kind === "dir") await visit(child, childPath, st);
      }
    });
  await visit(root, Buffer.from(dir), rootStat);
  return tree;
}
