/**
 * Content-addressed store of OCI blobs plus records of pulled images.
 *
 * ```
 * <dataDir>/oci/
 *   blobs/sha256/<hex>     verified content, never modified after the rename that creates it
 *   blobs/sha512/<hex>
 *   images/<id>.json       one record per (reference, platform); written atomically
 *   tmp/                   in-progress downloads (<hex>.<pid>.<random>.partial)
 *   locks/                 pull.<pid>.<random> markers and the prune lock
 * ```
 *
 * Guarantees:
 * - A blob appears under its final name only after its size and digest were verified and the data
 *   fsynced; it is created by rename(2), so readers never see a partial blob, and two processes
 *   writing the same blob at once both succeed (the second rename replaces identical bytes).
 * - Image records are written to a temp file, fsynced and renamed.
 * - Pulls and prune exclude each other through lock files: each pull (or import) holds a marker
 *   `locks/pull.<pid>.<random>` while it runs; prune creates `locks/prune` exclusively, then waits
 *   until no live pull marker remains. A pull that finds a live prune lock withdraws its marker
 *   and waits. Either side creates its own file before looking for the other's, so at least one
 *   of them sees the other. Locks of dead processes (pid no longer alive) are removed.
 *   Limitation: liveness is judged by pid, so the store must not be shared between hosts or pid
 *   namespaces while pruning.
 */

import { constants as fsConstants } from "node:fs";
import {
  type FileHandle,
  mkdir,
  open,
  readdir,
  readFile,
  rename,
  rm,
  stat,
  unlink,
  writeFile,
} from "node:fs/promises";
import { join } from "node:path";
import { AbortError, DigestMismatchError, SupermachineError } from "../errors.ts";
import { dataDir, debug, nodeCrypto } from "../internal/index.ts";
import { type DigestAlgorithm, hasherFor, parseDigest } from "./digest.ts";

/** `${SUPERMACHINE_DATA_DIR:-${XDG_DATA_HOME:-~/.local/share}/supermachine}`. */
/** The supermachine data dir (see `dataDir` in src/internal/paths.ts); the store is `<dataDir>/oci`. */
export const defaultDataDir = dataDir;

export type ImageSource = "registry" | "oci-layout" | "docker-archive";

export interface LayerRecord {
  readonly digest: string;
  readonly mediaType: string;
  readonly size: number;
  /** Digest of the uncompressed tar (from the config's `rootfs.diff_ids`), when known. */
  readonly diffId?: string | undefined;
}

/** What the store remembers about one pulled image. */
export interface ImageRecord {
  readonly version: 1;
  /** Canonical reference (`docker.io/library/alpine:3.20`) or local source (`oci:/abs/dir:tag`). */
  readonly reference: string;
  readonly source: ImageSource;
  /** `os/arch[/variant]`. */
  readonly platform: string;
  /** Digest of the index the manifest was chosen from, when there was one. */
  readonly indexDigest?: string | undefined;
  readonly manifestDigest: string;
  readonly manifestMediaType: string;
  readonly configDigest: string;
  readonly layers: readonly LayerRecord[];
  /** Sum of config and (compressed) layer sizes. */
  readonly sizeBytes: number;
  /** ISO 8601. */
  readonly pulledAt: string;
}

/** Thrown by {@link BlobWriter} when content is longer or shorter than its descriptor says. */
export class BlobSizeError extends Error {
  readonly expectedBytes: number;
  readonly actualBytes: number;
  readonly tooLong: boolean;

  constructor(digest: string, expectedBytes: number, actualBytes: number, tooLong: boolean) {
    super(
      tooLong
        ? `blob ${digest} is longer than the ${expectedBytes} bytes its descriptor declares`
        : `blob ${digest} ended after ${actualBytes} of ${expectedBytes} bytes`,
    );
    this.expectedBytes = expectedBytes;
    this.actualBytes = actualBytes;
    this.tooLong = tooLong;
  }
}

