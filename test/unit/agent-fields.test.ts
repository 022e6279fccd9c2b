import assert from "node:assert/strict";
import { describe, test } from "node:test";
import {
  decodeFieldList,
  decodeValue,
  encodeFieldList,
  encodeTypedFields,
  encodeValue,
  FieldReader,
  FieldWriter,
  MAX_FIELDS,
} from "../../src/agent/fields.ts";
import * as m from "../../src/agent/messages.ts";
import { signalName, signalNumber } from "../../src/agent/signals.ts";
import { SupermachineError, VmError } from "../../src/errors.ts";

const isProtocol = (e: unknown) => e instanceof VmError && e.code === "AGENT_PROTOCOL";
const isInvalid = (e: unknown) => SupermachineError.is(e) && e.code === "INVALID_ARGUMENT";

function field(tag: number, value: Uint8Array): Uint8Array {
  return encodeFieldList([{ tag, value }]);
}

describe("field values", () => {
  test("round-trip every kind at its limits", () => {
    const cases = [
      ["u8", 0],
      ["u8", 255],
      ["u16", 65_535],
      ["u32", 0xffff_ffff],
      ["i32", -2_147_483_648],
      ["i32", 2_147_483_647],
      ["i32", -1],
      ["u64", 0xffff_ffff_ffff_ffffn],
      ["u64", 0n],
      ["string", ""],
      ["string", "héllo ✓ 𝄞"],
    ] as const;
    for (const [kind, value] of cases) {
      assert.deepEqual(decodeValue(kind, encodeValue(kind, value)), value, `${kind} ${value}`);
    }
    assert.deepEqual([...encodeValue("i32", -2)], [0xff, 0xff, 0xff, 0xfe]);
  });

  test("refuse values out of range on encode", () => {
    for (const [kind, value] of [
      ["u8", 256],
      ["u8", -1],
      ["u16", 1.5],
      ["u32", 2 ** 32],
      ["i32", 2 ** 31],
      ["u64", -1n],
      ["u64", 2n ** 64n],
      ["string", "a\0b"],
      ["string", "\ud800"],
    ] as const) {
      assert.throws(() => encodeValue(kind, value), isInvalid, `${kind} ${String(value)}`);
    }
  });

  test("refuse a fixed-size kind with the wrong length, bad UTF-8 and NUL", () => {
    assert.throws(() => decodeValue("u32", Uint8Array.of(1, 2, 3)), isProtocol);
    assert.throws(() => decodeValue("u64", new Uint8Array(4)), isProtocol);
    assert.throws(() => decodeValue("u8", new Uint8Array(0)), isProtocol);
    assert.throws(() => decodeValue("string", Uint8Array.of(0xc3)), isProtocol);
    assert.throws(() => decodeValue("string", Uint8Array.of(0xed, 0xa0, 0x80)), isProtocol); // surrogate
    assert.throws(() => decodeValue("string", Uint8Array.of(0x61, 0)), isProtocol);
  });
});

describe("field sequences", () => {
  test("decoders accept any order, skip unknown tags and keep repeated order", () => {
    const payload = new Uint8Array(
      Buffer.concat([
        field(99, Uint8Array.of(1, 2, 3)),
        field(2, encodeValue("string", "B=2")),
        field(1, encodeValue("string", "echo")),
        field(2, encodeValue("string", "A=1")),
        field(1, encodeValue("string", "hi")),
      ]),
    );
    const exec = m.decodeExec(payload);
    assert.deepEqual(exec.argv, ["echo", "hi"]);
    assert.deepEqual(exec.env, ["B=2", "A=1"]);
  });

  test("reject truncated headers, overruns, duplicates and missing required fields", () => {
    assert.throws(() => decodeFieldList(Uint8Array.of(1, 0, 0, 0)), isProtocol);
    assert.throws(() => decodeFieldList(Uint8Array.of(1, 0, 0, 0, 2, 9)), isProtocol);
    const pid = field(1, encodeValue("u32", 5));
    assert.throws(() => m.decodeStarted(new Uint8Array(Buffer.concat([pid, pid]))), isProtocol);
    assert.throws(() => m.decodeStarted(new Uint8Array(0)), isProtocol);
    assert.deepEqual(m.decodeStarted(pid), { pid: 5 });
  });

  test(`allow ${MAX_FIELDS} fields per sequence, not one more`, () => {
    const many = (n: number) =>
      encodeFieldList(Array.from({ length: n }, () => ({ tag: 200, value: new Uint8Array(0) })));
    assert.equal(decodeFieldList(many(MAX_FIELDS)).length, MAX_FIELDS);
    const tooMany = new Uint8Array(Buffer.concat([many(MAX_FIELDS), field(200, new Uint8Array(0))]));
    assert.throws(() => decodeFieldList(tooMany), isProtocol);
    assert.throws(() => many(MAX_FIELDS + 1), isInvalid);
  });

  test("nesting stops at depth 2", () => {
    const inner = encodeTypedFields([{ tag: 1, kind: "string", value: "x" }]);
    const reader = FieldReader.decode(field(10, inner), "T");
    const [nested] = reader.nestedList(10, "chain");
    assert.deepEqual(nested!.strings(1, "argv"), ["x"]);
    assert.throws(() => nested!.nestedList(1, "deeper"), isProtocol);
  });

  test("FieldWriter writes canonical order and refuses to go backwards", () => {
    const w = new FieldWriter().u32(1, 1).u32(1, 2).string(3, "x");
    assert.throws(() => w.u8(2, 1));
    const raw = decodeFieldList(new FieldWriter().u8(1, 1).u8(2, undefined).u16(3, 7).finish());
    assert.deepEqual(
      raw.map((f) => f.tag),
      [1, 3],
    );
  });

  test("FieldWriter bounds a message to MAX_PAYLOAD", () => {
    const big = "x".repeat(600_000);
    assert.throws(() => m.encodeExec({ argv: ["sh", big, big], env: [] }), isInvalid);
  });

  test("u64 values beyond 2^53 are refused where a number is expected", () => {
    const payload = encodeTypedFields([{ tag: 1, kind: "u64", value: 2n ** 60n }]);
    assert.throws(() => m.decodeOk(payload), isProtocol);
  });
});

