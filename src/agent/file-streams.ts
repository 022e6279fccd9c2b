/**
 * File streams (docs/protocol.md, "File streams"): the host side of `WRITE_FILE` and `READ_FILE`.
 */

import { Readable } from "node:stream";
import { GuestIoError } from "../errors.ts";
import { agentTimeout, Watchdog } from "./deadline.ts";
import { describeType, FLAG_FIN, type Frame, MessageType } from "./frame-codec.ts";
import {
  agentErrorCodeName,
  decodeError,
  decodeFileInfo,
  decodeOk,
  type FileInfoMessage,
} from "./messages.ts";
import { protocolError } from "./protocol-error.ts";
import { deferred, GuestCredit, type StreamHandler, type StreamLink } from "./stream-link.ts";

function guestIoError(op: string, path: string, payload: Uint8Array): GuestIoError {
  const m = decodeError(payload);
  const detail = m.message ? `: ${m.message}` : "";
  return new GuestIoError(`${op} ${path} failed in the guest (${agentErrorCodeName(m.code)})${detail}`, {
    path,
    errno: m.errno,
  });
}

/** The agent's side of one `WRITE_FILE`: waits for `OK` or `ERROR`. */
export class FileWriteStream implements StreamHandler {
  readonly stream: number;
  readonly path: string;
  /** Resolves with the size the agent wrote; rejects with `GuestIoError` or the channel's error. */
  readonly result: Promise<number>;
  readonly #result = deferred<number>();
  readonly #link: StreamLink;
  readonly #size: number;
  #ended = false;

  constructor(link: StreamLink, stream: number, path: string, size: number) {
    this.#link = link;
    this.stream = stream;
    this.path = path;
    this.#size = size;
    this.result = this.#result.promise;
  }

  /** True once the agent answered or the stream was reset or closed: stop sending data. */
  get ended(): boolean {
    return this.#ended;
  }

  onFrame(frame: Frame): void {
    if (frame.type === MessageType.OK) {
      const { size } = decodeOk(frame.payload);
      if (size !== undefined && size !== this.#size) {
        throw protocolError(`write stream ${this.stream}: OK for ${size} bytes, ${this.#size} were sent`);
      }
      this.#end();
      this.#result.resolve(this.#size);
    } else if (frame.type === MessageType.ERROR) {
      const error = guestIoError("writeFile", this.path, frame.payload);
      this.#end();
      this.#result.reject(error);
    } else {
      throw protocolError(
        `write stream ${this.stream}: unexpected ${describeType(frame.type)} from the agent`,
      );
    }
  }

  onClose(error: Error): void {
    this.#ended = true;
    this.#result.reject(error);
  }

  /** Abandons the write (`RESET`): the agent discards the partial file. */
  reset(reason: Error): void {
    if (this.#ended) return;
    this.#link.reset(this.stream);
    this.#end();
    this.#result.reject(reason);
  }

  #end(): void {
    if (this.#ended) return;
    this.#ended = true;
    this.#link.release(this.stream);
  }
}

/** Metadata of a file read from the guest. */
export interface GuestFileInfo {
  size: number;
  /** Full `st_mode` (file type and permission bits). */
  mode: number;
  uid: number;
  gid: number;
}

/**
 * The host side of one `READ_FILE`: `FILE_INFO`, then `FILE_DATA` within the credit the host grants
 * as the {@link readable} is consumed.
 */
export class FileReadStream implements StreamHandler {
  readonly stream: number;
  readonly path: string;
  /** Resolves on `FILE_INFO`; rejects with `GuestIoError` (e.g. not found) or the channel's error. */
  readonly info: Promise<GuestFileInfo>;
  /** The file's bytes. Destroying it early abandons the stream (`RESET`). */
  readonly readable: Readable;

  readonly #info = deferred<FileInfoMessage>();
  readonly #link: StreamLink;
  readonly #credit: GuestCredit;
  /** Runs while the host waits on the guest: for FILE_INFO, then for data its consumer wants. */
  readonly #watchdog: Watchdog;
  #gotInfo = false;
  #failure: Error | undefined;
  #announced = 0;
  #received = 0;
  #finished = false;
  #fin = false;
  #wanting = false;
  /** Data not yet pushed to the readable, with the credit each chunk cost. */
  readonly #queue: { data: Uint8Array; cost: number }[] = [];

