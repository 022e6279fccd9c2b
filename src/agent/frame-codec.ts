/**
 * Frames of the host–guest protocol (docs/protocol.md, "Frames"):
 * `[u32 length][u32 stream][u8 type][u8 flags][payload]`, big-endian, payload ≤ {@link MAX_PAYLOAD}.
 */

import { protocolError } from "./protocol-error.ts";

/** Largest payload of one frame, in both directions (1 MiB). */
export const MAX_PAYLOAD = 1_048_576;
/** Size of a frame header in bytes. */
export const HEADER_BYTES = 10;
/** Flag bit 0: last frame of a data stream. */
export const FLAG_FIN = 0x01;
/**
 * Credit a guest→host data frame costs beyond its payload (docs/protocol.md, "Credit"): the host
 * keeps each frame as an object, so a flood of tiny frames must use the credit up too. An empty
 * frame with `FIN` is free (at most one per direction of a stream).
 */
export const FRAME_COST = 64;
/** Flag bits that must be zero. */
export const RESERVED_FLAGS = 0xfe;
/** Largest stream id (u32). */
export const MAX_STREAM_ID = 0xffff_ffff;

/** Message types of protocol version 2. */
export const MessageType = {
  HELLO: 0x01,
  PING: 0x02,
  PONG: 0x03,
  SHUTDOWN: 0x04,
  ERROR: 0x05,
  RESET: 0x06,
  EXEC: 0x10,
  STAGE_DATA: 0x11,
  STDIN: 0x12,
  STDOUT: 0x13,
  STDERR: 0x14,
  WINDOW: 0x15,
  RESIZE: 0x16,
  SIGNAL: 0x17,
  STARTED: 0x18,
  EXIT: 0x19,
  WORKLOAD_START: 0x1a,
  WORKLOAD_QUERY: 0x1b,
  WORKLOAD_SIGNAL: 0x1c,
  WORKLOAD_LOGS: 0x1d,
  WORKLOAD_STATUS: 0x1e,
  FREEZE: 0x1f,
  WRITE_FILE: 0x20,
  READ_FILE: 0x21,
  FILE_DATA: 0x22,
  FILE_INFO: 0x23,
  OK: 0x24,
  FS: 0x25,
  STAT: 0x26,
  DIRENTS: 0x27,
  WATCH: 0x28,
  WATCH_EVENT: 0x29,
  TCP_CONNECT: 0x30,
  TCP_CONNECTED: 0x31,
  TCP_DATA: 0x32,
  // The mounts channel (the `sm.mounts` port; docs/protocol.md, "Mounts channel").
  MOUNT: 0x40,
  MOUNTED: 0x41,
  MOUNT_DATA: 0x42,
  UNMOUNT: 0x43,
} as const;

export type MessageTypeName = keyof typeof MessageType;
export type MessageTypeCode = (typeof MessageType)[MessageTypeName];

const TYPE_NAMES = new Map<number, MessageTypeName>(
  (Object.entries(MessageType) as [MessageTypeName, number][]).map(([name, code]) => [code, name]),
);

/** The name of a known message type, or `undefined`. */
export function messageTypeName(type: number): MessageTypeName | undefined {
  return TYPE_NAMES.get(type);
}

/** `"EXEC"` for a known type, `"0x3f"` otherwise; for messages. */
export function describeType(type: number): string {
  return TYPE_NAMES.get(type) ?? `0x${type.toString(16).padStart(2, "0")}`;
}

/** Message types whose payload is raw bytes rather than fields. */
export const DATA_TYPES: ReadonlySet<number> = new Set([
  MessageType.PING,
  MessageType.PONG,
  MessageType.STAGE_DATA,
  MessageType.STDIN,
  MessageType.STDOUT,
  MessageType.STDERR,
  MessageType.WINDOW,
  MessageType.FILE_DATA,
  MessageType.TCP_DATA,
  MessageType.MOUNT_DATA,
]);

/** Message types that carry an empty payload. */
export const EMPTY_TYPES: ReadonlySet<number> = new Set([
  MessageType.SHUTDOWN,
  MessageType.RESET,
  MessageType.UNMOUNT,
]);

/** One decoded frame. `payload` is its own memory, never a view of an input chunk; see {@link FrameDecoder}. */
export interface Frame {
  readonly stream: number;
  readonly type: number;
  readonly flags: number;
  readonly payload: Uint8Array;
}

function checkHeaderFields(stream: number, type: number, flags: number, length: number): void {
  if (!Number.isInteger(stream) || stream < 0 || stream > MAX_STREAM_ID) {
    throw new RangeError(`frame stream id ${stream} is not a u32`);
  }
  if (!TYPE_NAMES.has(type)) throw new RangeError(`unknown frame type ${describeType(type)}`);
  if (!Number.isInteger(flags) || flags < 0 || (flags & RESERVED_FLAGS) !== 0) {
    throw new RangeError(`frame flags 0x${flags.toString(16)} use reserved bits`);
  }
  if (length > MAX_PAYLOAD) throw new RangeError(`frame payload of ${length} bytes exceeds ${MAX_PAYLOAD}`);
}

/** Encodes only the 10-byte header of a frame whose payload is written separately (zero copy). */
export function encodeFrameHeader(stream: number, type: number, flags: number, length: number): Uint8Array {
  checkHeaderFields(stream, type, flags, length);
  const header = new Uint8Array(HEADER_BYTES);
  const view = new DataView(header.buffer);
  view.setUint32(0, length);
  view.setUint32(4, stream);
  header[8] = type;
  header[9] = flags;
  return header;
}

