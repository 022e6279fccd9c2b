/**
 * A small 9P2000.L client for tests: it plays the guest kernel's side against the server in
 * src/ninep over any Duplex (a socketpair, or the stream pair of a MountChannel).
 */
import { constants } from "node:os";
import type { Duplex } from "node:stream";
import {
  type Dirent,
  decodeDirents,
  decodeMessage,
  encodeMessage,
  type Message,
  type MessageFields,
  type MessageName,
  NOFID,
  NOTAG,
  type Qid,
  readSize,
} from "../../src/ninep/index.ts";

const ERRNO_NAMES = new Map<number, string>(Object.entries(constants.errno).map(([k, v]) => [v, k]));

/** An `Rlerror` reply. `code` is the errno name (`ENOENT`). */
export class NinepErrno extends Error {
  readonly errno: number;
  readonly code: string;
  constructor(errno: number, what: string) {
    const code = ERRNO_NAMES.get(errno) ?? `errno ${errno}`;
    super(`${what}: ${code}`);
    this.errno = errno;
    this.code = code;
  }
}

type Reply = Message;

export const O = { RDONLY: 0, WRONLY: 1, RDWR: 2, CREAT: 0o100, EXCL: 0o200, TRUNC: 0o1000, APPEND: 0o2000 };

export class NinepClient {
  msize = 0;
  readonly #stream: Duplex;
  readonly #pending = new Map<
    number,
    { resolve: (m: Reply) => void; reject: (e: Error) => void; what: string }
  >();
  #buf: Buffer = Buffer.alloc(0);
  #nextTag = 1;
  #nextFid = 1;
  #closed: Error | undefined;

