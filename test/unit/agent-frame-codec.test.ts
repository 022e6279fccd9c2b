import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { describe, test } from "node:test";
import {
  encodeFrame,
  encodeFrameHeader,
  FLAG_FIN,
  type Frame,
  FrameDecoder,
  HEADER_BYTES,
  MAX_PAYLOAD,
  MessageType,
} from "../../src/agent/frame-codec.ts";
import { VmError } from "../../src/errors.ts";

const isProtocol = (e: unknown) => e instanceof VmError && e.code === "AGENT_PROTOCOL";

function frames(): Frame[] {
  return [
    { stream: 0, type: MessageType.PING, flags: 0, payload: Uint8Array.of(1, 2, 3) },
    { stream: 7, type: MessageType.STDOUT, flags: FLAG_FIN, payload: new Uint8Array(0) },
    { stream: 0xffff_ffff, type: MessageType.STDERR, flags: 0, payload: new Uint8Array(randomBytes(70_000)) },
    { stream: 3, type: MessageType.EXIT, flags: 0, payload: Uint8Array.of(1, 0, 0, 0, 4, 0, 0, 0, 0) },
  ];
}

function concat(parts: Uint8Array[]): Uint8Array {
  return new Uint8Array(Buffer.concat(parts));
}

describe("encodeFrame", () => {
  test("writes the header big-endian", () => {
    const bytes = encodeFrame({
      stream: 0x01020304,
      type: MessageType.STDIN,
      flags: FLAG_FIN,
      payload: Uint8Array.of(9),
    });
    assert.deepEqual([...bytes], [0, 0, 0, 1, 1, 2, 3, 4, 0x12, 1, 9]);
  });

  test("refuses what the decoder would refuse", () => {
    assert.throws(() => encodeFrame({ stream: 1, type: 0x7f }), RangeError);
    assert.throws(() => encodeFrame({ stream: 1, type: MessageType.STDIN, flags: 2 }), RangeError);
    assert.throws(() => encodeFrame({ stream: -1, type: MessageType.STDIN }), RangeError);
    assert.throws(() => encodeFrame({ stream: 2 ** 32, type: MessageType.STDIN }), RangeError);
    assert.throws(() => encodeFrameHeader(1, MessageType.STDIN, 0, MAX_PAYLOAD + 1), RangeError);
  });
});

