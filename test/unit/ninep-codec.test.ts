import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { VmError } from "../../src/errors.ts";
import {
  decodeDirents,
  decodeMessage,
  encodeMessage,
  LAYOUTS,
  type MessageFields,
  type MessageName,
  NOTAG,
} from "../../src/ninep/index.ts";

const isProtocol = (e: unknown) => e instanceof VmError && e.code === "AGENT_PROTOCOL";
const hex = (s: string) => Buffer.from(s.replace(/\s+/g, ""), "hex");

describe("9P codec golden bytes", () => {
  test("Tversion as the Linux client sends it", () => {
    const bytes = encodeMessage("Tversion", NOTAG, { msize: 8192, version: Buffer.from("9P2000.L") });
    assert.deepEqual(bytes, hex("15000000 64 ffff 00200000 0800 395032303030 2e4c"));
    const m = decodeMessage(bytes);
    assert.equal(m.op, "Tversion");
    assert.equal(m.tag, NOTAG);
    if (m.op === "Tversion") {
      assert.equal(m.msize, 8192);
      assert.equal(m.version.toString(), "9P2000.L");
    }
  });

  test("Twalk with two names and Rwalk with their qids", () => {
    const walk = encodeMessage("Twalk", 1, {
      fid: 0,
      newfid: 1,
      names: [Buffer.from("a"), Buffer.from("bc")],
    });
    assert.deepEqual(walk, hex("18000000 6e 0100 00000000 01000000 0200 0100 61 0200 6263"));
    const rwalk = encodeMessage("Rwalk", 1, {
      qids: [
        { type: 0x80, version: 0, path: 0x1122334455667788n },
        { type: 0, version: 7, path: 2n },
      ],
    });
    assert.deepEqual(
      rwalk,
      hex("23000000 6f 0100 0200 80 00000000 8877665544332211 00 07000000 0200000000000000"),
    );
  });

  test("Rlerror and Rread", () => {
    assert.deepEqual(encodeMessage("Rlerror", 9, { ecode: 2 }), hex("0b000000 07 0900 02000000"));
    assert.deepEqual(
      encodeMessage("Rread", 3, { data: Buffer.from("hi") }),
      hex("0d000000 75 0300 02000000 6869"),
    );
  });

  test("every message round-trips", () => {
    const sample = (kind: string): unknown => {
      switch (kind) {
        case "u8":
          return 0xab;
        case "u16":
          return 0xbeef;
        case "u32":
          return 0xdeadbeef;
        case "u64":
          return 0x0102030405060708n;
        case "str":
          return Buffer.from([0xff, 0x00, 0x41]); // raw bytes, not UTF-8, even a NUL
        case "qid":
          return { type: 2, version: 5, path: 99n };
        case "strs":
          return [Buffer.from("x"), Buffer.from("yz")];
        case "qids":
          return [{ type: 0x80, version: 0, path: 1n }];
        default:
          return Buffer.from("payload");
      }
    };
    for (const [name, layout] of Object.entries(LAYOUTS) as [MessageName, (typeof LAYOUTS)[MessageName]][]) {
      const fields: Record<string, unknown> = {};
      for (const [field, kind] of layout.fields) fields[field] = sample(kind);
      const bytes = encodeMessage(name, 0x1234, fields as MessageFields<typeof name>);
      const m = decodeMessage(bytes) as Record<string, unknown>;
      assert.equal(m.op, name);
      assert.equal(m.tag, 0x1234);
      for (const [field] of layout.fields) assert.deepEqual(m[field], fields[field], `${name}.${field}`);
      assert.deepEqual(encodeMessage(name, 0x1234, m as never), bytes, name);
    }
  });

  test("directory entries", () => {
    const data = hex("80 00000000 0500000000000000 0100000000000000 04 0100 2e");
    assert.deepEqual(decodeDirents(data), [
      { qid: { type: 0x80, version: 0, path: 5n }, offset: 1n, type: 4, name: Buffer.from(".") },
    ]);
  });
});

describe("9P codec refuses hostile messages", () => {
  test("a size field that does not match the bytes", () => {
    const bytes = encodeMessage("Tclunk", 1, { fid: 3 });
    bytes.writeUInt32LE(bytes.length + 1, 0);
    assert.throws(() => decodeMessage(bytes), isProtocol);
  });

  test("a header cut short", () => {
    assert.throws(() => decodeMessage(hex("0500000064")), isProtocol);
  });

  test("a string running past the end", () => {
    const bytes = hex("0f000000 6e 0100 00000000 01000000"); // Twalk without nwname
    assert.throws(() => decodeMessage(bytes), isProtocol);
    const overrun = hex("13000000 6e 0100 00000000 01000000 0100 ff00");
    assert.throws(() => decodeMessage(overrun), isProtocol);
  });

  test("bytes after the last field", () => {
    const bytes = Buffer.concat([encodeMessage("Tclunk", 1, { fid: 3 }), Buffer.from([0])]);
    bytes.writeUInt32LE(bytes.length, 0);
    assert.throws(() => decodeMessage(bytes), isProtocol);
  });

  test("more than 16 walk names", () => {
    const names = Array.from({ length: 17 }, () => Buffer.from("a"));
    const bytes = Buffer.concat([hex("00000000 6e 0100 00000000 01000000"), Buffer.from([17, 0])]);
    const full = Buffer.concat([bytes, ...names.map((n) => Buffer.concat([Buffer.from([1, 0]), n]))]);
    full.writeUInt32LE(full.length, 0);
    assert.throws(() => decodeMessage(full), isProtocol);
  });

  test("a data count beyond the message", () => {
    const bytes = hex("17000000 76 0100 01000000 0000000000000000 ffffffff");
    assert.throws(() => decodeMessage(bytes), isProtocol);
  });

  test("an unknown type decodes as unknown, for an Rlerror answer", () => {
    const m = decodeMessage(hex("07000000 70 0500")); // Topen of legacy 9P2000
    assert.equal(m.op, undefined);
    assert.equal(m.tag, 5);
  });
});
