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
 * - duplicate entries: the later one wins;
 * - symlinks are lrwxrwxrwx (0777) whatever the header says, as every Linux extractor makes them;
 * - POSIX ACLs become `system.posix_acl_*` xattrs, and an access ACL sets the permission bits
 *   (and is not stored when it only restates them), as the kernel does when tar sets it; named
 *   entries without a numeric id are resolved in the image's own /etc/passwd and /etc/group.
 */
import { closeSync, ftruncateSync, openSync, readSync, unlinkSync, writeSync } from "node:fs";
import { join } from "node:path";
import { throwIfAborted } from "./abort.ts";
import { MAX_XATTR_BLOCK_BYTES, xattrBytes } from "./ext4-writer.ts";
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
import {
  ACCESS_XATTR,
  ACL_GROUP,
  ACL_USER,
  type AclEntry,
  applyAccessAcl,
  DEFAULT_XATTR,
  encodeAclXattr,
} from "./posix-acl.ts";
import { displayName, MetadataBudget, type TarEntry, type TarLimits, TarReader } from "./tar-reader.ts";

export interface RootfsLimits extends TarLimits {
  /**
   * Most bytes all layers together may decompress to (tar headers and file data, holes of sparse
   * files not included). Checked against what a zstd layer declares before it is decompressed,
   * against each entry's declared size before its data is read, and while reading. Default 128 GiB.
   */
  maxTotalBytes: number;
  /** Most nodes (entries plus directories created on the way) in the tree. Default 4 million. */
  maxNodes: number;
  /** Most bytes of xattr names and values all entries together may carry. Default 64 MiB. */
  maxXattrBytes: number;
}

export const DEFAULT_ROOTFS_LIMITS: Readonly<Omit<RootfsLimits, keyof TarLimits>> = Object.freeze({
  maxTotalBytes: 128 * 1024 ** 3,
  maxNodes: 4_000_000,
  maxXattrBytes: 64 * 1024 * 1024,
});

const ZERO_BLOCK = Buffer.alloc(4096);
const ZERO_CHUNK = Buffer.alloc(1024 * 1024);

/**
 * Where content goes: one append-only file per layer, with a generated name, in a directory
 * only this build writes to. A file's content is a range of it ({@link ContentRef}). When no
 * file of the tree refers to a spool file any more (everything it held was replaced or whited
 * out), it is deleted.
 */
