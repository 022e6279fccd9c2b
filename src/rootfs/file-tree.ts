/**
 * The in-memory model of an image's root filesystem. Layers are applied to it; nothing on the
 * host is ever created from a layer's path. Paths are resolved inside the model the way a chroot
 * resolves them: intermediate symlinks are followed within the root, `..` stops at the root, and
 * a layer writing `lib/x` where `lib -> usr/lib` lands in `usr/lib/x`.
 *
 * Names are byte strings (one latin1 character per byte, see `tar-reader.ts`).
 */
import { LayerError } from "../errors.ts";
import { displayName } from "./tar-reader.ts";

/** Linux follows at most 40 symlinks while resolving one path. */
export const MAX_SYMLINK_EXPANSIONS = 40;
/** ext4's limit for one name. */
export const MAX_NAME_BYTES = 255;
/** Longest symlink target accepted (PATH_MAX - 1; also ext4's limit with 4 KiB blocks). */
export const MAX_SYMLINK_BYTES = 4095;

interface Meta {
  /** Permission bits including setuid/setgid/sticky (`& 0o7777`). */
  mode: number;
  uid: number;
  gid: number;
  /** Whole seconds since the epoch. */
  mtime: number;
  xattrs: Map<string, Buffer> | undefined;
}

export interface DirNode extends Meta {
  kind: "dir";
  children: Map<string, TreeNode>;
}

/** Where a regular file's bytes are: `size` bytes at `offset` of a host file (a spool file of the build, or a file of a source directory). */
export interface ContentRef {
  path: string | Buffer;
  offset: number;
  /** A file of a source directory: the inode it was when scanned; opening anything else is refused. */
  identity?: { dev: number; ino: number } | undefined;
}

export interface FileNode extends Meta {
  kind: "file";
  /** Logical size (holes of a sparse file included). */
  size: number;
  /** The content: byte `x` of the file is at `source.offset + x`; undefined for an empty file. */
  source: ContentRef | undefined;
  /** A sparse file's data ranges (sorted, disjoint); the rest are holes. Undefined: all data. */
  segments?: readonly { offset: number; length: number }[] | undefined;
  nlink: number;
}

export interface SymlinkNode extends Meta {
  kind: "symlink";
  /** Byte string, stored verbatim, never followed on the host. */
  target: string;
  nlink: number;
}

export interface DeviceNode extends Meta {
  kind: "char" | "block";
  major: number;
  minor: number;
  nlink: number;
}

export interface FifoNode extends Meta {
  kind: "fifo";
  nlink: number;
}

export interface SocketNode extends Meta {
  kind: "socket";
  nlink: number;
}

export type TreeNode = DirNode | FileNode | SymlinkNode | DeviceNode | FifoNode | SocketNode;
export type LeafNode = Exclude<TreeNode, DirNode>;

/** Layer + entry an operation works for, to name them in errors. */
export interface OpContext {
  layer: string;
  /** Display name of the entry. */
  entry: string;
}

export function unsafe(ctx: OpContext, message: string): LayerError {
  return new LayerError(
    "UNSAFE_LAYER",
    `unsafe layer ${ctx.layer} (entry ${JSON.stringify(ctx.entry)}): ${message}`,
    {
      layer: ctx.layer,
      entry: ctx.entry,
    },
  );
}

export function corrupt(ctx: OpContext, message: string): LayerError {
  return new LayerError(
    "CORRUPT_LAYER",
    `corrupt layer ${ctx.layer} (entry ${JSON.stringify(ctx.entry)}): ${message}`,
    {
      layer: ctx.layer,
      entry: ctx.entry,
    },
  );
}

export function newDir(meta: Meta | undefined = undefined): DirNode {
  return {
    kind: "dir",
    mode: meta?.mode ?? 0o755,
    uid: meta?.uid ?? 0,
    gid: meta?.gid ?? 0,
    mtime: meta?.mtime ?? 0,
    xattrs: meta?.xattrs,
    children: new Map(),
  };
}

/**
 * Splits an archive path into components: leading `./` and empty / `.` components are dropped.
 * Absolute paths and any `..` component are refused (`UNSAFE_LAYER`): no legitimate layer
 * producer writes them, and refusing is simpler to reason about than clamping.
 */
export function splitArchivePath(name: string, ctx: OpContext, what = "path"): string[] {
  if (name.startsWith("/")) throw unsafe(ctx, `absolute ${what} ${JSON.stringify(displayName(name))}`);
  const out: string[] = [];
  for (const part of name.split("/")) {
    if (part === "" || part === ".") continue;
    if (part === "..") throw unsafe(ctx, `${what} ${JSON.stringify(displayName(name))} contains ".."`);
    if (part.length > MAX_NAME_BYTES)
      throw corrupt(ctx, `a name in ${what} is longer than ${MAX_NAME_BYTES} bytes`);
    out.push(part);
  }
  return out;
}

export class FileTree {
  readonly root: DirNode = newDir();
  /** Called when the last name of a regular file goes away (its spool file can be deleted). */
  onRelease: ((file: FileNode) => void) | undefined;
  /** Nodes created so far (entries and directories created on the way), to bound memory. */
  nodeCount = 1;
  /** Names created or replaced by the layer being applied (whiteouts only hide lower layers). */
  #declared = new WeakMap<DirNode, Set<string>>();

