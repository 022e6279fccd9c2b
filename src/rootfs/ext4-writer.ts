/**
 * Writes a {@link FileTree} straight into an ext4 image file: no staging directory, no
 * e2fsprogs, no root. Every byte is decided here, so the same tree always gives the same image.
 *
 * Layout (4 KiB blocks, 32768 blocks per group, 256-byte inodes):
 * - features: has_journal, ext_attr, dir_index | filetype, extent | sparse_super, large_file,
 *   huge_file, dir_nlink, extra_isize, metadata_csum (crc32c). No flex_bg, 64bit or
 *   resize_inode: the image is at most 16 TiB and is not grown online;
 * - each group: [superblock + group descriptors if a backup group] block bitmap, inode bitmap,
 *   inode table, data. The journal (jbd2 v2, clean, size as mke2fs picks it) comes first in
 *   group 0's data; then, in inode order, each inode's data, extent leaves, xattr block;
 * - inodes: 2 root, 8 journal, 11 lost+found, 12… the tree, numbered directory by directory
 *   (all children of a directory, in byte order of names, then their subdirectories);
 * - directories are linear (the kernel indexes them when they grow); hardlinks of any file type
 *   share one inode; xattrs live in the inode when they fit, else in one block;
 * - unused inode-table blocks and all-zero file blocks are not written: the file is sparse.
 */
import { closeSync, fsyncSync, ftruncateSync, openSync, readSync, writeSync } from "node:fs";
import { SupermachineError } from "../errors.ts";
import { throwIfAborted, yieldToLoop } from "../internal/index.ts";
import { ContentReader } from "./content-reader.ts";
import { crc32c, crc32cU32 } from "./crc32c.ts";
import {
  compareBytes,
  type DirNode,
  type FileTree,
  MAX_SYMLINK_BYTES,
  newDir,
  type TreeNode,
} from "./file-tree.ts";
import { displayName } from "./tar-reader.ts";

export const BLOCK_SIZE = 4096;
const B = BLOCK_SIZE;
/** Blocks per group; only tests use fewer (to exercise many groups with small images). */
export const BLOCKS_PER_GROUP = 32768;
const INODE_SIZE = 256;
const EXTRA_ISIZE = 32;
const FIRST_INO = 11;
const ROOT_INO = 2;
const JOURNAL_INO = 8;
const LPF_INO = 11;
const DIR_TAIL = 12;
const DIR_SPACE = B - DIR_TAIL;
const EXTENTS_PER_BLOCK = (B - 12) / 12; // 340
const MAX_EXTENT_LEN = 32768;
const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

// Feature bits.
const COMPAT = 0x0004 /* has_journal */ | 0x0008 /* ext_attr */ | 0x0020; /* dir_index */
const INCOMPAT = 0x0002 /* filetype */ | 0x0040; /* extent */
const RO_COMPAT =
  0x0001 /* sparse_super */ |
  0x0002 /* large_file */ |
  0x0008 /* huge_file */ |
  0x0020 /* dir_nlink */ |
  0x0040 /* extra_isize */ |
  0x0400; /* metadata_csum */
export const EXT4_FEATURE_NAMES =
  "has_journal ext_attr dir_index filetype extent sparse_super large_file huge_file dir_nlink extra_isize metadata_csum";

const S_IFMT = {
  dir: 0o040000,
  file: 0o100000,
  symlink: 0o120000,
  char: 0o020000,
  block: 0o060000,
  fifo: 0o010000,
  socket: 0o140000,
} as const;
const FT = { file: 1, dir: 2, char: 3, block: 4, fifo: 5, socket: 6, symlink: 7 } as const;
const EXTENTS_FL = 0x80000;

/** A run of physical blocks holding the inode's blocks `logical` ... `logical + len - 1`. */
interface Run {
  logical: number;
  start: number;
  len: number;
}

interface DirEntry {
  name: string;
  ino: number;
  type: number;
}

interface Inode {
  ino: number;
  node: TreeNode;
  /** Directories: their entries, "." and ".." first. */
  entries?: DirEntry[];
  links: number;
  /** Blocks of data (a sparse file: only those its data touches). */
  dataBlocks: number;
  /** A sparse file's logical block ranges that hold data; undefined: blocks 0 … dataBlocks-1. */
  ranges?: { start: number; len: number }[] | undefined;
  runs: Run[];
  /** Extent tree blocks (leaves, then index levels), when the extents do not fit in the inode. */
  treeBlocks: number[];
  xattrInline?: Buffer | undefined;
  xattrBlock?: Buffer | undefined;
  xattrBlockNr?: number;
}

export interface Ext4WriteOptions {
  tree: FileTree;
  /** Image file to create (must not exist). */
  imagePath: string;
  /** Exact image size; default: content + `freeBytes` + metadata. */
  sizeBytes?: number | undefined;
  /** Free space to leave. Default max(1 GiB, 2 × content). */
  freeBytes?: number | undefined;
  uuid: string;
  hashSeed: string;
  label: string;
  /** fsync the image before returning (default true). */
  durable?: boolean | undefined;
  signal?: AbortSignal | undefined;
  /** Blocks per group (multiple of 8, ≤ 32768). For tests; default {@link BLOCKS_PER_GROUP}. */
  blocksPerGroup?: number | undefined;
}

export interface Ext4WriteResult {
  sizeBytes: number;
  freeBytes: number;
  freeInodes: number;
  /** Inodes holding the tree (root and lost+found included). */
  inodes: number;
  fileBytes: number;
  skippedXattrs: { path: string; name: string }[];
  /** Seconds since the epoch stamped as creation time (newest mtime of the tree, ≥ 1). */
  createdTime: number;
  layoutMs: number;
  writeMs: number;
}

function uuidBytes(uuid: string): Buffer {
  return Buffer.from(uuid.replaceAll("-", ""), "hex");
}

/** jbd2 journal size mke2fs picks for a file system of `blocks` blocks. */
export function defaultJournalBlocks(blocks: number): number {
  if (blocks < 2048) return 0;
  if (blocks < 32768) return 1024;
  if (blocks < 256 * 1024) return 4096;
  if (blocks < 512 * 1024) return 8192;
  if (blocks < 4096 * 1024) return 16384;
  if (blocks < 8192 * 1024) return 32768;
  if (blocks < 16384 * 1024) return 65536;
  if (blocks < 32768 * 1024) return 131072;
  return 262144;
}

function isPowerOf(n: number, base: number): boolean {
  while (n > 1 && n % base === 0) n /= base;
  return n === 1;
}