export class Spool {
  readonly dir: string;
  /** Bytes of content spooled so far (including content later replaced; holes not counted). */
  totalBytes = 0;
  /** Bytes actually written to the host (all-zero 4 KiB blocks are left as holes). */
  writtenBytes = 0;
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
    this.#end = 0;
    this.#live.set(this.#path, 0);
  }

  /** Closes the current spool file (and deletes it if nothing refers to it). */
  endLayer(): void {
    if (this.#fd === undefined) return;
    closeSync(this.#fd);
    this.#fd = undefined;
    this.#maybeDelete(this.#path);
  }

  /** Closes the current spool file (the build failed; its directory is removed). */
  close(): void {
    if (this.#fd === undefined) return;
    closeSync(this.#fd);
    this.#fd = undefined;
  }

  /**
   * Appends a file of `size` bytes whose body yields the bytes of `segments` one after the other
   * (all of the file when undefined); returns where byte 0 of the file is. The spool file holds
   * the file at its logical offsets: holes and all-zero 4 KiB blocks are never written, so they
   * take no host disk space. `onWrite` is told the bytes written so far (to watch free space).
   */
  async write(
    body: AsyncIterable<Buffer>,
    size: number,
    segments: readonly { offset: number; length: number }[] | undefined,
    onWrite?: (writtenBytes: number) => void,
  ): Promise<ContentRef> {
    if (this.#fd === undefined) this.beginLayer();
    const fd = this.#fd!;
    const base = this.#pos;
    const ref: ContentRef = { path: this.#path, offset: base };
    const segs = segments ?? [{ offset: 0, length: size }];
    let k = 0;
    let segLeft = segs[0]?.length ?? 0;
    let at = base + (segs[0]?.offset ?? 0); // where the next body byte goes
    let dataBytes = 0;
    for await (const chunk of body) {
      let off = 0;
      while (off < chunk.length) {
        while (segLeft === 0) {
          k++;
          if (k >= segs.length) throw new Error("sparse file body longer than its map");
          segLeft = segs[k]!.length;
          at = base + segs[k]!.offset;
        }
        const take = Math.min(segLeft, chunk.length - off);
        this.#put(fd, chunk.subarray(off, off + take), at);
        off += take;
        at += take;
        segLeft -= take;
        dataBytes += take;
      }
      onWrite?.(this.writtenBytes);
    }
    this.#pos = base + size;
    // A file ending in a hole or zeros: the spool file must still reach its end.
    if (size > 0 && this.#end < this.#pos) {
      ftruncateSync(fd, this.#pos);
      this.#end = this.#pos;
    }
    this.totalBytes += dataBytes;
    this.#live.set(this.#path, (this.#live.get(this.#path) ?? 0) + size);
    return ref;
  }

  #end = 0; // length of the current spool file

  /** Writes `data` at `position`, leaving all-zero 4 KiB-aligned blocks unwritten. */
  #put(fd: number, data: Buffer, position: number): void {
    // All zeros on 4 KiB boundaries (the common case of a zero run): nothing to write.
    if (
      position % 4096 === 0 &&
      data.length % 4096 === 0 &&
      data.length <= ZERO_CHUNK.length &&
      data.equals(ZERO_CHUNK.subarray(0, data.length))
    )
      return;
    let s = 0;
    while (s < data.length) {
      // The next 4 KiB boundary of the spool file, or the end of the data.
      const blockEnd = Math.min(data.length, s + 4096 - ((position + s) % 4096));
      const len = blockEnd - s;
      if (len === 4096 && data.subarray(s, blockEnd).equals(ZERO_BLOCK)) {
        s = blockEnd;
        continue;
      }
      let w = s;
      while (w < blockEnd) w += writeSync(fd, data, w, blockEnd - w, position + w);
      this.writtenBytes += len;
      if (position + blockEnd > this.#end) this.#end = position + blockEnd;
      s = blockEnd;
    }
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

/** What all layers of one image share: the metadata, xattr and decompressed-size budgets. */
export class ImageBudget {
  readonly metadata = new MetadataBudget();
  xattrBytes = 0;
  /** Decompressed bytes of the layers applied so far. */
  unpackedBytes = 0;
}

export interface ApplyLayerOptions {
  tree: FileTree;
  /** Uncompressed tar bytes. */
  source: AsyncIterable<Buffer | Uint8Array | string>;
  /** Names the layer in errors (its digest). */
  layer: string;
  spool: Spool;
  limits: RootfsLimits;
  /** Shared by the layers of one image (default: this layer's own). */
  budget?: ImageBudget | undefined;
  signal?: AbortSignal | undefined;
  /** Called after each entry. */
  onEntry?: ((entriesDone: number, tarBytes: number) => void) | undefined;
  /** Called while an entry's content is spooled, with the bytes written to the host so far; throws to stop (free space). */
  onSpool?: ((writtenBytes: number, ctx: OpContext) => void) | undefined;
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
  const budget = options.budget ?? new ImageBudget();
  const reader = new TarReader(options.source, { layer: options.layer, limits, budget: budget.metadata });
  const users = new ImageUsers(tree);
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
    const xattrs = entryXattrs(entry, users, ctx);
    if (xattrs !== undefined) {
      for (const [name, value] of xattrs) budget.xattrBytes += name.length + value.length;
      if (budget.xattrBytes > limits.maxXattrBytes)
        throw unsafe(ctx, `the image's xattrs exceed ${limits.maxXattrBytes} bytes (limits.maxXattrBytes)`);
      const need = xattrBytes(xattrs);
      if (need > MAX_XATTR_BLOCK_BYTES) {
        throw unsafe(
          ctx,
          `its xattrs take ${need} bytes; an ext4 inode holds at most ${MAX_XATTR_BLOCK_BYTES} (one 4 KiB block)`,
        );
      }
    }
    if (budget.unpackedBytes + reader.position + entry.dataSize > limits.maxTotalBytes) {
      throw unsafe(
        ctx,
        `the layers decompress to more than ${limits.maxTotalBytes} bytes (limits.maxTotalBytes)`,
      );
    }
    const file = applyEntry(tree, entry, ctx, xattrs);
    if (tree.nodeCount > limits.maxNodes)
      throw unsafe(ctx, `more than ${limits.maxNodes} files and directories`);
    if (file !== undefined && entry.size > 0) {
      // Content goes to a file we named, never through a path taken from the layer.
      const onSpool = options.onSpool;
      file.source = await spool.write(
        entry.body(),
        entry.size,
        entry.sparse,
        onSpool === undefined ? undefined : (written) => onSpool(written, ctx),
      );
      file.segments = entry.sparse;
    }
    entries++;
    options.onEntry?.(entries, reader.position);
  }
  spool.endLayer();
  budget.unpackedBytes += reader.position;
  return { entries, tarBytes: reader.position };
}

/**
 * The xattrs an entry gives its node: its xattr records, plus its ACLs as
 * `system.posix_acl_*` (ACL records win over raw `system.posix_acl_*` xattr records, as
 * libarchive applies them). An ACL naming a user or group the image does not define is left out.
 */
function entryXattrs(entry: TarEntry, users: ImageUsers, ctx: OpContext): Map<string, Buffer> | undefined {
  if (entry.xattrs.size === 0 && entry.aclAccess === undefined && entry.aclDefault === undefined)
    return undefined;
  const out = new Map(entry.xattrs);
  for (const [acl, name] of [
    [entry.aclAccess, ACCESS_XATTR],
    [entry.aclDefault, DEFAULT_XATTR],
  ] as const) {
    if (acl === undefined) continue;
    const resolved = users.resolve(acl);
    const value = resolved === undefined ? undefined : encodeAclXattr(resolved);
    if (value === undefined)
      throw corrupt(ctx, `invalid ACL (${name}), or one naming a user or group the image does not define`);
    out.set(name, value);
  }
  return out;
}

/**
 * The image's user and group names, read from the /etc/passwd and /etc/group the tree holds
 * when asked (lower layers and this layer so far), to resolve ACL entries that carry a name only.
 */
class ImageUsers {
  readonly #tree: FileTree;
  #cache = new Map<string, { node: FileNode; ids: Map<string, number> }>();

  constructor(tree: FileTree) {
    this.#tree = tree;
  }

  resolve(acl: readonly AclEntry[]): AclEntry[] | undefined {
    const out: AclEntry[] = [];
    for (const e of acl) {
      if (e.name === undefined) {
        out.push(e);
        continue;
      }
      const id = this.#ids(e.tag === ACL_USER ? "passwd" : e.tag === ACL_GROUP ? "group" : "").get(e.name);
      if (id === undefined) return undefined;
      out.push({ tag: e.tag, perm: e.perm, id });
    }
    return out;
  }

  #ids(file: string): Map<string, number> {
    const ctx: OpContext = { layer: "", entry: `/etc/${file}` };
    const node = this.#tree.lookup(["etc", file], ctx);
    if (node?.kind !== "file" || node.source === undefined || node.size > 4 * 1024 * 1024) return new Map();
    const cached = this.#cache.get(file);
    if (cached?.node === node) return cached.ids;
    const ids = new Map<string, number>();
    const buf = Buffer.alloc(node.size);
    const fd = openSync(node.source.path, "r");
    try {
      let got = 0;
      while (got < node.size) {
        const n = readSync(fd, buf, got, node.size - got, node.source.offset + got);
        if (n === 0) break;
        got += n;
      }
    } finally {
      closeSync(fd);
    }
    for (const line of buf.toString("latin1").split("\n")) {
      const f = line.split(":");
      if (f.length >= 3 && /^[0-9]{1,10}$/.test(f[2]!) && !ids.has(f[0]!)) ids.set(f[0]!, Number(f[2]));
    }
    this.#cache.set(file, { node, ids });
    return ids;
  }
}

/**
 * Applies one entry's metadata to the tree (`xattrs`: the node's xattrs, default the entry's).
 * Returns the new regular file whose content is still to come.
 */
export function applyEntry(
  tree: FileTree,
  entry: TarEntry,
  ctx: OpContext,
  xattrs: Map<string, Buffer> | undefined = entry.xattrs.size > 0 ? new Map(entry.xattrs) : undefined,
): FileNode | undefined {
  const components = splitArchivePath(entry.name, ctx);
  // Symlinks are 0777 on Linux whatever the header says; an access ACL sets the permission bits.
  let mode = entry.type === "symlink" ? 0o777 : entry.mode;
  const acl = xattrs?.get(ACCESS_XATTR);
  if (acl !== undefined) {
    const applied = applyAccessAcl(acl, mode);
    if (applied === undefined) throw corrupt(ctx, `invalid ${ACCESS_XATTR} value`);
    mode = applied.mode;
    if (applied.xattr === undefined) xattrs!.delete(ACCESS_XATTR);
    if (xattrs!.size === 0) xattrs = undefined;
  }
  if (components.length === 0) {
    if (entry.type !== "dir") throw corrupt(ctx, "the root can only be a directory");
    const root = tree.root;
    root.mode = mode;
    root.uid = checkId(entry.uid, "uid", ctx);
    root.gid = checkId(entry.gid, "gid", ctx);
    root.mtime = entry.mtime;
    root.xattrs = xattrs;
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
    mode,
    uid: checkId(entry.uid, "uid", ctx),
    gid: checkId(entry.gid, "gid", ctx),
    mtime: entry.mtime,
    xattrs,
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
