/** What an HTTP GET answers, whichever way it was read (http-get.ts, bulk-get.ts). */

/** A response body, read once. */
export interface HttpBody {
  /**
   * Hands the body to `sink` as it arrives. A chunk's memory may be reused once `sink` returns:
   * copy what you keep. While a promise `sink` returned is pending, reading waits. Resolves with
   * undefined once the whole body was handed over, or with the error when the connection broke or
   * was aborted before (the caller may resume); rejects with what `sink` threw or rejected with.
   */
  consume(sink: (chunk: Uint8Array) => void | Promise<void>): Promise<unknown>;
  /** Stop reading and close the connection. */
  destroy(): void;
}

export interface HttpResponse {
  readonly status: number;
  readonly ok: boolean;
  /** A header's value (repeated headers joined with ", "), or undefined. */
  header(name: string): string | undefined;
  readonly body: HttpBody;
  /** Drop the body: drained when short and declared (keeping a shared connection), else closed. */
  discard(): void;
}
