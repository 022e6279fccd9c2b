/**
 * Writes a {@link FileTree} into a fresh staging directory that `mke2fs -d` copies: directories,
 * regular files (copied out of the spool, hardlinks are real hardlinks), symlinks and
 * permission bits. Device nodes, FIFOs and sockets are not created here (an unprivileged user
 * cannot make devices); the debugfs pass makes them. Owners, ctimes and xattrs are fixed there
 * too. Every node created gets `host` = what `lstat` reports for its staged copy, so the
 * fix-up pass knows exactly what `mke2fs -d` will have copied.
 *
 * Safety: every path written is `staging root + names from the model`, each name a single
 * validated component (no `/`, not `.`/`..`), every parent a directory this function created with
 * exclusive `mkdir` in this run. Nothing is written through a symlink: symlinks are only ever
 * leaves of the model, and files are created with exclusive-create flags.
 */
import {
  chmodSync,
  closeSync,
  linkSync,
  lstatSync,
  lutimesSync,
  mkdirSync,
  openSync,
  readSync,
  symlinkSync,
  writeSync,
} from "node:fs";
import { setImmediate as yieldToLoop } from "node:timers/promises";
import { throwIfAborted } from "./abort.ts";
import {
  compareBytes,
  type DirNode,
  type FileNode,
  type FileTree,
  type HostAttrs,
  type TreeNode,
} from "./file-tree.ts";

/** Opens content sources once each; copies ranges of them into new files. */
export class ContentReader {
  readonly #fds = new Map<string, number>();
  readonly #buf = Buffer.allocUnsafe(1024 * 1024);

  fd(path: string | Buffer): number {
    const key = typeof path === "string" ? path : path.toString("latin1");
    let fd = this.#fds.get(key);
    if (fd === undefined) {
      fd = openSync(path, "r");
      this.#fds.set(key, fd);
    }
    return fd;
  }

  /** Copies `file`'s content into `fd` (from offset 0). */
  copyTo(file: FileNode, fd: number): void {
    if (file.source === undefined) return;
    const src = this.fd(file.source.path);
    let done = 0;
    while (done < file.size) {
      const want = Math.min(this.#buf.length, file.size - done);
      const got = readSync(src, this.#buf, 0, want, file.source.offset + done);
      if (got === 0) throw new Error(`content of ${String(file.source.path)} ended early`);
      let off = 0;
      while (off < got) off += writeSync(fd, this.#buf, off, got - off, done + off);
      done += got;
    }
  }

  close(): void {
    for (const fd of this.#fds.values()) closeSync(fd);
    this.#fds.clear();
  }
}

const SEP = Buffer.from("/");

function child(dir: Buffer, name: string): Buffer {
  return Buffer.concat([dir, SEP, Buffer.from(name, "latin1")]);
}

/** Times `utimes` can set on every host file system we expect (ext4, xfs, btrfs, tmpfs). */
function hostTimeOk(t: number): boolean {
  return Number.isSafeInteger(t) && t >= 0 && t < 2 ** 31;
}

function stagedAttrs(path: Buffer): HostAttrs {
  const st = lstatSync(path, { bigint: false });
  return {
    uid: st.uid,
    gid: st.gid,
    mode: st.mode & 0o7777,
    mtime: Math.floor(st.mtimeMs / 1000),
    atime: Math.floor(st.atimeMs / 1000),
  };
}

/** Sets permission bits and times on a staged node and records what the host then reports. */
function finish(path: Buffer, node: TreeNode): void {
  if (node.kind === "dir") chmodSync(path, node.mode | 0o700);
  else if (node.kind === "file") chmodSync(path, node.mode | 0o400);
  if (hostTimeOk(node.mtime)) lutimesSync(path, node.mtime, node.mtime);
  node.host = stagedAttrs(path);
}

export interface MaterialiseStats {
  dirs: number;
  files: number;
  hardlinks: number;
  symlinks: number;
  /** Devices, FIFOs and sockets left for the debugfs pass. */
  specials: number;
}

export async function materialiseTree(
  tree: FileTree,
  stagingDir: string,
  signal?: AbortSignal | undefined,
): Promise<MaterialiseStats> {
  const stats: MaterialiseStats = { dirs: 0, files: 0, hardlinks: 0, symlinks: 0, specials: 0 };
  const placed = new Map<TreeNode, Buffer>();
  const content = new ContentReader();
  let ops = 0;
  mkdirSync(stagingDir, { mode: 0o700 }); // must not exist yet
  chmodSync(stagingDir, 0o700); // drop a setgid bit inherited from the parent

  const visit = async (dir: DirNode, path: Buffer): Promise<void> => {
    const names = [...dir.children.keys()].sort(compareBytes);
    const symlinks: string[] = [];
    for (const name of names) {
      if (++ops % 512 === 0) {
        await yieldToLoop();
        throwIfAborted(signal, "writing the staging tree");
      }
      const node = dir.children.get(name)!;
      const target = child(path, name);
      switch (node.kind) {
        case "dir":
          mkdirSync(target, { mode: 0o700 });
          stats.dirs++;
          await visit(node, target);
          finish(target, node);
          break;
        case "file": {
          const first = placed.get(node);
          if (first !== undefined) {
            linkSync(first, target);
            stats.hardlinks++;
            break;
          }
          const fd = openSync(target, "wx", 0o600);
          try {
            content.copyTo(node, fd);
          } finally {
            closeSync(fd);
          }
          placed.set(node, target);
          stats.files++;
          finish(target, node);
          break;
        }
        case "symlink":
          symlinks.push(name);
          break;
        default:
          node.host = undefined;
          stats.specials++;
      }
    }
    // Symlinks last, so nothing is ever created in this directory after a symlink exists in it.
    for (const name of symlinks) {
      const node = dir.children.get(name)!;
      if (node.kind !== "symlink") continue;
      const target = child(path, name);
      symlinkSync(Buffer.from(node.target, "latin1"), target);
      stats.symlinks++;
      finish(target, node);
    }
  };
  const root = Buffer.from(stagingDir);
  try {
    await visit(tree.root, root);
  } finally {
    content.close();
  }
  return stats;
}
