/**
 * A streaming, bounded tar reader for every layer the ecosystem writes: ustar (155-byte prefix;
 * 131 in star archives), GNU (`L`/`K` long names and links, base-256 numbers, sparse files: old
 * `S` entries and PAX sparse formats 0.0, 0.1 and 1.0, `V` volume labels skipped), PAX (`x`
 * per-entry records; `g` global records validated and ignored, as Docker, containerd and
 * libarchive do), star/Solaris ACLs (`SCHILY.acl.*`, `A` entries), vendor xattr keys
 * (`SCHILY.xattr.*`, `LIBARCHIVE.xattr.*`, `RHT.security.selinux`) and V7. Numeric header fields
 * are read exactly as GNU tar reads them. Entries are yielded one at a time; the body of the
 * current entry must be read (or is skipped) before the next one. docs/rootfs.md has the table
 * of what is supported, mapped, skipped or refused.
 *
 * Names and link targets are "byte strings": JavaScript strings holding one byte per character
 * (latin1), so that any byte sequence a layer carries is reproduced exactly in the image.
 * {@link displayName} turns one into readable text for messages.
 *
 * Every malformation is a {@link LayerError} with code `CORRUPT_LAYER` naming the layer and,
 * when known, the entry.
 */
import { LayerError } from "../errors.ts";
import { ByteSource } from "./byte-source.ts";
import { type AclEntry, parseAclText } from "./posix-acl.ts";

export type TarEntryType = "file" | "hardlink" | "symlink" | "char" | "block" | "dir" | "fifo";

/** A run of data in a sparse file: `length` bytes at `offset`; everything else is a hole. */
export interface SparseSegment {
  readonly offset: number;
  readonly length: number;
}

export interface TarEntry {
  /** 0-based ordinal of this entry among the archive's real (non-metadata) entries. */
  readonly index: number;
  /** Path as stored in the archive (byte string), after PAX/GNU overrides. */
  readonly name: string;
  readonly type: TarEntryType;
  /** Size of the file (regular files only; 0 for every other type). For a sparse file, holes included. */
  readonly size: number;
  /**
   * Where the data of a sparse file lies (sorted, disjoint, non-empty, within `size`); the body
   * yields these segments' bytes one after the other. Undefined for a file that is not sparse.
   */
  readonly sparse: readonly SparseSegment[] | undefined;
  /** Bytes the body yields: `size`, or the sum of the sparse segments' lengths. */
  readonly dataSize: number;
  /** Permission bits including setuid/setgid/sticky (`mode & 0o7777`), as in the header. */
  readonly mode: number;
  readonly uid: number;
  readonly gid: number;
  /** Modification time, whole seconds since the epoch (fractions are truncated toward -∞). */
  readonly mtime: number;
  /** Symlink target or hardlink target path (byte string); "" for other types. */
  readonly linkname: string;
  readonly devMajor: number;
  readonly devMinor: number;
  /** Extended attributes (`SCHILY.xattr.*`, `LIBARCHIVE.xattr.*`, `RHT.security.selinux`). */
  readonly xattrs: ReadonlyMap<string, Buffer>;
  /** POSIX ACLs from `SCHILY.acl.access` / an `A` entry and `SCHILY.acl.default`. */
  readonly aclAccess: readonly AclEntry[] | undefined;
  readonly aclDefault: readonly AclEntry[] | undefined;
  /** The entry's content. Valid until the reader moves to the next entry; readable once. */
  body(): AsyncIterable<Buffer>;
}

export interface TarLimits {
  /** Largest extended header (`x`, `g`, `A`) accepted, in bytes. Default 16 MiB. */
  maxPaxBytes: number;
  /** Longest path or link target accepted, in bytes. Default 4096. */
  maxNameBytes: number;
  /** Largest regular-file size accepted (holes included). Default 64 GiB. */
  maxEntrySizeBytes: number;
  /** Most metadata headers (`x`, `g`, `L`, `K`, `A`, `V`) in a row before an entry. Default 64. */
  maxMetaHeaders: number;
  /** Most bytes of metadata (extended headers, long names, sparse maps) read per image. Default 256 MiB. */
  maxMetadataBytes: number;
  /** Most xattrs on one entry. Default 256. */
  maxXattrsPerEntry: number;
  /** Largest xattr value (Linux's XATTR_SIZE_MAX). Default 65536. */
  maxXattrValueBytes: number;
  /** Most data segments of one sparse file. Default 100,000. */
  maxSparseSegments: number;
}