/** sparse_super: groups 0, 1 and powers of 3, 5, 7 hold superblock backups. */
export function hasSuperblock(group: number): boolean {
  return group <= 1 || isPowerOf(group, 3) || isPowerOf(group, 5) || isPowerOf(group, 7);
}

/** ext4 stores seconds as signed 32 bits plus two epoch bits. */
export const EXT4_MIN_TIME = -(2 ** 31);
export const EXT4_MAX_TIME = 2 ** 34 - 2 ** 31 - 1;

/** `t` clamped to what an ext4 timestamp can hold. */
export function clampTime(t: number): number {
  return Math.min(EXT4_MAX_TIME, Math.max(EXT4_MIN_TIME, t));
}

/** Splits an ext4 timestamp into the 32-bit field and the epoch bits of the `_extra` field. */
export function encodeTime(t: number): [number, number] {
  const c = clampTime(t);
  const epoch = Math.floor((c + 2 ** 31) / 2 ** 32);
  return [c - epoch * 2 ** 32, epoch];
}

// ---- extended attributes ----

const XATTR_INDEX: [string, number][] = [
  ["system.posix_acl_default", 3],
  ["system.posix_acl_access", 2],
  ["security.", 6],
  ["trusted.", 4],
  ["user.", 1],
];

function xattrIndex(name: string): [number, string] | undefined {
  for (const [prefix, index] of XATTR_INDEX) {
    if (prefix.endsWith(".") ? name.startsWith(prefix) && name.length > prefix.length : name === prefix) {
      return [index, name.slice(prefix.length)];
    }
  }
  return undefined;
}

/** POSIX ACL xattr (VFS format, version 2) → ext4 on-disk ACL (version 1). */
function aclToDisk(value: Buffer): Buffer | undefined {
  if (value.length < 4 || (value.length - 4) % 8 !== 0 || value.readUInt32LE(0) !== 2) return undefined;
  const parts: Buffer[] = [Buffer.from([1, 0, 0, 0])];
  for (let off = 4; off < value.length; off += 8) {
    const tag = value.readUInt16LE(off);
    const perm = value.readUInt16LE(off + 2);
    if (tag === 0x01 || tag === 0x04 || tag === 0x10 || tag === 0x20) {
      const e = Buffer.alloc(4);
      e.writeUInt16LE(tag, 0);
      e.writeUInt16LE(perm, 2);
      parts.push(e);
    } else if (tag === 0x02 || tag === 0x08) {
      const e = Buffer.alloc(8);
      e.writeUInt16LE(tag, 0);
      e.writeUInt16LE(perm, 2);
      e.writeUInt32LE(value.readUInt32LE(off + 4), 4);
      parts.push(e);
    } else {
      return undefined;
    }
  }
  return Buffer.concat(parts);
}

interface XattrEntry {
  index: number;
  name: Buffer;
  value: Buffer;
}

function entryHash(e: XattrEntry): number {
  let hash = 0;
  for (const c of e.name) hash = ((hash << 5) ^ (hash >>> 27) ^ c) >>> 0;
  const padded = Buffer.alloc((e.value.length + 3) & ~3);
  e.value.copy(padded);
  for (let i = 0; i < padded.length; i += 4)
    hash = ((hash << 16) ^ (hash >>> 16) ^ padded.readUInt32LE(i)) >>> 0;
  return hash;
}

const entrySize = (e: XattrEntry): number => (16 + e.name.length + 3) & ~3;
const valueSize = (e: XattrEntry): number => (e.value.length + 3) & ~3;

/** Lays entries out: entries from `entriesStart` forward, values from the end backward. */
function packXattrs(
  buf: Buffer,
  entriesStart: number,
  end: number,
  offsetBase: number,
  entries: XattrEntry[],
  withHash: boolean,
): void {
  let e = entriesStart;
  let v = end;
  for (const x of entries) {
    v -= valueSize(x);
    x.value.copy(buf, v);
    buf.writeUInt8(x.name.length, e);
    buf.writeUInt8(x.index, e + 1);
    buf.writeUInt16LE(v - offsetBase, e + 2);
    buf.writeUInt32LE(0, e + 4);
    buf.writeUInt32LE(x.value.length, e + 8);
    buf.writeUInt32LE(withHash ? entryHash(x) : 0, e + 12);
    x.name.copy(buf, e + 16);
    e += entrySize(x);
  }
  buf.writeUInt32LE(0, e);
}

// ---- the writer ----

export async function writeExt4Image(options: Ext4WriteOptions): Promise<Ext4WriteResult> {
  const t0 = performance.now();
  const skippedXattrs: { path: string; name: string }[] = [];
  const numbered = numberInodes(options.tree);
  const { inodes, paths, maxIno, createdTime } = numbered;
  const bpg = options.blocksPerGroup ?? BLOCKS_PER_GROUP;
  let fileBytes = 0;
  let contentBlocks = 0;
  for (const i of inodes) {
    fileBytes += i.node.kind === "file" ? i.node.size : 0;
    contentBlocks += measureInode(i, bpg, paths.get(i) ?? "?", skippedXattrs);
  }
  const geo = chooseGeometry({
    bpg,
    contentBlocks,
    maxIno,
    sizeBytes: options.sizeBytes,
    freeBytes: options.freeBytes,
  });
  const space = new BlockAllocator(geo);
  const journal: Inode = {
    ino: JOURNAL_INO,
    node: newDir(),
    links: 1,
    dataBlocks: geo.journalBlocks,
    runs: [],
    treeBlocks: [],
  };
  space.allocInode(journal, "the journal");
  for (const i of inodes) space.allocInode(i, paths.get(i) ?? "?");
  const layoutMs = performance.now() - t0;
  throwIfAborted(options.signal, "writing the image");

  const t1 = performance.now();
  const fd = openSync(options.imagePath, "wx", 0o600);
  try {
    ftruncateSync(fd, geo.blocks * B);
    const image = new ImageFile(fd, uuidBytes(options.uuid));
    await writeFileData(image, inodes, options.signal);
    const tables = new InodeTables(geo);
    let done = 0;
    for (const i of [journal, ...inodes]) {
      if (++done % 4096 === 0) {
        await yieldToLoop();
        throwIfAborted(options.signal, "writing the image");
      }
      tables.put(
        i.ino,
        encodeInode(image, i, i === journal, createdTime),
        i.node.kind === "dir" && i !== journal,
      );
      if (i !== journal) writeInodeBlocks(image, i);
    }
    if (geo.journalBlocks > 0) writeJournalSuperblock(image, geo.journalBlocks, journal.runs[0]!.start);
    for (let ino = 1; ino < FIRST_INO; ino++) tables.mark(ino);
    for (const i of inodes) if (i.ino !== ROOT_INO) tables.mark(i.ino);
    const { freeBlocks, freeInodes, gdt } = writeGroups(image, geo, space, tables);
    writeSuperblocks(image, geo, gdt, {
      freeBlocks,
      freeInodes,
      createdTime,
      label: options.label,
      hashSeed: uuidBytes(options.hashSeed),
      journal,
    });
    if (options.durable !== false) fsyncSync(fd);
    return {
      sizeBytes: geo.blocks * B,
      freeBytes: freeBlocks * B,
      freeInodes,
      inodes: inodes.length,
      fileBytes,
      skippedXattrs,
      createdTime,
      layoutMs,
      writeMs: performance.now() - t1,
    };
  } finally {
    closeSync(fd);
  }
}

