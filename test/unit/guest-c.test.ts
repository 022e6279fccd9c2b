/**
 * Runs the guest agent's C tests (`make -C guest test`): the frame/field codec against the golden
 * fixtures in test/fixtures/protocol, and the agent itself (`sm-init --channel-fd`) in host mode.
 */

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

const guestDir = fileURLToPath(new URL("../../guest/", import.meta.url));

test("guest C tests pass (make -C guest test)", () => {
  const result = spawnSync("make", ["-C", guestDir, "test"], { encoding: "utf8", timeout: 120_000 });
  assert.ifError(result.error);
  assert.equal(
    result.status,
    0,
    `make -C guest test failed (status ${result.status}, signal ${result.signal}):\n${result.stdout}\n${result.stderr}`,
  );
  assert.match(result.stdout, /test-proto: \d+ checks, 0 failures/);
  assert.match(result.stdout, /test-agent: \d+ checks, 0 failures/);
});

test("the agent's decoder survives a short coverage-guided fuzz run (make -C guest fuzz-run)", () => {
  // FUZZ_SECONDS=600 for a longer run on demand.
  const seconds = process.env.FUZZ_SECONDS ?? "10";
  const result = spawnSync("make", ["-C", guestDir, "fuzz-run", `SECONDS=${seconds}`], {
    encoding: "utf8",
    timeout: (Number(seconds) + 120) * 1000,
  });
  assert.ifError(result.error);
  assert.equal(
    result.status,
    0,
    `the fuzz run failed:\n${result.stdout.slice(-2000)}\n${result.stderr.slice(-4000)}`,
  );
  assert.match(result.stderr, /Done \d+ runs in \d+ second/);
});
