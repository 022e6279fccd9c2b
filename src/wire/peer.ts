/**
 * One end of a stream WebSocket, whatever the WebSocket implementation (the server's `ws`, the
 * client's global `WebSocket`): the adapter hands every message to {@link StreamPeer.receive} and
 * the close to {@link StreamPeer.closed}; the peer sends through {@link PeerTransport}.
 *
 * Inbound messages other than credits are handled one at a time, in order (so a `stdin-end`
 * comes after the data before it); a data message counts as consumed, and is credited back, when
 * its handler's promise settles. At most {@link MAX_QUEUED} messages wait; a peer that sends more,
 * overruns its window, or sends a malformed message is disconnected with {@link CLOSE_PROTOCOL}.
 *
 * When the other side closes, messages already received are still handled if `drainOnClose`
 * (the client: output sent before the exit must not be lost) and {@link StreamPeer.ended}
 * resolves after them; otherwise (the server: a client that left wants nothing more) they are
 * dropped at once.
 */

import {
  CLOSE_PROTOCOL,
  decodeData,
  encodeData,
  MAX_CHUNK_BYTES,
  parseControl,
  ReceiveWindow,
  SendWindow,
} from "./stream.ts";

export interface PeerTransport {
  send(message: string | Uint8Array): void;
  close(code: number, reason: string): void;
}

export interface PeerHandlers {
  /** A control message (not a credit), parsed. */
  control(message: { type: string } & Record<string, unknown>): void | Promise<void>;
  /** Data on `channel`; the returned promise settles when the consumer took it. */
  data(channel: number, bytes: Uint8Array): void | Promise<void>;
}

/** Most inbound messages waiting for their handler. */
export const MAX_QUEUED = 1024;

export class StreamPeer {
  readonly #transport: PeerTransport;
  readonly #handlers: PeerHandlers;
  readonly #send = new SendWindow();
  readonly #receive = new ReceiveWindow();
  #queue: Promise<void> = Promise.resolve();
  #queued = 0;
  #ended = false;
  /** Queued messages are dropped (this side closed, or the other side did and we do not drain). */
  #dropping = false;
  readonly #drainOnClose: boolean;
  readonly ended: Promise<{ code: number; reason: string }>;
  #resolveEnded!: (value: { code: number; reason: string }) => void;

  constructor(transport: PeerTransport, handlers: PeerHandlers, options: { drainOnClose?: boolean } = {}) {
    this.#transport = transport;
    this.#handlers = handlers;
    this.#drainOnClose = options.drainOnClose === true;
    this.ended = new Promise((resolve) => {
      this.#resolveEnded = resolve;
    });
  }

  get isEnded(): boolean {
    return this.#ended;
  }

  /** An inbound message from the transport. */
  receive(message: string | Uint8Array): void {
    if (this.#ended) return;
    if (typeof message === "string") {
      const control = parseControl(message);
      if (control === undefined) {
        this.violation("a control message is not a JSON object with a type");
        return;
      }
      if (control.type === "credit") {
        if (!this.#send.credit(control.bytes)) this.violation("a credit for more than was sent");
        return;
      }
      this.#enqueue(() => this.#handlers.control(control));
      return;
    }
    const decoded = decodeData(message);
    if (decoded === undefined) {
      this.violation("an empty data message");
      return;
    }
    const { channel, data } = decoded;
    if (!this.#receive.received(data.length)) {
      this.violation("data past the flow-control window");
      return;
    }
    this.#enqueue(async () => {
      try {
        await this.#handlers.data(channel, data);
      } finally {
        const credit = this.#receive.consumed(data.length);
        if (credit > 0 && !this.#ended)
          this.#transport.send(JSON.stringify({ type: "credit", bytes: credit }));
      }
    });
  }

  #enqueue(task: () => void | Promise<void>): void {
    if (++this.#queued > MAX_QUEUED) {
      this.violation(`more than ${MAX_QUEUED} messages waiting`);
      return;
    }
    this.#queue = this.#queue
      .then(async () => {
        if (!this.#dropping) await task();
      })
      .catch((error: Error) => this.close(CLOSE_PROTOCOL, error.message))
      .finally(() => {
        this.#queued -= 1;
      });
  }

  /** Sends `bytes` on `channel` in chunks, each once the window has room. */
  async sendData(channel: number, bytes: Uint8Array): Promise<void> {
    for (let offset = 0; offset < bytes.length; offset += MAX_CHUNK_BYTES) {
      const chunk = bytes.subarray(offset, offset + MAX_CHUNK_BYTES);
      await this.#send.reserve(chunk.length);
      if (this.#ended) throw new Error("the stream ended");
      this.#transport.send(encodeData(channel, chunk));
    }
  }

  sendControl(message: { type: string } & Record<string, unknown>): void {
    if (!this.#ended) this.#transport.send(JSON.stringify(message));
  }

  /** Ends the stream from this side (what is queued is dropped). */
  close(code: number, reason: string): void {
    this.#dropping = true;
    if (this.#ended) return;
    this.#transport.close(code, reason.length > 120 ? `${reason.slice(0, 117)}...` : reason);
    this.closed(code, reason);
  }

  violation(reason: string): void {
    this.close(CLOSE_PROTOCOL, `protocol violation: ${reason}`);
  }

  /** The transport closed (or this side closed it). */
  closed(code: number, reason: string): void {
    if (this.#ended) return;
    this.#ended = true;
    this.#send.fail(new Error(`the stream ended (${code}${reason ? `: ${reason}` : ""})`));
    if (this.#drainOnClose && !this.#dropping) {
      void this.#queue.then(() => this.#resolveEnded({ code, reason }));
    } else {
      this.#dropping = true;
      this.#resolveEnded({ code, reason });
    }
  }
}
