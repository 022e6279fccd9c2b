/**
 * Fields of control payloads (docs/protocol.md, "Fields"): a sequence of
 * `[u8 tag][u32 length][value]`, big-endian. {@link FieldWriter} encodes in canonical order
 * (ascending tags, repeated fields in list order); {@link FieldReader} accepts any order, ignores
 * unknown tags, checks kinds and sizes, and rejects duplicates of non-repeated fields.
 *
 * Decoding errors are `VmError` `AGENT_PROTOCOL` (the peer sent bad bytes); encoding errors are
 * `SupermachineError` `INVALID_ARGUMENT` (the caller passed a value the protocol cannot carry).
 */

import { SupermachineError } from "../errors.ts";
import { MAX_PAYLOAD } from "./frame-codec.ts";
import { protocolError } from "./protocol-error.ts";

/** At most this many fields in one field sequence (a payload, or one nested value). */
export const MAX_FIELDS = 8192;
/** A payload is depth 1, a nested value inside it depth 2; deeper nesting is an error. */
export const MAX_NESTING_DEPTH = 2;
/** Bytes of a field header: u8 tag + u32 length. */
export const FIELD_HEADER_BYTES = 5;

export type FieldKind = "u8" | "u16" | "u32" | "u64" | "i32" | "string" | "bytes" | "nested";

export const FIELD_KINDS: readonly FieldKind[] = [
  "u8",
  "u16",
  "u32",
  "u64",
  "i32",
  "string",
  "bytes",
  "nested",
];

const FIXED_SIZE: Partial<Record<FieldKind, number>> = { u8: 1, u16: 2, u32: 4, u64: 8, i32: 4 };

/** One field as it appears on the wire: a tag and the raw bytes of its value. */
export interface RawField {
  readonly tag: number;
  readonly value: Uint8Array;
}

/** A field with a known kind and a decoded value (used by generic tooling such as fixtures). */
export interface TypedField {
  readonly tag: number;
  readonly kind: FieldKind;
  readonly value: number | bigint | string | Uint8Array | readonly TypedField[];
}

const utf8Decoder = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
const utf8Encoder = new TextEncoder();

function invalid(message: string): SupermachineError {
  return new SupermachineError("INVALID_ARGUMENT", message);
}

/**
 * Walks a payload's fields, checking the structure only (lengths, count): per field in wire order
 * its tag, the offset of its value and the value's length, flat in one array.
 */
function indexFields(payload: Uint8Array, what: string): number[] {
  const index: number[] = [];
  const end = payload.length;
  let offset = 0;
  while (offset < end) {
    if (end - offset < FIELD_HEADER_BYTES) {
      throw protocolError(`${what}: truncated field header at offset ${offset}`);
    }
    const tag = payload[offset]!;
    const length = readU32(payload, offset + 1);
    offset += FIELD_HEADER_BYTES;
    if (length > end - offset) {
      throw protocolError(`${what}: field ${tag} claims ${length} bytes but only ${end - offset} remain`);
    }
    if (index.length === MAX_FIELDS * 3) throw protocolError(`${what}: more than ${MAX_FIELDS} fields`);
    index.push(tag, offset, length);
    offset += length;
  }
  return index;
}

/** A nested sequence inside one at `depth`, or a protocol error when it would be too deep. */
function checkNesting(what: string, depth: number): void {
  if (depth + 1 > MAX_NESTING_DEPTH) {
    throw protocolError(`${what}: nested fields deeper than ${MAX_NESTING_DEPTH} levels`);
  }
}

/**
 * Splits a payload into raw fields, checking the structure only (lengths, count). Values are views
 * of `payload`.
 */
export function decodeFieldList(payload: Uint8Array, what = "payload"): RawField[] {
  const index = indexFields(payload, what);
  const fields: RawField[] = [];
  for (let i = 0; i < index.length; i += 3) {
    const offset = index[i + 1]!;
    fields.push({ tag: index[i]!, value: payload.subarray(offset, offset + index[i + 2]!) });
  }
  return fields;
}

/** Joins raw fields into a payload, in the given order. */
export function encodeFieldList(fields: readonly RawField[]): Uint8Array {
  if (fields.length > MAX_FIELDS) throw invalid(`more than ${MAX_FIELDS} fields in one message`);
  let size = 0;
  for (const f of fields) size += FIELD_HEADER_BYTES + f.value.length;
  const out = new Uint8Array(size);
  const view = new DataView(out.buffer);
  let offset = 0;
  for (const f of fields) {
    if (!Number.isInteger(f.tag) || f.tag < 0 || f.tag > 255) throw invalid(`field tag ${f.tag} is not a u8`);
    out[offset] = f.tag;
    view.setUint32(offset + 1, f.value.length);
    out.set(f.value, offset + FIELD_HEADER_BYTES);
    offset += FIELD_HEADER_BYTES + f.value.length;
  }
  return out;
}

