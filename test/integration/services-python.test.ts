/**
 * Python (Debian's python3) as an image for programs: baked without a workload, each clone runs a
 * program that reads its stdin and writes a file, which the host reads back.
 */
import assert from "node:assert/strict";
import { describe } from "node:test";
import { assertCountingProgram, serviceSuite } from "../helpers/services.ts";

const PROGRAM = `
import hashlib, json, sys
data = sys.stdin.buffer.read()
text = data.decode("utf-8")
with open(sys.argv[1], "w") as out:
    json.dump({
        "lines": len(text.splitlines()),
        "words": len(text.split()),
        "sha256": hashlib.sha256(data).hexdigest(),
        "python": "%d.%d" % sys.version_info[:2],
    }, out)
print("wrote", sys.argv[1])
`;

describe("python as an image for programs", { timeout: 600_000 }, () => {
  const service = serviceSuite("python", {
    memoryMiB: 256,
    workload: false,
    // the interpreter's files in the page cache of every clone
    warmup: async (vm) => {
      await vm.exec(["python3", "-c", "import hashlib, json, sys"]);
    },
  });

  service.it("the image has the official image's config", async () => {
    assert.deepEqual(service.image().command(), ["python3"]);
    assert.ok(service.image().config.env.includes("LANG=C.UTF-8"));
  });

  service.it("runs a program that reads stdin and writes a file the host reads back", (vm) =>
    assertCountingProgram(vm, ["python3", "/tmp/count.py"], PROGRAM, { python: "3.11" }),
  );
});
