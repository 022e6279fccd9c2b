import type { Frame } from "./frame-codec.ts";

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
   * needs none). Call before {@link release}.
   */
  reset(stream: number): void;
  /** Resolves once the socket is not congested (or the connection closed). Never rejects. */
  writable(): Promise<void>;
  /** Forgets the stream: later frames for it are dropped (docs/protocol.md, "Frames"). */
  release(stream: number): void;
  /** The error the connection closed with, once closed. */
  readonly closedError: Error | undefined;
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