  /** Starts a new layer: whiteouts and opaque markers from now on hide only what exists so far. */
  beginLayer(): void {
    this.#declared = new WeakMap();
  }

  #declare(dir: DirNode, name: string): void {
    let set = this.#declared.get(dir);
    if (!set) {
      set = new Set();
      this.#declared.set(dir, set);
    }
    set.add(name);
  }

  #isDeclared(dir: DirNode, name: string): boolean {
    return this.#declared.get(dir)?.has(name) ?? false;
  }

  /**
   * Resolves `components` to a directory, following every symlink inside the root (`..` clamped
   * at the root). With `create`, missing directories are created (mode 0755, root-owned, as
   * containerd's MkdirAll does); without it, a missing or non-directory component gives undefined.
   */
  resolveDir(components: readonly string[], create: boolean, ctx: OpContext): DirNode | undefined {
    const stack: DirNode[] = [this.root];
    let pending: string[] = components.slice().reverse(); // pop() takes the next component
    let expansions = 0;
    while (pending.length > 0) {
      const c = pending.pop()!;
      if (c === "" || c === ".") continue;
      if (c === "..") {
        if (stack.length > 1) stack.pop();
        continue;
      }
      const cur = stack[stack.length - 1]!;
      let child = cur.children.get(c);
      if (child === undefined) {
        if (!create) return undefined;
        if (c.length > MAX_NAME_BYTES)
          throw corrupt(ctx, `a path component is longer than ${MAX_NAME_BYTES} bytes`);
        child = newDir();
        this.nodeCount++;
        cur.children.set(c, child);
        this.#declare(cur, c);
      }
      if (child.kind === "dir") {
        stack.push(child);
      } else if (child.kind === "symlink") {
        if (++expansions > MAX_SYMLINK_EXPANSIONS) {
          throw unsafe(
            ctx,
            `too many levels of symbolic links (loop?) while resolving ${JSON.stringify(displayName(c))}`,
          );
        }
        if (child.target.startsWith("/")) stack.length = 1;
        pending = pending.concat(child.target.split("/").reverse());
      } else {
        if (!create) return undefined;
        throw corrupt(ctx, `${JSON.stringify(displayName(c))} is not a directory`);
      }
    }
    return stack[stack.length - 1]!;
  }

  /** Looks up a path without following its last component. Undefined when it does not exist. */
  lookup(components: readonly string[], ctx: OpContext): TreeNode | undefined {
    if (components.length === 0) return this.root;
    const dir = this.resolveDir(components.slice(0, -1), false, ctx);
    return dir?.children.get(components[components.length - 1]!);
  }

  /**
   * Puts `node` at `dir/name`, replacing what is there (a directory over a directory keeps the
   * children and takes the new metadata). Returns the node now at that name.
   */
  place(dir: DirNode, name: string, node: TreeNode): TreeNode {
    const existing = dir.children.get(name);
    this.#declare(dir, name);
    if (existing !== undefined) {
      if (existing === node) return existing;
      if (existing.kind === "dir" && node.kind === "dir") {
        existing.mode = node.mode;
        existing.uid = node.uid;
        existing.gid = node.gid;
        existing.mtime = node.mtime;
        existing.xattrs = node.xattrs;
        return existing;
      }
      this.remove(dir, name);
    }
    dir.children.set(name, node);
    if (node.kind !== "dir") {
      if (node.nlink === 0) this.nodeCount++;
      node.nlink++;
    } else this.nodeCount++;
    return node;
  }

  /** Removes `dir/name` and everything under it. */
  remove(dir: DirNode, name: string): void {
    const node = dir.children.get(name);
    if (node === undefined) return;
    dir.children.delete(name);
    this.#release(node);
  }

  #release(node: TreeNode): void {
    if (node.kind === "dir") {
      for (const child of node.children.values()) this.#release(child);
      node.children.clear();
      return;
    }
    node.nlink--;
    if (node.nlink === 0 && node.kind === "file") this.onRelease?.(node);
  }

  /**
   * A whiteout for `dir/name`: removes what lower layers put there. What the current layer
   * created survives (OCI: a whiteout applies to lower layers only), and so do the directories
   * leading to it; a directory the current layer re-declared keeps only this layer's children.
   */
  whiteout(dir: DirNode, name: string): void {
    const node = dir.children.get(name);
    if (node === undefined) return;
    const declared = this.#isDeclared(dir, name);
    if (node.kind === "dir") {
      this.opaque(node);
      if (declared || node.children.size > 0) return;
    } else if (declared) {
      return;
    }
    this.remove(dir, name);
  }

  /** An opaque marker in `dir`: removes everything lower layers put under it. */
  opaque(dir: DirNode): void {
    for (const name of [...dir.children.keys()]) this.whiteout(dir, name);
  }
}

/** Visits every (directory, name, node) under `dir` in byte order of names, parents first. */
export function* walkTree(
  dir: DirNode,
  path: string[] = [],
): Generator<{ parent: DirNode; name: string; node: TreeNode; path: string[] }> {
  const names = [...dir.children.keys()].sort(compareBytes);
  for (const name of names) {
    const node = dir.children.get(name)!;
    const childPath = [...path, name];
    yield { parent: dir, name, node, path: childPath };
    if (node.kind === "dir") yield* walkTree(node, childPath);
  }
}

/** Byte-wise order of byte strings (what `LC_ALL=C` sorting gives). */
export function compareBytes(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}