// ---- 1. inode numbers ----

interface Numbered {
  /** In inode-number order: 2 (root), 11 (lost+found), 12, 13, … */
  inodes: Inode[];
  paths: Map<Inode, string>;
  maxIno: number;
  /** Newest mtime of the tree (≥ 1, ≤ 2^32 - 1): the image's creation time. */
  createdTime: number;
}

/** Numbers the tree's inodes directory by directory: all children of a directory (byte order), then its subdirectories. */
function numberInodes(tree: FileTree): Numbered {
  const inodes: Inode[] = [];
  const byNode = new Map<TreeNode, Inode>();
  let newest = tree.root.mtime;
  const add = (ino: number, node: TreeNode): Inode => {
    const i: Inode = { ino, node, links: 0, dataBlocks: 0, runs: [], treeBlocks: [] };
    inodes.push(i);
    byNode.set(node, i);
    if (node.mtime > newest) newest = node.mtime;
    return i;
  };
  const treeLpf = tree.root.children.get("lost+found");
  if (treeLpf !== undefined && treeLpf.kind !== "dir") {
    throw new SupermachineError(
      "ROOTFS_BUILD",
      "the image has a /lost+found that is not a directory; ext4 needs that name",
    );
  }
  const root = add(ROOT_INO, tree.root);
  const lpf = add(LPF_INO, treeLpf ?? newDir({ mode: 0o700, uid: 0, gid: 0, mtime: 0, xattrs: undefined }));
  let next = FIRST_INO + 1;
  const paths = new Map<Inode, string>([
    [root, "/"],
    [lpf, "/lost+found"],
  ]);
  const queue: [Inode, Inode, string][] = [[root, root, "/"]];
  for (let q = 0; q < queue.length; q++) {
    const [dirIno, parentIno, dirPath] = queue[q]!;
    const dir = dirIno.node as DirNode;
    const entries: DirEntry[] = [
      { name: ".", ino: dirIno.ino, type: FT.dir },
      { name: "..", ino: parentIno.ino, type: FT.dir },
    ];
    if (dirIno === root) entries.push({ name: "lost+found", ino: LPF_INO, type: FT.dir });
    const subdirs: [Inode, string][] = dirIno === root ? [[lpf, "/lost+found/"]] : [];
    for (const name of [...dir.children.keys()].sort(compareBytes)) {
      if (dirIno === root && name === "lost+found") continue; // inode 11, listed third
      const node = dir.children.get(name)!;
      const child = byNode.get(node) ?? add(next++, node);
      entries.push({ name, ino: child.ino, type: FT[node.kind] });
      const childPath = `${dirPath}${name}`;
      if (!paths.has(child)) paths.set(child, childPath);
      if (node.kind === "dir") subdirs.push([child, `${childPath}/`]);
      else child.links++;
    }
    dirIno.entries = entries;
    dirIno.links = 2 + subdirs.length;
    if (dirIno.links >= 65000) dirIno.links = 1; // dir_nlink: "many"
    for (const [child, p] of subdirs) queue.push([child, dirIno, p]);
  }
  const createdTime = Math.min(2 ** 32 - 1, Math.max(1, clampTime(newest)));
  if (treeLpf === undefined) lpf.node.mtime = createdTime;
  inodes.sort((a, b) => a.ino - b.ino);
  return { inodes, paths, maxIno: next - 1, createdTime };
}

// ---- 2. what each inode needs ----

/** Sets data blocks and xattr encoding; returns an upper bound of the blocks the inode takes. */
function measureInode(
  i: Inode,
  bpg: number,
  path: string,
  skipped: { path: string; name: string }[],
): number {
  const node = i.node;
  if (node.kind === "file") {
    if (node.segments === undefined) {
      i.dataBlocks = Math.ceil(node.size / B);
    } else {
      // Only the blocks a sparse file's data touches; holes stay holes.
      const ranges: { start: number; len: number }[] = [];
      for (const seg of node.segments) {
        const first = Math.floor(seg.offset / B);
        const end = Math.ceil((seg.offset + seg.length) / B);
        const last = ranges[ranges.length - 1];
        if (last !== undefined && last.start + last.len >= first)
          last.len = Math.max(last.len, end - last.start);
        else ranges.push({ start: first, len: end - first });
      }
      i.ranges = ranges;
      i.dataBlocks = ranges.reduce((n, r) => n + r.len, 0);
    }
  } else if (node.kind === "dir") {
    i.dataBlocks = dirBlocks(i.entries!).length;
    if (i.ino === LPF_INO) i.dataBlocks = Math.max(i.dataBlocks, 4); // room for e2fsck, as mke2fs makes it
  } else if (node.kind === "symlink") {
    if (node.target.length > MAX_SYMLINK_BYTES) {
      throw new SupermachineError("ROOTFS_BUILD", `symlink target of ${displayName(path)} is too long`);
    }
    i.dataBlocks = node.target.length < 60 ? 0 : 1;
  }
  encodeXattrs(i, path, skipped);
  // Runs break at group boundaries (at most one break per group crossed) and at holes.
  const runsMax = i.dataBlocks === 0 ? 0 : Math.ceil(i.dataBlocks / (bpg / 2)) + (i.ranges?.length ?? 1);
  return i.dataBlocks + extentTreeBlocks(runsMax) + (i.xattrBlock ? 1 : 0);
}

