import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { once } from "node:events";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readdir, readFile, readlink, rm, stat, utimes, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import {
  newVmId,
  type OwnerRecord,
  procCmdline,
  procStartTime,
  runtimeRoot,
  sweepStaleVms,
  VmStateDir,
} from "../../src/vmm/state-dir.ts";

let root: string;
let counter = 0;
before(async () => {
  root = await mkdtemp(path.join(tmpdir(), "sm-state-"));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

/** A fresh runtime root per test. */
async function freshRoot(): Promise<string> {
  const dir = path.join(root, `r${counter++}`);
  await mkdir(dir);
  return dir;
}

/** The pid and start time of a process that has exited. */
async function deadProcess(): Promise<{ pid: number; startTime: string }> {
  const child = spawn("true");
  await once(child, "exit");
  return { pid: child.pid!, startTime: "1" };
}

/** The disk root that goes with a runtime root in these tests. */
function disks(base: string): string {
  return path.join(base, "disks");
}

async function writeOwner(dir: string, owner: OwnerRecord): Promise<void> {
  await mkdir(dir, { recursive: true });
  await writeFile(path.join(dir, "owner.json"), JSON.stringify(owner));
}

describe("runtimeRoot", () => {
  const uid = process.getuid!();
  const table: { env: NodeJS.ProcessEnv; expected: string }[] = [
    { env: { SUPERMACHINE_RUNTIME_DIR: "/srv/sm", XDG_RUNTIME_DIR: "/run/user/1" }, expected: "/srv/sm" },
    { env: { XDG_RUNTIME_DIR: "/run/user/1" }, expected: `/run/user/1/supermachine-${uid}` },
    { env: { XDG_RUNTIME_DIR: "" }, expected: `/tmp/supermachine-${uid}` },
    { env: {}, expected: `/tmp/supermachine-${uid}` },
  ];
  for (const { env, expected } of table) {
    it(`${JSON.stringify(env)} → ${expected}`, () => assert.equal(runtimeRoot(env), expected));
  }
});

describe("/proc helpers", () => {
  it("reads this process's start time and command line", () => {
    const start = procStartTime(process.pid);
    assert.match(start ?? "", /^\d+$/);
    assert.equal(procStartTime(process.pid), start);
    assert.equal(procCmdline(process.pid)?.[0], process.argv0);
  });
  it("knows a process that is gone", async () => {
    const { pid } = await deadProcess();
    assert.equal(procStartTime(pid), undefined);
  });
});

describe("VmStateDir", () => {
  it("makes ids of 10 hex digits with a letter among them (the default hostname: glibc never looks up digits alone)", () => {
    // about 1 id in 110 would be digits alone without the rule: 5000 make a miss near certain
    for (let i = 0; i < 5000; i++) assert.match(newVmId(), /^(?=.*[a-f])[0-9a-f]{10}$/);
  });

  it("creates a private dir recording this process as owner", async () => {
    const base = await freshRoot();
    const dir = await VmStateDir.create({ root: base, diskRoot: disks(base), id: "vm1" });
    assert.equal(dir.path, path.join(base, "vms", "vm1"));
    assert.equal((await stat(dir.path)).mode & 0o777, 0o700);
    assert.equal((await stat(path.join(base, "vms"))).mode & 0o777, 0o700);
    const owner = JSON.parse(await readFile(dir.ownerPath, "utf8")) as OwnerRecord;
    assert.equal(owner.hostPid, process.pid);
    assert.equal(owner.hostStartTime, procStartTime(process.pid));
    await assert.rejects(VmStateDir.create({ root: base, diskRoot: disks(base), id: "vm1" }), {
      code: "INVALID_ARGUMENT",
    });
    await assert.rejects(VmStateDir.create({ root: base, diskRoot: disks(base), id: "../x" }), {
      code: "INVALID_ARGUMENT",
    });
  });

  it("refuses a root whose socket paths would be too long", async () => {
    await assert.rejects(
      VmStateDir.create({ root: path.join(root, "x".repeat(100)), diskRoot: disks(root) }),
      {
        code: "HOST_UNSUPPORTED",
      },
    );
  });

  it("records QEMU and removes or keeps the dir when finished", async () => {
    const base = await freshRoot();
    const removed = await VmStateDir.create({ root: base, diskRoot: disks(base) });
    removed.recordQemu(process.pid);
    const owner = JSON.parse(await readFile(removed.ownerPath, "utf8")) as OwnerRecord;
    assert.equal(owner.qemuPid, process.pid);
    assert.equal(owner.qemuStartTime, procStartTime(process.pid));
    await removed.finish({ keep: false, exit: { exitCode: 0, signal: null, reason: "kept" } });
    assert.equal(existsSync(removed.path), false);

    const kept = await VmStateDir.create({ root: base, diskRoot: disks(base) });
    await writeFile(kept.consoleLogPath, "boot\n");
    await writeFile(kept.qmpSocketPath, "");
    await kept.finish({ keep: true, exit: { exitCode: 1, signal: null, reason: "failed" } });
    assert.deepEqual((await readdir(kept.path)).sort(), ["console.log", "exit.json"]);
    assert.equal(await readFile(kept.consoleLogPath, "utf8"), "boot\n");
  });

  it("gives each VM a private disk dir on disk that links to its runtime dir and goes with it", async () => {
    const base = await freshRoot();
    const dir = await VmStateDir.create({ root: base, diskRoot: disks(base), id: "d1" });
    assert.equal(dir.diskDir, path.join(disks(base), "d1"));
    assert.equal((await stat(dir.diskDir)).mode & 0o777, 0o700);
    assert.equal(await readlink(path.join(dir.diskDir, "state")), dir.path);
    await writeFile(path.join(dir.diskDir, "rootfs.qcow2"), "overlay");
    await dir.finish({ keep: true, exit: { exitCode: 1, signal: null, reason: "failed" } });
    assert.equal(existsSync(dir.diskDir), false, "a kept dir keeps its log, not its disk");
  });

  it("removes a disk dir with a large overlay, a small one and a dir of its own", async () => {
    const base = await freshRoot();
    const dir = await VmStateDir.create({ root: base, diskRoot: disks(base), id: "d2" });
    await writeFile(path.join(dir.diskDir, "rootfs.qcow2"), Buffer.alloc(64 * 1024 * 1024, 1));
    await writeFile(path.join(dir.diskDir, "data.qcow2"), "overlay");
    await mkdir(path.join(dir.diskDir, "volumes"));
    await writeFile(path.join(dir.diskDir, "volumes", "v1"), "v");
    await dir.finish({ keep: false, exit: { exitCode: 0, signal: null, reason: "kept" } });
    assert.equal(existsSync(dir.diskDir), false);
    assert.equal(existsSync(dir.path), false);
  });
});

describe("sweepStaleVms", () => {
  it("leaves VMs whose owner is alive", async () => {
    const base = await freshRoot();
    const dir = await VmStateDir.create({ root: base, diskRoot: disks(base) });
    const result = await sweepStaleVms({ root: base, diskRoot: disks(base) });
    assert.deepEqual(result, { killedPids: [], removedDirs: [] });
    assert.ok(existsSync(dir.path));
  });

  it("removes the dir of a dead owner, but never kills a reused pid that is not its QEMU", async () => {
    const base = await freshRoot();
    const owner = await deadProcess();
    // A live process that is not the VM's QEMU: its pid is recorded, as if the pid had been reused.
    const bystander: ChildProcess = spawn("sleep", ["30"], { stdio: "ignore" });
    await once(bystander, "spawn");
    try {
      const startTime = procStartTime(bystander.pid!)!;
      const dir = path.join(base, "vms", "stale1");
      await writeOwner(dir, {
        hostPid: owner.pid,
        hostStartTime: owner.startTime,
        qemuPid: bystander.pid!,
        qemuStartTime: startTime,
        createdAt: new Date().toISOString(),
      });
      const result = await sweepStaleVms({ root: base, diskRoot: disks(base) });
      assert.deepEqual(result.killedPids, []);
      assert.deepEqual(result.removedDirs, [dir]);
      assert.equal(existsSync(dir), false);
      assert.equal(bystander.exitCode, null);
      assert.equal(procStartTime(bystander.pid!), startTime, "the bystander still runs");
    } finally {
      bystander.kill("SIGKILL");
    }
  });

  it("treats an owner pid with another start time as dead", async () => {
    const base = await freshRoot();
    const dir = path.join(base, "vms", "reused");
    await writeOwner(dir, {
      hostPid: process.pid,
      hostStartTime: "12345",
      createdAt: new Date().toISOString(),
    });
    const result = await sweepStaleVms({ root: base, diskRoot: disks(base) });
    assert.deepEqual(result.removedDirs, [dir]);
  });

  it("keeps the newest failed dirs and removes old litter", async () => {
    const base = await freshRoot();
    const vms = path.join(base, "vms");
    for (let n = 0; n < 5; n++) {
      const dir = path.join(vms, `failed${n}`);
      await mkdir(dir, { recursive: true });
      await writeFile(path.join(dir, "console.log"), "");
      await writeFile(path.join(dir, "exit.json"), "{}");
      const time = new Date(Date.now() - (10 - n) * 1000);
      await utimes(path.join(dir, "exit.json"), time, time);
    }
    await mkdir(path.join(vms, "fresh-unowned"));
    await mkdir(path.join(vms, "old-unowned"));
    const old = new Date(Date.now() - 3600_000);
    await utimes(path.join(vms, "old-unowned"), old, old);

    const result = await sweepStaleVms({ root: base, diskRoot: disks(base), maxKeptDirs: 2 });
    assert.deepEqual(result.removedDirs.map((dir) => path.basename(dir)).sort(), [
      "failed0",
      "failed1",
      "failed2",
      "old-unowned",
    ]);
    assert.deepEqual((await readdir(vms)).sort(), ["failed3", "failed4", "fresh-unowned"]);
  });

  it("removes disk dirs whose runtime dir is gone, from any runtime root", async () => {
    const base = await freshRoot();
    const live = await VmStateDir.create({ root: base, diskRoot: disks(base), id: "live" });
    const other = await freshRoot();
    const gone = await VmStateDir.create({ root: other, diskRoot: disks(base), id: "gone" });
    await rm(other, { recursive: true });
    await mkdir(path.join(disks(base), "fresh-unlinked"));
    await mkdir(path.join(disks(base), "old-unlinked"));
    const old = new Date(Date.now() - 3600_000);
    await utimes(path.join(disks(base), "old-unlinked"), old, old);

    const result = await sweepStaleVms({ root: base, diskRoot: disks(base) });
    assert.deepEqual(
      result.removedDirs.sort(),
      [gone.diskDir, path.join(disks(base), "old-unlinked")].sort(),
    );
    assert.deepEqual((await readdir(disks(base))).sort(), ["fresh-unlinked", "live"]);
    assert.ok(existsSync(live.diskDir));
  });

  it("does nothing when the root does not exist", async () => {
    assert.deepEqual(
      await sweepStaleVms({ root: path.join(root, "missing"), diskRoot: path.join(root, "missing-disks") }),
      {
        killedPids: [],
        removedDirs: [],
      },
    );
  });
});
