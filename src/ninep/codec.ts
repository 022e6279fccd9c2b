/**
 * 9P2000.L messages: the subset the Linux 9p client sends and the replies a server gives, as one
 * table of field layouts ({@link LAYOUTS}) that both {@link decodeMessage} and
 * {@link encodeMessage} follow, so tests can play either side.
 *
 * Wire format: `size[4] type[1] tag[2] fields…`, little-endian; `size` counts the whole message.
 * Strings are `len[2] bytes` (raw bytes: Linux names need not be UTF-8), qids `type[1] version[4]
 * path[8]`. Decoding is bounded: a message larger than the negotiated `msize`, a field that runs
 * past the end, bytes left over after the last field, or more than {@link MAX_WALK_NAMES} walk
 * names are protocol errors (`AGENT_PROTOCOL`), which end the mount.
 */

import { ninepProtocolError } from "./protocol-error.ts";

/** Bytes of a message header: size[4] type[1] tag[2]. */
export const HEADER_BYTES = 7;
/** The tag of `Tversion`. */
export const NOTAG = 0xffff;
/** "No fid" (`afid` of an attach without authentication). */
export const NOFID = 0xffff_ffff;
/** At most this many names in one `Twalk` (MAXWELEM). */
export const MAX_WALK_NAMES = 16;
/** Reply overhead of `Rread`/`Rreaddir` and request overhead of `Twrite` the client reserves (P9_IOHDRSZ). */
export const IOHDRSZ = 24;
/** Largest message size this implementation negotiates (the fd transport's limit too). */
export const MAX_MSIZE = 1024 * 1024;
/** Smallest `msize` a client may ask for. */
export const MIN_MSIZE = 4096;
/** The protocol version string of 9P2000.L. */
export const VERSION_9P2000L = "9P2000.L";

/** Qid types. */
export const QidType = {
  DIR: 0x80,
  APPEND: 0x40,
  EXCL: 0x20,
  AUTH: 0x08,
  TMP: 0x04,
  SYMLINK: 0x02,
  FILE: 0,
} as const;

/** A server's unique id of a file. `path` is unique per file within the mount. */
export interface Qid {
  type: number;
  version: number;
  path: bigint;
}

type Kind = "u8" | "u16" | "u32" | "u64" | "str" | "qid" | "strs" | "qids" | "data";

type Value<K extends Kind> = K extends "u8" | "u16" | "u32"
  ? number
  : K extends "u64"
    ? bigint
    : K extends "str"
      ? Buffer
      : K extends "qid"
        ? Qid
        : K extends "strs"
          ? Buffer[]
          : K extends "qids"
            ? Qid[]
            : Uint8Array;

/**
 * Field layout of every message this implementation knows, by name. `data` is `count[4]` followed
 * by `count` bytes. `Rreaddir.data` holds packed directory entries ({@link encodeDirent}).
 */