/** Encodes one value of `kind` (no field header). */
export function encodeValue(kind: FieldKind, value: TypedField["value"]): Uint8Array {
  switch (kind) {
    case "u8":
    case "u16":
    case "u32": {
      const n = checkUnsigned(kind, value, kind === "u8" ? 0xff : kind === "u16" ? 0xffff : 0xffff_ffff);
      const size = FIXED_SIZE[kind]!;
      const out = new Uint8Array(size);
      const view = new DataView(out.buffer);
      if (size === 1) out[0] = n;
      else if (size === 2) view.setUint16(0, n);
      else view.setUint32(0, n);
      return out;
    }
    case "i32": {
      if (
        typeof value !== "number" ||
        !Number.isInteger(value) ||
        value < -0x8000_0000 ||
        value > 0x7fff_ffff
      ) {
        throw invalid(`${String(value)} is not an i32`);
      }
      const out = new Uint8Array(4);
      new DataView(out.buffer).setInt32(0, value);
      return out;
    }
    case "u64": {
      const big = typeof value === "number" && Number.isSafeInteger(value) ? BigInt(value) : value;
      if (typeof big !== "bigint" || big < 0n || big > 0xffff_ffff_ffff_ffffn) {
        throw invalid(`${String(value)} is not a u64`);
      }
      const out = new Uint8Array(8);
      new DataView(out.buffer).setBigUint64(0, big);
      return out;
    }
    case "string": {
      if (typeof value !== "string") throw invalid(`${String(value)} is not a string`);
      if (value.includes("\0")) throw invalid(`string ${JSON.stringify(value)} contains a NUL character`);
      if (!value.isWellFormed()) throw invalid(`string ${JSON.stringify(value)} is not well-formed Unicode`);
      return utf8Encoder.encode(value);
    }
    case "bytes":
      if (!(value instanceof Uint8Array)) throw invalid("bytes value is not a Uint8Array");
      return value;
    case "nested":
      if (!Array.isArray(value)) throw invalid("nested value is not a list of fields");
      return encodeTypedFields(value as readonly TypedField[]);
    default:
      throw invalid(`unknown field kind ${String(kind)}`);
  }
}

/** Encodes typed fields in the order given (generic tooling; messages use {@link FieldWriter}). */
export function encodeTypedFields(fields: readonly TypedField[]): Uint8Array {
  return encodeFieldList(fields.map((f) => ({ tag: f.tag, value: encodeValue(f.kind, f.value) })));
}

/** Decodes one raw value as `kind`; `depth` is the depth of the sequence holding it. */
export function decodeValue(
  kind: FieldKind,
  raw: Uint8Array,
  what = "field",
  depth = 1,
): number | bigint | string | Uint8Array | RawField[] {
  const fixed = FIXED_SIZE[kind];
  if (fixed !== undefined && raw.length !== fixed) {
    throw protocolError(`${what}: a ${kind} must be ${fixed} bytes, got ${raw.length}`);
  }
  const view = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
  switch (kind) {
    case "u8":
      return raw[0]!;
    case "u16":
      return view.getUint16(0);
    case "u32":
      return view.getUint32(0);
    case "i32":
      return view.getInt32(0);
    case "u64":
      return view.getBigUint64(0);
    case "string": {
      let text: string;
      try {
        text = utf8Decoder.decode(raw);
      } catch (error) {
        throw protocolError(`${what}: string is not valid UTF-8`, { cause: error });
      }
      if (raw.includes(0)) throw protocolError(`${what}: string contains a NUL byte`);
      return text;
    }
    case "bytes":
      return raw;
    case "nested":
      checkNesting(what, depth);
      return decodeFieldList(raw, what);
    default:
      throw protocolError(`${what}: unknown field kind ${String(kind)}`);
  }
}

/** `value` as a `kind` integer of at most `max`, or `INVALID_ARGUMENT`. */
function checkUnsigned(kind: FieldKind, value: unknown, max: number): number {
  if (typeof value !== "number" || !Number.isInteger(value) || value < 0 || value > max) {
    throw invalid(`${String(value)} is not a ${kind}`);
  }
  return value;
}

/**
 * Builds a field sequence in canonical order. Call the setters in ascending tag order (repeated
 * fields: once per entry, in list order); `undefined` values are skipped. Values are checked as
 * they are set and written into one buffer by {@link finish} (ASCII strings and integers without
 * an intermediate copy).
 */
export class FieldWriter {
  readonly #tags: number[] = [];
  /** An ASCII string, an integer (its width in {@link #lengths}), or bytes. */
  readonly #values: (string | number | Uint8Array)[] = [];
  readonly #lengths: number[] = [];
  #lastTag = -1;
  #size = 0;

