import { FLAG_FIN, FRAME_COST, type Frame, MessageType } from "./frame-codec.ts";
import { encodeWindow } from "./messages.ts";
import { protocolError } from "./protocol-error.ts";

/** What a stream (exec or file) needs from the connection that carries it. */
export interface StreamLink {
  /**
   * Writes a frame now, ignoring socket backpressure (small control frames: `WINDOW`, `SIGNAL`,
   * `RESIZE`, `RESET`). A no-op once the connection is closed.
   */
  sendControl(stream: number, type: number, payload?: Uint8Array, flags?: number): void;
  /**
   * Writes a frame once the socket has drained (data, and the frames opening a stream). Rejects with
   * the connection's error once it is closed.
   */
  sendData(stream: number, type: number, payload: Uint8Array, flags?: number): Promise<void>;
  /**
   * Writes the frame that opens a stream (`EXEC`, `WRITE_FILE`, `READ_FILE`) like {@link sendData},
   * after every opening frame requested before it: the agent requires stream ids to increase.
   */
  sendOpen(stream: number, type: number, payload: Uint8Array): Promise<void>;
  /**
   * Sends `RESET` for the stream if its opening frame was written (a stream the agent never saw
   * needs none). Call before {@link release}. `inFlightBytes` is the guest→host credit the agent
   * still held for it: frames it may have sent before it sees the `RESET`, which the host then
   * drops without counting them as a violation (docs/protocol.md, "Frames").
   */
  reset(stream: number, inFlightBytes?: number): void;
  /** Resolves once the socket is not congested (or the connection closed). Never rejects. */
  writable(): Promise<void>;
  /** Forgets the stream: later frames for it are dropped (docs/protocol.md, "Frames"). */
  release(stream: number): void;
  /** The error the connection closed with, once closed. */
  readonly closedError: Error | undefined;
  /**
   * A call on this connection waited on the agent past its deadline (see `agentTimeout`): what
   * the guest is doing is unknown from then on.
   */
  timedOut(): void;
}

/** What a feature module (files, tunnels, watches, the workload) needs to open its streams. */
export interface StreamHost {
  readonly link: StreamLink;
  /**
   * Allocates a stream id, registers the handler `create(id)` builds, and writes the opening frame
   * (in id order, see {@link StreamLink.sendOpen}); `sent` settles once it is written. Throws the
   * connection's error, or `VM_STOPPED`, if the connection is not open.
   */
  open<H extends StreamHandler>(
    type: number,
    payload: Uint8Array,
    create: (stream: number) => H,
  ): { handler: H; sent: Promise<void> };
}

/** A stream's side of the connection: frames in, and the connection's end. */
export interface StreamHandler {
  /** Handles one frame for this stream; throws `AGENT_PROTOCOL` on a frame the stream cannot take. */
  onFrame(frame: Frame): void;
  /** The connection ended (`error` says why); settle everything pending. */
  onClose(error: Error): void;
}

/** Promise that never produces an unhandled rejection, while still rejecting for whoever awaits it. */
export function deferred<T>(): {
  promise: Promise<T>;
  resolve: (value: T) => void;
  reject: (error: Error) => void;
  settled: () => boolean;
} {
  let done = false;
  let resolve!: (value: T) => void;
  let reject!: (error: Error) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = (v) => {
      if (!done) {
        done = true;
        res(v);
      }
    };
    reject = (e) => {
      if (!done) {
        done = true;
        rej(e);
      }
    };
  });
  promise.catch(() => {});
  return { promise, resolve, reject, settled: () => done };
}

/**
 * The credit one stream gives the agent for guest→host data (docs/protocol.md, "Credit"): every
 * data frame must fit in what was granted ({@link take}; more is a lying guest), and its cost is
 * given back in batched `WINDOW` frames once the host no longer holds it ({@link grant}). A frame
 * costs its payload plus {@link FRAME_COST}, so what the host holds for a stream — frames and the
 * objects around them — is bounded by the window whatever the frame sizes. Grants wait while the
 * socket is congested: a guest that does not read its end of the channel gets no more credit, so
 * the host's write buffer cannot grow without bound.
 */
export class GuestCredit {
  readonly #link: StreamLink;
  readonly #stream: number;
  readonly #wanted: () => boolean;
  #available: number;
  #pending = 0;
  #scheduled = false;

  /** `wanted()` says whether the stream still takes data when a batched grant goes out. */
  constructor(link: StreamLink, stream: number, windowBytes: number, wanted: () => boolean) {
    this.#link = link;
    this.#stream = stream;
    this.#available = windowBytes;
    this.#wanted = wanted;
  }

  /**
   * Consumes what `frame` costs and returns it (to {@link grant} back later); `what` names the data
   * in the protocol error if the frame exceeds the credit left.
   */
  take(frame: Frame, what: string): number {
    const cost = frameCost(frame);
    if (cost > this.#available) {
      throw protocolError(
        `${what}: a frame of ${frame.payload.length} bytes (cost ${cost}) exceeds the ${this.#available} granted`,
      );
    }
    this.#available -= cost;
    return cost;
  }

  /** Credit the agent holds and may still use (what it may have in flight if the stream is reset). */
  get outstanding(): number {
    return this.#available;
  }

  /** Gives `bytes` back to the agent (batched into one `WINDOW` once the socket is writable). */
  grant(bytes: number): void {
    if (bytes <= 0) return;
    this.#pending += bytes;
    if (this.#scheduled) return;
    this.#scheduled = true;
    void this.#link.writable().then(() => {
      this.#scheduled = false;
      const n = this.#pending;
      this.#pending = 0;
      if (!this.#wanted() || n === 0) return;
      this.#available += n;
      this.#link.sendControl(this.#stream, MessageType.WINDOW, encodeWindow(n));
    });
  }
}

/** Credit a guest→host data frame uses: its payload plus {@link FRAME_COST}; an empty `FIN` is free. */
export function frameCost(frame: Frame): number {
  if (frame.payload.length === 0 && (frame.flags & FLAG_FIN) !== 0) return 0;
  return frame.payload.length + FRAME_COST;
}
