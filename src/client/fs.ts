/**
 * `vm.fs` on a server: the library's `GuestFileSystem` methods with the same names, options,
 * results and errors (`GuestIoError` with the errno's name as `code`). File contents are
 * streamed both ways; every other call is one request.
 */

import { Readable } from "node:stream";
import { GuestIoError } from "../errors.ts";
import type {
  FsCallOptions,
  GuestFileStream,
  GuestWatchEvent,
  GuestWatcher,
  ReaddirOptions,
  WatchOptions,
  WriteFileOptions,
  WriteFileSource,
} from "../index.ts";
import { GuestDirent, type GuestStats, guestStats } from "../internal/index.ts";
import {
  errorFromWire,
  FILE_GID_HEADER,
  FILE_MODE_HEADER,
  FILE_SIZE_HEADER,
  FILE_UID_HEADER,
  type WireDirent,
  type WireError,
  type WireFsCall,
  type WireStats,
} from "../wire/index.ts";
import type { Endpoint, RequestBody } from "./endpoint.ts";

/** Where a VM's files are: its endpoint and `/v1/vms/{id}`. */
export interface FileSite {
  readonly endpoint: Endpoint;
  readonly path: string;
  /** Throws when the VM cannot take work any more (stopped by this client). */
  check?(): void;
}

/** Reads a file of the VM at `site` as a stream, with its size and mode. */
export async function readFileStream(
  site: FileSite,
  path: string,
  options: FsCallOptions = {},
): Promise<GuestFileStream> {
  site.check?.();
  const response = await site.endpoint.request("GET", `${site.path}/files`, {
    query: { path },
    signal: options.signal,
  });
  const body = response.body;
  const stream = body === null ? Readable.from([]) : Readable.fromWeb(body as never);
  return {
    size: Number(response.headers.get(FILE_SIZE_HEADER) ?? 0),
    mode: Number(response.headers.get(FILE_MODE_HEADER) ?? 0),
    uid: Number(response.headers.get(FILE_UID_HEADER) ?? 0),
    gid: Number(response.headers.get(FILE_GID_HEADER) ?? 0),
    stream,
  };
}

/** The whole file; more than `maxBytes` is `EFBIG`, as in the library. */
export async function readFileBytes(
  site: FileSite,
  path: string,
  options: FsCallOptions & { maxBytes?: number } = {},
): Promise<Uint8Array> {
  const { stream } = await readFileStream(site, path, options);
  const chunks: Uint8Array[] = [];
  let size = 0;
  for await (const chunk of stream as AsyncIterable<Uint8Array>) {
    size += chunk.length;
    if (options.maxBytes !== undefined && size > options.maxBytes) {
      stream.destroy();
      throw new GuestIoError(`EFBIG: ${path} is larger than maxBytes ${options.maxBytes}`, {
        path,
        code: "EFBIG",
        errno: 27,
        syscall: "read",
      });
    }
    chunks.push(chunk);
  }
  const out = new Uint8Array(size);
  let offset = 0;
  for (const c of chunks) {
    out.set(c, offset);
    offset += c.length;
  }
  return out;
}

/** Writes (atomically replaces) a file of the VM at `site`, streamed. */
export async function writeFile(
  site: FileSite,
  path: string,
  data: WriteFileSource,
  options: WriteFileOptions = {},
): Promise<void> {
  site.check?.();
  const body =
    typeof data === "string" ? new TextEncoder().encode(data) : data instanceof Uint8Array ? data : data;
  const size = body instanceof Uint8Array ? body.length : options.sizeBytes;
  await site.endpoint.request("PUT", `${site.path}/files`, {
    query: {
      path,
      mode: options.mode?.toString(8),
      mkdirs: options.mkdirs ? 1 : undefined,
      size,
      uid: options.uid,
      gid: options.gid,
    },
    body: body as RequestBody,
    signal: options.signal,
  });
}

let makeFs: (site: FileSite) => RemoteFileSystem;

/** Internal: the file system of the VM at `site`. */
export function remoteFileSystem(site: FileSite): RemoteFileSystem {
  return makeFs(site);
}

