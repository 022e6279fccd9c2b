/**
 * Applies one layer (a tar stream) to a {@link FileTree}. Regular-file contents are spooled to
 * files with generated names in a directory the build owns; nothing else touches the host.
 *
 * Decisions on ambiguous input (docs/rootfs.md has the full table):
 * - absolute names and names with a `..` component: `UNSAFE_LAYER`;
 * - intermediate symlinks are followed inside the root like a chroot (`..` clamped at the root),
 *   missing directories on the way are created (0755, root, mtime 0); a non-directory on the way
 *   is `CORRUPT_LAYER`, more than 40 symlinks (a loop) `UNSAFE_LAYER`;
 * - the last component is never followed: an entry replaces whatever is there, except that a
 *   directory over a directory keeps its children and takes the new metadata;
 * - hardlink targets are archive paths resolved the same way (last component not followed);
 *   a missing target is `CORRUPT_LAYER`, a directory target `UNSAFE_LAYER`;
 * - whiteouts and opaque markers hide only what lower layers created (OCI image spec); entries of
 *   the same layer survive, in whatever order they appear;
 * - duplicate entries: the later one wins.
 */
import { closeSync, openSync, writeSync } from "node:fs";
import { join } from "node:path";
import { throwIfAborted } from "./abort.ts";
import {
  corrupt,
  type DirNode,
  type FileNode,
  type FileTree,
  MAX_SYMLINK_BYTES,
  type OpContext,
  splitArchivePath,
  type TreeNode,
  unsafe,
} from "./file-tree.ts";
import { displayName, type TarEntry, type TarLimits, TarReader } from "./tar-reader.ts";

export interface RootfsLimits extends TarLimits {
  /** Most bytes of file content all layers together may expand to. Default 256 GiB. */
  maxTotalBytes: number;
  /** Most nodes (entries plus directories created on the way) in the tree. Default 4 million. */
  maxNodes: number;
}

export const DEFAULT_ROOTFS_LIMITS: Readonly<Omit<RootfsLimits, keyof TarLimits>> = Object.freeze({
  maxTotalBytes: 256 * 1024 ** 3,
  maxNodes: 4_000_000,
});

/** Where content goes: one file per regular-file entry, named by a counter. */
export class Spool {
  readonly dir: string;
  #next = 0;
  /** Bytes of content spooled so far (including content later replaced). */
  totalBytes = 0;

  constructor(dir: string) {
    this.dir = dir;
  }

