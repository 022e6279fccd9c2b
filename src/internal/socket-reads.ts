import { connect, type Socket } from "node:net";
import type { Duplex } from "node:stream";

/** Size of the one buffer a {@link SocketReads} socket reads into. */
const READ_BUFFER_BYTES = 65_536;

const bySocket = new WeakMap<Duplex, SocketReads>();

/**
 * A socket read without Node's stream machinery (net's `onread`: one reused buffer, no `data`
 * events, no allocation per read), for the VM's agent channel: there each exec costs the host a
 * few reads, and the stream machinery was a large part of each (docs/benchmarks.md). Chunks go to
 * the reader set with {@link read} as views of the reused buffer, valid only during the call: the
 * reader copies what it keeps. `end`, `close` and `error` are emitted as usual.
 */
export class SocketReads {
  readonly socket: Socket;
  #reader: ((chunk: Uint8Array) => void) | undefined;
  /** What arrived before there was a reader (reading stops until there is one). */
  #early: Uint8Array | undefined;

  private constructor(path: string) {
    const buffer = new Uint8Array(READ_BUFFER_BYTES);
    this.socket = connect({
      path,
      onread: { buffer, callback: (bytes: number) => this.#chunk(buffer.subarray(0, bytes)) },
    });
    bySocket.set(this.socket, this);
  }

  /** Connects to the unix socket at `path`; `socket` reports the connection like `net.connect`. */
  static connect(path: string): SocketReads {
    return new SocketReads(path);
  }

  /** Hands every chunk to `reader` from now on, beginning with any that arrived before. */
  read(reader: (chunk: Uint8Array) => void): void {
    this.#reader = reader;
    const early = this.#early;
    if (early === undefined) return;
    this.#early = undefined;
    reader(early);
    this.socket.resume();
  }

  #chunk(chunk: Uint8Array): boolean {
    if (this.#reader !== undefined) {
      this.#reader(chunk);
      return true;
    }
    this.#early = chunk.slice();
    return false; // stops reading until read() resumes it
  }
}

/** The {@link SocketReads} of `socket` if it was connected as one. */
export function socketReads(socket: Duplex): SocketReads | undefined {
  return bySocket.get(socket);
}
