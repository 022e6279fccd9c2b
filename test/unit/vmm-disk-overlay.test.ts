/**
 * Boot overlays: made from a template per base file (one `qemu-img` run per base as it is), a new
 * template when the base is rewritten in place. Uses the host's real qemu-img behind a wrapper
 * that counts its runs.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { chmod, mkdtemp, readFile, rm, stat, truncate, utimes, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { promisify } from "node:util";
import { createBootOverlay } from "../../src/vmm/disk-overlay.ts";

const run = promisify(execFile);
let dir: string;
let runsLog: string;
let savedQemuImg: string | undefined;

before(async () => {
  dir = await mkdtemp(path.join(tmpdir(), "sm-overlay-"));
  runsLog = path.join(dir, "runs.log");
  const wrapper = path.join(dir, "qemu-img");
  await writeFile(wrapper, `#!/bin/sh\necho run >> "${runsLog}"\nexec qemu-img "$@"\n`);
  await chmod(wrapper, 0o755);
  savedQemuImg = process.env.SUPERMACHINE_QEMU_IMG;
  process.env.SUPERMACHINE_QEMU_IMG = wrapper;
});
after(async () => {
  if (savedQemuImg === undefined) delete process.env.SUPERMACHINE_QEMU_IMG;
  else process.env.SUPERMACHINE_QEMU_IMG = savedQemuImg;
  await rm(dir, { recursive: true, force: true });
});

const qemuImgRuns = async () =>
  (await readFile(runsLog, "utf8").catch(() => "")).split("\n").filter(Boolean).length;

async function overlayInfo(file: string): Promise<{ virtualSize: number; backing: string }> {
  const { stdout } = await run("qemu-img", ["info", "--output=json", "-U", file]);
  const info = JSON.parse(stdout) as { "virtual-size": number; "backing-filename": string };
  return { virtualSize: info["virtual-size"], backing: info["backing-filename"] };
}

describe("createBootOverlay", () => {
  it("runs qemu-img once per base, copies the template after, and makes a new one when the base changes", async () => {
    const base = path.join(dir, "rootfs.ext4");
    await writeFile(base, "");
    await truncate(base, 1024 * 1024);

    await createBootOverlay(base, path.join(dir, "a.qcow2"));
    await createBootOverlay(base, path.join(dir, "b.qcow2"));
    assert.equal(await qemuImgRuns(), 1);
    assert.deepEqual(await readFile(path.join(dir, "b.qcow2")), await readFile(path.join(dir, "a.qcow2")));
    assert.deepEqual(await overlayInfo(path.join(dir, "b.qcow2")), {
      virtualSize: 1024 * 1024,
      backing: base,
    });
    assert.equal((await stat(path.join(dir, "b.qcow2"))).mode & 0o777, 0o600);

    // The base rewritten in place, bigger: the old template would give the guest a wrong disk size.
    await truncate(base, 2 * 1024 * 1024);
    const later = new Date(Date.now() + 5_000);
    await utimes(base, later, later);
    await createBootOverlay(base, path.join(dir, "c.qcow2"));
    assert.equal(await qemuImgRuns(), 2);
    assert.equal((await overlayInfo(path.join(dir, "c.qcow2"))).virtualSize, 2 * 1024 * 1024);
  });

  it("refuses to write over an existing file", async () => {
    const base = path.join(dir, "other.ext4");
    await writeFile(base, "");
    await truncate(base, 1024 * 1024);
    const target = path.join(dir, "taken.qcow2");
    await writeFile(target, "mine");
    await assert.rejects(createBootOverlay(base, target), { code: "EEXIST" });
    assert.equal(await readFile(target, "utf8"), "mine");
  });
});