  constructor(stream: Duplex) {
    this.#stream = stream;
    stream.on("data", (chunk: Buffer) => this.#receive(chunk));
    stream.on("error", (e) => this.#fail(e));
    stream.on("close", () => this.#fail(new Error("9P connection closed")));
  }

  /** Tversion + Tattach of fid 0 at the root. */
  static async connect(stream: Duplex, opts: { msize?: number } = {}): Promise<NinepClient> {
    const client = new NinepClient(stream);
    const v = await client.rpc(
      "Tversion",
      { msize: opts.msize ?? 65536, version: Buffer.from("9P2000.L") },
      NOTAG,
    );
    if (v.op !== "Rversion" || v.version.toString() !== "9P2000.L") throw new Error("version refused");
    client.msize = v.msize;
    await client.rpc("Tattach", {
      fid: 0,
      afid: NOFID,
      uname: Buffer.from("root"),
      aname: Buffer.alloc(0),
      nUname: 0,
    });
    return client;
  }

  get closedError(): Error | undefined {
    return this.#closed;
  }

  fid(): number {
    return this.#nextFid++;
  }

  #receive(chunk: Buffer): void {
    this.#buf = this.#buf.length === 0 ? chunk : Buffer.concat([this.#buf, chunk]);
    while (this.#buf.length >= 4) {
      const size = readSize(this.#buf);
      if (this.#buf.length < size) return;
      const msg = decodeMessage(this.#buf.subarray(0, size));
      this.#buf = this.#buf.subarray(size);
      const p = this.#pending.get(msg.tag);
      if (!p) continue;
      this.#pending.delete(msg.tag);
      if (msg.op === "Rlerror") p.reject(new NinepErrno(msg.ecode, p.what));
      else p.resolve(msg as Reply);
    }
  }

  #fail(error: Error): void {
    this.#closed ??= error;
    for (const p of this.#pending.values()) p.reject(error);
    this.#pending.clear();
  }

  /** Sends one request and waits for its reply; `Rlerror` rejects with {@link NinepErrno}. */
  rpc<N extends MessageName>(name: N, fields: MessageFields<N>, tag?: number): Promise<Reply> {
    if (this.#closed) return Promise.reject(this.#closed);
    const t = tag ?? this.#allocTag();
    return new Promise((resolve, reject) => {
      this.#pending.set(t, { resolve, reject, what: name });
      this.#stream.write(encodeMessage(name, t, fields));
    });
  }

  /** Writes raw bytes (hostile messages). */
  raw(bytes: Uint8Array): void {
    this.#stream.write(bytes);
  }

  #allocTag(): number {
    for (;;) {
      const t = this.#nextTag;
      this.#nextTag = this.#nextTag >= 0xfffe ? 1 : this.#nextTag + 1;
      if (!this.#pending.has(t)) return t;
    }
  }

  // ---- helpers over single operations ----

  async walk(fid: number, names: string[], newfid = this.fid()): Promise<{ fid: number; qids: Qid[] }> {
    const r = (await this.rpc("Twalk", {
      fid,
      newfid,
      names: names.map((n) => Buffer.from(n)),
    })) as Message<"Rwalk">;
    if (r.qids.length !== names.length)
      throw new NinepErrno(constants.errno.ENOENT, `walk ${names.join("/")}`);
    return { fid: newfid, qids: r.qids };
  }

  /** Walks `path` (relative to the root, `/`-separated) from fid 0; resolves with the new fid. */
  async walkPath(path: string): Promise<number> {
    const names = path.split("/").filter((n) => n !== "");
    let fid = 0;
    let first = true;
    // Twalk takes at most 16 names per message.
    do {
      const chunk = names.splice(0, 16);
      const next = await this.walk(fid, chunk);
      if (!first) await this.clunk(fid);
      fid = next.fid;
      first = false;
    } while (names.length > 0);
    return fid;
  }

  async clunk(fid: number): Promise<void> {
    await this.rpc("Tclunk", { fid });
  }

  async getattr(fid: number): Promise<Message<"Rgetattr">> {
    return (await this.rpc("Tgetattr", { fid, requestMask: 0x7ffn })) as Message<"Rgetattr">;
  }

  async lopen(fid: number, flags: number): Promise<Message<"Rlopen">> {
    return (await this.rpc("Tlopen", { fid, flags })) as Message<"Rlopen">;
  }

  async read(fid: number, offset: bigint, count: number): Promise<Buffer> {
    const r = (await this.rpc("Tread", { fid, offset, count })) as Message<"Rread">;
    return Buffer.from(r.data);
  }

  async write(fid: number, offset: bigint, data: Uint8Array): Promise<number> {
    return ((await this.rpc("Twrite", { fid, offset, data })) as Message<"Rwrite">).count;
  }

  /** The whole file at `path`. */
  async readFile(path: string): Promise<Buffer> {
    const fid = await this.walkPath(path);
    try {
      await this.lopen(fid, O.RDONLY);
      const parts: Buffer[] = [];
      let offset = 0n;
      for (;;) {
        const data = await this.read(fid, offset, this.msize - 24);
        if (data.length === 0) break;
        parts.push(data);
        offset += BigInt(data.length);
      }
      return Buffer.concat(parts);
    } finally {
      await this.clunk(fid);
    }
  }

  /** Creates `name` in the directory at `dir` and writes `data` to it. */
  async createFile(
    dir: string,
    name: string,
    data: Uint8Array = new Uint8Array(0),
    mode = 0o644,
  ): Promise<Qid> {
    const fid = await this.walkPath(dir);
    try {
      const r = (await this.rpc("Tlcreate", {
        fid,
        name: Buffer.from(name),
        flags: O.RDWR | O.CREAT,
        mode,
        gid: 0,
      })) as Message<"Rlcreate">;
      let off = 0;
      while (off < data.length) {
        const n = await this.write(fid, BigInt(off), data.subarray(off, off + this.msize - 24));
        off += n;
      }
      return r.qid;
    } finally {
      await this.clunk(fid);
    }
  }

  /** Every entry of the directory at `path` (names, including `.` and `..`). */
  async readdir(path: string, count = 8192): Promise<Dirent[]> {
    const fid = await this.walkPath(path);
    try {
      await this.lopen(fid, O.RDONLY);
      const out: Dirent[] = [];
      let offset = 0n;
      for (;;) {
        const r = (await this.rpc("Treaddir", { fid, offset, count })) as Message<"Rreaddir">;
        const entries = decodeDirents(r.data).map((e) => ({ ...e, name: Buffer.from(e.name) }));
        if (entries.length === 0) break;
        out.push(...entries);
        offset = entries[entries.length - 1]!.offset;
      }
      return out;
    } finally {
      await this.clunk(fid);
    }
  }

  async mkdir(dir: string, name: string, mode = 0o755): Promise<Qid> {
    const fid = await this.walkPath(dir);
    try {
      return (
        (await this.rpc("Tmkdir", { dfid: fid, name: Buffer.from(name), mode, gid: 0 })) as Message<"Rmkdir">
      ).qid;
    } finally {
      await this.clunk(fid);
    }
  }

  async symlink(dir: string, name: string, target: string): Promise<Qid> {
    const fid = await this.walkPath(dir);
    try {
      return (
        (await this.rpc("Tsymlink", {
          fid,
          name: Buffer.from(name),
          target: Buffer.from(target),
          gid: 0,
        })) as Message<"Rsymlink">
      ).qid;
    } finally {
      await this.clunk(fid);
    }
  }

  async readlink(path: string): Promise<string> {
    const fid = await this.walkPath(path);
    try {
      return ((await this.rpc("Treadlink", { fid })) as Message<"Rreadlink">).target.toString();
    } finally {
      await this.clunk(fid);
    }
  }

  async unlink(dir: string, name: string, flags = 0): Promise<void> {
    const fid = await this.walkPath(dir);
    try {
      await this.rpc("Tunlinkat", { dirfid: fid, name: Buffer.from(name), flags });
    } finally {
      await this.clunk(fid);
    }
  }

  async rename(fromDir: string, from: string, toDir: string, to: string): Promise<void> {
    const a = await this.walkPath(fromDir);
    const b = await this.walkPath(toDir);
    try {
      await this.rpc("Trenameat", {
        olddirfid: a,
        oldname: Buffer.from(from),
        newdirfid: b,
        newname: Buffer.from(to),
      });
    } finally {
      await this.clunk(a);
      await this.clunk(b);
    }
  }

  async link(target: string, dir: string, name: string): Promise<void> {
    const f = await this.walkPath(target);
    const d = await this.walkPath(dir);
    try {
      await this.rpc("Tlink", { dfid: d, fid: f, name: Buffer.from(name) });
    } finally {
      await this.clunk(f);
      await this.clunk(d);
    }
  }

  async setattr(path: string, fields: Partial<MessageFields<"Tsetattr">> & { valid: number }): Promise<void> {
    const fid = await this.walkPath(path);
    try {
      await this.rpc("Tsetattr", {
        fid,
        mode: 0,
        uid: 0,
        gid: 0,
        size: 0n,
        atimeSec: 0n,
        atimeNsec: 0n,
        mtimeSec: 0n,
        mtimeNsec: 0n,
        ...fields,
      });
    } finally {
      await this.clunk(fid);
    }
  }
}
