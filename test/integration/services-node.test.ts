/**
 * Node.js (Debian's nodejs) as an image for programs: baked without a workload, each clone runs a
 * program that reads its stdin and writes a file, which the host reads back.
 */
import assert from "node:assert/strict";
import { describe } from "node:test";
import { assertCountingProgram, serviceSuite } from "../helpers/services.ts";

const PROGRAM = `
import { createHash } from "node:crypto";
import { writeFileSync } from "node:fs";
const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const data = Buffer.concat(chunks);
const text = data.toString("utf8");
writeFileSync(process.argv[2], JSON.stringify({
  lines: text.split("\\n").filter(Boolean).length,
  words: text.split(/\\s+/).filter(Boolean).length,
  sha256: createHash("sha256").update(data).digest("hex"),
  node: process.versions.node.split(".")[0],
}));
console.log("wrote", process.argv[2]);
`;

describe("node as an image for programs", { timeout: 600_000 }, () => {
  const service = serviceSuite("node", { memoryMiB: 256, workload: false });

  service.it("the image has the official image's config", async () => {
    assert.deepEqual(service.image().command(), ["node"]);
  });

  service.it("runs a program that reads stdin and writes a file the host reads back", (vm) =>
    assertCountingProgram(vm, ["node", "/tmp/count.mjs"], PROGRAM, { node: "18" }),
  );
});
