/**
 * A pull-based reader over an async iterable of byte chunks: exact reads for headers, zero-copy
 * streaming for entry bodies. Used by the tar reader; knows nothing about tar.
 */
export class ByteSource {
  readonly #iterator: AsyncIterator<Buffer | Uint8Array | string>;
  #chunk: Buffer = Buffer.alloc(0);
  #offset = 0;
  #ended = false;
  /** Bytes handed out so far (position in the stream). */
  position = 0;

  constructor(source: AsyncIterable<Buffer | Uint8Array | string>) {
    this.#iterator = source[Symbol.asyncIterator]();
  }

  get #available(): number {
    return this.#chunk.length - this.#offset;
  }

  /** Loads the next non-empty chunk. Returns false at the end of the stream. */
  async #pull(): Promise<boolean> {
    while (!this.#ended) {
      const next = await this.#iterator.next();
      if (next.done) {
        this.#ended = true;
        return false;
      }
      const value = next.value;
      const buf =
        typeof value === "string"
          ? Buffer.from(value, "latin1")
          : Buffer.from(value.buffer, value.byteOffset, value.byteLength);
      if (buf.length === 0) continue;
      this.#chunk = buf;
      this.#offset = 0;
      return true;
    }
    return false;
  }

  /**
   * Reads exactly `n` bytes. Returns fewer only at the end of the stream (the caller decides
   * whether that is a truncation). The returned buffer may share memory with the input.
   */
  async read(n: number): Promise<Buffer> {
    if (this.#available >= n) {
      const out = this.#chunk.subarray(this.#offset, this.#offset + n);
      this.#offset += n;
      this.position += n;
      return out;
    }
    const parts: Buffer[] = [];
    let have = 0;
    while (have < n) {
      if (this.#available === 0 && !(await this.#pull())) break;
      const take = Math.min(n - have, this.#available);
      parts.push(this.#chunk.subarray(this.#offset, this.#offset + take));
      this.#offset += take;
      have += take;
    }
    this.position += have;
    return parts.length === 1 ? parts[0]! : Buffer.concat(parts, have);
  }

  /**
   * Yields the next `n` bytes as slices of the input chunks (valid until the next call).
   * Stops early at the end of the stream; `position` tells how much was delivered.
   */
  async *stream(n: number): AsyncGenerator<Buffer, void, undefined> {
    let left = n;
    while (left > 0) {
      if (this.#available === 0 && !(await this.#pull())) return;
      const take = Math.min(left, this.#available);
      const out = this.#chunk.subarray(this.#offset, this.#offset + take);
      this.#offset += take;
      this.position += take;
      left -= take;
      yield out;
    }
  }

  /** Skips `n` bytes; returns how many were actually skipped. */
  async skip(n: number): Promise<number> {
    let left = n;
    while (left > 0) {
      if (this.#available === 0 && !(await this.#pull())) break;
      const take = Math.min(left, this.#available);
      this.#offset += take;
      this.position += take;
      left -= take;
    }
    return n - left;
  }

  /** Stops reading: lets the underlying iterator clean up (destroys a Node stream). */
  async close(): Promise<void> {
    this.#ended = true;
    await this.#iterator.return?.();
  }
}