export const DEFAULT_TAR_LIMITS: Readonly<TarLimits> = Object.freeze({
  maxPaxBytes: 16 * 1024 * 1024,
  maxNameBytes: 4096,
  maxEntrySizeBytes: 64 * 1024 ** 3,
  maxMetaHeaders: 64,
  maxMetadataBytes: 256 * 1024 * 1024,
  maxXattrsPerEntry: 256,
  maxXattrValueBytes: 65536,
  maxSparseSegments: 100_000,
});

/** Bytes of metadata read so far, shared by the readers of all layers of one image. */
export class MetadataBudget {
  used = 0;
}

export interface TarReaderOptions {
  /** Names the archive in errors (a layer digest or path). */
  layer: string;
  limits?: Partial<TarLimits> | undefined;
  /** Shared across the layers of one image (default: this reader's own). */
  budget?: MetadataBudget | undefined;
  /** Bytes drained after the end-of-archive marker (so a compressor can check its trailer). Default 1 MiB. */
  maxTrailingBytes?: number | undefined;
}

const BLOCK = 512;
const TEXT = new TextDecoder("utf-8", { fatal: false });
/** XATTR_NAME_MAX. */
const MAX_XATTR_NAME = 255;

/** Readable text for a byte-string path (UTF-8 decoded, invalid bytes replaced). */
export function displayName(name: string): string {
  return TEXT.decode(Buffer.from(name, "latin1"));
}

async function* guard<T>(source: AsyncIterable<T>, mapError: (err: unknown) => unknown): AsyncGenerator<T> {
  try {
    yield* source;
  } catch (err) {
    throw mapError(err);
  }
}

function isZeroBlock(block: Buffer): boolean {
  for (let i = 0; i < block.length; i++) if (block[i] !== 0) return false;
  return true;
}

function cString(buf: Buffer, start: number, end: number): string {
  let stop = start;
  while (stop < end && buf[stop] !== 0) stop++;
  return buf.toString("latin1", start, stop);
}

/** C's isspace in the "C" locale. */
const isSpace = (c: number): boolean => c === 0x20 || (c >= 0x09 && c <= 0x0d);

/**
 * A numeric header field, read as GNU tar's `from_header` reads it: one leading NUL is skipped
 * (some tars write it when the previous field overflowed), then white space; then octal digits,
 * which must end at the field's end, a NUL or a space (what follows is not looked at); or GNU
 * base-256 (first byte 0x80: non-negative, 0xff: negative two's complement). A field of NULs
 * reads 0, so does an empty or all-blank one (as libarchive, Python and Go read it). Returns a
 * string naming the problem when the field is not a number.
 */
export function parseNumericField(
  block: Uint8Array,
  start: number,
  length: number,
  octalOnly = false,
): number | string {
  const end = start + length;
  let i = start;
  if (block[i] === 0) i++;
  while (i < end && isSpace(block[i]!)) i++;
  if (i === end) return 0;
  const first = block[i]!;
  if (first >= 0x30 && first <= 0x37) {
    let value = 0;
    while (i < end && block[i]! >= 0x30 && block[i]! <= 0x37) {
      value = value * 8 + (block[i]! - 0x30);
      i++;
    }
    if (value > Number.MAX_SAFE_INTEGER) return "is too large";
    if (i < end && block[i] !== 0 && !isSpace(block[i]!)) return "is not an octal number";
    return value;
  }
  if (!octalOnly && (first === 0x80 || first === 0xff) && i <= end - 2) {
    const negative = first === 0xff;
    let value = negative ? -1 : 0; // the first byte's value bits: all ones (negative) or zero
    for (i++; i < end; i++) {
      value = value * 256 + block[i]!;
      if (!Number.isSafeInteger(value)) return "is too large";
    }
    return value;
  }
  if (first === 0) return 0;
  return "is not a number";
}

/** Big-endian number of a GNU sparse map field; like {@link parseNumericField}. */
function sparseField(block: Buffer, start: number): number | string {
  return parseNumericField(block, start, 12);
}

interface Pax {
  path?: string;
  linkpath?: string;
  size?: number;
  uid?: number;
  gid?: number;
  mtime?: number;
  devMajor?: number;
  devMinor?: number;
  xattrs: Map<string, Buffer>;
  selinux?: Buffer;
  aclAccess?: AclEntry[];
  aclDefault?: AclEntry[];
  sparse: {
    /** GNU.sparse.major / minor, when given. */
    major?: number;
    minor?: number;
    /** 0.0: GNU.sparse.offset / numbytes pairs; 0.1: GNU.sparse.map. */
    map?: number[];
    /** The file's real size (GNU.sparse.size, GNU.sparse.realsize). */
    realSize?: number;
    name?: string;
  };
}