export const LAYOUTS = {
  Rlerror: { type: 7, fields: [["ecode", "u32"]] },
  Tstatfs: { type: 8, fields: [["fid", "u32"]] },
  Rstatfs: {
    type: 9,
    fields: [
      ["fsType", "u32"],
      ["bsize", "u32"],
      ["blocks", "u64"],
      ["bfree", "u64"],
      ["bavail", "u64"],
      ["files", "u64"],
      ["ffree", "u64"],
      ["fsid", "u64"],
      ["namelen", "u32"],
    ],
  },
  Tlopen: {
    type: 12,
    fields: [
      ["fid", "u32"],
      ["flags", "u32"],
    ],
  },
  Rlopen: {
    type: 13,
    fields: [
      ["qid", "qid"],
      ["iounit", "u32"],
    ],
  },
  Tlcreate: {
    type: 14,
    fields: [
      ["fid", "u32"],
      ["name", "str"],
      ["flags", "u32"],
      ["mode", "u32"],
      ["gid", "u32"],
    ],
  },
  Rlcreate: {
    type: 15,
    fields: [
      ["qid", "qid"],
      ["iounit", "u32"],
    ],
  },
  Tsymlink: {
    type: 16,
    fields: [
      ["fid", "u32"],
      ["name", "str"],
      ["target", "str"],
      ["gid", "u32"],
    ],
  },
  Rsymlink: { type: 17, fields: [["qid", "qid"]] },
  Tmknod: {
    type: 18,
    fields: [
      ["dfid", "u32"],
      ["name", "str"],
      ["mode", "u32"],
      ["major", "u32"],
      ["minor", "u32"],
      ["gid", "u32"],
    ],
  },
  Rmknod: { type: 19, fields: [["qid", "qid"]] },
  Trename: {
    type: 20,
    fields: [
      ["fid", "u32"],
      ["dfid", "u32"],
      ["name", "str"],
    ],
  },
  Rrename: { type: 21, fields: [] },
  Treadlink: { type: 22, fields: [["fid", "u32"]] },
  Rreadlink: { type: 23, fields: [["target", "str"]] },
  Tgetattr: {
    type: 24,
    fields: [
      ["fid", "u32"],
      ["requestMask", "u64"],
    ],
  },
  Rgetattr: {
    type: 25,
    fields: [
      ["valid", "u64"],
      ["qid", "qid"],
      ["mode", "u32"],
      ["uid", "u32"],
      ["gid", "u32"],
      ["nlink", "u64"],
      ["rdev", "u64"],
      ["size", "u64"],
      ["blksize", "u64"],
      ["blocks", "u64"],
      ["atimeSec", "u64"],
      ["atimeNsec", "u64"],
      ["mtimeSec", "u64"],
      ["mtimeNsec", "u64"],
      ["ctimeSec", "u64"],
      ["ctimeNsec", "u64"],
      ["btimeSec", "u64"],
      ["btimeNsec", "u64"],
      ["gen", "u64"],
      ["dataVersion", "u64"],
    ],
  },
  Tsetattr: {
    type: 26,
    fields: [
      ["fid", "u32"],
      ["valid", "u32"],
      ["mode", "u32"],
      ["uid", "u32"],
      ["gid", "u32"],
      ["size", "u64"],
      ["atimeSec", "u64"],
      ["atimeNsec", "u64"],
      ["mtimeSec", "u64"],
      ["mtimeNsec", "u64"],
    ],
  },
  Rsetattr: { type: 27, fields: [] },
  Txattrwalk: {
    type: 30,
    fields: [
      ["fid", "u32"],
      ["newfid", "u32"],
      ["name", "str"],
    ],
  },
  Rxattrwalk: { type: 31, fields: [["size", "u64"]] },
  Txattrcreate: {
    type: 32,
    fields: [
      ["fid", "u32"],
      ["name", "str"],
      ["attrSize", "u64"],
      ["flags", "u32"],
    ],
  },
  Rxattrcreate: { type: 33, fields: [] },
  Treaddir: {
    type: 40,
    fields: [
      ["fid", "u32"],
      ["offset", "u64"],
      ["count", "u32"],
    ],
  },
  Rreaddir: { type: 41, fields: [["data", "data"]] },
  Tfsync: {
    type: 50,
    fields: [
      ["fid", "u32"],
      ["datasync", "u32"],
    ],
  },
  Rfsync: { type: 51, fields: [] },
  Tlock: {
    type: 52,
    fields: [
      ["fid", "u32"],
      ["lockType", "u8"],
      ["flags", "u32"],
      ["start", "u64"],
      ["length", "u64"],
      ["procId", "u32"],
      ["clientId", "str"],
    ],
  },
  Rlock: { type: 53, fields: [["status", "u8"]] },
  Tgetlock: {
    type: 54,
    fields: [
      ["fid", "u32"],
      ["lockType", "u8"],
      ["start", "u64"],
      ["length", "u64"],
      ["procId", "u32"],
      ["clientId", "str"],
    ],
  },
  Rgetlock: {
    type: 55,
    fields: [
      ["lockType", "u8"],
      ["start", "u64"],
      ["length", "u64"],
      ["procId", "u32"],
      ["clientId", "str"],
    ],
  },
  Tlink: {
    type: 70,
    fields: [
      ["dfid", "u32"],
      ["fid", "u32"],
      ["name", "str"],
    ],
  },
  Rlink: { type: 71, fields: [] },
  Tmkdir: {
    type: 72,
    fields: [
      ["dfid", "u32"],
      ["name", "str"],
      ["mode", "u32"],
      ["gid", "u32"],
    ],
  },
  Rmkdir: { type: 73, fields: [["qid", "qid"]] },
  Trenameat: {
    type: 74,
    fields: [
      ["olddirfid", "u32"],
      ["oldname", "str"],
      ["newdirfid", "u32"],
      ["newname", "str"],
    ],
  },
  Rrenameat: { type: 75, fields: [] },
  Tunlinkat: {
    type: 76,
    fields: [
      ["dirfid", "u32"],
      ["name", "str"],
      ["flags", "u32"],
    ],
  },
  Runlinkat: { type: 77, fields: [] },
  Tversion: {
    type: 100,
    fields: [
      ["msize", "u32"],
      ["version", "str"],
    ],
  },
  Rversion: {
    type: 101,
    fields: [
      ["msize", "u32"],
      ["version", "str"],
    ],
  },
  Tauth: {
    type: 102,
    fields: [
      ["afid", "u32"],
      ["uname", "str"],
      ["aname", "str"],
      ["nUname", "u32"],
    ],
  },
  Tattach: {
    type: 104,
    fields: [
      ["fid", "u32"],
      ["afid", "u32"],
      ["uname", "str"],
      ["aname", "str"],
      ["nUname", "u32"],
    ],
  },
  Rattach: { type: 105, fields: [["qid", "qid"]] },
  Tflush: { type: 108, fields: [["oldtag", "u16"]] },
  Rflush: { type: 109, fields: [] },
  Twalk: {
    type: 110,
    fields: [
      ["fid", "u32"],
      ["newfid", "u32"],
      ["names", "strs"],
    ],
  },
  Rwalk: { type: 111, fields: [["qids", "qids"]] },
  Tread: {
    type: 116,
    fields: [
      ["fid", "u32"],
      ["offset", "u64"],
      ["count", "u32"],
    ],
  },
  Rread: { type: 117, fields: [["data", "data"]] },
  Twrite: {
    type: 118,
    fields: [
      ["fid", "u32"],
      ["offset", "u64"],
      ["data", "data"],
    ],
  },
  Rwrite: { type: 119, fields: [["count", "u32"]] },
  Tclunk: { type: 120, fields: [["fid", "u32"]] },
  Rclunk: { type: 121, fields: [] },
  Tremove: { type: 122, fields: [["fid", "u32"]] },
  Rremove: { type: 123, fields: [] },
} as const satisfies Record<string, { type: number; fields: readonly (readonly [string, Kind])[] }>;