/** The ext4 entries of `xattrs` (ACLs converted to ext4's format); the others are passed to `skip`. */
function xattrEntries(xattrs: ReadonlyMap<string, Buffer>, skip: (name: string) => void): XattrEntry[] {
  const entries: XattrEntry[] = [];
  for (const [name, raw] of xattrs) {
    const idx = xattrIndex(name);
    let value: Buffer | undefined = raw;
    if (idx && (idx[0] === 2 || idx[0] === 3)) value = aclToDisk(raw);
    if (!idx || value === undefined || idx[1].length > 255) {
      skip(name);
      continue;
    }
    entries.push({ index: idx[0], name: Buffer.from(idx[1], "latin1"), value });
  }
  return entries;
}

/** Most bytes of xattrs (entries, values, terminator) one inode can have: one block, after its header. */
export const MAX_XATTR_BLOCK_BYTES = B - 32;

/** Bytes the xattrs ext4 can store of `xattrs` take in one inode's xattr block. */
export function xattrBytes(xattrs: ReadonlyMap<string, Buffer>): number {
  return xattrEntries(xattrs, () => {}).reduce((n, e) => n + entrySize(e) + valueSize(e), 4);
}

function encodeXattrs(i: Inode, path: string, skipped: { path: string; name: string }[]): void {
  const xattrs = i.node.xattrs;
  if (!xattrs || xattrs.size === 0) return;
  const entries = xattrEntries(xattrs, (name) =>
    skipped.push({ path: displayName(path), name: displayName(name) }),
  );
  if (entries.length === 0) return;
  entries.sort(
    (a, b) => a.index - b.index || a.name.length - b.name.length || Buffer.compare(a.name, b.name),
  );
  const need = entries.reduce((n, e) => n + entrySize(e) + valueSize(e), 4);
  const inline = INODE_SIZE - 128 - EXTRA_ISIZE - 4; // after the 4-byte magic
  if (need <= inline) {
    const area = Buffer.alloc(INODE_SIZE - 128 - EXTRA_ISIZE);
    area.writeUInt32LE(0xea020000, 0);
    packXattrs(area, 4, area.length, 4, entries, false);
    i.xattrInline = area;
    return;
  }
  if (need > MAX_XATTR_BLOCK_BYTES) {
    throw new SupermachineError(
      "ROOTFS_BUILD",
      `extended attributes of ${displayName(path)} take ${need} bytes, more than one ${B}-byte block`,
    );
  }
  const block = Buffer.alloc(B);
  block.writeUInt32LE(0xea020000, 0);
  block.writeUInt32LE(1, 4); // refcount
  block.writeUInt32LE(1, 8); // blocks
  packXattrs(block, 32, B, 0, entries, true);
  let hash = 0;
  for (const e of entries) hash = ((hash << 16) ^ (hash >>> 16) ^ entryHash(e)) >>> 0;
  block.writeUInt32LE(hash, 12);
  i.xattrBlock = block;
}

// ---- 3. geometry ----

export interface Geometry {
  blocks: number;
  bpg: number;
  groups: number;
  ipg: number;
  gdtBlocks: number;
  /** Inode-table blocks per group. */
  itb: number;
  journalBlocks: number;
}

function overheadOf(g: number, geo: Omit<Geometry, "blocks" | "journalBlocks">): number {
  return (hasSuperblock(g) ? 1 + geo.gdtBlocks : 0) + 2 + geo.itb;
}

function shape(blocks: number, bpg: number, inodesWanted: number) {
  const groups = Math.ceil(blocks / bpg);
  const ipg = Math.min(B * 8, Math.max(16, Math.ceil(inodesWanted / groups / 16) * 16));
  const gdtBlocks = Math.ceil((groups * 32) / B);
  const geo = { bpg, groups, ipg, gdtBlocks, itb: (ipg * INODE_SIZE) / B };
  let overhead = 0;
  for (let g = 0; g < groups; g++) overhead += overheadOf(g, geo);
  return { ...geo, overhead };
}

/**
 * Picks the image size and group shape. Free space defaults to max(1 GiB, 2 × content); free
 * inodes to one per 16 KiB of free space (at least 16384). An explicit size is taken as is and
 * must hold the content.
 */
export function chooseGeometry(o: {
  bpg: number;
  contentBlocks: number;
  maxIno: number;
  sizeBytes?: number | undefined;
  freeBytes?: number | undefined;
}): Geometry {
  const { bpg, contentBlocks } = o;
  const free = o.freeBytes ?? Math.max(GiB, 2 * contentBlocks * B);
  const freeBlocks = Math.ceil(free / B);
  const inodesWanted = o.maxIno + Math.max(16384, Math.ceil(free / 16384));
  let blocks: number;
  if (o.sizeBytes !== undefined) {
    blocks = Math.floor(o.sizeBytes / B);
  } else {
    // Enough groups for the inodes (≤ 8 × block size inodes per group), then enough blocks.
    blocks = Math.max(
      contentBlocks + freeBlocks + 1024,
      (Math.ceil(inodesWanted / (B * 8)) - 1) * bpg + 1024,
    );
    for (;;) {
      const need =
        contentBlocks +
        freeBlocks +
        defaultJournalBlocks(blocks) +
        shape(blocks, bpg, inodesWanted).overhead +
        64;
      if (blocks >= need) break;
      blocks = need;
    }
    blocks = Math.ceil(blocks / 256) * 256; // whole MiB
  }
  // A last group too small for its own metadata: drop it (explicit size) or fill it up.
  const s = shape(blocks, bpg, inodesWanted);
  const last = blocks - (s.groups - 1) * bpg;
  const lastOverhead = overheadOf(s.groups - 1, s);
  if (s.groups > 1 && last < lastOverhead + 64) {
    if (o.sizeBytes !== undefined) blocks = (s.groups - 1) * bpg;
    else blocks += lastOverhead + 64 - last;
  }
  const final = shape(blocks, bpg, inodesWanted);
  const journalBlocks = defaultJournalBlocks(blocks);
  const needed = contentBlocks + journalBlocks + final.overhead;
  if (final.groups * final.ipg < o.maxIno + 1 || blocks < needed) {
    throw new SupermachineError(
      "ROOTFS_BUILD",
      `the image is too small: ${blocks * B} bytes for ${needed * B} bytes of content and metadata and ${o.maxIno} inodes`,
    );
  }
  if (blocks >= 2 ** 32)
    throw new SupermachineError("ROOTFS_BUILD", "images of 16 TiB or more are not supported");
  return {
    blocks,
    bpg,
    groups: final.groups,
    ipg: final.ipg,
    gdtBlocks: final.gdtBlocks,
    itb: final.itb,
    journalBlocks,
  };
}