const newPax = (): Pax => ({ xattrs: new Map(), sparse: {} });

/** Reads a tar stream. See the module comment. */
export class TarReader {
  readonly #src: ByteSource;
  readonly #layer: string;
  readonly #limits: TarLimits;
  readonly #budget: MetadataBudget;
  readonly #maxTrailing: number;
  #remaining = 0; // unread body bytes of the current entry
  #padding = 0; // padding after the current entry's body
  #current: string | undefined; // display name of the current entry
  #bodyTaken = false;

  constructor(source: AsyncIterable<Buffer | Uint8Array | string>, options: TarReaderOptions) {
    this.#src = new ByteSource(guard(source, (err) => this.#sourceError(err)));
    this.#layer = options.layer;
    this.#limits = { ...DEFAULT_TAR_LIMITS, ...options.limits };
    this.#budget = options.budget ?? new MetadataBudget();
    this.#maxTrailing = options.maxTrailingBytes ?? 1024 * 1024;
  }

  /** Bytes of (decompressed) tar consumed so far. */
  get position(): number {
    return this.#src.position;
  }

  #sourceError(err: unknown): unknown {
    if (err instanceof LayerError || (err as Error | undefined)?.name === "AbortError") return err;
    const message = (err as Error | undefined)?.message ?? String(err);
    return this.#corrupt(`cannot read the layer: ${message}`, this.#current, err);
  }

  #corrupt(message: string, entry?: string, cause?: unknown): LayerError {
    const where = entry === undefined ? "" : ` (entry ${JSON.stringify(entry)})`;
    return new LayerError(
      "CORRUPT_LAYER",
      `corrupt layer ${this.#layer}${where}: ${message}`,
      { layer: this.#layer, entry },
      cause === undefined ? undefined : { cause },
    );
  }

  #numeric(
    block: Buffer,
    start: number,
    length: number,
    field: string,
    entry: string | undefined,
    signed = false,
  ): number {
    const v = parseNumericField(block, start, length);
    if (typeof v === "string") {
      const raw = JSON.stringify(block.toString("latin1", start, start + length));
      throw this.#corrupt(`the ${field} field ${raw} ${v}`, entry);
    }
    if (v < 0 && !signed) throw this.#corrupt(`negative ${field} in header`, entry);
    return v;
  }

  #checkChecksum(block: Buffer, entry: string): void {
    const stored = parseNumericField(block, 148, 8, true);
    let unsigned = 0;
    let signed = 0;
    for (let i = 0; i < BLOCK; i++) {
      const b = i >= 148 && i < 156 ? 0x20 : block[i]!;
      unsigned += b;
      signed += b > 127 ? b - 256 : b;
    }
    if (stored !== unsigned && stored !== signed) {
      throw this.#corrupt(`header checksum mismatch (stored ${stored}, computed ${unsigned})`, entry);
    }
  }

  /** Counts `n` bytes of metadata against the image's budget. */
  #spend(n: number, what: string, entry: string): void {
    this.#budget.used += n;
    if (this.#budget.used > this.#limits.maxMetadataBytes) {
      throw this.#corrupt(
        `${what}: the image's metadata exceeds ${this.#limits.maxMetadataBytes} bytes (limits.maxMetadataBytes)`,
        entry,
      );
    }
  }

  /** Reads `size` bytes of a metadata entry (PAX / long name / ACL) plus its padding. */
  async #readMeta(size: number, what: string, entry: string): Promise<Buffer> {
    this.#spend(size, what, entry);
    const data = Buffer.from(await this.#src.read(size)); // copy: must outlive the chunk
    if (data.length < size) throw this.#corrupt(`archive truncated inside ${what}`, entry);
    const pad = (BLOCK - (size % BLOCK)) % BLOCK;
    if ((await this.#src.skip(pad)) < pad) throw this.#corrupt(`archive truncated inside ${what}`, entry);
    return data;
  }

  #parsePax(data: Buffer, pax: Pax | undefined, entry: string): void {
    let pos = 0;
    while (pos < data.length) {
      // "%d %s=%s\n": length (decimal, counts the whole record), space, key=value, newline.
      let sp = pos;
      while (sp < data.length && sp - pos <= 10 && data[sp] !== 0x20) sp++;
      const lenText = data.toString("latin1", pos, sp);
      if (sp >= data.length || !/^[1-9][0-9]{0,9}$/.test(lenText)) {
        // A run of NUL padding after the last record is tolerated (some writers emit it).
        if (data.subarray(pos).every((b) => b === 0)) return;
        throw this.#corrupt("malformed PAX record length", entry);
      }
      const len = Number(lenText);
      const end = pos + len;
      if (end > data.length || end <= sp + 1 || data[end - 1] !== 0x0a)
        throw this.#corrupt("malformed PAX record", entry);
      const record = data.subarray(sp + 1, end - 1);
      const eq = record.indexOf(0x3d);
      if (eq <= 0) throw this.#corrupt("PAX record without key", entry);
      const key = record.toString("latin1", 0, eq);
      const value = record.subarray(eq + 1);
      pos = end;
      if (pax !== undefined) this.#applyPaxRecord(pax, key, value, entry); // global records: checked only
    }
  }

  #decimal(text: string, key: string, entry: string): number {
    if (!/^[0-9]{1,16}$/.test(text)) throw this.#corrupt(`invalid PAX ${key} ${JSON.stringify(text)}`, entry);
    const n = Number(text);
    if (!Number.isSafeInteger(n)) throw this.#corrupt(`PAX ${key} too large`, entry);
    return n;
  }

  #paxNumber(value: Buffer, key: string, entry: string): number {
    return this.#decimal(value.toString("latin1"), key, entry);
  }

  #addXattr(pax: Pax, name: string, value: Buffer, entry: string): void {
    if (name.length === 0) throw this.#corrupt("PAX xattr record without a name", entry);
    if (name.length > MAX_XATTR_NAME)
      throw this.#corrupt(`xattr name longer than ${MAX_XATTR_NAME} bytes`, entry);
    if (value.length > this.#limits.maxXattrValueBytes) {
      throw this.#corrupt(
        `xattr ${JSON.stringify(displayName(name))} of ${value.length} bytes exceeds ${this.#limits.maxXattrValueBytes} (limits.maxXattrValueBytes)`,
        entry,
      );
    }
    pax.xattrs.delete(name); // a later record for the same name wins, in its own place
    pax.xattrs.set(name, Buffer.from(value));
    if (pax.xattrs.size > this.#limits.maxXattrsPerEntry)
      throw this.#corrupt(`more than ${this.#limits.maxXattrsPerEntry} xattrs on one entry`, entry);
  }

  #acl(value: Buffer, key: string, entry: string): AclEntry[] {
    const entries = parseAclText(value.toString("utf8"));
    if (entries === undefined) throw this.#corrupt(`malformed ACL in ${key}`, entry);
    if (entries.length > 1024) throw this.#corrupt(`more than 1024 ACL entries in ${key}`, entry);
    return entries;
  }

  #applyPaxRecord(pax: Pax, key: string, value: Buffer, entry: string): void {
    const empty = value.length === 0; // an empty value cancels the keyword
    const text = (): string => value.toString("latin1");
    switch (key) {
      case "path":
        if (empty) delete pax.path;
        else pax.path = text();
        return;
      case "linkpath":
        if (empty) delete pax.linkpath;
        else pax.linkpath = text();
        return;
      case "size":
        if (empty) delete pax.size;
        else pax.size = this.#paxNumber(value, key, entry);
        return;
      case "uid":
        if (empty) delete pax.uid;
        else pax.uid = this.#paxNumber(value, key, entry);
        return;
      case "gid":
        if (empty) delete pax.gid;
        else pax.gid = this.#paxNumber(value, key, entry);
        return;
      case "SCHILY.devmajor":
        if (empty) delete pax.devMajor;
        else pax.devMajor = this.#paxNumber(value, key, entry);
        return;
      case "SCHILY.devminor":
        if (empty) delete pax.devMinor;
        else pax.devMinor = this.#paxNumber(value, key, entry);
        return;
      case "mtime": {
        if (empty) {
          delete pax.mtime;
          return;
        }
        const m = /^(-?)([0-9]{1,15})(?:\.([0-9]*))?$/.exec(text());
        if (!m) throw this.#corrupt(`invalid PAX mtime ${JSON.stringify(text())}`, entry);
        const whole = Number(m[2]);
        const frac = m[3] !== undefined && /[1-9]/.test(m[3]);
        pax.mtime = m[1] === "-" ? -whole - (frac ? 1 : 0) : whole;
        return;
      }
      case "SCHILY.acl.access":
        if (empty) delete pax.aclAccess;
        else pax.aclAccess = this.#acl(value, key, entry);
        return;
      case "SCHILY.acl.default":
        if (empty) delete pax.aclDefault;
        else pax.aclDefault = this.#acl(value, key, entry);
        return;
      case "RHT.security.selinux":
        if (empty) delete pax.selinux;
        else pax.selinux = Buffer.from(value);
        return;
      // GNU sparse files (https://www.gnu.org/software/tar/manual/html_node/Sparse-Formats.html).
      case "GNU.sparse.major":
        pax.sparse.major = this.#paxNumber(value, key, entry);
        return;
      case "GNU.sparse.minor":
        pax.sparse.minor = this.#paxNumber(value, key, entry);
        return;
      case "GNU.sparse.size":
      case "GNU.sparse.realsize":
        pax.sparse.realSize = this.#paxNumber(value, key, entry);
        return;
      case "GNU.sparse.name":
        pax.sparse.name = text();
        return;
      case "GNU.sparse.numblocks":
        this.#paxNumber(value, key, entry); // checked; the map itself says how many
        pax.sparse.map ??= [];
        return;
      case "GNU.sparse.offset":
      case "GNU.sparse.numbytes": {
        // Format 0.0: pairs of repeated records, offset first (as Go's archive/tar checks).
        pax.sparse.map ??= [];
        const map = pax.sparse.map;
        if ((map.length % 2 === 0) !== (key === "GNU.sparse.offset"))
          throw this.#corrupt("GNU sparse offset/numbytes records out of order", entry);
        if (map.length >= 2 * this.#limits.maxSparseSegments)
          throw this.#corrupt(`more than ${this.#limits.maxSparseSegments} sparse segments`, entry);
        map.push(this.#paxNumber(value, key, entry));
        return;
      }
      case "GNU.sparse.map": {
        // Format 0.1: "offset,size,offset,size,…".
        const parts = empty ? [] : text().split(",");
        if (parts.length % 2 !== 0) throw this.#corrupt("GNU.sparse.map has an odd number of values", entry);
        if (parts.length > 2 * this.#limits.maxSparseSegments)
          throw this.#corrupt(`more than ${this.#limits.maxSparseSegments} sparse segments`, entry);
        pax.sparse.map = parts.map((p) => this.#decimal(p, key, entry));
        return;
      }
      default:
        break;
    }
    if (key.startsWith("SCHILY.xattr.")) {
      this.#addXattr(pax, key.slice("SCHILY.xattr.".length), value, entry);
    } else if (key.startsWith("LIBARCHIVE.xattr.")) {
      // The name is URL-encoded (bytes; a '%' not followed by two hex digits stays as it is);
      // the value is base64, with or without padding (as libarchive writes and reads it).
      const name = key
        .slice("LIBARCHIVE.xattr.".length)
        .replace(/%([0-9A-Fa-f]{2})/g, (_, h: string) => String.fromCharCode(Number.parseInt(h, 16)));
      const b64 = text();
      if (!/^[A-Za-z0-9+/]*={0,2}$/.test(b64)) throw this.#corrupt("malformed LIBARCHIVE.xattr value", entry);
      this.#addXattr(pax, name, Buffer.from(b64, "base64"), entry);
    } else if (key.startsWith("GNU.sparse.")) {
      throw this.#corrupt(`unknown GNU sparse record ${JSON.stringify(key)}`, entry);
    }
    // Other keywords (atime, ctime, uname, gname, comment, charset, hdrcharset, SCHILY.dev/ino/
    // nlink, …) are ignored: numeric ids and mtime rule.
  }

  #checkName(name: string, what: string, entry: string): void {
    if (name.length > this.#limits.maxNameBytes) {
      throw this.#corrupt(`${what} is ${name.length} bytes, more than ${this.#limits.maxNameBytes}`, entry);
    }
    if (name.includes("\0")) throw this.#corrupt(`${what} contains a NUL byte`, entry);
  }

  async #skipCurrent(): Promise<void> {
    const want = this.#remaining + this.#padding;
    const entry = this.#current;
    this.#remaining = 0;
    this.#padding = 0;
    if (want > 0 && (await this.#src.skip(want)) < want) {
      throw this.#corrupt("archive truncated inside entry data", entry);
    }
  }

  /** Checks a sparse map (pairs of offset, length) against the file and data sizes; drops empty segments. */
  #sparseSegments(
    map: readonly number[],
    realSize: number,
    dataSize: number,
    entry: string,
  ): SparseSegment[] {
    const out: SparseSegment[] = [];
    let end = 0;
    let sum = 0;
    for (let k = 0; k < map.length; k += 2) {
      const offset = map[k]!;
      const length = map[k + 1]!;
      if (offset < end || offset + length > realSize)
        throw this.#corrupt("sparse map with overlapping, unsorted or out-of-range segments", entry);
      sum += length;
      if (length === 0) continue;
      const last = out[out.length - 1];
      if (last !== undefined && last.offset + last.length === offset)
        out[out.length - 1] = { offset: last.offset, length: last.length + length };
      else out.push({ offset, length });
      end = offset + length;
    }
    if (sum !== dataSize) {
      throw this.#corrupt(`sparse map describes ${sum} bytes of data, the entry holds ${dataSize}`, entry);
    }
    if (out.length > this.#limits.maxSparseSegments)
      throw this.#corrupt(`more than ${this.#limits.maxSparseSegments} sparse segments`, entry);
    return out;
  }

  /** Old GNU sparse header (type `S`): 4 segments in the header, 21 more per extension block. */
  async #oldSparseMap(block: Buffer, entry: string): Promise<{ map: number[]; realSize: number }> {
    const map: number[] = [];
    const take = (b: Buffer, start: number, count: number): void => {
      for (let k = 0; k < count; k++) {
        const at = start + k * 24;
        if (b[at] === 0 && b[at + 12] === 0) return; // unused slot: end of the list
        for (const v of [sparseField(b, at), sparseField(b, at + 12)]) {
          if (typeof v === "string" || v < 0) throw this.#corrupt("malformed GNU sparse map", entry);
          map.push(v);
        }
      }
    };
    take(block, 386, 4);
    const realSize = this.#numeric(block, 483, 12, "realsize", entry);
    let extended = block[482] !== 0;
    while (extended) {
      if (map.length >= 2 * this.#limits.maxSparseSegments)
        throw this.#corrupt(`more than ${this.#limits.maxSparseSegments} sparse segments`, entry);
      this.#spend(BLOCK, "GNU sparse map", entry);
      const ext = await this.#src.read(BLOCK);
      if (ext.length < BLOCK) throw this.#corrupt("archive truncated inside a GNU sparse map", entry);
      take(ext, 0, 21);
      extended = ext[504] !== 0;
    }
    return { map, realSize };
  }

  /** PAX sparse format 1.0: the map is decimal lines at the start of the data, padded to a block. */
  async #sparse10Map(dataSize: number, entry: string): Promise<{ map: number[]; mapBytes: number }> {
    let used = 0;
    const line = async (): Promise<number> => {
      let text = "";
      for (;;) {
        if (used >= dataSize || text.length > 20) throw this.#corrupt("malformed GNU sparse 1.0 map", entry);
        const b = await this.#src.read(1);
        if (b.length === 0) throw this.#corrupt("archive truncated inside a GNU sparse map", entry);
        used++;
        if (b[0] === 0x0a) break;
        text += String.fromCharCode(b[0]!);
      }
      return this.#decimal(text, "GNU sparse 1.0 map", entry);
    };
    const count = await line();
    if (count > this.#limits.maxSparseSegments)
      throw this.#corrupt(`more than ${this.#limits.maxSparseSegments} sparse segments`, entry);
    const map: number[] = [];
    for (let k = 0; k < 2 * count; k++) map.push(await line());
    const pad = (BLOCK - (used % BLOCK)) % BLOCK;
    if (used + pad > dataSize) throw this.#corrupt("malformed GNU sparse 1.0 map", entry);
    if ((await this.#src.skip(pad)) < pad)
      throw this.#corrupt("archive truncated inside a GNU sparse map", entry);
    this.#spend(used + pad, "GNU sparse map", entry);
    return { map, mapBytes: used + pad };
  }

  /** Yields the archive's entries. Throws `CORRUPT_LAYER` on any malformation or truncation. */
  async *entries(): AsyncGenerator<TarEntry, void, undefined> {
    let index = 0;
    let pax: Pax = newPax();
    let longName: string | undefined;
    let longLink: string | undefined;
    let pending = false; // per-entry metadata read, its entry still to come
    let metaCount = 0;
    try {
      for (;;) {
        await this.#skipCurrent();
        const at = this.#src.position;
        const where = `#${index} at byte ${at}`;
        const block = await this.#src.read(BLOCK);
        if (block.length === 0) {
          // End of stream on a header boundary without the end-of-archive marker: accepted, as
          // Go's archive/tar, GNU tar and libarchive do — unless an entry's metadata is dangling.
          if (pending)
            throw this.#corrupt(
              "archive ends after an extended header",
              longName === undefined ? pax.path : displayName(longName),
            );
          await this.#drain();
          return;
        }
        if (block.length < BLOCK) throw this.#corrupt("archive truncated inside a header", where);
        if (isZeroBlock(block)) {
          if (pending) throw this.#corrupt("extended header not followed by an entry", where);
          const next = await this.#src.read(BLOCK);
          if (!isZeroBlock(next)) {
            // GNU tar stops here with a warning, libarchive silently: what follows would be
            // hidden from them. Go's archive/tar (Docker) refuses; so do we.
            throw this.#corrupt("data after a zero block (damaged archive)", where);
          }
          await this.#drain();
          return;
        }
        const headerName = cString(block, 0, 100);
        const label = displayName(longName ?? pax.path ?? headerName) || where;
        this.#checkChecksum(block, label);
        const magic = block.toString("latin1", 257, 263);
        const version = block.toString("latin1", 263, 265);
        let flag = String.fromCharCode(block[156]!);
        const headerSize = this.#numeric(block, 124, 12, "size", label);

        if ("xXgLKAV".includes(flag)) {
          if (++metaCount > this.#limits.maxMetaHeaders)
            throw this.#corrupt("too many extended headers in a row", label);
          if (flag === "x" || flag === "X" || flag === "g" || flag === "A") {
            if (headerSize > this.#limits.maxPaxBytes) {
              throw this.#corrupt(
                `extended header of ${headerSize} bytes exceeds ${this.#limits.maxPaxBytes} (limits.maxPaxBytes)`,
                label,
              );
            }
            const data = await this.#readMeta(headerSize, "an extended header", label);
            if (flag === "A") {
              this.#solarisAcl(data, pax, label);
              pending = true;
            } else if (flag === "g") {
              this.#parsePax(data, undefined, label); // global: metadata only, may be the whole archive
            } else {
              this.#parsePax(data, pax, label);
              pending = true;
            }
          } else if (flag === "V") {
            // GNU volume label: carries no file (skipped as GNU tar and libarchive skip it).
            if (headerSize !== 0) throw this.#corrupt("GNU volume label with data", label);
          } else {
            if (headerSize > this.#limits.maxNameBytes + 1) {
              throw this.#corrupt(
                `GNU long ${flag === "L" ? "name" : "link"} of ${headerSize} bytes is too long`,
                label,
              );
            }
            const data = await this.#readMeta(headerSize, "a GNU long name", label);
            let end = data.length;
            while (end > 0 && data[end - 1] === 0) end--;
            const text = data.toString("latin1", 0, end);
            if (flag === "L") longName = text;
            else longLink = text;
            pending = true;
          }
          continue;
        }

        let name: string;
        if (pax.sparse.name !== undefined) name = pax.sparse.name;
        else if (pax.path !== undefined) name = pax.path;
        else if (longName !== undefined) name = longName;
        else {
          name = headerName;
          if (magic === "ustar\0" && version === "00") {
            // POSIX ustar: a 155-byte prefix (131 bytes in star archives, marked by "tar\0" at 508).
            const star = block.toString("latin1", 508, 512) === "tar\0";
            const prefix = cString(block, 345, star ? 476 : 500);
            if (prefix.length > 0) name = `${prefix}/${name}`;
          }
        }
        const display = displayName(name);
        if (name.length === 0) throw this.#corrupt("entry with an empty name", where);
        this.#checkName(name, "path", display);
        if (magic !== "ustar\0" && magic !== "ustar " && !isZeroBlock(block.subarray(257, 263))) {
          throw this.#corrupt(`unknown header magic ${JSON.stringify(magic)}`, display);
        }

        if (flag === "\0") flag = name.endsWith("/") ? "5" : "0";
        let type: TarEntryType;
        switch (flag) {
          case "0":
          case "7":
          case "S":
            type = "file";
            break;
          case "1":
            type = "hardlink";
            break;
          case "2":
            type = "symlink";
            break;
          case "3":
            type = "char";
            break;
          case "4":
            type = "block";
            break;
          case "5":
            type = "dir";
            break;
          case "6":
            type = "fifo";
            break;
          default:
            throw this.#corrupt(`unsupported entry type ${JSON.stringify(flag)}`, display);
        }

        // Header-only types carry no data whatever their size field says (as Go's archive/tar).
        let dataSize = type === "file" ? (pax.size ?? headerSize) : 0;
        let size = dataSize;
        let sparse: SparseSegment[] | undefined;
        if (flag === "S") {
          if (magic !== "ustar ") throw this.#corrupt("GNU sparse entry in a non-GNU header", display);
          const old = await this.#oldSparseMap(block, display);
          size = old.realSize;
          sparse = this.#sparseSegments(old.map, size, dataSize, display);
        } else if (type === "file" && (pax.sparse.major !== undefined || pax.sparse.map !== undefined)) {
          const { major, minor } = pax.sparse;
          const version = major === undefined ? "0.x" : `${major}.${minor ?? 0}`;
          if (pax.sparse.realSize === undefined)
            throw this.#corrupt("GNU sparse file without its size", display);
          size = pax.sparse.realSize;
          if (version === "1.0") {
            if (dataSize > this.#limits.maxEntrySizeBytes + 64 * 1024 * 1024)
              throw this.#corrupt(`entry data of ${dataSize} bytes is too large`, display);
            const m = await this.#sparse10Map(dataSize, display);
            dataSize -= m.mapBytes;
            sparse = this.#sparseSegments(m.map, size, dataSize, display);
          } else if (version === "0.x" || version === "0.0" || version === "0.1") {
            sparse = this.#sparseSegments(pax.sparse.map ?? [], size, dataSize, display);
          } else {
            throw this.#corrupt(`unknown GNU sparse format ${version}`, display);
          }
        }
        if (size > this.#limits.maxEntrySizeBytes) {
          throw this.#corrupt(
            `entry size ${size} exceeds the limit of ${this.#limits.maxEntrySizeBytes} bytes`,
            display,
          );
        }
        const linkname =
          type === "hardlink" || type === "symlink"
            ? (pax.linkpath ?? longLink ?? cString(block, 157, 257))
            : "";
        if (type === "hardlink" || type === "symlink") {
          if (linkname.length === 0) throw this.#corrupt(`${type} without a target`, display);
          this.#checkName(linkname, "link target", display);
        }
        const isDevice = type === "char" || type === "block";
        const xattrs = pax.xattrs;
        // RHT.security.selinux (GNU tar --selinux) is security.selinux under another key; an
        // explicit SCHILY.xattr.security.selinux has the exact bytes and wins.
        if (pax.selinux !== undefined && !xattrs.has("security.selinux"))
          this.#addXattr(pax, "security.selinux", pax.selinux, display);
        const entry: TarEntry = {
          index,
          name,
          type,
          size,
          sparse,
          dataSize,
          mode: this.#numeric(block, 100, 8, "mode", display) & 0o7777,
          uid: pax.uid ?? this.#numeric(block, 108, 8, "uid", display),
          gid: pax.gid ?? this.#numeric(block, 116, 8, "gid", display),
          mtime: pax.mtime ?? this.#numeric(block, 136, 12, "mtime", display, true),
          linkname,
          devMajor: isDevice ? (pax.devMajor ?? this.#numeric(block, 329, 8, "devmajor", display)) : 0,
          devMinor: isDevice ? (pax.devMinor ?? this.#numeric(block, 337, 8, "devminor", display)) : 0,
          xattrs,
          aclAccess: pax.aclAccess,
          aclDefault: pax.aclDefault,
          body: () => this.#body(display),
        };
        this.#remaining = dataSize;
        this.#padding = (BLOCK - (dataSize % BLOCK)) % BLOCK; // a 1.0 sparse map is whole blocks
        this.#current = display;
        this.#bodyTaken = false;
        pax = newPax();
        longName = undefined;
        longLink = undefined;
        pending = false;
        metaCount = 0;
        index++;
        yield entry;
      }
    } finally {
      await this.#src.close();
    }
  }

  /** A Solaris `A` entry: "<octal type and count>\0<ACL text>\0"; POSIX.1e ACLs apply to the next entry. */
  #solarisAcl(data: Buffer, pax: Pax, entry: string): void {
    const nul = data.indexOf(0);
    const typeText = data.toString("latin1", 0, nul < 0 ? data.length : nul);
    if (!/^[0-7]{1,8}$/.test(typeText)) throw this.#corrupt("malformed Solaris ACL entry", entry);
    const type = Number.parseInt(typeText, 8) & ~0o777777;
    if (type === 0o3000000) return; // NFSv4 ACL: not representable on Linux, skipped (as libarchive)
    if (type !== 0o1000000) throw this.#corrupt(`unknown Solaris ACL type 0${type.toString(8)}`, entry);
    const rest = data.subarray(nul + 1);
    const end = rest.indexOf(0);
    pax.aclAccess = this.#acl(end < 0 ? rest : rest.subarray(0, end), "a Solaris ACL entry", entry);
  }

  async *#body(entry: string): AsyncGenerator<Buffer, void, undefined> {
    if (this.#current !== entry || this.#bodyTaken) throw new Error("tar entry body read out of order");
    this.#bodyTaken = true;
    while (this.#remaining > 0) {
      let got = 0;
      for await (const chunk of this.#src.stream(this.#remaining)) {
        got += chunk.length;
        this.#remaining -= chunk.length;
        yield chunk;
      }
      if (got === 0) throw this.#corrupt("archive truncated inside entry data", entry);
    }
  }

  /** After the end-of-archive marker: read (and discard) a bounded tail so a decompressor can verify its trailer. */
  async #drain(): Promise<void> {
    await this.#src.skip(this.#maxTrailing);
  }
}
