/**
 * The guest's serial console, kept in a bounded file.
 *
 * The file holds the first quarter of `maxBytes` of output (the boot) as it came, then the most
 * recent output. When appending would pass `maxBytes`, everything after the head is rewritten as
 * one marker line (`[supermachine: N bytes of console output dropped]`) followed by the last
 * quarter of `maxBytes` of output, which is kept in memory for that. So the file never exceeds
 * `maxBytes` plus the marker, always shows how the guest started and how it ended, and the cost
 * of the rewrites is at most one extra write of every byte.
 */

import { once } from "node:events";
import { type FileHandle, open } from "node:fs/promises";
import { Writable } from "node:stream";

/** Default cap of a console log file: 1 MiB. */
export const DEFAULT_CONSOLE_LOG_MAX_BYTES = 1024 * 1024;
const MIN_MAX_BYTES = 4096;

export interface ConsoleLogOptions {
  /** Cap of the file in bytes (plus one marker line). Default 1 MiB, minimum 4 KiB. */
  maxBytes?: number;
}

/**
 * A writable stream that keeps what is written to it in a bounded file at `path`. It also emits
 * `"output"` with each chunk, for consumers that watch the console live.
 */
export class ConsoleLog extends Writable {
  /** Path of the log file. */
  readonly path: string;
  /** Cap of the file (plus one marker line). */
  readonly maxBytes: number;
  readonly #file: FileHandle;
  readonly #headBytes: number;
  readonly #keepBytes: number;
  /** The most recent output: at least `#keepBytes` once that much has been written. */
  #recent: Buffer[] = [];
  #recentBytes = 0;
  #fileBytes = 0;
  #totalBytes = 0;
  #droppedBytes = 0;

  private constructor(file: FileHandle, path: string, maxBytes: number) {
    super({ decodeStrings: true });
    this.#file = file;
    this.path = path;
    this.maxBytes = maxBytes;
    this.#headBytes = Math.floor(maxBytes / 4);
    this.#keepBytes = Math.floor(maxBytes / 4);
  }

  /** Create (or truncate) the log file at `path`, mode 0600. */
  static async open(path: string, options: ConsoleLogOptions = {}): Promise<ConsoleLog> {
    const maxBytes = options.maxBytes ?? DEFAULT_CONSOLE_LOG_MAX_BYTES;
    if (!Number.isSafeInteger(maxBytes) || maxBytes < MIN_MAX_BYTES) {
      throw new RangeError(`console log maxBytes must be an integer >= ${MIN_MAX_BYTES}, got ${maxBytes}`);
    }
    const file = await open(path, "w", 0o600);
    return new ConsoleLog(file, path, maxBytes);
  }

  /** Bytes written to the log so far, including dropped ones. */
  get totalBytes(): number {
    return this.#totalBytes;
  }

  /** Bytes of output that are no longer in the file. */
  get droppedBytes(): number {
    return this.#droppedBytes;
  }

  /** The last `bytes` bytes of output (from memory; at most a quarter of `maxBytes`), as text. */
  tail(bytes = 4096): string {
    const limit = Math.min(bytes, this.#keepBytes);
    const all = Buffer.concat(this.#recent);
    return all.subarray(Math.max(0, all.length - limit)).toString("utf8");
  }

  /** End the stream and wait until everything is in the file and the file is closed. */
  async close(): Promise<void> {
    if (this.writableFinished || this.destroyed) {
      if (!this.closed) await once(this, "close");
      return;
    }
    if (!this.writableEnded) this.end();
    await once(this, "close");
  }

  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    this.#append(chunk).then(() => callback(), callback);
  }

  /** Chunks that queued up while a write was in flight go to the file in one write. */
  override _writev(chunks: { chunk: Buffer }[], callback: (error?: Error | null) => void): void {
    this.#append(Buffer.concat(chunks.map(({ chunk }) => chunk))).then(() => callback(), callback);
  }

  override _final(callback: (error?: Error | null) => void): void {
    this.#file.close().then(() => callback(), callback);
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    this.#file.close().then(
      () => callback(error),
      () => callback(error),
    );
  }

  async #append(chunk: Buffer): Promise<void> {
    this.#totalBytes += chunk.length;
    this.#remember(chunk);
    if (chunk.length > 0) this.emit("output", chunk);
    if (this.#fileBytes + chunk.length <= this.maxBytes) {
      await this.#file.write(chunk, 0, chunk.length, this.#fileBytes);
      this.#fileBytes += chunk.length;
      return;
    }
    // Compact: keep the head, then a marker, then the most recent output.
    if (this.#fileBytes < this.#headBytes) {
      // One chunk larger than the rest of the cap: its start still belongs to the head.
      const headPart = this.#headBytes - this.#fileBytes;
      await this.#file.write(chunk, 0, headPart, this.#fileBytes);
    }
    const recent = Buffer.concat(this.#recent);
    this.#droppedBytes = this.#totalBytes - this.#headBytes - recent.length;
    const marker = Buffer.from(`\n[supermachine: ${this.#droppedBytes} bytes of console output dropped]\n`);
    const rewrite = Buffer.concat([marker, recent]);
    await this.#file.write(rewrite, 0, rewrite.length, this.#headBytes);
    this.#fileBytes = this.#headBytes + rewrite.length;
    await this.#file.truncate(this.#fileBytes);
  }

  #remember(chunk: Buffer): void {
    this.#recent.push(chunk);
    this.#recentBytes += chunk.length;
    while (this.#recentBytes > this.#keepBytes) {
      const first = this.#recent[0]!;
      const excess = this.#recentBytes - this.#keepBytes;
      if (first.length <= excess) {
        this.#recent.shift();
        this.#recentBytes -= first.length;
      } else {
        this.#recent[0] = first.subarray(excess);
        this.#recentBytes -= excess;
      }
    }
  }
}
