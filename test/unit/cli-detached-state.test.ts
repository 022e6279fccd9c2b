/** Detached VMs' state on disk: names, the sweep of supervisors that are gone, listing. */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { UsageError } from "../../src/cli/cli.ts";
import { DetachedDir, type DetachedState, listDetached, processStartTime } from "../../src/cli/detached.ts";

let root: string;
before(async () => {
  root = await mkdtemp(join(tmpdir(), "sm-detached-state-"));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

function state(name: string, pid: number, startTime: string, createdAt: string): DetachedState {
  return {
    name,
    image: "rootfs:/x",
    command: ["sleep", "1"],
    status: "running",
    supervisorPid: pid,
    supervisorStartTime: startTime,
    createdAt,
  };
}

describe("detached VM state", () => {
  it("refuses names that are not one path segment of safe characters", () => {
    for (const name of ["", "../x", "a/b", ".hidden", "-x", "x".repeat(64)])
      assert.throws(() => new DetachedDir(name, root), UsageError, name);
    assert.equal(new DetachedDir("web-1.a_b", root).name, "web-1.a_b");
  });

  it("a second VM of the same name is a usage error naming the fix", async () => {
    const dir = new DetachedDir("taken", root);
    await dir.create();
    await assert.rejects(
      new DetachedDir("taken", root).create(),
      /in use: remove that VM with 'supermachine rm -f taken'/,
    );
  });

  it("a running state whose supervisor is gone, or whose pid was reused, is recorded as exited", async () => {
    const child = spawn("sleep", ["60"]);
    await new Promise((resolve) => child.once("spawn", resolve));
    const alive = processStartTime(child.pid!)!;
    const live = new DetachedDir("live", root);
    await live.create();
    await live.writeState(state("live", child.pid!, alive, "2026-01-01T00:00:02Z"));
    const reused = new DetachedDir("reused", root);
    await reused.create();
    await reused.writeState(state("reused", child.pid!, `${alive}0`, "2026-01-01T00:00:01Z"));
    try {
      const listed = await listDetached(root);
      assert.deepEqual(
        listed.map((s) => [s.name, s.status]),
        [
          ["reused", "exited"],
          ["live", "running"],
        ],
      );
      assert.match((await reused.readState())!.error!, /supervisor is gone/);
    } finally {
      child.kill("SIGKILL");
      await new Promise((resolve) => child.once("exit", resolve));
    }
    assert.equal((await live.currentState())!.status, "exited", "once its supervisor died");
  });
});
