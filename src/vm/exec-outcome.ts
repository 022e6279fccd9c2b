// The outcome class is shared with the client (src/internal/exec-outcome.ts); the exec code takes
// it from here, next to the collector of its output.
export { ExecOutcomeRecord } from "../internal/index.ts";

const EMPTY = new Uint8Array(0);

/** Output past this size is copied as it arrives instead of in one go when the exec ends. */
const INCREMENTAL_FROM_BYTES = 1024 * 1024;

interface Collected {
  chunks: Uint8Array[];
  size: number;
  /** Set once the output is large: a buffer that grows in place (up to the bound) as chunks come. */
  grown: ArrayBuffer | undefined;
  view: Uint8Array | undefined;
}

/**
 * Collects output chunks into one buffer per stream, bounded by `maxBytes` per stream.
 * `add` returns false (and keeps nothing more) once a stream would exceed the bound.
 * Small output is kept as chunks and joined on demand; large output is copied on arrival into a
 * resizable buffer reserved up to the bound, so the copy overlaps with waiting for more output
 * and nothing is left to join when the exec ends.
 */
export class OutputCollector {
  readonly maxBytes: number;
  readonly #streams: { stdout: Collected; stderr: Collected } = {
    stdout: { chunks: [], size: 0, grown: undefined, view: undefined },
    stderr: { chunks: [], size: 0, grown: undefined, view: undefined },
  };

  constructor(maxBytes: number) {
    this.maxBytes = maxBytes;
  }

  add(kind: "stdout" | "stderr", data: Uint8Array): boolean {
    const s = this.#streams[kind];
    if (s.size + data.length > this.maxBytes) return false;
    if (data.length === 0) return true;
    s.view = undefined;
    if (s.grown) {
      append(s, data);
      return true;
    }
    s.chunks.push(data);
    s.size += data.length;
    if (s.size >= INCREMENTAL_FROM_BYTES) this.#startGrowing(s);
    return true;
  }

  bytes(kind: "stdout" | "stderr"): Uint8Array {
    const s = this.#streams[kind];
    if (s.grown) {
      s.view ??= new Uint8Array(s.grown, 0, s.size);
      return s.view;
    }
    const chunks = s.chunks;
    if (chunks.length === 0) return EMPTY;
    const only = chunks[0]!;
    // A lone chunk is returned as is only if it owns its whole buffer (frames are views of the
    // channel's read buffers, which hold other streams' bytes too).
    if (chunks.length === 1 && only.byteOffset === 0 && only.byteLength === only.buffer.byteLength)
      return only;
    const out = new Uint8Array(s.size);
    let offset = 0;
    for (const c of chunks) {
      out.set(c, offset);
      offset += c.length;
    }
    chunks.length = 0;
    chunks.push(out);
    return out;
  }

  #startGrowing(s: Collected): void {
    let grown: ArrayBuffer;
    try {
      grown = new ArrayBuffer(s.size, { maxByteLength: this.maxBytes });
    } catch {
      return; // the bound is too large to reserve: keep joining at the end
    }
    const bytes = new Uint8Array(grown);
    let offset = 0;
    for (const c of s.chunks) {
      bytes.set(c, offset);
      offset += c.length;
    }
    s.chunks = [];
    s.grown = grown;
  }
}

function append(s: Collected, data: Uint8Array): void {
  const grown = s.grown!;
  const size = s.size + data.length;
  if (size > grown.byteLength)
    grown.resize(Math.min(Math.max(size, grown.byteLength * 2), grown.maxByteLength));
  new Uint8Array(grown, s.size, data.length).set(data);
  s.size = size;
}