/** The guest's file system through a server; `vm.fs` of a remote VM. */
export class RemoteFileSystem {
  readonly #site: FileSite;

  static {
    makeFs = (site) => new RemoteFileSystem(site);
  }

  private constructor(site: FileSite) {
    this.#site = site;
  }

  async #call<T>(call: WireFsCall, options: FsCallOptions | undefined): Promise<T> {
    this.#site.check?.();
    const { result } = await this.#site.endpoint.json<{ result: T }>("POST", `${this.#site.path}/fs`, {
      json: call,
      signal: options?.signal,
    });
    return result;
  }

  readFile(path: string, options: FsCallOptions & { encoding: "utf8" }): Promise<string>;
  readFile(
    path: string,
    options?: FsCallOptions & { encoding?: undefined; maxBytes?: number },
  ): Promise<Uint8Array>;
  async readFile(
    path: string,
    options: FsCallOptions & { encoding?: "utf8"; maxBytes?: number } = {},
  ): Promise<Uint8Array | string> {
    const bytes = await readFileBytes(this.#site, path, options);
    return options.encoding === "utf8" ? new TextDecoder().decode(bytes) : bytes;
  }

  writeFile(path: string, data: WriteFileSource, options: WriteFileOptions = {}): Promise<void> {
    return writeFile(this.#site, path, data, options);
  }

  async createReadStream(path: string, options: FsCallOptions = {}): Promise<Readable> {
    return (await readFileStream(this.#site, path, options)).stream;
  }

  async stat(path: string, options?: FsCallOptions): Promise<GuestStats> {
    return statsFromWire(await this.#call<WireStats>({ op: "stat", path }, options));
  }

  async lstat(path: string, options?: FsCallOptions): Promise<GuestStats> {
    return statsFromWire(await this.#call<WireStats>({ op: "lstat", path }, options));
  }

  readdir(path: string, options: ReaddirOptions & { withFileTypes: true }): Promise<GuestDirent[]>;
  readdir(path: string, options?: ReaddirOptions & { withFileTypes?: false | undefined }): Promise<string[]>;
  async readdir(path: string, options?: ReaddirOptions): Promise<string[] | GuestDirent[]> {
    if (options?.withFileTypes === true) {
      const entries = await this.#call<WireDirent[]>({ op: "readdir", path, withFileTypes: true }, options);
      return entries.map((entry) => new GuestDirent(entry.name, entry.parentPath, entry.type));
    }
    return this.#call<string[]>({ op: "readdir", path }, options);
  }

  async mkdir(
    path: string,
    options: FsCallOptions & { recursive?: boolean; mode?: number } = {},
  ): Promise<string | undefined> {
    const { recursive, mode } = options;
    const made = await this.#call<string | null>(
      {
        op: "mkdir",
        path,
        ...(recursive === undefined ? {} : { recursive }),
        ...(mode === undefined ? {} : { mode }),
      },
      options,
    );
    return made ?? undefined;
  }

  async rm(
    path: string,
    options: FsCallOptions & { recursive?: boolean; force?: boolean } = {},
  ): Promise<void> {
    await this.#call(
      { op: "rm", path, recursive: options.recursive === true, force: options.force === true },
      options,
    );
  }

  async rename(oldPath: string, newPath: string, options?: FsCallOptions): Promise<void> {
    await this.#call({ op: "rename", path: oldPath, newPath }, options);
  }

  async chmod(path: string, mode: number | string, options?: FsCallOptions): Promise<void> {
    await this.#call({ op: "chmod", path, mode }, options);
  }

  async chown(path: string, uid: number, gid: number, options?: FsCallOptions): Promise<void> {
    await this.#call({ op: "chown", path, uid, gid }, options);
  }

  async lchown(path: string, uid: number, gid: number, options?: FsCallOptions): Promise<void> {
    await this.#call({ op: "lchown", path, uid, gid }, options);
  }

  async symlink(target: string, path: string, options?: FsCallOptions): Promise<void> {
    await this.#call({ op: "symlink", path, target }, options);
  }

  readlink(path: string, options?: FsCallOptions): Promise<string> {
    return this.#call({ op: "readlink", path }, options);
  }

  realpath(path: string, options?: FsCallOptions): Promise<string> {
    return this.#call({ op: "realpath", path }, options);
  }

  async truncate(path: string, length?: number, options?: FsCallOptions): Promise<void> {
    await this.#call({ op: "truncate", path, ...(length === undefined ? {} : { length }) }, options);
  }

  async utimes(
    path: string,
    atime: number | Date,
    mtime: number | Date,
    options?: FsCallOptions,
  ): Promise<void> {
    await this.#call({ op: "utimes", path, atime: seconds(atime), mtime: seconds(mtime) }, options);
  }

  async lutimes(
    path: string,
    atime: number | Date,
    mtime: number | Date,
    options?: FsCallOptions,
  ): Promise<void> {
    await this.#call({ op: "lutimes", path, atime: seconds(atime), mtime: seconds(mtime) }, options);
  }

  async access(path: string, mode?: number, options?: FsCallOptions): Promise<void> {
    await this.#call({ op: "access", path, ...(mode === undefined ? {} : { mode }) }, options);
  }

  exists(path: string, options?: FsCallOptions): Promise<boolean> {
    return this.#call({ op: "exists", path }, options);
  }

  /** Changes under `path`, from a WebSocket of the server's watch. */
  watch(path: string, options: WatchOptions = {}): GuestWatcher {
    return new RemoteWatcher(this.#site, path, options);
  }
}

/** `GuestStats` as a server sent them (nanosecond times as decimal strings). */
function statsFromWire(w: WireStats): GuestStats {
  return guestStats({
    ...w,
    atimeNs: BigInt(w.atimeNs),
    mtimeNs: BigInt(w.mtimeNs),
    ctimeNs: BigInt(w.ctimeNs),
  });
}

/** `node:fs` times: a Date, or seconds since the epoch (what the library passes on). */
function seconds(time: number | Date): number {
  return time instanceof Date ? time.getTime() / 1000 : time;
}

class RemoteWatcher implements GuestWatcher {
  readonly ready: Promise<void>;
  readonly #ready = Promise.withResolvers<void>();
  #events: GuestWatchEvent[] = [];
  #waiters: (() => void)[] = [];
  #failure: Error | undefined;
  #ended = false;
  #close: (() => void) | undefined;
  #closed = false;

  constructor(site: FileSite, path: string, options: WatchOptions) {
    this.ready = this.#ready.promise;
    this.ready.catch(() => {});
    const endpoint = site.endpoint;
    endpoint
      .openStream(
        `${site.path}/fs/watch`,
        { path, recursive: options.recursive ? 1 : undefined },
        {
          control: (message) => {
            if (message.type === "ready") this.#ready.resolve();
            else if (message.type === "event") this.#push(message.event as GuestWatchEvent);
            else if (message.type === "error") {
              this.#fail(errorFromWire(message.error as WireError, { endpoint: endpoint.url }));
            }
          },
          data: () => {},
        },
        () => endpoint.json("GET", site.path),
        options.signal,
      )
      .then(
        (peer) => {
          this.#close = () => peer.close(1000, "closed");
          if (this.#closed) this.#close();
          void peer.ended.then(() => {
            this.#ended = true;
            this.#ready.resolve();
            this.#wake();
          });
        },
        (error: Error) => this.#fail(error),
      );
  }

  #push(event: GuestWatchEvent): void {
    this.#events.push(event);
    this.#wake();
  }

  #fail(error: Error): void {
    this.#failure ??= error;
    this.#ended = true;
    this.#ready.reject(error);
    this.#wake();
  }

  #wake(): void {
    for (const wake of this.#waiters.splice(0)) wake();
  }

  close(): void {
    this.#closed = true;
    this.#close?.();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<GuestWatchEvent> {
    try {
      for (;;) {
        const event = this.#events.shift();
        if (event !== undefined) {
          yield event;
          continue;
        }
        if (this.#ended) {
          if (this.#failure) throw this.#failure;
          return;
        }
        await new Promise<void>((resolve) => this.#waiters.push(resolve));
      }
    } finally {
      this.close();
    }
  }
}