export type MessageName = keyof typeof LAYOUTS;

type FieldsOf<N extends MessageName> = {
  -readonly [E in (typeof LAYOUTS)[N]["fields"][number] as E[0]]: Value<E[1]>;
};

/** A decoded message: its name, tag and fields. */
export type Message<N extends MessageName = MessageName> = N extends MessageName
  ? { op: N; tag: number } & FieldsOf<N>
  : never;

/** The fields of message `N` (for encoding). */
export type MessageFields<N extends MessageName> = FieldsOf<N>;

const BY_TYPE = new Map<number, MessageName>(
  (Object.entries(LAYOUTS) as [MessageName, { type: number }][]).map(([name, l]) => [l.type, name]),
);

/** The name of a known message type, or `undefined`. */
export function messageName(type: number): MessageName | undefined {
  return BY_TYPE.get(type);
}

/** Reads the `size` field of a message header (little-endian u32 at `offset`). */
export function readSize(bytes: Uint8Array, offset = 0): number {
  return (
    (bytes[offset]! | (bytes[offset + 1]! << 8) | (bytes[offset + 2]! << 16) | (bytes[offset + 3]! << 24)) >>>
    0
  );
}

class Reader {
  readonly #buf: Buffer;
  readonly #what: string;
  #pos = HEADER_BYTES;

  constructor(buf: Buffer, what: string) {
    this.#buf = buf;
    this.#what = what;
  }

