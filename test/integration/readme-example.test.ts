/**
 * The README's library example (examples/quickstart.ts, included verbatim in the README) runs as a
 * user would run it — `import … from "supermachine"` — against an image in a registry on loopback.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { describe, it } from "node:test";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { fixtureImages } from "../helpers/fixtures.ts";
import { startRegistry } from "../helpers/registry.ts";
import { scratchDir } from "../helpers/scratch.ts";
import { vmSkipReason } from "../helpers/vm.ts";

const run = promisify(execFile);
const root = fileURLToPath(new URL("../../", import.meta.url));

describe("the README's library example", { timeout: 600_000 }, () => {
  it("is examples/quickstart.ts, word for word", async () => {
    const readme = await readFile(join(root, "README.md"), "utf8");
    const example = await readFile(join(root, "examples/quickstart.ts"), "utf8");
    assert.ok(
      readme.includes(`\`\`\`ts\n${example}\`\`\``),
      "README.md does not show examples/quickstart.ts as it is",
    );
  });

  it("bakes, pools and runs a staged script against an image from a registry", async (t) => {
    const skip = await vmSkipReason();
    if (skip !== undefined) return t.skip(skip);
    const fx = await fixtureImages();
    await using registry = await startRegistry();
    await registry.push(fx.busybox, "library/busybox:1");
    const dataDir = await scratchDir("sm-readme-");
    const { stdout } = await run(
      process.execPath,
      ["--conditions=source", join(root, "examples/quickstart.ts"), `${registry.host}/library/busybox:1`],
      { env: { ...process.env, SUPERMACHINE_DATA_DIR: dataDir }, timeout: 300_000 },
    );
    assert.equal(stdout, "hello from Linux, warmed up\n\n");
  });
});
