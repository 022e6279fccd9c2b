/**
 * A streaming, bounded tar reader: ustar, GNU (`L`/`K` long names and links, base-256 numbers),
 * PAX (`x` per-entry records; `g` global records are validated and ignored, as Docker and
 * containerd do), V7. Entries are yielded one at a time; the body of the current entry must be
 * read (or is skipped) before the next one.
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

export type TarEntryType = "file" | "hardlink" | "symlink" | "char" | "block" | "dir" | "fifo";

export interface TarEntry {
  /** 0-based ordinal of this entry among the archive's real (non-metadata) entries. */
  readonly index: number;
  /** Path as stored in the archive (byte string), after PAX/GNU overrides. */
  readonly name: string;
  readonly type: TarEntryType;
  /** Bytes of content (regular files only; 0 for every other type). */
  readonly size: number;
  /** Permission bits including setuid/setgid/sticky (`mode & 0o7777`). */
  readonly mode: number;
  readonly uid: number;
  readonly gid: number;
  /** Modification time, whole seconds since the epoch (fractions are truncated toward -∞). */
  readonly mtime: number;
  /** Symlink target or hardlink target path (byte string); "" for other types. */
  readonly linkname: string;
  readonly devMajor: number;
  readonly devMinor: number;
  /** Extended attributes from `SCHILY.xattr.*` / `LIBARCHIVE.xattr.*` PAX records. */
  readonly xattrs: ReadonlyMap<string, Buffer>;
  /** The entry's content. Valid until the reader moves to the next entry; readable once. */
  body(): AsyncIterable<Buffer>;
}

export interface TarLimits {
  /** Largest PAX (`x`/`g`) record block accepted. Default 1 MiB. */
  maxPaxBytes: number;
  /** Longest path or link target accepted, in bytes. Default 4096. */
  maxNameBytes: number;
  /** Largest regular-file size accepted. Default 64 GiB. */
  maxEntrySizeBytes: number;
  /** Most metadata headers (`x`, `g`, `L`, `K`) in a row before an entry. Default 64. */
  maxMetaHeaders: number;
}

export const DEFAULT_TAR_LIMITS: Readonly<TarLimits> = Object.freeze({
  maxPaxBytes: 1024 * 1024,
  maxNameBytes: 4096,
  maxEntrySizeBytes: 64 * 1024 ** 3,
  maxMetaHeaders: 64,
});

export interface TarReaderOptions {
  /** Names the archive in errors (a layer digest or path). */
  layer: string;
  limits?: Partial<TarLimits> | undefined;
  /** Bytes drained after the end-of-archive marker (so a compressor can check its trailer). Default 1 MiB. */
  maxTrailingBytes?: number | undefined;
}

const BLOCK = 512;
const TEXT = new TextDecoder("utf-8", { fatal: false });

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
}

/** Reads a tar stream. See the module comment. */
export class TarReader {
  readonly #src: ByteSource;
  readonly #layer: string;
  readonly #limits: TarLimits;
  readonly #maxTrailing: number;
  #remaining = 0; // unread body bytes of the current entry
  #padding = 0; // padding after the current entry's body
  #current: string | undefined; // display name of the current entry
  #bodyTaken = false;

  constructor(source: AsyncIterable<Buffer | Uint8Array | string>, options: TarReaderOptions) {
    this.#src = new ByteSource(guard(source, (err) => this.#sourceError(err)));
    this.#layer = options.layer;
    this.#limits = { ...DEFAULT_TAR_LIMITS, ...options.limits };
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

  #numeric(block: Buffer, start: number, length: number, field: string, entry: string | undefined): number {
    const first = block[start]!;
    if (first & 0x80) {
      // GNU base-256: big-endian two's complement; we accept non-negative values only.
      if (first === 0xff) throw this.#corrupt(`negative ${field} in header`, entry);
      let value = first & 0x7f;
      for (let i = start + 1; i < start + length; i++) {
        value = value * 256 + block[i]!;
        if (value > Number.MAX_SAFE_INTEGER) throw this.#corrupt(`${field} too large`, entry);
      }
      return value;
    }
    let i = start;
    let end = start + length;
    while (i < end && (block[i] === 0x20 || block[i] === 0)) i++;
    while (end > i && (block[end - 1] === 0x20 || block[end - 1] === 0)) end--;
    let value = 0;
    for (; i < end; i++) {
      const c = block[i]!;
      if (c < 0x30 || c > 0x37) throw this.#corrupt(`invalid octal digit in ${field} field`, entry);
      value = value * 8 + (c - 0x30);
    }
    if (value > Number.MAX_SAFE_INTEGER) throw this.#corrupt(`${field} too large`, entry);
    return value;
  }