// ---- 4. block allocation ----

interface GroupMeta {
  start: number;
  end: number;
  bbitmap: number;
  ibitmap: number;
  itable: number;
  dataStart: number;
}

/** Hands out blocks front to back, skipping each group's metadata; keeps the block bitmaps. */
class BlockAllocator {
  readonly metas: GroupMeta[];
  readonly bitmaps: Buffer[];
  readonly used: Uint32Array;
  readonly #bpg: number;
  #cursor: number;

  constructor(geo: Geometry) {
    this.#bpg = geo.bpg;
    this.metas = Array.from({ length: geo.groups }, (_, g) => {
      const start = g * geo.bpg;
      const bbitmap = start + (hasSuperblock(g) ? 1 + geo.gdtBlocks : 0);
      return {
        start,
        end: Math.min(geo.blocks, start + geo.bpg),
        bbitmap,
        ibitmap: bbitmap + 1,
        itable: bbitmap + 2,
        dataStart: bbitmap + 2 + geo.itb,
      };
    });
    this.bitmaps = this.metas.map(() => Buffer.alloc(B));
    this.used = new Uint32Array(geo.groups);
    for (const m of this.metas) this.#mark(m.start, m.dataStart - m.start);
    this.#cursor = this.metas[0]!.dataStart;
  }

  #mark(start: number, len: number): void {
    for (let b = start; b < start + len; b++) {
      const g = Math.floor(b / this.#bpg);
      const i = b - g * this.#bpg;
      this.bitmaps[g]![i >> 3]! |= 1 << (i & 7);
      this.used[g]!++;
    }
  }