  allocate(): string {
    return join(this.dir, String(this.#next++));
  }
}

export interface ApplyLayerOptions {
  tree: FileTree;
  /** Uncompressed tar bytes. */
  source: AsyncIterable<Buffer | Uint8Array | string>;
  /** Names the layer in errors (its digest). */
  layer: string;
  spool: Spool;
  limits: RootfsLimits;
  signal?: AbortSignal | undefined;
  /** Called after each entry. */
  onEntry?: ((entriesDone: number, tarBytes: number) => void) | undefined;
}

export interface ApplyLayerResult {
  entries: number;
  tarBytes: number;
}

const WHITEOUT = ".wh.";
const OPAQUE = ".wh..wh..opq";

function checkId(value: number, what: string, ctx: OpContext): number {
  if (!Number.isSafeInteger(value) || value < 0 || value > 0xffff_ffff)
    throw corrupt(ctx, `${what} ${value} out of range`);
  return value;
}

async function spoolBody(entry: TarEntry, path: string): Promise<void> {
  // Exclusive create of a name we generated, in a directory only this build writes to.
  const fd = openSync(path, "wx", 0o600);
  try {
    for await (const chunk of entry.body()) {
      let off = 0;
      while (off < chunk.length) off += writeSync(fd, chunk, off, chunk.length - off);
    }
  } finally {
    closeSync(fd);
  }
}

export async function applyLayer(options: ApplyLayerOptions): Promise<ApplyLayerResult> {
  const { tree, spool, limits, signal } = options;
  const reader = new TarReader(options.source, { layer: options.layer, limits });
  tree.beginLayer();
  let entries = 0;
  for await (const entry of reader.entries()) {
    throwIfAborted(signal, "applying layers");
    const ctx: OpContext = { layer: options.layer, entry: displayName(entry.name) };
    const file = applyEntry(tree, entry, ctx);
    if (tree.nodeCount > limits.maxNodes)
      throw unsafe(ctx, `more than ${limits.maxNodes} files and directories`);
    if (file !== undefined && entry.size > 0) {
      if (spool.totalBytes + entry.size > limits.maxTotalBytes) {
        throw unsafe(ctx, `layers expand to more than ${limits.maxTotalBytes} bytes of file content`);
      }
      // Content goes to a name we generated, never through a path taken from the layer.
      const path = spool.allocate();
      await spoolBody(entry, path);
      spool.totalBytes += entry.size;
      file.source = path;
    }
    entries++;
    options.onEntry?.(entries, reader.position);
  }
  return { entries, tarBytes: reader.position };
}

/** Applies one entry's metadata to the tree. Returns the new regular file whose content is still to come. */
export function applyEntry(tree: FileTree, entry: TarEntry, ctx: OpContext): FileNode | undefined {
  const components = splitArchivePath(entry.name, ctx);
  if (components.length === 0) {
    if (entry.type !== "dir") throw corrupt(ctx, "the root can only be a directory");
    const root = tree.root;
    root.mode = entry.mode;
    root.uid = checkId(entry.uid, "uid", ctx);
    root.gid = checkId(entry.gid, "gid", ctx);
    root.mtime = entry.mtime;
    root.xattrs = entry.xattrs.size > 0 ? new Map(entry.xattrs) : undefined;
    return undefined;
  }
  const base = components[components.length - 1]!;
  const parentPath = components.slice(0, -1);
  // aufs metadata (/.wh..wh.plnk/…, /.wh..wh.aufs, …): ignored, as moby does.
  if (components[0]!.startsWith(`${WHITEOUT}${WHITEOUT}`)) return undefined;

  if (base.startsWith(WHITEOUT)) {
    const dir = tree.resolveDir(parentPath, false, ctx);
    if (base === OPAQUE) {
      if (dir) tree.opaque(dir);
      return undefined;
    }
    if (base.startsWith(`${WHITEOUT}${WHITEOUT}`)) return undefined; // aufs metadata (.wh..wh.plnk, …)
    const hidden = base.slice(WHITEOUT.length);
    if (hidden === "" || hidden === "." || hidden === "..")
      throw unsafe(ctx, "whiteout with an invalid name");
    if (dir) tree.whiteout(dir, hidden);
    return undefined;
  }

  const parent: DirNode = tree.resolveDir(parentPath, true, ctx)!;
  const meta = {
    mode: entry.mode,
    uid: checkId(entry.uid, "uid", ctx),
    gid: checkId(entry.gid, "gid", ctx),
    mtime: entry.mtime,
    xattrs: entry.xattrs.size > 0 ? new Map(entry.xattrs) : undefined,
  };
  let node: TreeNode;
  let file: FileNode | undefined;
  switch (entry.type) {
    case "dir":
      node = { kind: "dir", ...meta, children: new Map() };
      break;
    case "file":
      file = { kind: "file", ...meta, size: entry.size, source: undefined, nlink: 0 };
      node = file;
      break;
    case "symlink":
      if (entry.linkname.length > MAX_SYMLINK_BYTES) {
        throw corrupt(ctx, `symlink target longer than ${MAX_SYMLINK_BYTES} bytes`);
      }
      node = { kind: "symlink", ...meta, target: entry.linkname, nlink: 0 };
      break;
    case "char":
    case "block":
      if (entry.devMajor > 0xfff || entry.devMinor > 0xfffff) {
        throw corrupt(ctx, `device number ${entry.devMajor}:${entry.devMinor} out of range`);
      }
      node = { kind: entry.type, ...meta, major: entry.devMajor, minor: entry.devMinor, nlink: 0 };
      break;
    case "fifo":
      node = { kind: "fifo", ...meta, nlink: 0 };
      break;
    case "hardlink": {
      const targetPath = splitArchivePath(entry.linkname, ctx, "hardlink target");
      const target = tree.lookup(targetPath, ctx);
      if (target === undefined) {
        throw corrupt(ctx, `hardlink target ${JSON.stringify(displayName(entry.linkname))} does not exist`);
      }
      if (target.kind === "dir") throw unsafe(ctx, "hardlink to a directory");
      node = target;
      break;
    }
  }
  tree.place(parent, base, node);
  return file;
}
