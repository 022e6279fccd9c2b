import assert from "node:assert/strict";
import { mkdtemp, readFile, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { ConsoleLog } from "../../src/vmm/console-log.ts";

let dir: string;
before(async () => {
  dir = await mkdtemp(path.join(tmpdir(), "sm-console-"));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** Deterministic, non-repeating-looking text: line N is "line N\n". */
function lines(from: number, to: number): Buffer {
  let text = "";
  for (let n = from; n < to; n++) text += `line ${n}\n`;
  return Buffer.from(text);
}

async function writeAll(log: ConsoleLog, chunks: Buffer[]): Promise<void> {
  for (const chunk of chunks) {
    if (!log.write(chunk)) await new Promise((resolve) => log.once("drain", resolve));
  }
  await log.close();
}

describe("ConsoleLog", () => {
  it("keeps everything while under the cap", async () => {
    const file = path.join(dir, "small.log");
    const log = await ConsoleLog.open(file, { maxBytes: 64 * 1024 });
    const data = lines(0, 100);
    await writeAll(log, [data.subarray(0, 10), data.subarray(10)]);
    assert.deepEqual(await readFile(file), data);
    assert.equal(log.droppedBytes, 0);
    assert.equal((await stat(file)).mode & 0o777, 0o600);
  });

  const table = [
    { name: "many small chunks", chunkBytes: 100, totalBytes: 300_000 },
    { name: "pipe-sized chunks", chunkBytes: 65_536, totalBytes: 1_000_000 },
    { name: "one chunk larger than the cap", chunkBytes: 200_000, totalBytes: 200_000 },
  ];
  for (const { name, chunkBytes, totalBytes } of table) {
    it(`stays bounded with ${name}, keeping head and tail`, async () => {
      const maxBytes = 16 * 1024;
      const file = path.join(dir, `${name.replaceAll(" ", "-")}.log`);
      const log = await ConsoleLog.open(file, { maxBytes });
      const data = lines(0, 200_000).subarray(0, totalBytes);
      const chunks: Buffer[] = [];
      for (let offset = 0; offset < data.length; offset += chunkBytes)
        chunks.push(data.subarray(offset, offset + chunkBytes));
      let largest = 0;
      log.on("output", () => {});
      const sizes: number[] = [];
      const sampler = setInterval(() => stat(file).then((s) => sizes.push(s.size)), 1);
      await writeAll(log, chunks);
      clearInterval(sampler);
      largest = Math.max(...sizes, 0);

      const content = await readFile(file);
      const marker = /\n\[supermachine: (\d+) bytes of console output dropped\]\n/.exec(
        content.toString("latin1"),
      );
      assert.ok(marker, "the file says output was dropped");
      const markerLength = marker[0].length;
      assert.ok(content.length <= maxBytes + markerLength, `file is ${content.length} bytes`);
      assert.ok(largest <= maxBytes + markerLength, `file grew to ${largest} bytes`);
      // Head: the first quarter of the cap, exactly.
      assert.deepEqual(content.subarray(0, maxBytes / 4), data.subarray(0, maxBytes / 4));
      // Tail: the file ends with the end of the output.
      const tailBytes = content.length - maxBytes / 4 - markerLength;
      assert.ok(tailBytes >= maxBytes / 4);
      assert.deepEqual(content.subarray(content.length - tailBytes), data.subarray(data.length - tailBytes));
      // The marker counts exactly what is missing.
      assert.equal(Number(marker[1]), data.length - maxBytes / 4 - tailBytes);
      assert.equal(log.droppedBytes, Number(marker[1]));
      assert.equal(log.totalBytes, data.length);
      assert.equal(log.tail(20), data.subarray(data.length - 20).toString());
    });
  }

  it("emits output chunks", async () => {
    const log = await ConsoleLog.open(path.join(dir, "events.log"));
    const seen: Buffer[] = [];
    log.on("output", (chunk: Buffer) => seen.push(chunk));
    await writeAll(log, [Buffer.from("a"), Buffer.from("bc")]);
    assert.equal(Buffer.concat(seen).toString(), "abc");
  });

  it("refuses a cap below 4 KiB", async () => {
    await assert.rejects(ConsoleLog.open(path.join(dir, "tiny.log"), { maxBytes: 100 }), RangeError);
  });
});
