/**
 * A stream that carries one request and its answer (docs/protocol.md: `FS` other than readdir,
 * `WORKLOAD_START`, `WORKLOAD_QUERY`, `WORKLOAD_SIGNAL`): at most one result frame, then `OK`; or
 * `ERROR`. Bounded by a deadline and cancellable.
 */

import { AbortError } from "../errors.ts";
import { type AgentCallOptions, agentTimeout, timeoutOption } from "./deadline.ts";
import { describeType, type Frame, MessageType } from "./frame-codec.ts";
import { type AgentErrorMessage, decodeError, decodeOk, type OkMessage } from "./messages.ts";
import { protocolError } from "./protocol-error.ts";
import { deferred, type StreamHandler, type StreamHost, type StreamLink } from "./stream-link.ts";

export interface RequestSpec<T> {
  /** What the request does, for errors: `stat /etc`, `startWorkload`. */
  operation: string;
  /** The result message the answer may carry before `OK` (at most one), if any. */
  result?: number | undefined;
  /** Builds the value from the result frame's payload (if any) and the `OK`. */
  finish: (result: Uint8Array | undefined, ok: OkMessage) => T;
  /** The error for the agent's `ERROR`. */
  fail: (error: AgentErrorMessage) => Error;
}

class RequestStream<T> implements StreamHandler {
  readonly #link: StreamLink;
  readonly #stream: number;
  readonly #spec: RequestSpec<T>;
  readonly #done = deferred<T>();
  #result: Uint8Array | undefined;
  #ended = false;

  constructor(link: StreamLink, stream: number, spec: RequestSpec<T>) {
    this.#link = link;
    this.#stream = stream;
    this.#spec = spec;
  }

  get result(): Promise<T> {
    return this.#done.promise;
  }

  onFrame(frame: Frame): void {
    if (frame.type === MessageType.OK) {
      const value = this.#spec.finish(this.#result, decodeOk(frame.payload));
      this.#end();
      this.#done.resolve(value);
    } else if (frame.type === MessageType.ERROR) {
      const error = this.#spec.fail(decodeError(frame.payload));
      this.#end();
      this.#done.reject(error);
    } else if (frame.type === this.#spec.result && this.#result === undefined) {
      this.#result = frame.payload;
    } else {
      throw protocolError(
        `${this.#spec.operation} (stream ${this.#stream}): unexpected ${describeType(frame.type)} from the agent`,
      );
    }
  }

  onClose(error: Error): void {
    this.#ended = true;
    this.#done.reject(error);
  }

  reset(reason: Error): void {
    if (this.#ended) return;
    this.#link.reset(this.#stream);
    this.#end();
    this.#done.reject(reason);
  }

  #end(): void {
    this.#ended = true;
    this.#link.release(this.#stream);
  }
}

/**
 * Sends a request on a new stream and waits for its answer, within `opts.timeoutMs` (the stream is
 * reset and the promise rejects with `AGENT_TIMEOUT`) and until `opts.signal` aborts (`ABORTED`).
 */
export async function request<T>(
  host: StreamHost,
  type: number,
  payload: Uint8Array,
  spec: RequestSpec<T>,
  opts: AgentCallOptions = {},
): Promise<T> {
  const timeoutMs = timeoutOption(opts.timeoutMs);
  const signal = opts.signal;
  if (signal?.aborted) throw new AbortError(`${spec.operation} aborted`, { cause: signal.reason });
  const { handler } = host.open(type, payload, (stream) => new RequestStream(host.link, stream, spec));
  const timer = setTimeout(
    () => handler.reset(agentTimeout(host.link, spec.operation, timeoutMs)),
    timeoutMs,
  );
  const onAbort = () => handler.reset(new AbortError(`${spec.operation} aborted`, { cause: signal?.reason }));
  signal?.addEventListener("abort", onAbort, { once: true });
  try {
    return await handler.result;
  } finally {
    clearTimeout(timer);
    signal?.removeEventListener("abort", onAbort);
  }
}
