/**
 * Random access to the regular files of an (uncompressed) tar archive: one pass over the headers
 * records where each file's data lives, so members can be streamed straight from the archive
 * without extracting it. Understands ustar, GNU long names and PAX path/size records.
 */

import { type FileHandle, open } from "node:fs/promises";
import { posix } from "node:path";

export interface TarMember {
  readonly name: string;
  /** `file`, `symlink`, `hardlink`, `directory` or `other`. */
  readonly type: "file" | "symlink" | "hardlink" | "directory" | "other";
  /** Offset of the data in the archive. */
  readonly offset: number;
  readonly size: number;
  readonly linkName: string;
}

export class TarFormatError extends Error {}

const BLOCK = 512;

function cstring(buf: Buffer, start: number, end: number): string {
  const slice = buf.subarray(start, end);
  const nul = slice.indexOf(0);
  return slice.subarray(0, nul < 0 ? slice.length : nul).toString("utf8");
}

function parseNumeric(buf: Buffer, start: number, end: number): number {
  const field = buf.subarray(start, end);
  if (field[0] !== undefined && (field[0] & 0x80) !== 0) {
    // GNU base-256: big-endian, first byte's high bit set.
    let n = field[0] & 0x7f;
    for (let i = 1; i < field.length; i++) n = n * 256 + field[i]!;
    return n;
  }
  const text = cstring(buf, start, end).trim();
  if (text === "") return 0;
  if (!/^[0-7]+$/.test(text))
    throw new TarFormatError(`invalid octal number ${JSON.stringify(text)} in tar header`);
  return Number.parseInt(text, 8);
}

function checksumOk(header: Buffer): boolean {
  const stored = parseNumeric(header, 148, 156);
  let sum = 0;
  for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 32 : header[i]!;
  return sum === stored;
}

function parsePax(data: Buffer): Record<string, string> {
  const out: Record<string, string> = {};
  let i = 0;
  while (i < data.length) {
    const space = data.indexOf(0x20, i);
    if (space < 0) break;
    const len = Number(data.subarray(i, space).toString("ascii"));
    if (!Number.isInteger(len) || len <= 0 || i + len > data.length) break;
    const record = data.subarray(space + 1, i + len - 1).toString("utf8");
    const eq = record.indexOf("=");
    if (eq > 0) out[record.slice(0, eq)] = record.slice(eq + 1);
    i += len;
  }
  return out;
}

function normalizeName(name: string): string {
  let n = posix.normalize(name.replace(/^\/+/, ""));
  if (n === "." || n === "./") n = "";
  return n.replace(/\/+$/, "");
}

/** Index of a tar archive on disk. */
export class TarIndex {
  readonly path: string;
  readonly members: ReadonlyMap<string, TarMember>;

  private constructor(path: string, members: Map<string, TarMember>) {
    this.path = path;
    this.members = members;
  }

  /** Scan the headers of the tar at `path`. Throws {@link TarFormatError} on a malformed archive. */
  static async open(path: string): Promise<TarIndex> {
    const fh = await open(path, "r");
    try {
      const size = (await fh.stat()).size;
      return new TarIndex(path, await scan(fh, size));
    } finally {
      await fh.close();
    }
  }

  /** Follow symlinks and hardlinks (inside the archive) to a regular file. */
  resolve(name: string): TarMember | undefined {
    let current = normalizeName(name);
    for (let depth = 0; depth < 32; depth++) {
      const m = this.members.get(current);
      if (m === undefined) return undefined;
      if (m.type === "file") return m;
      if (m.type === "hardlink") current = normalizeName(m.linkName);
      else if (m.type === "symlink") {
        current = m.linkName.startsWith("/")
          ? normalizeName(m.linkName)
          : normalizeName(posix.join(posix.dirname(current), m.linkName));
      } else return undefined;
    }
    return undefined;
  }
}

async function readAt(fh: FileHandle, position: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  let done = 0;
  while (done < length) {
    const { bytesRead } = await fh.read(buf, done, length - done, position + done);
    if (bytesRead === 0) throw new TarFormatError("tar archive is truncated");
    done += bytesRead;
  }
  return buf;
}

async function scan(fh: FileHandle, fileSize: number): Promise<Map<string, TarMember>> {
  const members = new Map<string, TarMember>();
  let pos = 0;
  let longName: string | undefined;
  let longLink: string | undefined;
  let pax: Record<string, string> = {};
  let global: Record<string, string> = {};
  let count = 0;
  while (pos + BLOCK <= fileSize) {
    const header = await readAt(fh, pos, BLOCK);
    if (header.every((b) => b === 0)) break;
    if (!checksumOk(header)) throw new TarFormatError(`bad tar header checksum at offset ${pos}`);
    if (++count > 1_000_000) throw new TarFormatError("tar archive has too many entries");
    const typeflag = String.fromCharCode(header[156]!);
    let size = parseNumeric(header, 124, 136);
    const merged = { ...global, ...pax };
    if (merged.size !== undefined && /^\d+$/.test(merged.size)) size = Number(merged.size);
    const dataOffset = pos + BLOCK;
    if (dataOffset + size > fileSize)
      throw new TarFormatError(`tar entry at offset ${pos} runs past the end of the archive`);
    const next = dataOffset + Math.ceil(size / BLOCK) * BLOCK;

    if (typeflag === "x" || typeflag === "g" || typeflag === "L" || typeflag === "K") {
      if (size > 1024 * 1024) throw new TarFormatError("tar extended header is larger than 1 MiB");
      const data = await readAt(fh, dataOffset, size);
      if (typeflag === "x") pax = parsePax(data);
      else if (typeflag === "g") global = { ...global, ...parsePax(data) };
      else if (typeflag === "L") longName = cstring(data, 0, data.length);
      else longLink = cstring(data, 0, data.length);
      pos = next;
      continue;
    }

    const magic = header.subarray(257, 263).toString("latin1");
    let name = cstring(header, 0, 100);
    if (magic.startsWith("ustar")) {
      const prefix = cstring(header, 345, magic === "ustar\0" ? 500 : 345);
      if (prefix !== "") name = `${prefix}/${name}`;
    }
    name = merged.path ?? longName ?? name;
    const linkName = merged.linkpath ?? longLink ?? cstring(header, 157, 257);
    const type: TarMember["type"] =
      typeflag === "0" || typeflag === "\0" || typeflag === "7"
        ? "file"
        : typeflag === "1"
          ? "hardlink"
          : typeflag === "2"
            ? "symlink"
            : typeflag === "5"
              ? "directory"
              : "other";
    const key = normalizeName(name);
    if (key !== "") members.set(key, { name: key, type, offset: dataOffset, size, linkName });
    longName = undefined;
    longLink = undefined;
    pax = {};
    pos = next;
  }
  return members;
}