  /** `n` blocks for logical blocks `logical` ...; appended to `runs` (merged where contiguous). */
  alloc(n: number, logical = 0, runs: Run[] = []): Run[] {
    while (n > 0) {
      const g = Math.floor(this.#cursor / this.#bpg);
      const m = this.metas[g];
      if (m === undefined)
        throw new SupermachineError("ROOTFS_BUILD", "ran out of space while laying out the image");
      if (this.#cursor < m.dataStart) this.#cursor = m.dataStart;
      const len = Math.min(n, m.end - this.#cursor, MAX_EXTENT_LEN);
      if (len <= 0) {
        this.#cursor = m.start + this.#bpg;
        continue;
      }
      const last = runs[runs.length - 1];
      if (
        last &&
        last.start + last.len === this.#cursor &&
        last.logical + last.len === logical &&
        last.len + len <= MAX_EXTENT_LEN
      )
        last.len += len;
      else runs.push({ logical, start: this.#cursor, len });
      this.#mark(this.#cursor, len);
      this.#cursor += len;
      logical += len;
      n -= len;
    }
    return runs;
  }

  /** Data runs, then the extent tree's blocks (when more than 4 runs), then the xattr block. */
  allocInode(i: Inode, path: string): void {
    i.runs = [];
    for (const r of i.ranges ?? [{ start: 0, len: i.dataBlocks }]) this.alloc(r.len, r.start, i.runs);
    const tree = extentTreeBlocks(i.runs.length);
    if (tree > 4 * EXTENTS_PER_BLOCK ** 2)
      throw new SupermachineError("ROOTFS_BUILD", `${displayName(path)} is too fragmented`);
    for (const r of this.alloc(tree)) for (let k = 0; k < r.len; k++) i.treeBlocks.push(r.start + k);
    if (i.xattrBlock) i.xattrBlockNr = this.alloc(1)[0]!.start;
  }
}

// ---- 5. writing ----

/** The image file: positioned block writes plus the metadata checksum seed. */
class ImageFile {
  readonly fd: number;
  readonly uuid: Buffer;
  /** crc32c(~0, uuid): the seed of every metadata checksum. */
  readonly csumSeed: number;

  constructor(fd: number, uuid: Buffer) {
    this.fd = fd;
    this.uuid = uuid;
    this.csumSeed = crc32c(0xffffffff, uuid);
  }

  writeAt(buf: Buffer, block: number): void {
    this.writeBytes(buf, 0, buf.length, block * B);
  }

  writeBytes(buf: Buffer, start: number, end: number, position: number): void {
    let off = start;
    while (off < end) off += writeSync(this.fd, buf, off, end - off, position + off - start);
  }

  /** Seed of an inode's checksums (inode, directory blocks, extent blocks): crc(seed, ino, generation 0). */
  inodeSeed(ino: number): number {
    return crc32cU32(crc32cU32(this.csumSeed, ino), 0);
  }
}

/** Copies every regular file's content into its blocks, in inode order, leaving all-zero blocks unwritten. */
async function writeFileData(
  image: ImageFile,
  inodes: Inode[],
  signal: AbortSignal | undefined,
): Promise<void> {
  const content = new ContentReader();
  const buf = Buffer.allocUnsafe(4 * MiB);
  let sinceYield = 0;
  try {
    for (const i of inodes) {
      const node = i.node;
      if (node.kind !== "file" || node.size === 0 || node.source === undefined) continue;
      const src = content.fd(node.source);
      for (const run of i.runs) {
        const logical = run.logical * B;
        const runBytes = Math.min(run.len * B, node.size - logical);
        for (let runDone = 0; runDone < runBytes; ) {
          const want = Math.min(buf.length, runBytes - runDone);
          let got = 0;
          while (got < want) {
            const n = readSync(src, buf, got, want - got, node.source.offset + logical + runDone + got);
            if (n === 0)
              throw new SupermachineError(
                "ROOTFS_BUILD",
                `content of a file ended early (${String(node.source.path)})`,
              );
            got += n;
          }
          const position = run.start * B + runDone;
          if (isZero(buf, 0, got)) {
            runDone += got; // a hole in the image file
            continue;
          }
          for (let s = 0; s < got; ) {
            while (s < got && isZero(buf, s, Math.min(got, s + B))) s += B;
            let e = s;
            while (e < got && !isZero(buf, e, Math.min(got, e + B))) e += B;
            e = Math.min(e, got);
            if (e > s) image.writeBytes(buf, s, e, position + s);
            s = e;
          }
          runDone += got;
        }
      }
      content.release(node.source);
      sinceYield += node.size;
      if (sinceYield >= 64 * MiB) {
        sinceYield = 0;
        await yieldToLoop();
        throwIfAborted(signal, "writing the image");
      }
    }
  } finally {
    content.close();
  }
}

/** The 256 bytes of an inode, checksummed. Writes its extent leaves. */
function encodeInode(image: ImageFile, i: Inode, isJournal: boolean, createdTime: number): Buffer {
  const raw = Buffer.alloc(INODE_SIZE);
  const node = i.node;
  const kind = isJournal ? "file" : node.kind;
  const uid = isJournal ? 0 : node.uid;
  const gid = isJournal ? 0 : node.gid;
  raw.writeUInt16LE(S_IFMT[kind] | ((isJournal ? 0o600 : node.mode) & 0o7777), 0);
  raw.writeUInt16LE(uid & 0xffff, 2);
  raw.writeUInt16LE(uid >>> 16, 0x78);
  raw.writeUInt16LE(gid & 0xffff, 24);
  raw.writeUInt16LE(gid >>> 16, 0x7a);
  const [t, epoch] = encodeTime(isJournal ? createdTime : node.mtime);
  raw.writeInt32LE(t, 8); // atime
  raw.writeInt32LE(t, 12); // ctime
  raw.writeInt32LE(t, 16); // mtime
  raw.writeUInt32LE(epoch, 0x84); // ctime_extra
  raw.writeUInt32LE(epoch, 0x88); // mtime_extra
  raw.writeUInt32LE(epoch, 0x8c); // atime_extra
  raw.writeUInt32LE(createdTime, 0x90); // crtime
  raw.writeUInt16LE(i.links, 26);
  raw.writeUInt16LE(EXTRA_ISIZE, 0x80);
  let size = 0;
  let flags = 0;
  let blocksUsed = 0;
  if (kind === "file" || kind === "dir" || (kind === "symlink" && i.dataBlocks > 0)) {
    flags |= EXTENTS_FL;
    raw.set(
      extentRoot(i, image.inodeSeed(i.ino), (b, n) => image.writeAt(b, n)),
      40,
    );
    blocksUsed = i.dataBlocks + i.treeBlocks.length;
    if (isJournal) size = i.dataBlocks * B;
    else if (node.kind === "file") size = node.size;
    else if (node.kind === "dir") size = i.dataBlocks * B;
    else if (node.kind === "symlink") size = node.target.length;
  } else if (node.kind === "symlink") {
    size = node.target.length; // fast symlink: the target lives in i_block
    raw.write(node.target, 40, "latin1");
  } else if (node.kind === "char" || node.kind === "block") {
    const { major, minor } = node;
    if (major < 256 && minor < 256) raw.writeUInt32LE(major * 256 + minor, 40);
    else raw.writeUInt32LE(((minor & 0xff) | (major << 8) | ((minor & ~0xff) << 12)) >>> 0, 44);
  }
  if (i.xattrBlockNr !== undefined) {
    raw.writeUInt32LE(i.xattrBlockNr, 104);
    blocksUsed++;
  }
  raw.writeUInt32LE(flags, 32);
  raw.writeUInt32LE(size % 2 ** 32, 4);
  raw.writeUInt32LE(Math.floor(size / 2 ** 32), 108);
  const sectors = blocksUsed * (B / 512);
  raw.writeUInt32LE(sectors % 2 ** 32, 28);
  raw.writeUInt16LE(Math.floor(sectors / 2 ** 32), 0x74);
  if (i.xattrInline) i.xattrInline.copy(raw, 128 + EXTRA_ISIZE);
  const crc = crc32c(image.inodeSeed(i.ino), raw);
  raw.writeUInt16LE(crc & 0xffff, 0x7c);
  raw.writeUInt16LE(crc >>> 16, 0x82);
  return raw;
}

/** Directory blocks, a slow symlink's block, the xattr block. */
function writeInodeBlocks(image: ImageFile, i: Inode): void {
  const node = i.node;
  if (node.kind === "dir") {
    const blocks = dirBlocks(i.entries!);
    while (blocks.length < i.dataBlocks) blocks.push(emptyDirBlock());
    const seed = image.inodeSeed(i.ino);
    const physical = runBlocks(i.runs);
    for (const [k, block] of blocks.entries()) {
      block.writeUInt32LE(crc32c(seed, block, 0, DIR_SPACE), B - 4);
      image.writeAt(block, physical[k]!);
    }
  } else if (node.kind === "symlink" && i.dataBlocks > 0) {
    const block = Buffer.alloc(B);
    block.write(node.target, 0, "latin1");
    image.writeAt(block, i.runs[0]!.start);
  }
  if (i.xattrBlock && i.xattrBlockNr !== undefined) {
    const block = i.xattrBlock;
    const nr = Buffer.alloc(8);
    nr.writeUInt32LE(i.xattrBlockNr, 0);
    block.writeUInt32LE(0, 16);
    block.writeUInt32LE(crc32c(crc32c(image.csumSeed, nr), block), 16);
    image.writeAt(block, i.xattrBlockNr);
  }
}

/** jbd2 superblock, v2, clean (s_start = 0): nothing to replay. Big-endian. */
function writeJournalSuperblock(image: ImageFile, journalBlocks: number, block: number): void {
  const jsb = Buffer.alloc(B);
  jsb.writeUInt32BE(0xc03b3998, 0);
  jsb.writeUInt32BE(4, 4); // superblock v2
  jsb.writeUInt32BE(B, 12);
  jsb.writeUInt32BE(journalBlocks, 16);
  jsb.writeUInt32BE(1, 20); // s_first
  jsb.writeUInt32BE(1, 24); // s_sequence
  image.uuid.copy(jsb, 0x30);
  jsb.writeUInt32BE(1, 0x40); // s_nr_users
  image.writeAt(jsb, block);
}

/** Inode tables of the groups that hold inodes, and the inode bitmaps. */
class InodeTables {
  readonly #geo: Geometry;
  readonly tables = new Map<number, Buffer>();
  readonly bitmaps: Buffer[];
  readonly used: Uint32Array;
  readonly lastUsed: Uint32Array;
  readonly dirs: Uint32Array;

  constructor(geo: Geometry) {
    this.#geo = geo;
    this.bitmaps = Array.from({ length: geo.groups }, () => Buffer.alloc(B));
    this.used = new Uint32Array(geo.groups);
    this.lastUsed = new Uint32Array(geo.groups);
    this.dirs = new Uint32Array(geo.groups);
  }

  put(ino: number, raw: Buffer, isDir: boolean): void {
    const { ipg } = this.#geo;
    const g = Math.floor((ino - 1) / ipg);
    let t = this.tables.get(g);
    if (t === undefined) {
      t = Buffer.alloc(ipg * INODE_SIZE);
      this.tables.set(g, t);
    }
    raw.copy(t, ((ino - 1) % ipg) * INODE_SIZE);
    if (isDir) this.dirs[g]!++;
  }

  mark(ino: number): void {
    const { ipg } = this.#geo;
    const g = Math.floor((ino - 1) / ipg);
    const idx = (ino - 1) % ipg;
    this.bitmaps[g]![idx >> 3]! |= 1 << (idx & 7);
    this.used[g]!++;
    this.lastUsed[g] = Math.max(this.lastUsed[g]!, idx + 1);
  }
}

/** Inode tables (used part), bitmaps and the group descriptor table. */
function writeGroups(image: ImageFile, geo: Geometry, space: BlockAllocator, tables: InodeTables) {
  const { ipg, bpg } = geo;
  for (const [g, table] of tables.tables) {
    image.writeAt(table.subarray(0, tables.lastUsed[g]! * INODE_SIZE), space.metas[g]!.itable);
  }
  const gdt = Buffer.alloc(geo.gdtBlocks * B);
  let freeBlocks = 0;
  let freeInodes = 0;
  for (let g = 0; g < geo.groups; g++) {
    const m = space.metas[g]!;
    const bb = space.bitmaps[g]!;
    const groupBlocks = m.end - m.start;
    for (let k = groupBlocks; k < B * 8; k++) bb[k >> 3]! |= 1 << (k & 7); // past the end: in use
    const ib = tables.bitmaps[g]!;
    for (let k = ipg; k < B * 8; k++) ib[k >> 3]! |= 1 << (k & 7); // padding
    image.writeAt(bb, m.bbitmap);
    image.writeAt(ib, m.ibitmap);
    const gFreeBlocks = groupBlocks - space.used[g]!;
    const gFreeInodes = ipg - tables.used[g]!;
    freeBlocks += gFreeBlocks;
    freeInodes += gFreeInodes;
    const uninit = tables.used[g] === 0;
    const d = gdt.subarray(g * 32, g * 32 + 32);
    d.writeUInt32LE(m.bbitmap, 0);
    d.writeUInt32LE(m.ibitmap, 4);
    d.writeUInt32LE(m.itable, 8);
    d.writeUInt16LE(gFreeBlocks, 12);
    d.writeUInt16LE(gFreeInodes, 14);
    d.writeUInt16LE(tables.dirs[g]!, 16);
    d.writeUInt16LE(0x0004 | (uninit ? 0x0001 : 0), 18); // ITABLE_ZEROED (| INODE_UNINIT)
    d.writeUInt16LE(crc32c(image.csumSeed, bb, 0, bpg / 8) & 0xffff, 24);
    d.writeUInt16LE(crc32c(image.csumSeed, ib, 0, ipg / 8) & 0xffff, 26);
    d.writeUInt16LE(uninit ? ipg : ipg - tables.lastUsed[g]!, 28); // itable_unused
    d.writeUInt16LE(crc32c(crc32cU32(image.csumSeed, g), d) & 0xffff, 30);
  }
  return { freeBlocks, freeInodes, gdt };
}

/** The superblock, and its copies (with the group descriptors) in groups 1 and powers of 3, 5, 7. */
function writeSuperblocks(
  image: ImageFile,
  geo: Geometry,
  gdt: Buffer,
  o: {
    freeBlocks: number;
    freeInodes: number;
    createdTime: number;
    label: string;
    hashSeed: Buffer;
    journal: Inode;
  },
): void {
  const sb = Buffer.alloc(1024);
  sb.writeUInt32LE(geo.groups * geo.ipg, 0x00);
  sb.writeUInt32LE(geo.blocks, 0x04);
  sb.writeUInt32LE(o.freeBlocks, 0x0c);
  sb.writeUInt32LE(o.freeInodes, 0x10);
  sb.writeUInt32LE(0, 0x14); // first data block
  sb.writeUInt32LE(2, 0x18); // block size 1024 << 2
  sb.writeUInt32LE(2, 0x1c); // cluster size
  sb.writeUInt32LE(geo.bpg, 0x20);
  sb.writeUInt32LE(geo.bpg, 0x24);
  sb.writeUInt32LE(geo.ipg, 0x28);
  sb.writeUInt32LE(o.createdTime, 0x30); // wtime
  sb.writeInt16LE(-1, 0x36); // max mount count: no forced checks
  sb.writeUInt16LE(0xef53, 0x38);
  sb.writeUInt16LE(1, 0x3a); // clean
  sb.writeUInt16LE(1, 0x3c); // errors: continue
  sb.writeUInt32LE(o.createdTime, 0x40); // lastcheck
  sb.writeUInt32LE(1, 0x4c); // dynamic revision
  sb.writeUInt32LE(FIRST_INO, 0x54);
  sb.writeUInt16LE(INODE_SIZE, 0x58);
  sb.writeUInt32LE(geo.journalBlocks > 0 ? COMPAT : COMPAT & ~0x0004, 0x5c);
  sb.writeUInt32LE(INCOMPAT, 0x60);
  sb.writeUInt32LE(RO_COMPAT, 0x64);
  image.uuid.copy(sb, 0x68);
  Buffer.from(o.label, "utf8").copy(sb, 0x78, 0, 16);
  o.hashSeed.copy(sb, 0xec);
  sb.writeUInt8(1, 0xfc); // half_md4 directory hash
  sb.writeUInt32LE(0x000c, 0x100); // default mount options: user_xattr, acl
  sb.writeUInt32LE(o.createdTime, 0x108); // mkfs time
  if (geo.journalBlocks > 0) {
    sb.writeUInt32LE(JOURNAL_INO, 0xe0);
    sb.writeUInt8(1, 0xfd); // s_jnl_blocks holds a copy of the journal inode's i_block
    extentRoot(o.journal, image.inodeSeed(JOURNAL_INO), () => {}).copy(sb, 0x10c);
    sb.writeUInt32LE(0, 0x10c + 60); // i_size_high
    sb.writeUInt32LE(geo.journalBlocks * B, 0x10c + 64); // i_size
  }
  sb.writeUInt16LE(EXTRA_ISIZE, 0x15c);
  sb.writeUInt16LE(EXTRA_ISIZE, 0x15e);
  sb.writeUInt32LE(0x1, 0x160); // signed directory hash
  sb.writeUInt8(1, 0x175); // checksum type crc32c
  for (let g = 0; g < geo.groups; g++) {
    if (!hasSuperblock(g)) continue;
    const copy = Buffer.from(sb);
    copy.writeUInt16LE(g, 0x5a);
    copy.writeUInt32LE(crc32c(0xffffffff, copy, 0, 0x3fc), 0x3fc);
    const block = Buffer.alloc(B);
    copy.copy(block, g === 0 ? 1024 : 0); // group 0: after the 1 KiB boot area
    image.writeAt(block, g * geo.bpg);
    image.writeAt(gdt, g * geo.bpg + 1);
  }
}

const ZERO_BUFFER = Buffer.alloc(4 * MiB);

/** True when `buf[start, end)` (at most 4 MiB) is all zeros. */
function isZero(buf: Buffer, start: number, end: number): boolean {
  return buf.subarray(start, end).equals(ZERO_BUFFER.subarray(0, end - start));
}

function runBlocks(runs: Run[]): number[] {
  const out: number[] = [];
  for (const r of runs) for (let k = 0; k < r.len; k++) out.push(r.start + k);
  return out;
}

/** Blocks an extent tree of `extents` extents needs outside the inode (leaves and index levels). */
function extentTreeBlocks(extents: number): number {
  if (extents <= 4) return 0;
  let total = 0;
  let nodes = extents;
  do {
    nodes = Math.ceil(nodes / EXTENTS_PER_BLOCK);
    total += nodes;
  } while (nodes > 4);
  return total;
}

/**
 * The 60-byte i_block of an extent-mapped inode. When the extents do not fit in it, writes the
 * tree's blocks (with checksums): leaves of 340 extents, then index levels of 340 entries, until
 * at most 4 entries remain for the root.
 */
function extentRoot(i: Inode, seed: number, writeAt: (buf: Buffer, block: number) => void): Buffer {
  const root = Buffer.alloc(60);
  const header = (buf: Buffer, off: number, entries: number, max: number, depth: number): void => {
    buf.writeUInt16LE(0xf30a, off);
    buf.writeUInt16LE(entries, off + 2);
    buf.writeUInt16LE(max, off + 4);
    buf.writeUInt16LE(depth, off + 6);
    buf.writeUInt32LE(0, off + 8);
  };
  const putExtent = (buf: Buffer, off: number, run: Run): void => {
    buf.writeUInt32LE(run.logical, off);
    buf.writeUInt16LE(run.len, off + 4);
    buf.writeUInt16LE(0, off + 6); // start hi
    buf.writeUInt32LE(run.start, off + 8);
  };
  const putIndex = (buf: Buffer, off: number, logical: number, block: number): void => {
    buf.writeUInt32LE(logical, off);
    buf.writeUInt32LE(block, off + 4);
    buf.writeUInt16LE(0, off + 8);
    buf.writeUInt16LE(0, off + 10);
  };
  if (i.runs.length <= 4) {
    header(root, 0, i.runs.length, 4, 0);
    for (const [k, run] of i.runs.entries()) putExtent(root, 12 + k * 12, run);
    return root;
  }
  // Level 0: leaves. Each level's nodes: (first logical block, block number).
  let free = 0;
  let level: { logical: number; block: number }[] = [];
  for (let k = 0; k < i.runs.length; k += EXTENTS_PER_BLOCK) {
    const slice = i.runs.slice(k, k + EXTENTS_PER_BLOCK);
    const block = Buffer.alloc(B);
    header(block, 0, slice.length, EXTENTS_PER_BLOCK, 0);
    for (const [j, run] of slice.entries()) putExtent(block, 12 + j * 12, run);
    block.writeUInt32LE(crc32c(seed, block, 0, B - 4), B - 4);
    const nr = i.treeBlocks[free++]!;
    writeAt(block, nr);
    level.push({ logical: slice[0]!.logical, block: nr });
  }
  let depth = 1;
  while (level.length > 4) {
    const next: { logical: number; block: number }[] = [];
    for (let k = 0; k < level.length; k += EXTENTS_PER_BLOCK) {
      const slice = level.slice(k, k + EXTENTS_PER_BLOCK);
      const block = Buffer.alloc(B);
      header(block, 0, slice.length, EXTENTS_PER_BLOCK, depth);
      for (const [j, e] of slice.entries()) putIndex(block, 12 + j * 12, e.logical, e.block);
      block.writeUInt32LE(crc32c(seed, block, 0, B - 4), B - 4);
      const nr = i.treeBlocks[free++]!;
      writeAt(block, nr);
      next.push({ logical: slice[0]!.logical, block: nr });
    }
    level = next;
    depth++;
  }
  header(root, 0, level.length, 4, depth);
  for (const [k, e] of level.entries()) putIndex(root, 12 + k * 12, e.logical, e.block);
  return root;
}

const recLen = (nameLen: number): number => (8 + nameLen + 3) & ~3;

/** Packs directory entries into 4 KiB blocks, each ending with the 12-byte checksum tail. */
function dirBlocks(entries: DirEntry[]): Buffer[] {
  const blocks: Buffer[] = [];
  let block: Buffer | undefined;
  let off = 0;
  let lastOff = 0;
  const finish = (): void => {
    if (!block) return;
    block.writeUInt16LE(DIR_SPACE - lastOff, lastOff + 4); // last entry spans the rest
    writeTail(block);
    blocks.push(block);
  };
  for (const e of entries) {
    const name = Buffer.from(e.name, "latin1");
    const len = recLen(name.length);
    if (!block || off + len > DIR_SPACE) {
      finish();
      block = Buffer.alloc(B);
      off = 0;
    }
    block.writeUInt32LE(e.ino, off);
    block.writeUInt16LE(len, off + 4);
    block.writeUInt8(name.length, off + 6);
    block.writeUInt8(e.type, off + 7);
    name.copy(block, off + 8);
    lastOff = off;
    off += len;
  }
  finish();
  return blocks;
}

function emptyDirBlock(): Buffer {
  const block = Buffer.alloc(B);
  block.writeUInt32LE(0, 0);
  block.writeUInt16LE(DIR_SPACE, 4);
  writeTail(block);
  return block;
}

function writeTail(block: Buffer): void {
  block.writeUInt32LE(0, DIR_SPACE);
  block.writeUInt16LE(DIR_TAIL, DIR_SPACE + 4);
  block.writeUInt8(0, DIR_SPACE + 6);
  block.writeUInt8(0xde, DIR_SPACE + 7);
}