/** Accepted bytes are copied into buffers of this size, each written once it is full. */
const BUFFER_BYTES = 1024 * 1024;
/** Accepted bytes not yet handed to a write, at most: beyond this, {@link BlobWriter.write} waits for the disk. */
const MAX_PENDING_BYTES = 8 * 1024 * 1024;
/** Written data is flushed to disk (fdatasync, in the background) every this many bytes. */
const SYNC_BYTES = 8 * 1024 * 1024;

/**
 * Writes one blob into a temp file while hashing it. Obtained from {@link ContentStore.writeBlob}.
 * Chunks are copied into 1 MiB buffers of the writer's own (reused: a chunk's memory is the
 * caller's again once append returns, as a socket's reused read buffer needs); one write is in
 * flight while the next buffers fill, and the buffers filled meanwhile (up to 8 MiB) go in the
 * next one, so that a slow write (the disk busy with a sync) does not stop the producer. Every 8
 * MiB written, an fdatasync runs in the background, so that the disk works while the download goes
 * on and the fsync before the rename has only the tail left to flush.
 */
export class BlobWriter {
  readonly digest: string;
  readonly expectedBytes: number | undefined;
  readonly #fh: FileHandle;
  readonly #algorithm: DigestAlgorithm;
  #hash;
  #bytes = 0;
  /** Full buffers (and at a flush the last, partial one) waiting to be written, in order. */
  #queue: Buffer[] = [];
  /** The buffer being filled, and how much of it is. */
  #filling: Buffer | undefined;
  #filled = 0;
  /** Buffers written and free to fill again. */
  #free: Buffer[] = [];
  /** Accepted bytes not yet handed to a write (queued or filling). */
  #pendingBytes = 0;
  #fileBytes = 0;
  /** The write in flight (never rejects: a failure is kept in #failure). */
  #writing: Promise<void> | undefined;
  #failure: { readonly error: unknown } | undefined;
  #syncedBytes = 0;
  #syncing: Promise<void> | undefined;

  constructor(fh: FileHandle, digest: string, algorithm: DigestAlgorithm, expectedBytes: number | undefined) {
    this.#fh = fh;
    this.digest = digest;
    this.#algorithm = algorithm;
    this.#hash = hasherFor(algorithm);
    this.expectedBytes = expectedBytes;
  }

  /** Bytes accepted so far (where a resumed download continues from). */
  get bytesWritten(): number {
    return this.#bytes;
  }

  /**
   * Append a chunk (copied: the caller may reuse its memory). Throws {@link BlobSizeError} when it
   * would exceed the declared size, or the error of a failed write.
   */
  async write(chunk: Uint8Array): Promise<void> {
    if (!this.append(chunk)) await this.drained();
    this.#throwIfFailed();
  }

