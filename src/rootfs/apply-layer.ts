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
import { closeSync, openSync, unlinkSync, writeSync } from "node:fs";
import { join } from "node:path";
import { throwIfAborted } from "./abort.ts";
import {
  type ContentRef,
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

/**
 * Where content goes: one append-only file per layer, with a generated name, in a directory
 * only this build writes to. A file's content is a range of it ({@link ContentRef}). When no
 * file of the tree refers to a spool file any more (everything it held was replaced or whited
 * out), it is deleted.
 */
export class Spool {
  readonly dir: string;
  /** Bytes of content spooled so far (including content later replaced). */
  totalBytes = 0;
  #count = 0;
  #fd: number | undefined;
  #path = "";
  #pos = 0;
  readonly #live = new Map<string, number>();

  constructor(dir: string) {
    this.dir = dir;
  }

  /** Starts the spool file of the next layer. */
  beginLayer(): void {
    this.endLayer();
    this.#path = join(this.dir, String(this.#count++));
    this.#fd = openSync(this.#path, "wx", 0o600);
    this.#pos = 0;
    this.#live.set(this.#path, 0);
  }

  /** Closes the current spool file (and deletes it if nothing refers to it). */
  endLayer(): void {
    if (this.#fd === undefined) return;
    closeSync(this.#fd);
    this.#fd = undefined;
    this.#maybeDelete(this.#path);
  }

  /** Appends a body of `size` bytes; returns where it is. */
  async write(body: AsyncIterable<Buffer>, size: number): Promise<ContentRef> {
    if (this.#fd === undefined) this.beginLayer();
    const fd = this.#fd!;
    const ref: ContentRef = { path: this.#path, offset: this.#pos };
    for await (const chunk of body) {
      let off = 0;
      while (off < chunk.length) {
        const n = writeSync(fd, chunk, off, chunk.length - off, this.#pos);
        off += n;
        this.#pos += n;
      }
    }
    this.totalBytes += size;
    this.#live.set(this.#path, (this.#live.get(this.#path) ?? 0) + size);
    return ref;
  }

  /** `size` bytes at `ref` are no longer needed. */
  release(ref: ContentRef, size: number): void {
    if (typeof ref.path !== "string" || !this.#live.has(ref.path)) return;
    this.#live.set(ref.path, this.#live.get(ref.path)! - size);
    if (ref.path !== this.#path || this.#fd === undefined) this.#maybeDelete(ref.path);
  }

  #maybeDelete(path: string): void {
    if (this.#live.get(path) === 0) {
      unlinkSync(path);
      this.#live.delete(path);
    }
  }

  /** Spool files still holding content. */
  get files(): string[] {
    return [...this.#live.keys()];
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

export async function applyLayer(options: ApplyLayerOptions): Promise<ApplyLayerResult> {
  const { tree, spool, limits, signal } = options;
  const reader = new TarReader(options.source, { layer: options.layer, limits });
  tree.beginLayer();
  spool.beginLayer();
  let entries = 0;
  for await (const entry of reader.entries()) {
    throwIfAborted(signal, "applying layers");
    // The display name is only needed for an error: decode it lazily.
    const ctx: OpContext = {
      layer: options.layer,
      get entry() {
        return displayName(entry.name);
      },
    };
    const file = applyEntry(tree, entry, ctx);
    if (tree.nodeCount > limits.maxNodes)
      throw unsafe(ctx, `more than ${limits.maxNodes} files and directories`);
    if (file !== undefined && entry.size > 0) {
      if (spool.totalBytes + entry.size > limits.maxTotalBytes) {
        throw unsafe(ctx, `layers expand to more than ${limits.maxTotalBytes} bytes of file content`);
      }
      // Content goes to a file we named, never through a path taken from the layer.
      file.source = await spool.write(entry.body(), entry.size);
    }
    entries++;
    options.onEntry?.(entries, reader.position);
  }
  spool.endLayer();
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