  #checkChecksum(block: Buffer, entry: string): void {
    const stored = this.#numeric(block, 148, 8, "checksum", entry);
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

  /** Reads `size` bytes of a metadata entry (PAX / long name) plus its padding. */
  async #readMeta(size: number, what: string, entry: string): Promise<Buffer> {
    const data = Buffer.from(await this.#src.read(size)); // copy: must outlive the chunk
    if (data.length < size) throw this.#corrupt(`archive truncated inside ${what}`, entry);
    const pad = (BLOCK - (size % BLOCK)) % BLOCK;
    if ((await this.#src.skip(pad)) < pad) throw this.#corrupt(`archive truncated inside ${what}`, entry);
    return data;
  }

  #parsePax(data: Buffer, pax: Pax, global: boolean, entry: string): void {
    let pos = 0;
    while (pos < data.length) {
      // "%d %s=%s\n": length (decimal, counts the whole record), space, key=value, newline.
      let sp = pos;
      while (sp < data.length && data[sp] !== 0x20) sp++;
      const lenText = data.toString("latin1", pos, sp);
      if (sp >= data.length || !/^[1-9][0-9]{0,9}$/.test(lenText)) {
        // A run of NUL padding after the last record is tolerated (some writers emit it).
        if (data.subarray(pos).every((b) => b === 0)) return;
        throw this.#corrupt("malformed PAX record length", entry);
      }
      const len = Number(lenText);
      const end = pos + len;
      if (end > data.length || data[end - 1] !== 0x0a) throw this.#corrupt("malformed PAX record", entry);
      const record = data.subarray(sp + 1, end - 1);
      const eq = record.indexOf(0x3d);
      if (eq <= 0) throw this.#corrupt("PAX record without key", entry);
      const key = record.toString("latin1", 0, eq);
      const value = record.subarray(eq + 1);
      pos = end;
      if (!global) this.#applyPaxRecord(pax, key, value, entry);
      else if (key.startsWith("GNU.sparse."))
        throw this.#corrupt("GNU sparse files are not supported", entry);
    }
  }

  #paxNumber(value: Buffer, key: string, entry: string): number {
    const text = value.toString("latin1");
    if (!/^[0-9]{1,16}$/.test(text)) throw this.#corrupt(`invalid PAX ${key} ${JSON.stringify(text)}`, entry);
    const n = Number(text);
    if (!Number.isSafeInteger(n)) throw this.#corrupt(`PAX ${key} too large`, entry);
    return n;
  }