  /**
   * {@link write} without waiting: false when 8 MiB or more wait to be written, and the caller
   * should await {@link drained} before the next chunk.
   */
  append(chunk: Uint8Array): boolean {
    this.#throwIfFailed();
    if (chunk.length === 0) return true;
    if (this.expectedBytes !== undefined && this.#bytes + chunk.length > this.expectedBytes) {
      throw new BlobSizeError(this.digest, this.expectedBytes, this.#bytes + chunk.length, true);
    }
    this.#hash.update(chunk);
    this.#bytes += chunk.length;
    this.#pendingBytes += chunk.length;
    for (let at = 0; at < chunk.length; ) {
      this.#filling ??= this.#free.pop() ?? Buffer.allocUnsafe(BUFFER_BYTES);
      const take = Math.min(chunk.length - at, BUFFER_BYTES - this.#filled);
      this.#filling.set(chunk.subarray(at, at + take), this.#filled);
      this.#filled += take;
      at += take;
      if (this.#filled === BUFFER_BYTES) this.#queueFilling();
    }
    this.#startWrite();
    return this.#pendingBytes < MAX_PENDING_BYTES;
  }

  /** Resolves once less than 8 MiB wait to be written, or a write failed (the next {@link append} throws). */
  async drained(): Promise<void> {
    while (this.#pendingBytes >= MAX_PENDING_BYTES && this.#writing !== undefined) await this.#writing;
  }

  #throwIfFailed(): void {
    if (this.#failure !== undefined) throw this.#failure.error;
  }

  #queueFilling(): void {
    if (this.#filling === undefined || this.#filled === 0) return;
    this.#queue.push(this.#filled === BUFFER_BYTES ? this.#filling : this.#filling.subarray(0, this.#filled));
    this.#filling = undefined;
    this.#filled = 0;
  }

  /** Throw away everything written (a server that ignored a Range request sends from byte 0). */
  async reset(): Promise<void> {
    await this.settle();
    this.#failure = undefined;
    this.#syncing = undefined;
    this.#queue = [];
    this.#filling = undefined;
    this.#filled = 0;
    this.#pendingBytes = 0;
    await this.#fh.truncate(0);
    this.#fileBytes = 0;
    this.#syncedBytes = 0;
    this.#bytes = 0;
    this.#hash = hasherFor(this.#algorithm);
  }

  /** Write out everything accepted so far (to the page cache: the store fsyncs before the rename). */
  async flush(): Promise<void> {
    for (;;) {
      while (this.#writing !== undefined) await this.#writing;
      this.#throwIfFailed();
      this.#queueFilling();
      if (this.#queue.length === 0) break;
      this.#startWrite();
    }
    await this.#syncing;
  }

  /** Unless a write is in flight, start writing the queued buffers (not awaited). */
  #startWrite(): void {
    if (this.#writing !== undefined || this.#failure !== undefined || this.#queue.length === 0) return;
    const buffers = this.#queue;
    const position = this.#fileBytes;
    const length = buffers.reduce((n, b) => n + b.length, 0);
    this.#queue = [];
    this.#pendingBytes -= length;
    this.#fileBytes += length;
    this.#writing = this.#writeAll(buffers, position).then(
      () => {
        this.#writing = undefined;
        for (const buffer of buffers) {
          if (buffer.length === BUFFER_BYTES && this.#free.length < MAX_PENDING_BYTES / BUFFER_BYTES)
            this.#free.push(buffer);
        }
        this.#startSync(position + length);
        this.#startWrite();
      },
      (error: unknown) => {
        this.#writing = undefined;
        this.#failure = { error };
      },
    );
  }

  /** Start an fdatasync of what is written once SYNC_BYTES more than the last one are (not awaited). */
  #startSync(written: number): void {
    if (this.#syncing !== undefined || written - this.#syncedBytes < SYNC_BYTES) return;
    const p = this.#fh.datasync().then(() => {
      this.#syncedBytes = Math.max(this.#syncedBytes, written);
      this.#syncing = undefined;
    });
    p.catch(() => {}); // surfaced by flush(); the fsync before the rename fails too
    this.#syncing = p;
  }

  async #writeAll(chunks: Uint8Array[], position: number): Promise<void> {
    let remaining = chunks;
    let pos = position;
    while (remaining.length > 0) {
      const { bytesWritten } = await this.#fh.writev(remaining, pos);
      pos += bytesWritten;
      let skip = bytesWritten;
      const rest: Uint8Array[] = [];
      for (const c of remaining) {
        if (skip >= c.length) skip -= c.length;
        else {
          rest.push(skip > 0 ? c.subarray(skip) : c);
          skip = 0;
        }
      }
      remaining = rest;
    }
  }

  /** @internal Wait for the write in flight and the background sync, ignoring their outcome (before closing on failure). */
  async settle(): Promise<void> {
    while (this.#writing !== undefined) await this.#writing;
    await this.#syncing?.catch(() => {});
  }

  /** @internal Final digest of what was written. */
  finalDigest(): string {
    return `${this.#algorithm}:${this.#hash.digest("hex")}`;
  }
}

function isAlive(pid: number): boolean {
  if (pid === process.pid) return true;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

function sleep(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(new AbortError("operation aborted", { cause: signal.reason }));
      return;
    }
    const onAbort = () => {
      clearTimeout(timer);
      reject(new AbortError("operation aborted", { cause: signal?.reason }));
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

function storeError(message: string, cause?: unknown): SupermachineError {
  return new SupermachineError("STORE_ERROR", message, cause === undefined ? undefined : { cause });
}

async function fsyncDir(dir: string): Promise<void> {
  let fh: FileHandle | undefined;
  try {
    fh = await open(dir, fsConstants.O_RDONLY | fsConstants.O_DIRECTORY);
    await fh.sync();
  } catch (err) {
    debug("fsync of directory %s failed: %s", dir, (err as Error).message);
  } finally {
    await fh?.close();
  }
}

function randomSuffix(): string {
  return nodeCrypto().randomBytes(6).toString("hex");
}

/** Write a file atomically: temp file in the same directory, fsync, rename, fsync the directory. */
export async function writeFileAtomic(path: string, dir: string, data: string | Uint8Array): Promise<void> {
  const tmp = join(dir, `.tmp.${process.pid}.${randomSuffix()}`);
  let fh: FileHandle | undefined;
  try {
    fh = await open(tmp, "wx", 0o600);
    await fh.writeFile(data);
    await fh.sync();
    await fh.close();
    fh = undefined;
    await rename(tmp, path);
  } catch (err) {
    await fh?.close().catch(() => {});
    await unlink(tmp).catch(() => {});
    throw err;
  }
  await fsyncDir(dir);
}

function recordId(reference: string, platform: string): string {
  return nodeCrypto().createHash("sha256").update(`${reference}\n${platform}`).digest("hex").slice(0, 40);
}

function isRecordShape(v: unknown): v is ImageRecord {
  if (typeof v !== "object" || v === null) return false;
  const r = v as Record<string, unknown>;
  return (
    r.version === 1 &&
    typeof r.reference === "string" &&
    typeof r.platform === "string" &&
    typeof r.manifestDigest === "string" &&
    typeof r.configDigest === "string" &&
    Array.isArray(r.layers)
  );
}

export interface PruneResult {
  /** Digests of deleted blobs. */
  readonly removedBlobs: readonly string[];
  readonly freedBytes: number;
  /** Stale temp files (left by crashed processes) that were deleted. */
  readonly removedTempFiles: number;
}

const LOCK_POLL_MS = 100;

export class ContentStore {
  /** `<dataDir>/oci`. */
  readonly root: string;

  private constructor(root: string) {
    this.root = root;
  }

  /** Open (creating directories as needed) the store under `dataDir` (default {@link defaultDataDir}). */
  static async open(dataDir: string = defaultDataDir()): Promise<ContentStore> {
    const store = new ContentStore(join(dataDir, "oci"));
    try {
      await Promise.all(
        ["blobs/sha256", "blobs/sha512", "images", "tmp", "locks"].map((d) =>
          mkdir(join(store.root, d), { recursive: true, mode: 0o700 }),
        ),
      );
    } catch (err) {
      throw storeError(`cannot create the image store in ${store.root}: ${(err as Error).message}`, err);
    }
    return store;
  }

  /** Path of a blob (whether or not it exists). Throws `STORE_ERROR` for a digest it cannot hold. */
  blobPath(digest: string): string {
    const d = parseDigest(digest);
    if (d === undefined) throw storeError(`invalid or unsupported digest ${JSON.stringify(digest)}`);
    return join(this.root, "blobs", d.algorithm, d.hex);
  }

  /** Size of a stored blob, or undefined when absent. */
  async blobSize(digest: string): Promise<number | undefined> {
    try {
      const st = await stat(this.blobPath(digest));
      return st.isFile() ? st.size : undefined;
    } catch {
      return undefined;
    }
  }

  /**
   * True when the blob is stored with the expected size. Stored blobs were verified before they
   * were renamed into place, so a complete one is trusted without re-hashing.
   */
  async hasBlob(digest: string, size?: number): Promise<boolean> {
    const actual = await this.blobSize(digest);
    return actual !== undefined && (size === undefined || actual === size);
  }

  /**
   * Write a blob through `produce`, which receives a {@link BlobWriter}. Once `produce` resolves,
   * size and digest are checked, the data fsynced, and the temp file renamed to its final name.
   * On any failure (including a `DigestMismatchError` from the check) the temp file is deleted.
   * `commitAfter`: the rename waits for it, and a rejection fails the write (a pull's layers wait
   * for its config's checks). Returns the blob's path.
   */
  async writeBlob(
    digest: string,
    expectedBytes: number | undefined,
    produce: (writer: BlobWriter) => Promise<void>,
    commitAfter?: Promise<void>,
  ): Promise<string> {
    if (parseDigest(digest) === undefined)
      throw storeError(`invalid or unsupported digest ${JSON.stringify(digest)}`);
    return (await this.#write(digest, expectedBytes, produce, commitAfter)).path;
  }

  async #write(
    digest: string,
    expectedBytes: number | undefined,
    produce: (writer: BlobWriter) => Promise<void>,
    commitAfter: Promise<void> | undefined,
  ): Promise<{ digest: string; size: number; path: string }> {
    const parsed = parseDigest(digest);
    const algorithm = parsed?.algorithm ?? "sha256";
    const tmpName = `${parsed?.hex.slice(0, 16) ?? "blob"}.${process.pid}.${randomSuffix()}.partial`;
    const tmpPath = join(this.root, "tmp", tmpName);
    let fh: FileHandle;
    try {
      fh = await open(tmpPath, "wx+", 0o600);
    } catch (err) {
      throw storeError(
        `cannot create a temp file in ${join(this.root, "tmp")}: ${(err as Error).message}`,
        err,
      );
    }
    let committed = false;
    let writer: BlobWriter | undefined;
    try {
      writer = new BlobWriter(fh, digest, algorithm, expectedBytes);
      await produce(writer);
      await writer.flush();
      if (expectedBytes !== undefined && writer.bytesWritten !== expectedBytes) {
        throw new BlobSizeError(
          writer.digest,
          expectedBytes,
          writer.bytesWritten,
          writer.bytesWritten > expectedBytes,
        );
      }
      const actual = writer.finalDigest();
      if (actual !== digest) {
        throw new DigestMismatchError(`content of blob ${digest} hashes to ${actual}`, {
          digest,
          actualDigest: actual,
        });
      }
      await fh.sync();
      await commitAfter;
      await fh.close();
      const finalPath = this.blobPath(actual);
      await rename(tmpPath, finalPath);
      committed = true;
      await fsyncDir(join(this.root, "blobs", algorithm));
      return { digest: actual, size: writer.bytesWritten, path: finalPath };
    } finally {
      if (!committed) {
        await writer?.settle();
        await fh.close().catch(() => {});
        await unlink(tmpPath).catch(() => {});
      }
    }
  }

  /** Store bytes already in memory (manifests, configs). Verifies `digest`. */
  async putBlobBytes(digest: string, bytes: Uint8Array): Promise<string> {
    if (await this.hasBlob(digest, bytes.length)) return this.blobPath(digest);
    return this.writeBlob(digest, bytes.length, (w) => w.write(bytes));
  }

  /** Read a whole blob, refusing more than `maxBytes`. */
  async readBlob(digest: string, maxBytes: number): Promise<Buffer> {
    const path = this.blobPath(digest);
    let size: number;
    try {
      size = (await stat(path)).size;
    } catch (err) {
      throw new SupermachineError("IMAGE_NOT_FOUND", `blob ${digest} is missing from the image store`, {
        cause: err,
      });
    }
    if (size > maxBytes)
      throw storeError(`blob ${digest} is ${size} bytes, more than the ${maxBytes} expected`);
    return readFile(path);
  }

  // ---- image records ------------------------------------------------------------------------

  #recordPath(reference: string, platform: string): string {
    return join(this.root, "images", `${recordId(reference, platform)}.json`);
  }

  /** Save (replace) the record of an image. */
  async putImage(record: ImageRecord): Promise<void> {
    try {
      await writeFileAtomic(
        this.#recordPath(record.reference, record.platform),
        join(this.root, "images"),
        `${JSON.stringify(record, null, 2)}\n`,
      );
    } catch (err) {
      throw storeError(
        `cannot write the image record for ${record.reference}: ${(err as Error).message}`,
        err,
      );
    }
  }

  /** The record for exactly this reference and platform, if any. */
  async getImage(reference: string, platform: string): Promise<ImageRecord | undefined> {
    try {
      const v: unknown = JSON.parse(await readFile(this.#recordPath(reference, platform), "utf8"));
      return isRecordShape(v) && v.reference === reference && v.platform === platform ? v : undefined;
    } catch {
      return undefined;
    }
  }

  /** All image records, sorted by reference then platform. Unreadable records are skipped. */
  async listImages(): Promise<ImageRecord[]> {
    const dir = join(this.root, "images");
    let names: string[];
    try {
      names = await readdir(dir);
    } catch (err) {
      throw storeError(`cannot list ${dir}: ${(err as Error).message}`, err);
    }
    const out: ImageRecord[] = [];
    for (const name of names) {
      if (!name.endsWith(".json") || name.startsWith(".")) continue;
      try {
        const v: unknown = JSON.parse(await readFile(join(dir, name), "utf8"));
        if (isRecordShape(v)) out.push(v);
        else debug("skipping malformed image record %s", name);
      } catch (err) {
        debug("skipping unreadable image record %s: %s", name, (err as Error).message);
      }
    }
    out.sort((a, b) => a.reference.localeCompare(b.reference) || a.platform.localeCompare(b.platform));
    return out;
  }

  /** Delete the records of `reference` (all platforms, or one). Blobs stay until {@link prune}. */
  async removeImage(reference: string, platform?: string): Promise<number> {
    let removed = 0;
    for (const r of await this.listImages()) {
      if (r.reference !== reference || (platform !== undefined && r.platform !== platform)) continue;
      try {
        await unlink(this.#recordPath(r.reference, r.platform));
        removed++;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== "ENOENT") {
          throw storeError(`cannot remove the record of ${reference}: ${(err as Error).message}`, err);
        }
      }
    }
    if (removed > 0) await fsyncDir(join(this.root, "images"));
    return removed;
  }

  // ---- locking and pruning ----------------------------------------------------------------

  async #livePullMarkers(): Promise<string[]> {
    const dir = join(this.root, "locks");
    const live: string[] = [];
    for (const name of await readdir(dir).catch(() => [] as string[])) {
      if (!name.startsWith("pull.")) continue;
      const pid = Number(name.split(".")[1]);
      if (Number.isInteger(pid) && pid > 0 && isAlive(pid)) live.push(name);
      else await unlink(join(dir, name)).catch(() => {});
    }
    return live;
  }

  /** True when a live process holds the prune lock (a stale one is removed). */
  async #pruneLockHeld(): Promise<boolean> {
    const path = join(this.root, "locks", "prune");
    let text: string;
    try {
      text = await readFile(path, "utf8");
    } catch {
      return false;
    }
    const pid = Number(text.trim());
    if (Number.isInteger(pid) && pid > 0 && isAlive(pid)) return true;
    // A lock file being written has no pid yet: treat it as held unless it is old.
    if (text.trim() === "") {
      const age = await stat(path).then(
        (s) => Date.now() - s.mtimeMs,
        () => Number.POSITIVE_INFINITY,
      );
      if (age < 10_000) return true;
    }
    debug("removing stale prune lock (pid %s)", text.trim());
    await unlink(path).catch(() => {});
    return false;
  }

  /**
   * Run `fn` while holding a pull marker, so that {@link prune} cannot delete blobs this pull
   * relies on before its image record is written. Waits while a prune runs.
   */
  async withPullLock<T>(fn: () => Promise<T>, signal?: AbortSignal): Promise<T> {
    const marker = join(this.root, "locks", `pull.${process.pid}.${randomSuffix()}`);
    for (;;) {
      if (signal?.aborted) throw new AbortError("operation aborted", { cause: signal.reason });
      try {
        await writeFile(marker, `${process.pid}\n`, { flag: "wx" });
      } catch (err) {
        throw storeError(`cannot create lock file ${marker}: ${(err as Error).message}`, err);
      }
      if (!(await this.#pruneLockHeld())) break;
      await unlink(marker).catch(() => {});
      await sleep(LOCK_POLL_MS + Math.random() * LOCK_POLL_MS, signal);
    }
    try {
      return await fn();
    } finally {
      await unlink(marker).catch(() => {});
    }
  }

  /**
   * Delete blobs no image record refers to, and temp files left by dead processes. Takes the
   * prune lock, then waits (honouring `signal`) until running pulls finish; pulls that start
   * meanwhile wait for the prune.
   */
  async prune(options: { signal?: AbortSignal | undefined } = {}): Promise<PruneResult> {
    const { signal } = options;
    const lockPath = join(this.root, "locks", "prune");
    for (;;) {
      if (signal?.aborted) throw new AbortError("operation aborted", { cause: signal.reason });
      try {
        await writeFile(lockPath, `${process.pid}\n`, { flag: "wx" });
        break;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== "EEXIST") {
          throw storeError(`cannot create ${lockPath}: ${(err as Error).message}`, err);
        }
        if (await this.#pruneLockHeld()) await sleep(LOCK_POLL_MS, signal);
      }
    }
    try {
      while ((await this.#livePullMarkers()).length > 0) await sleep(LOCK_POLL_MS, signal);

      const keep = new Set<string>();
      for (const r of await this.listImages()) {
        keep.add(r.manifestDigest);
        keep.add(r.configDigest);
        if (r.indexDigest) keep.add(r.indexDigest);
        for (const l of r.layers) keep.add(l.digest);
      }
      const removedBlobs: string[] = [];
      let freedBytes = 0;
      for (const algorithm of ["sha256", "sha512"]) {
        const dir = join(this.root, "blobs", algorithm);
        for (const hex of await readdir(dir).catch(() => [] as string[])) {
          const digest = `${algorithm}:${hex}`;
          if (keep.has(digest)) continue;
          const path = join(dir, hex);
          const size = await stat(path).then(
            (s) => s.size,
            () => 0,
          );
          try {
            await unlink(path);
            removedBlobs.push(digest);
            freedBytes += size;
          } catch (err) {
            if ((err as NodeJS.ErrnoException).code !== "ENOENT") {
              throw storeError(`cannot delete ${path}: ${(err as Error).message}`, err);
            }
          }
        }
      }
      // No pull is running, so every temp file is left over from a crash.
      let removedTempFiles = 0;
      const tmpDir = join(this.root, "tmp");
      for (const name of await readdir(tmpDir).catch(() => [] as string[])) {
        await rm(join(tmpDir, name), { recursive: true, force: true });
        removedTempFiles++;
      }
      // Half-written records of crashed processes (writeFileAtomic's temp files).
      const imagesDir = join(this.root, "images");
      for (const name of await readdir(imagesDir).catch(() => [] as string[])) {
        if (!name.startsWith(".tmp.")) continue;
        const pid = Number(name.split(".")[2]);
        if (Number.isInteger(pid) && isAlive(pid)) continue;
        await rm(join(imagesDir, name), { force: true });
        removedTempFiles++;
      }
      return { removedBlobs, freedBytes, removedTempFiles };
    } finally {
      await unlink(lockPath).catch(() => {});
    }
  }
}
