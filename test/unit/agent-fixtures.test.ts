import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, test } from "node:test";
import {
  decodeFieldList,
  decodeValue,
  encodeTypedFields,
  type FieldKind,
  type RawField,
  type TypedField,
} from "../../src/agent/fields.ts";
import { encodeFrame, FrameDecoder, MessageType, messageTypeName } from "../../src/agent/frame-codec.ts";
import * as m from "../../src/agent/messages.ts";
import * as mounts from "../../src/agent/mount-messages.ts";
import { VmError } from "../../src/errors.ts";

const DIR = join(import.meta.dirname, "..", "fixtures", "protocol");

interface JsonField {
  tag: number;
  kind: FieldKind;
  value: unknown;
}
interface Fixture {
  from: "host" | "guest";
  stream: number;
  type: string;
  flags: number;
  fields?: JsonField[];
  data?: string;
}

export function readHex(path: string): Uint8Array {
  const text = readFileSync(path, "utf8")
    .split("\n")
    .map((line) => line.replace(/#.*$/, ""))
    .join("")
    .replace(/\s+/g, "");
  assert.match(text, /^([0-9a-f]{2})*$/i, `${path}: not hex`);
  return new Uint8Array(Buffer.from(text, "hex"));
}

function toTyped(f: JsonField): TypedField {
  switch (f.kind) {
    case "u64":
      return { tag: f.tag, kind: f.kind, value: BigInt(f.value as string) };
    case "bytes":
      return { tag: f.tag, kind: f.kind, value: new Uint8Array(Buffer.from(f.value as string, "hex")) };
    case "nested":
      return { tag: f.tag, kind: f.kind, value: (f.value as JsonField[]).map(toTyped) };
    default:
      return { tag: f.tag, kind: f.kind, value: f.value as number | string };
  }
}

function checkFields(raw: RawField[], expected: JsonField[], where: string, depth = 1): void {
  assert.deepEqual(
    raw.map((r) => r.tag),
    expected.map((e) => e.tag),
    `${where}: tags`,
  );
  raw.forEach((r, i) => {
    const e = expected[i]!;
    const value = decodeValue(e.kind, r.value, where, depth);
    if (e.kind === "nested")
      checkFields(value as RawField[], e.value as JsonField[], `${where}.${e.tag}`, depth + 1);
    else if (e.kind === "u64") assert.equal(value, BigInt(e.value as string), `${where}.${e.tag}`);
    else if (e.kind === "bytes") assert.equal(Buffer.from(value as Uint8Array).toString("hex"), e.value);
    else assert.equal(value, e.value, `${where}.${e.tag}`);
  });
}

/** Typed decoder and encoder of each message, per sending side. */
const TYPED: Record<string, { decode: (p: Uint8Array) => unknown; encode: (v: never) => Uint8Array }> = {
  "host:HELLO": { decode: m.decodeHostHello, encode: m.encodeHostHello },
  "guest:HELLO": { decode: m.decodeGuestHello, encode: m.encodeGuestHello },
  "guest:ERROR": { decode: m.decodeError, encode: m.encodeError },
  "host:EXEC": { decode: m.decodeExec, encode: m.encodeExec },
  "host:WINDOW": { decode: m.decodeWindow, encode: m.encodeWindow },
  "guest:WINDOW": { decode: m.decodeWindow, encode: m.encodeWindow },
  "host:RESIZE": { decode: m.decodeResize, encode: m.encodeResize },
  "host:SIGNAL": { decode: m.decodeSignal, encode: m.encodeSignal },
  "guest:STARTED": { decode: m.decodeStarted, encode: (v: { pid: number }) => m.encodeStarted(v.pid) },
  "guest:EXIT": { decode: m.decodeExit, encode: m.encodeExit },
  "host:WRITE_FILE": { decode: m.decodeWriteFile, encode: m.encodeWriteFile },
  "host:READ_FILE": { decode: m.decodeReadFile, encode: m.encodeReadFile },
  "guest:FILE_INFO": { decode: m.decodeFileInfo, encode: m.encodeFileInfo },
  "guest:OK": { decode: m.decodeOk, encode: m.encodeOk },
  "host:WORKLOAD_START": { decode: m.decodeWorkloadStart, encode: m.encodeWorkloadStart },
  "host:FREEZE": { decode: m.decodeFreeze, encode: m.encodeFreeze },
  "host:WORKLOAD_QUERY": { decode: m.decodeWorkloadQuery, encode: () => m.encodeWorkloadQuery() },
  "host:WORKLOAD_SIGNAL": { decode: m.decodeWorkloadSignal, encode: m.encodeWorkloadSignal },
  "host:WORKLOAD_LOGS": { decode: m.decodeWorkloadLogs, encode: m.encodeWorkloadLogs },
  "guest:WORKLOAD_STATUS": { decode: m.decodeWorkloadStatus, encode: m.encodeWorkloadStatus },
  "host:FS": { decode: m.decodeFs, encode: m.encodeFs },
  "guest:STAT": { decode: m.decodeStat, encode: m.encodeStat },
  "guest:DIRENTS": { decode: m.decodeDirents, encode: m.encodeDirents },
  "host:WATCH": { decode: m.decodeWatch, encode: m.encodeWatch },
  "guest:WATCH_EVENT": { decode: m.decodeWatchEvent, encode: m.encodeWatchEvent },
  "host:TCP_CONNECT": { decode: m.decodeTcpConnect, encode: m.encodeTcpConnect },
  "guest:TCP_CONNECTED": { decode: m.decodeTcpConnected, encode: () => m.encodeTcpConnected() },
  "host:PING": { decode: (p) => m.checkPingPayload(p, "PING"), encode: (v: Uint8Array) => v },
  "guest:PONG": { decode: (p) => m.checkPingPayload(p, "PONG"), encode: (v: Uint8Array) => v },
  // The mounts channel.
  "host:MOUNT": { decode: mounts.decodeMount, encode: mounts.encodeMount },
  "guest:MOUNTED": { decode: mounts.decodeMounted, encode: () => mounts.encodeMounted() },
};

/** Tags a fixture carries that its message does not define (decoders skip them). */
const UNKNOWN_TAGS: Record<string, number[]> = { "started-unknown-tag": [200] };

const names = readdirSync(DIR)
  .filter((n) => n.endsWith(".json"))
  .map((n) => n.slice(0, -5))
  .sort();

describe("golden protocol fixtures", () => {
  test("cover every message type, FIN frames, nested fields and negative i32", () => {
    const fixtures = names.map((n) => JSON.parse(readFileSync(join(DIR, `${n}.json`), "utf8")) as Fixture);
    const types = new Set(fixtures.map((f) => f.type));
    for (const name of Object.keys(MessageType)) assert.ok(types.has(name), `no fixture for ${name}`);
    assert.ok(
      fixtures.some((f) => f.flags === 1 && f.data === ""),
      "an empty FIN frame",
    );
    assert.ok(
      fixtures.some((f) => f.fields?.some((x) => x.kind === "nested")),
      "nested fields",
    );
    assert.ok(
      fixtures.some((f) => f.fields?.some((x) => x.kind === "i32" && (x.value as number) < 0)),
      "i32 < 0",
    );
    assert.ok(names.length >= 40);
  });

  for (const name of names) {
    test(name, () => {
      const fx = JSON.parse(readFileSync(join(DIR, `${name}.json`), "utf8")) as Fixture;
      const bytes = readHex(join(DIR, `${name}.hex`));

      // Decode in one chunk and byte by byte.
      const frames = new FrameDecoder().pushAll(bytes);
      assert.equal(frames.length, 1);
      const decoder = new FrameDecoder();
      const slow = [...bytes].flatMap((b) => decoder.pushAll(Uint8Array.of(b)));
      assert.equal(slow.length, 1);
      assert.deepEqual(slow[0], frames[0]);
      const frame = frames[0]!;
      assert.equal(messageTypeName(frame.type), fx.type);
      assert.equal(frame.stream, fx.stream);
      assert.equal(frame.flags, fx.flags);

      // Compare with the description, then re-encode the description.
      let payload: Uint8Array;
      if (fx.fields) {
        checkFields(decodeFieldList(frame.payload), fx.fields, name);
        payload = encodeTypedFields(fx.fields.map(toTyped));
      } else {
        assert.equal(Buffer.from(frame.payload).toString("hex"), fx.data);
        payload = new Uint8Array(Buffer.from(fx.data ?? "", "hex"));
      }
      assert.deepEqual(encodeFrame({ stream: fx.stream, type: frame.type, flags: fx.flags, payload }), bytes);

      // The typed parser accepts it and its builder reproduces the canonical payload.
      const typed = TYPED[`${fx.from}:${fx.type}`];
      if (typed) {
        const decoded = typed.decode(frame.payload);
        const unknown = UNKNOWN_TAGS[name] ?? [];
        const known = fx.fields
          ? encodeTypedFields(fx.fields.filter((f) => !unknown.includes(f.tag)).map(toTyped))
          : frame.payload;
        assert.deepEqual(typed.encode(decoded as never), known);
      }
    });
  }
});

describe("invalid protocol fixtures", () => {
  const invalidDir = join(DIR, "invalid");
  const invalid = readdirSync(invalidDir)
    .filter((n) => n.endsWith(".json"))
    .map((n) => n.slice(0, -5))
    .sort();

  for (const name of invalid) {
    test(name, () => {
      const fx = JSON.parse(readFileSync(join(invalidDir, `${name}.json`), "utf8")) as Fixture & {
        reject: "frame" | "payload";
      };
      const bytes = readHex(join(invalidDir, `${name}.hex`));
      const isProtocol = (e: unknown) => e instanceof VmError && e.code === "AGENT_PROTOCOL";
      if (fx.reject === "frame") {
        assert.throws(() => new FrameDecoder().pushAll(bytes), isProtocol);
        return;
      }
      const frames = new FrameDecoder().pushAll(bytes);
      assert.equal(frames.length, 1);
      const typed = TYPED[`${fx.from}:${fx.type}`];
      assert.ok(typed, `no parser for ${fx.from}:${fx.type}`);
      assert.throws(() => typed.decode(frames[0]!.payload), isProtocol);
    });
  }
});