  #need(n: number): void {
    if (this.#buf.length - this.#pos < n) {
      throw ninepProtocolError(`${this.#what}: truncated (${n} more bytes needed at offset ${this.#pos})`);
    }
  }

  read(kind: Kind): unknown {
    const b = this.#buf;
    switch (kind) {
      case "u8":
        this.#need(1);
        return b[this.#pos++]!;
      case "u16": {
        this.#need(2);
        const v = b.readUInt16LE(this.#pos);
        this.#pos += 2;
        return v;
      }
      case "u32": {
        this.#need(4);
        const v = b.readUInt32LE(this.#pos);
        this.#pos += 4;
        return v;
      }
      case "u64": {
        this.#need(8);
        const v = b.readBigUInt64LE(this.#pos);
        this.#pos += 8;
        return v;
      }
      case "str": {
        const n = this.read("u16") as number;
        this.#need(n);
        const s = b.subarray(this.#pos, this.#pos + n);
        this.#pos += n;
        return s;
      }
      case "qid": {
        this.#need(13);
        const q = {
          type: b[this.#pos]!,
          version: b.readUInt32LE(this.#pos + 1),
          path: b.readBigUInt64LE(this.#pos + 5),
        };
        this.#pos += 13;
        return q;
      }
      case "strs":
      case "qids": {
        const n = this.read("u16") as number;
        if (n > MAX_WALK_NAMES)
          throw ninepProtocolError(`${this.#what}: ${n} elements (at most ${MAX_WALK_NAMES})`);
        const out: unknown[] = [];
        for (let i = 0; i < n; i++) out.push(this.read(kind === "strs" ? "str" : "qid"));
        return out;
      }
      case "data": {
        const n = this.read("u32") as number;
        this.#need(n);
        const d = b.subarray(this.#pos, this.#pos + n);
        this.#pos += n;
        return d;
      }
    }
  }

  end(): void {
    if (this.#pos !== this.#buf.length) {
      throw ninepProtocolError(`${this.#what}: ${this.#buf.length - this.#pos} bytes after the last field`);
    }
  }
}

/**
 * Decodes one whole message (`bytes` starts with its header and holds exactly `size` bytes).
 * `op` names the message. Values of `str` and `data` fields are views into `bytes`. An unknown type
 * gives `{ op: undefined, type, tag }` (the server answers it with `Rlerror`); anything malformed throws
 * `AGENT_PROTOCOL`.
 */
export function decodeMessage(bytes: Uint8Array): Message | { op: undefined; type: number; tag: number } {
  const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (buf.length < HEADER_BYTES)
    throw ninepProtocolError(`message of ${buf.length} bytes is shorter than a header`);
  const size = buf.readUInt32LE(0);
  if (size !== buf.length)
    throw ninepProtocolError(`message size field ${size} does not match its ${buf.length} bytes`);
  const type = buf[4]!;
  const tag = buf.readUInt16LE(5);
  const name = BY_TYPE.get(type);
  if (name === undefined) return { op: undefined, type, tag };
  const reader = new Reader(buf, name);
  const out: Record<string, unknown> = { op: name, tag };
  for (const [field, kind] of LAYOUTS[name].fields) out[field] = reader.read(kind);
  reader.end();
  return out as Message;
}

function kindSize(kind: Kind, value: unknown): number {
  switch (kind) {
    case "u8":
      return 1;
    case "u16":
      return 2;
    case "u32":
      return 4;
    case "u64":
      return 8;
    case "str":
      return 2 + (value as Uint8Array).length;
    case "qid":
      return 13;
    case "strs":
      return 2 + (value as Uint8Array[]).reduce((n, s) => n + 2 + s.length, 0);
    case "qids":
      return 2 + 13 * (value as Qid[]).length;
    case "data":
      return 4 + (value as Uint8Array).length;
  }
}

function write(buf: Buffer, pos: number, kind: Kind, value: unknown, what: string): number {
  switch (kind) {
    case "u8":
      buf[pos] = value as number;
      return pos + 1;
    case "u16":
      buf.writeUInt16LE(value as number, pos);
      return pos + 2;
    case "u32":
      buf.writeUInt32LE(value as number, pos);
      return pos + 4;
    case "u64":
      buf.writeBigUInt64LE(BigInt(value as bigint | number), pos);
      return pos + 8;
    case "str": {
      const s = value as Uint8Array;
      if (s.length > 0xffff) throw new RangeError(`${what}: string of ${s.length} bytes`);
      buf.writeUInt16LE(s.length, pos);
      buf.set(s, pos + 2);
      return pos + 2 + s.length;
    }
    case "qid":
      return writeQid(buf, pos, value as Qid);
    case "strs":
    case "qids": {
      const list = value as unknown[];
      if (list.length > MAX_WALK_NAMES) throw new RangeError(`${what}: ${list.length} elements`);
      buf.writeUInt16LE(list.length, pos);
      let p = pos + 2;
      for (const v of list) p = write(buf, p, kind === "strs" ? "str" : "qid", v, what);
      return p;
    }
    case "data": {
      const d = value as Uint8Array;
      buf.writeUInt32LE(d.length, pos);
      buf.set(d, pos + 4);
      return pos + 4 + d.length;
    }
  }
}

/** Writes a qid at `pos`; returns the position after it. */
export function writeQid(buf: Buffer, pos: number, qid: Qid): number {
  buf[pos] = qid.type;
  buf.writeUInt32LE(qid.version >>> 0, pos + 1);
  buf.writeBigUInt64LE(qid.path, pos + 5);
  return pos + 13;
}

/** Encodes message `name` with `tag` and `fields` into a new buffer. Throws `RangeError` on bad values. */
export function encodeMessage<N extends MessageName>(name: N, tag: number, fields: MessageFields<N>): Buffer {
  const layout = LAYOUTS[name];
  const values = fields as Record<string, unknown>;
  let size = HEADER_BYTES;
  for (const [field, kind] of layout.fields) size += kindSize(kind, values[field]);
  const buf = Buffer.allocUnsafe(size);
  buf.writeUInt32LE(size, 0);
  buf[4] = layout.type;
  buf.writeUInt16LE(tag, 5);
  let pos = HEADER_BYTES;
  for (const [field, kind] of layout.fields) pos = write(buf, pos, kind, values[field], `${name}.${field}`);
  return buf;
}

/** Writes a message header (size, type, tag) at the start of `buf`. */
export function writeHeader(buf: Buffer, size: number, type: number, tag: number): void {
  buf.writeUInt32LE(size, 0);
  buf[4] = type;
  buf.writeUInt16LE(tag, 5);
}

/** One entry of `Rreaddir.data`. */
export interface Dirent {
  qid: Qid;
  /** Offset of the entry after this one (what the next `Treaddir` passes to continue). */
  offset: bigint;
  /** `DT_*` type of the entry. */
  type: number;
  name: Uint8Array;
}

/** Bytes one directory entry takes in `Rreaddir.data`. */
export function direntSize(nameBytes: number): number {
  return 13 + 8 + 1 + 2 + nameBytes;
}

/** Writes one directory entry at `pos`; returns the position after it. */
export function encodeDirent(buf: Buffer, pos: number, e: Dirent): number {
  pos = writeQid(buf, pos, e.qid);
  buf.writeBigUInt64LE(e.offset, pos);
  buf[pos + 8] = e.type;
  buf.writeUInt16LE(e.name.length, pos + 9);
  buf.set(e.name, pos + 11);
  return pos + 11 + e.name.length;
}

/** Splits `Rreaddir.data` into entries (test clients). Throws `AGENT_PROTOCOL` when malformed. */
export function decodeDirents(data: Uint8Array): Dirent[] {
  const buf = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  const out: Dirent[] = [];
  let pos = 0;
  while (pos < buf.length) {
    if (buf.length - pos < 24) throw ninepProtocolError("Rreaddir: truncated directory entry");
    const qid = { type: buf[pos]!, version: buf.readUInt32LE(pos + 1), path: buf.readBigUInt64LE(pos + 5) };
    const offset = buf.readBigUInt64LE(pos + 13);
    const type = buf[pos + 21]!;
    const n = buf.readUInt16LE(pos + 22);
    if (buf.length - pos - 24 < n) throw ninepProtocolError("Rreaddir: truncated directory entry name");
    out.push({ qid, offset, type, name: buf.subarray(pos + 24, pos + 24 + n) });
    pos += 24 + n;
  }
  return out;
}