describe("messages", () => {
  test("EXIT needs exactly one of exitCode and signal", () => {
    const both = encodeTypedFields([
      { tag: 1, kind: "i32", value: 0 },
      { tag: 2, kind: "u32", value: 9 },
    ]);
    assert.throws(() => m.decodeExit(both), isProtocol);
    assert.throws(() => m.decodeExit(new Uint8Array(0)), isProtocol);
    const exit = m.decodeExit(encodeTypedFields([{ tag: 2, kind: "u32", value: 15 }]));
    assert.deepEqual(exit, {
      exitCode: undefined,
      signal: 15,
      timedOut: false,
      durationUs: 0,
      peakRssKiB: 0,
      step: 0,
    });
  });

  test("flags are 0 or 1", () => {
    const tty = encodeTypedFields([
      { tag: 1, kind: "string", value: "sh" },
      { tag: 5, kind: "u8", value: 2 },
    ]);
    assert.throws(() => m.decodeExec(tty), isProtocol);
  });

  test("HELLO entropy is 32–512 bytes; PING at most 64", () => {
    assert.throws(() => m.encodeHostHello({ version: 1, epoch: 1n, entropy: new Uint8Array(31) }), isInvalid);
    assert.throws(
      () => m.encodeHostHello({ version: 1, epoch: 1n, entropy: new Uint8Array(513) }),
      isInvalid,
    );
    assert.throws(() => m.checkPingPayload(new Uint8Array(65), "PONG"), isProtocol);
  });

  test("HELLO's machine id is 32 lowercase hex digits; its hostname what sethostname and /etc/hosts take", () => {
    const hello = (fields: { machineId?: string; hostname?: string }) =>
      m.encodeHostHello({ version: 2, epoch: 1n, ...fields });
    assert.deepEqual(
      m.decodeHostHello(hello({ machineId: "0123456789abcdef0123456789abcdef", hostname: "web-1.example" })),
      {
        version: 2,
        epoch: 1n,
        timeNs: undefined,
        entropy: undefined,
        machineId: "0123456789abcdef0123456789abcdef",
        hostname: "web-1.example",
      },
    );
    for (const machineId of ["", "0123456789ABCDEF0123456789ABCDEF", "0".repeat(31), "0".repeat(33)])
      assert.throws(() => hello({ machineId }), isInvalid, machineId);
    for (const hostname of ["", "-a", ".a", "a_b", "a b", "a\n127.0.0.1 evil", "a".repeat(65)])
      assert.throws(() => hello({ hostname }), isInvalid, hostname);
    assert.doesNotThrow(() => hello({ hostname: "a".repeat(64) }));
  });

  test("ERROR messages are bounded to 4096 bytes", () => {
    const long = encodeTypedFields([
      { tag: 1, kind: "u32", value: 5 },
      { tag: 3, kind: "string", value: "é".repeat(2049) },
    ]);
    assert.throws(() => m.decodeError(long), isProtocol);
    assert.throws(() => m.encodeError({ code: 5, message: "x".repeat(4097) }), isInvalid);
  });

  test("WINDOW is exactly 4 bytes", () => {
    assert.equal(m.decodeWindow(m.encodeWindow(0xffff_ffff)), 0xffff_ffff);
    assert.throws(() => m.decodeWindow(new Uint8Array(5)), isProtocol);
  });
});

describe("signals", () => {
  test("names and numbers follow Linux", () => {
    assert.equal(signalName(9), "SIGKILL");
    assert.equal(signalName(15), "SIGTERM");
    assert.equal(signalName(28), "SIGWINCH");
    assert.equal(signalName(36), "SIGRTMIN+2");
    assert.equal(signalName(99), "SIG99");
    assert.equal(signalNumber("SIGTERM"), 15);
    assert.equal(signalNumber("term"), 15);
    assert.equal(signalNumber("SIGRTMIN+1"), 35);
    assert.equal(signalNumber("SIGRTMAX"), 64);
    assert.equal(signalNumber("SIGIOT"), 6);
    assert.equal(signalNumber(9), 9);
    assert.equal(signalNumber("9"), 9);
    assert.equal(signalNumber("SIGNOPE"), undefined);
    assert.equal(signalNumber(0), undefined);
  });
});