/** Encodes one frame (header and payload) into a new buffer. Throws `RangeError` on bad input. */
export function encodeFrame(frame: {
  stream: number;
  type: number;
  flags?: number;
  payload?: Uint8Array;
}): Uint8Array {
  const payload = frame.payload ?? new Uint8Array(0);
  const header = encodeFrameHeader(frame.stream, frame.type, frame.flags ?? 0, payload.length);
  const out = new Uint8Array(HEADER_BYTES + payload.length);
  out.set(header, 0);
  out.set(payload, HEADER_BYTES);
  return out;
}

/**
 * Incremental frame decoder. Push chunks as they arrive; each call yields the frames completed by
 * that chunk. Nothing of a chunk is kept once `push` returns — payloads are copied out — so the
 * caller may reuse its read buffer (the agent channel does), and whoever keeps a payload keeps
 * exactly its size, never a whole read buffer for a 1-byte frame.
 *
 * Bounded: it never allocates more than one {@link MAX_PAYLOAD} buffer, and a header whose length
 * exceeds `MAX_PAYLOAD`, whose reserved flag bits are set, or whose type is unknown throws a
 * `VmError` with code `AGENT_PROTOCOL`. After an error every further `push` throws it again.
 */
export class FrameDecoder {
  readonly #maxPayload: number;
  readonly #header = new Uint8Array(HEADER_BYTES);
  #headerFill = 0;
  #stream = 0;
  #type = 0;
  #flags = 0;
  #payload: Uint8Array | null = null;
  #payloadFill = 0;
  #error: Error | null = null;

  constructor(opts: { maxPayload?: number } = {}) {
    this.#maxPayload = opts.maxPayload ?? MAX_PAYLOAD;
  }

  /** Bytes of an incomplete frame held by the decoder. */
  get bufferedBytes(): number {
    return this.#headerFill + this.#payloadFill;
  }

  /** True when no partial frame is pending (a clean place for the byte stream to end). */
  get idle(): boolean {
    return this.#headerFill === 0 && this.#payload === null;
  }

  /** Feeds `chunk`, yielding every frame it completes. */
  *push(chunk: Uint8Array): Generator<Frame, void, undefined> {
    if (this.#error) throw this.#error;
    let offset = 0;
    const end = chunk.length;
    while (offset < end) {
      if (this.#payload === null) {
        let header: Uint8Array;
        let headerOffset: number;
        if (this.#headerFill === 0 && end - offset >= HEADER_BYTES) {
          header = chunk;
          headerOffset = offset;
          offset += HEADER_BYTES;
        } else {
          const take = Math.min(HEADER_BYTES - this.#headerFill, end - offset);
          this.#header.set(chunk.subarray(offset, offset + take), this.#headerFill);
          this.#headerFill += take;
          offset += take;
          if (this.#headerFill < HEADER_BYTES) return;
          this.#headerFill = 0;
          header = this.#header;
          headerOffset = 0;
        }
        const length = readU32(header, headerOffset);
        const stream = readU32(header, headerOffset + 4);
        const type = header[headerOffset + 8]!;
        const flags = header[headerOffset + 9]!;
        this.#check(length, stream, type, flags);
        if (end - offset >= length) {
          const payload = copyOut(chunk, offset, length);
          offset += length;
          yield { stream, type, flags, payload };
          continue;
        }
        this.#stream = stream;
        this.#type = type;
        this.#flags = flags;
        this.#payload = new Uint8Array(Buffer.allocUnsafeSlow(length).buffer, 0, length); // not zero-filled
        this.#payloadFill = 0;
      }
      const payload = this.#payload;
      const take = Math.min(payload.length - this.#payloadFill, end - offset);
      payload.set(chunk.subarray(offset, offset + take), this.#payloadFill);
      this.#payloadFill += take;
      offset += take;
      if (this.#payloadFill === payload.length) {
        this.#payload = null;
        this.#payloadFill = 0;
        yield { stream: this.#stream, type: this.#type, flags: this.#flags, payload };
      }
    }
  }

  /** Feeds `chunk` and returns the completed frames as an array. */
  pushAll(chunk: Uint8Array): Frame[] {
    return [...this.push(chunk)];
  }

  /** Declares the end of input; throws `AGENT_PROTOCOL` if a frame was cut off. */
  end(): void {
    if (this.#error) throw this.#error;
    if (!this.idle) this.#fail(`channel ended inside a frame (${this.bufferedBytes} bytes pending)`);
  }

  #check(length: number, stream: number, type: number, flags: number): void {
    if (length > this.#maxPayload) {
      this.#fail(`frame of ${length} bytes on stream ${stream} exceeds the ${this.#maxPayload}-byte limit`);
    }
    if ((flags & RESERVED_FLAGS) !== 0) {
      this.#fail(
        `frame ${describeType(type)} on stream ${stream} sets reserved flag bits (0x${hex2(flags)})`,
      );
    }
    if (!TYPE_NAMES.has(type)) this.#fail(`frame of unknown type 0x${hex2(type)} on stream ${stream}`);
  }

  #fail(message: string): never {
    this.#error = protocolError(message);
    this.#headerFill = 0;
    this.#payload = null;
    this.#payloadFill = 0;
    throw this.#error;
  }
}

const EMPTY = new Uint8Array(0);

/** A copy of `chunk[offset, offset + length)`. */
function copyOut(chunk: Uint8Array, offset: number, length: number): Uint8Array {
  if (length === 0) return EMPTY;
  const copy = new Uint8Array(length);
  copy.set(chunk.subarray(offset, offset + length));
  return copy;
}

function readU32(bytes: Uint8Array, offset: number): number {
  return (
    ((bytes[offset]! << 24) | (bytes[offset + 1]! << 16) | (bytes[offset + 2]! << 8) | bytes[offset + 3]!) >>>
    0
  );
}

function hex2(n: number): string {
  return n.toString(16).padStart(2, "0");
}