  #add(tag: number, value: string | number | Uint8Array, length: number): this {
    if (tag < this.#lastTag)
      throw new Error(`fields written out of order: tag ${tag} after ${this.#lastTag}`);
    this.#lastTag = tag;
    if (this.#tags.length === MAX_FIELDS) throw invalid(`more than ${MAX_FIELDS} fields in one message`);
    this.#size += FIELD_HEADER_BYTES + length;
    if (this.#size > MAX_PAYLOAD) throw invalid(`message larger than ${MAX_PAYLOAD} bytes`);
    this.#tags.push(tag);
    this.#values.push(value);
    this.#lengths.push(length);
    return this;
  }

  u8(tag: number, value: number | undefined): this {
    return value === undefined ? this : this.#add(tag, checkUnsigned("u8", value, 0xff), 1);
  }
  u16(tag: number, value: number | undefined): this {
    return value === undefined ? this : this.#add(tag, checkUnsigned("u16", value, 0xffff), 2);
  }
  u32(tag: number, value: number | undefined): this {
    return value === undefined ? this : this.#add(tag, checkUnsigned("u32", value, 0xffff_ffff), 4);
  }
  i32(tag: number, value: number | undefined): this {
    return value === undefined ? this : this.#add(tag, encodeValue("i32", value), 4);
  }
  u64(tag: number, value: bigint | number | undefined): this {
    return value === undefined ? this : this.#add(tag, encodeValue("u64", value), 8);
  }
  bool(tag: number, value: boolean | undefined): this {
    return value === undefined ? this : this.#add(tag, value ? 1 : 0, 1);
  }
  string(tag: number, value: string | undefined): this {
    if (value === undefined) return this;
    if (typeof value === "string") {
      let ascii = true;
      for (let i = 0; i < value.length; i++) {
        const c = value.charCodeAt(i);
        if (c === 0 || c > 0x7f) {
          ascii = false;
          break;
        }
      }
      if (ascii) return this.#add(tag, value, value.length);
    }
    const bytes = encodeValue("string", value);
    return this.#add(tag, bytes, bytes.length);
  }
  strings(tag: number, values: readonly string[] | undefined): this {
    for (const v of values ?? []) this.string(tag, v);
    return this;
  }
  bytes(tag: number, value: Uint8Array | undefined): this {
    return value === undefined ? this : this.#add(tag, value, value.length);
  }
  nested(tag: number, value: FieldWriter): this {
    const bytes = value.finish();
    return this.#add(tag, bytes, bytes.length);
  }

  /** The encoded payload. */
  finish(): Uint8Array {
    const out = new Uint8Array(this.#size);
    const tags = this.#tags;
    const values = this.#values;
    const lengths = this.#lengths;
    let offset = 0;
    for (let i = 0; i < tags.length; i++) {
      const value = values[i]!;
      const length = lengths[i]!;
      out[offset] = tags[i]!;
      out[offset + 1] = length >>> 24;
      out[offset + 2] = length >>> 16;
      out[offset + 3] = length >>> 8;
      out[offset + 4] = length;
      offset += FIELD_HEADER_BYTES;
      if (typeof value === "string") {
        for (let j = 0; j < length; j++) out[offset + j] = value.charCodeAt(j);
      } else if (typeof value === "number") {
        for (let j = length - 1, rest = value; j >= 0; j--, rest >>>= 8) out[offset + j] = rest;
      } else {
        out.set(value, offset);
      }
      offset += length;
    }
    return out;
  }
}

/**
 * Reads a field sequence by tag. Getters return `undefined` for absent optional fields; `need()`
 * turns that into an error naming the field. Values are read in place (a field sequence holds a
 * handful of fields: a lookup is a scan).
 */
export class FieldReader {
  readonly what: string;
  readonly depth: number;
  readonly #payload: Uint8Array;
  /** Per field in wire order: its tag, the offset of its value and the value's length. */
  readonly #index: number[];

  private constructor(payload: Uint8Array, what: string, depth: number) {
    this.what = what;
    this.depth = depth;
    this.#payload = payload;
    this.#index = indexFields(payload, what);
  }

  /** Parses `payload` as a field sequence. */
  static decode(payload: Uint8Array, what: string, depth = 1): FieldReader {
    return new FieldReader(payload, what, depth);
  }

  /** Tags present, in ascending order. */
  get tags(): number[] {
    const tags = new Set<number>();
    for (let i = 0; i < this.#index.length; i += 3) tags.add(this.#index[i]!);
    return [...tags].sort((a, b) => a - b);
  }

  /** Where the value of the non-repeated field `tag` is in the index, or -1 if absent. */
  #single(tag: number, name: string): number {
    const index = this.#index;
    let found = -1;
    let count = 0;
    for (let i = 0; i < index.length; i += 3) {
      if (index[i] !== tag) continue;
      if (found === -1) found = i;
      count++;
    }
    if (count > 1) throw protocolError(`${this.what}: field ${name} (${tag}) appears ${count} times`);
    return found;
  }

  /** Offset of the fixed-size `kind` value of field `tag`, or -1 if absent. */
  #fixed(kind: FieldKind, size: number, tag: number, name: string): number {
    const at = this.#single(tag, name);
    if (at === -1) return -1;
    const length = this.#index[at + 2]!;
    if (length !== size) {
      throw protocolError(`${this.what}.${name}: a ${kind} must be ${size} bytes, got ${length}`);
    }
    return this.#index[at + 1]!;
  }

  #value(at: number): Uint8Array {
    const offset = this.#index[at + 1]!;
    return this.#payload.subarray(offset, offset + this.#index[at + 2]!);
  }

  /** The values of the repeated field `tag`, in order. */
  #all(tag: number): Uint8Array[] {
    const values: Uint8Array[] = [];
    for (let i = 0; i < this.#index.length; i += 3) if (this.#index[i] === tag) values.push(this.#value(i));
    return values;
  }

  u8(tag: number, name: string): number | undefined {
    const at = this.#fixed("u8", 1, tag, name);
    return at === -1 ? undefined : this.#payload[at]!;
  }
  u16(tag: number, name: string): number | undefined {
    const at = this.#fixed("u16", 2, tag, name);
    return at === -1 ? undefined : (this.#payload[at]! << 8) | this.#payload[at + 1]!;
  }
  u32(tag: number, name: string): number | undefined {
    const at = this.#fixed("u32", 4, tag, name);
    return at === -1 ? undefined : readU32(this.#payload, at);
  }
  i32(tag: number, name: string): number | undefined {
    const at = this.#fixed("i32", 4, tag, name);
    return at === -1 ? undefined : readU32(this.#payload, at) | 0;
  }
  u64(tag: number, name: string): bigint | undefined {
    const at = this.#fixed("u64", 8, tag, name);
    if (at === -1) return undefined;
    return (BigInt(readU32(this.#payload, at)) << 32n) | BigInt(readU32(this.#payload, at + 4));
  }
  /** A u64 that must fit in a JavaScript number (sizes, durations). */
  u64Number(tag: number, name: string): number | undefined {
    const at = this.#fixed("u64", 8, tag, name);
    if (at === -1) return undefined;
    const high = readU32(this.#payload, at);
    if (high > 0x1f_ffff) {
      const v = (BigInt(high) << 32n) | BigInt(readU32(this.#payload, at + 4));
      throw protocolError(`${this.what}.${name}: ${v} is too large`);
    }
    return high * 0x1_0000_0000 + readU32(this.#payload, at + 4);
  }
  /** A u8 used as a flag: 0 or 1. */
  bool(tag: number, name: string): boolean | undefined {
    const v = this.u8(tag, name);
    if (v === undefined) return undefined;
    if (v > 1) throw protocolError(`${this.what}.${name}: flag must be 0 or 1, got ${v}`);
    return v === 1;
  }
  string(tag: number, name: string, maxBytes?: number): string | undefined {
    const at = this.#single(tag, name);
    if (at === -1) return undefined;
    const raw = this.#value(at);
    if (maxBytes !== undefined && raw.length > maxBytes) {
      throw protocolError(`${this.what}.${name}: ${raw.length} bytes, limit ${maxBytes}`);
    }
    return decodeValue("string", raw, `${this.what}.${name}`, this.depth) as string;
  }
  bytes(tag: number, name: string): Uint8Array | undefined {
    const at = this.#single(tag, name);
    return at === -1 ? undefined : this.#value(at);
  }
  /** A repeated string field, in order (empty if absent). */
  strings(tag: number, name: string): string[] {
    return this.#all(tag).map(
      (raw) => decodeValue("string", raw, `${this.what}.${name}`, this.depth) as string,
    );
  }
  /** A repeated nested field, in order (empty if absent). */
  nestedList(tag: number, name: string): FieldReader[] {
    const what = `${this.what}.${name}`;
    return this.#all(tag).map((raw) => {
      checkNesting(what, this.depth);
      return new FieldReader(raw, what, this.depth + 1);
    });
  }

  /** Throws `AGENT_PROTOCOL` naming the missing required field. */
  need<T>(value: T | undefined, name: string): T {
    if (value === undefined) throw protocolError(`${this.what}: required field ${name} is missing`);
    return value;
  }
}

function readU32(bytes: Uint8Array, offset: number): number {
  return (
    ((bytes[offset]! << 24) | (bytes[offset + 1]! << 16) | (bytes[offset + 2]! << 8) | bytes[offset + 3]!) >>>
    0
  );
}