  #applyPaxRecord(pax: Pax, key: string, value: Buffer, entry: string): void {
    const empty = value.length === 0; // an empty value cancels the keyword
    if (key.startsWith("GNU.sparse.")) throw this.#corrupt("GNU sparse files are not supported", entry);
    switch (key) {
      case "path":
        if (empty) delete pax.path;
        else pax.path = value.toString("latin1");
        return;
      case "linkpath":
        if (empty) delete pax.linkpath;
        else pax.linkpath = value.toString("latin1");
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
        const text = value.toString("latin1");
        const m = /^(-?)([0-9]{1,15})(?:\.([0-9]*))?$/.exec(text);
        if (!m) throw this.#corrupt(`invalid PAX mtime ${JSON.stringify(text)}`, entry);
        const whole = Number(m[2]);
        const frac = m[3] !== undefined && /[1-9]/.test(m[3]);
        pax.mtime = m[1] === "-" ? -whole - (frac ? 1 : 0) : whole;
        return;
      }
      default:
        break;
    }
    if (key.startsWith("SCHILY.xattr.")) {
      const name = key.slice("SCHILY.xattr.".length);
      if (name.length === 0) throw this.#corrupt("PAX xattr record without a name", entry);
      pax.xattrs.set(name, Buffer.from(value));
    } else if (key.startsWith("LIBARCHIVE.xattr.")) {
      let name: string;
      try {
        // The name is URL-encoded (bytes); the value is base64.
        name = Buffer.from(
          key
            .slice("LIBARCHIVE.xattr.".length)
            .replace(/%([0-9A-Fa-f]{2})/g, (_, h: string) => String.fromCharCode(Number.parseInt(h, 16))),
          "latin1",
        ).toString("latin1");
      } catch (cause) {
        throw this.#corrupt("malformed LIBARCHIVE.xattr name", entry, cause);
      }
      if (name.length === 0) throw this.#corrupt("PAX xattr record without a name", entry);
      const text = value.toString("latin1");
      if (!/^[A-Za-z0-9+/]*={0,2}$/.test(text))
        throw this.#corrupt("malformed LIBARCHIVE.xattr value", entry);
      pax.xattrs.set(name, Buffer.from(text, "base64"));
    }
    // Other keywords (atime, ctime, uname, gname, comment, charset, hdrcharset, …) are ignored.
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

  /** Yields the archive's entries. Throws `CORRUPT_LAYER` on any malformation or truncation. */
  async *entries(): AsyncGenerator<TarEntry, void, undefined> {
    let index = 0;
    let pax: Pax = { xattrs: new Map() };
    let longName: string | undefined;
    let longLink: string | undefined;
    let metaCount = 0;
    try {
      for (;;) {
        await this.#skipCurrent();
        const at = this.#src.position;
        const where = `#${index} at byte ${at}`;
        const block = await this.#src.read(BLOCK);
        if (block.length === 0) {
          throw this.#corrupt(
            metaCount > 0
              ? "archive ends after an extended header"
              : "archive truncated: no end-of-archive marker",
            longName === undefined ? pax.path : displayName(longName),
          );
        }
        if (block.length < BLOCK) throw this.#corrupt("archive truncated inside a header", where);
        if (isZeroBlock(block)) {
          if (metaCount > 0) throw this.#corrupt("extended header not followed by an entry", where);
          const next = await this.#src.read(BLOCK);
          if (next.length > 0 && (next.length < BLOCK || !isZeroBlock(next))) {
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

        if (flag === "x" || flag === "g" || flag === "L" || flag === "K") {
          if (++metaCount > this.#limits.maxMetaHeaders)
            throw this.#corrupt("too many extended headers in a row", label);
          if (flag === "x" || flag === "g") {
            if (headerSize > this.#limits.maxPaxBytes) {
              throw this.#corrupt(
                `PAX header of ${headerSize} bytes exceeds ${this.#limits.maxPaxBytes}`,
                label,
              );
            }
            const data = await this.#readMeta(headerSize, "a PAX header", label);
            this.#parsePax(data, pax, flag === "g", label);
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
          }
          continue;
        }

        let name: string;
        if (pax.path !== undefined) name = pax.path;
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
          case "S":
            throw this.#corrupt("GNU sparse files are not supported", display);
          default:
            throw this.#corrupt(`unsupported entry type ${JSON.stringify(flag)}`, display);
        }

        const size = type === "file" ? (pax.size ?? headerSize) : 0;
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
        const entry: TarEntry = {
          index,
          name,
          type,
          size,
          mode: this.#numeric(block, 100, 8, "mode", display) & 0o7777,
          uid: pax.uid ?? this.#numeric(block, 108, 8, "uid", display),
          gid: pax.gid ?? this.#numeric(block, 116, 8, "gid", display),
          mtime: pax.mtime ?? this.#numeric(block, 136, 12, "mtime", display),
          linkname,
          devMajor: isDevice ? (pax.devMajor ?? this.#numeric(block, 329, 8, "devmajor", display)) : 0,
          devMinor: isDevice ? (pax.devMinor ?? this.#numeric(block, 337, 8, "devminor", display)) : 0,
          xattrs: pax.xattrs,
          body: () => this.#body(display),
        };
        // Header-only types carry no data whatever their size field says (as Go's archive/tar).
        this.#remaining = size;
        this.#padding = (BLOCK - (size % BLOCK)) % BLOCK;
        this.#current = display;
        this.#bodyTaken = false;
        pax = { xattrs: new Map() };
        longName = undefined;
        longLink = undefined;
        metaCount = 0;
        index++;
        yield entry;
      }
    } finally {
      await this.#src.close();
    }
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
