/**
 * The host's frame decoder and message decoders under random input (a seeded generator; set
 * FUZZ_RUNS for a longer run): golden frames round-trip whatever the chunking, and mutated or
 * random bytes end only in the typed AGENT_PROTOCOL error, never another exception, and never a
 * buffer larger than one frame's limit.
 */
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, it } from "node:test";
import { fileURLToPath } from "node:url";
import { decodeFieldList } from "../../src/agent/fields.ts";
import { encodeFrame, FrameDecoder, MAX_PAYLOAD } from "../../src/agent/frame-codec.ts";
import { SupermachineError } from "../../src/errors.ts";
import { prng } from "../helpers/seeded-random.ts";

const FIXTURES = fileURLToPath(new URL("../fixtures/protocol/", import.meta.url));
const RUNS = Number(process.env.FUZZ_RUNS ?? 3000);

const golden = readdirSync(FIXTURES)
  .filter((f) => f.endsWith(".hex"))
  .map((f) =>
    Buffer.from(readFileSync(join(FIXTURES, f), "utf8").replace(/#.*$/gm, "").replace(/\s+/g, ""), "hex"),
  );

/** Feeds `bytes` in random chunks; returns the frames, or the error thrown. */
function decode(bytes: Uint8Array, rand: () => number): { frames: number; error?: unknown } {
  const decoder = new FrameDecoder();
  let frames = 0;
  try {
    for (let off = 0; off < bytes.length; ) {
      const n = 1 + Math.floor(rand() * Math.min(bytes.length - off, 4096));
      for (const frame of decoder.push(bytes.subarray(off, off + n))) {
        frames++;
        assert.ok(frame.payload.length <= MAX_PAYLOAD);
        // The fields of a control payload: decoded or refused with a typed error.
        try {
          decodeFieldList(frame.payload, "fuzz");
        } catch (error) {
          if (!(error instanceof SupermachineError)) throw error;
        }
      }
      assert.ok(decoder.bufferedBytes <= MAX_PAYLOAD + 10);
      off += n;
    }
  } catch (error) {
    return { frames, error };
  }
  return { frames };
}

describe("decoder fuzzing", () => {
  it("golden frames decode whole in any chunking", () => {
    const rand = prng(1);
    const stream = Buffer.concat(golden);
    for (let i = 0; i < 200; i++) {
      const { frames, error } = decode(stream, rand);
      assert.equal(error, undefined);
      assert.equal(frames, golden.length);
    }
  });

  it(`${RUNS} mutated and random streams end only in AGENT_PROTOCOL`, () => {
    const rand = prng(42);
    for (let run = 0; run < RUNS; run++) {
      let bytes: Buffer;
      if (run % 4 === 0) {
        bytes = Buffer.alloc(Math.floor(rand() * 2048));
        for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(rand() * 256);
      } else {
        bytes = Buffer.from(Buffer.concat(golden.filter(() => rand() < 0.3)));
        const flips = 1 + Math.floor(rand() * 8);
        for (let f = 0; f < flips && bytes.length > 0; f++) {
          bytes[Math.floor(rand() * bytes.length)] = Math.floor(rand() * 256);
        }
        if (rand() < 0.2)
          bytes = Buffer.concat([bytes, encodeFrame({ stream: 1, type: 0x13, payload: Buffer.alloc(5) })]);
      }
      const { error } = decode(bytes, rand);
      if (error !== undefined) {
        assert.ok(
          error instanceof SupermachineError && error.code === "AGENT_PROTOCOL",
          `run ${run}: ${String(error)}`,
        );
      }
    }
  });
});