describe("FrameDecoder", () => {
  test("decodes frames however the bytes are split", () => {
    const input = frames();
    const bytes = concat(input.map((f) => encodeFrame(f)));
    for (const split of [1, 3, 10, 11, 4096, 65_536, bytes.length]) {
      const decoder = new FrameDecoder();
      const out: Frame[] = [];
      for (let i = 0; i < bytes.length; i += split) out.push(...decoder.push(bytes.subarray(i, i + split)));
      assert.deepEqual(
        out.map((f) => ({ ...f, payload: Buffer.from(f.payload) })),
        input.map((f) => ({ ...f, payload: Buffer.from(f.payload) })),
        `split ${split}`,
      );
      assert.ok(decoder.idle);
      decoder.end();
    }
    // Random splits.
    for (let round = 0; round < 20; round++) {
      const decoder = new FrameDecoder();
      let count = 0;
      let i = 0;
      while (i < bytes.length) {
        const n = 1 + Math.floor(Math.random() * 20_000);
        count += decoder.pushAll(bytes.subarray(i, i + n)).length;
        i += n;
      }
      assert.equal(count, input.length);
    }
  });

  test("copies every payload out of its chunk, so the caller may reuse its read buffer", () => {
    const frames = [
      { stream: 1, type: MessageType.STDOUT, payload: Uint8Array.of(9) },
      { stream: 1, type: MessageType.STDOUT, payload: new Uint8Array(0) },
      { stream: 1, type: MessageType.STDOUT, payload: new Uint8Array(60_000).fill(3) },
    ];
    const chunk = Buffer.concat(frames.map((f) => encodeFrame(f)));
    const [one, empty, big] = new FrameDecoder().pushAll(chunk);
    chunk.fill(0xee); // the reader's buffer, reused for the next read
    assert.equal(one!.payload.buffer.byteLength, 1);
    assert.deepEqual([...one!.payload], [9]);
    assert.equal(empty!.payload.length, 0);
    assert.notEqual(empty!.payload.buffer, chunk.buffer);
    assert.notEqual(big!.payload.buffer, chunk.buffer);
    assert.equal(big!.payload.length, 60_000);
    assert.ok(big!.payload.every((b) => b === 3));
  });

  test("keeps nothing of a chunk a frame spans: the next chunk may reuse its memory", () => {
    const payload = new Uint8Array(100).map((_, i) => i);
    const bytes = encodeFrame({ stream: 1, type: MessageType.STDOUT, payload });
    const buffer = new Uint8Array(64);
    const decoder = new FrameDecoder();
    const out = [];
    for (let at = 0; at < bytes.length; at += buffer.length) {
      const n = Math.min(buffer.length, bytes.length - at);
      buffer.set(bytes.subarray(at, at + n));
      out.push(...decoder.push(buffer.subarray(0, n)));
      buffer.fill(0xee);
    }
    assert.equal(out.length, 1);
    assert.deepEqual([...out[0]!.payload], [...payload]);
  });

  test("accepts a payload of exactly MAX_PAYLOAD", () => {
    const payload = new Uint8Array(MAX_PAYLOAD);
    const out = new FrameDecoder().pushAll(encodeFrame({ stream: 1, type: MessageType.STDOUT, payload }));
    assert.equal(out[0]!.payload.length, MAX_PAYLOAD);
  });

  test("rejects an oversized length from the header alone, without buffering the payload", () => {
    const decoder = new FrameDecoder();
    const header = new Uint8Array(HEADER_BYTES);
    new DataView(header.buffer).setUint32(0, 0xffff_ffff);
    header[8] = MessageType.STDOUT;
    assert.equal(decoder.pushAll(header.subarray(0, 9)).length, 0);
    assert.equal(decoder.bufferedBytes, 9);
    assert.throws(() => decoder.pushAll(header.subarray(9)), isProtocol);
    // Poisoned: later input fails the same way.
    assert.throws(() => decoder.pushAll(Uint8Array.of(0)), isProtocol);
  });

  test("rejects reserved flag bits and unknown types", () => {
    for (const [type, flags] of [
      [MessageType.STDOUT, 0x80],
      [MessageType.STDOUT, 0x03],
      [0x00, 0],
      [0x7f, 0],
      [0xff, 0],
    ] as const) {
      const header = Uint8Array.of(0, 0, 0, 0, 0, 0, 0, 1, type, flags);
      assert.throws(() => new FrameDecoder().pushAll(header), isProtocol, `type ${type} flags ${flags}`);
    }
  });

  test("reports a channel that ends inside a frame", () => {
    const decoder = new FrameDecoder();
    decoder.pushAll(
      encodeFrame({ stream: 1, type: MessageType.STDOUT, payload: Uint8Array.of(1, 2) }).subarray(0, 11),
    );
    assert.equal(decoder.idle, false);
    assert.throws(() => decoder.end(), isProtocol);
  });

  test("garbage input yields frames or AGENT_PROTOCOL, nothing else", () => {
    for (let round = 0; round < 500; round++) {
      const decoder = new FrameDecoder();
      const garbage = new Uint8Array(randomBytes(1 + Math.floor(Math.random() * 300)));
      // Keep lengths small sometimes so that well-formed-looking frames also occur.
      if (round % 2 === 0) garbage[0] = garbage[1] = garbage[2] = 0;
      try {
        decoder.pushAll(garbage);
      } catch (error) {
        assert.ok(isProtocol(error), String(error));
      }
    }
  });

  test("a custom maxPayload bounds frames", () => {
    const decoder = new FrameDecoder({ maxPayload: 4 });
    assert.throws(
      () => decoder.pushAll(encodeFrame({ stream: 1, type: MessageType.STDOUT, payload: new Uint8Array(5) })),
      isProtocol,
    );
  });
});