  constructor(link: StreamLink, stream: number, path: string, windowBytes: number, timeoutMs: number) {
    this.#link = link;
    this.stream = stream;
    this.path = path;
    this.#credit = new GuestCredit(link, stream, windowBytes, () => !this.#finished);
    this.#watchdog = new Watchdog(timeoutMs, () =>
      this.reset(agentTimeout(link, `readFile ${path}`, timeoutMs)),
    );
    this.#watchdog.arm();
    this.info = this.#info.promise;
    this.readable = new Readable({
      highWaterMark: 64 * 1024,
      read: () => {
        this.#wanting = true;
        this.#pump();
      },
      destroy: (error, callback) => {
        if (!this.#finished)
          this.reset(error ?? new GuestIoError(`readFile ${path}: stream destroyed`, { path }));
        callback(error);
      },
    });
  }

  /** Why the read failed, once it did (the readable may only report a premature close). */
  get failure(): Error | undefined {
    return this.#failure;
  }

  /** Bytes received and not yet taken by the readable's consumer. */
  get bufferedBytes(): number {
    let n = 0;
    for (const c of this.#queue) n += c.data.length;
    return n;
  }

  onFrame(frame: Frame): void {
    this.#watchdog.progress();
    switch (frame.type) {
      case MessageType.FILE_INFO: {
        if (this.#gotInfo) throw protocolError(`read stream ${this.stream}: FILE_INFO twice`);
        this.#gotInfo = true;
        const info = decodeFileInfo(frame.payload);
        this.#announced = info.size;
        this.#info.resolve(info);
        this.#pump();
        return;
      }
      case MessageType.FILE_DATA: {
        if (!this.#gotInfo) throw protocolError(`read stream ${this.stream}: FILE_DATA before FILE_INFO`);
        const size = frame.payload.length;
        const cost = this.#credit.take(frame, `read stream ${this.stream}`);
        this.#received += size;
        if (this.#received > this.#announced) {
          throw protocolError(
            `read stream ${this.stream}: more data than the ${this.#announced} bytes FILE_INFO announced`,
          );
        }
        const fin = (frame.flags & FLAG_FIN) !== 0;
        if (fin !== (this.#received === this.#announced)) {
          throw protocolError(
            `read stream ${this.stream}: ${fin ? "FIN" : "no FIN"} after ${this.#received} of the ${this.#announced} bytes announced`,
          );
        }
        if (size > 0) this.#queue.push({ data: frame.payload, cost });
        else this.#credit.grant(cost);
        if (fin) {
          this.#fin = true;
          this.#finished = true;
          this.#watchdog.stop();
          this.#link.release(this.stream);
        }
        this.#pump();
        return;
      }
      case MessageType.ERROR: {
        const error = guestIoError("readFile", this.path, frame.payload);
        this.#fail(error);
        return;
      }
      default:
        throw protocolError(
          `read stream ${this.stream}: unexpected ${describeType(frame.type)} from the agent`,
        );
    }
  }

  onClose(error: Error): void {
    if (this.#finished) return;
    this.#fail(error);
  }

  /** Abandons the read (`RESET`); the readable is destroyed with `reason`. */
  reset(reason: Error): void {
    if (this.#finished) return;
    this.#link.reset(this.stream, this.#credit.outstanding);
    this.#fail(reason);
  }

  #fail(error: Error): void {
    if (this.#finished) return;
    this.#finished = true;
    this.#failure = error;
    this.#watchdog.stop();
    this.#link.release(this.stream);
    this.#queue.length = 0;
    this.#info.reject(error);
    if (this.readable.destroyed) return;
    // Before FILE_INFO nobody holds the readable: the error goes to readFile()'s promise. After, an
    // 'error' nobody listens to would crash the host process, so it is only emitted to listeners
    // (iterating the stream or piping it always listens).
    if (this.#gotInfo && this.readable.listenerCount("error") > 0) this.readable.destroy(error);
    else this.readable.destroy();
  }

  #pump(): void {
    while (this.#wanting && this.#queue.length > 0) {
      const { data, cost } = this.#queue.shift()!;
      this.#credit.grant(cost);
      this.#wanting = this.readable.push(data);
    }
    if (this.#fin && this.#queue.length === 0 && this.#wanting) {
      this.#fin = false;
      this.readable.push(null);
    }
    if (this.#finished || (this.#gotInfo && !(this.#wanting && this.#queue.length === 0)))
      this.#watchdog.disarm();
    else this.#watchdog.arm();
  }
}
