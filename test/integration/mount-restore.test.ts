/**
 * Mounts and snapshots: a snapshot never carries a mount. Clones restored from a snapshot taken
 * without mounts each mount their own host directory at the same guest path, live both ways; a
 * snapshot taken while a mount was attached restores without it (the new session's HELLO detaches
 * it), and the VM it was taken from keeps its mount.
 */
import assert from "node:assert/strict";
import { chown, mkdir, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { type MountSpec, type Snapshot, Vm } from "../../src/index.ts";
import { busyboxRootfs, vmSkipReason } from "../helpers/vm.ts";

const ROOT = process.geteuid?.() === 0;
const OWNER = { uid: 4242, gid: 4243 };
const owner = ROOT ? { owner: OWNER } : {};

describe("mounts and snapshots", { timeout: 600_000 }, () => {
  let skip: string | undefined;
  let base: string;
  const vms: Vm[] = [];

  async function hostDir(name: string): Promise<string> {
    const dir = join(base, name);
    await mkdir(dir);
    if (ROOT) await chown(dir, OWNER.uid, OWNER.gid);
    return dir;
  }

  async function sh(vm: Vm, script: string): Promise<string> {
    return (await vm.exec(["sh", "-c", `exec 2>&1; ${script}`], { timeoutMs: 60_000 })).stdoutText;
  }

  async function restore(snapshot: Snapshot, mounts?: MountSpec[]): Promise<Vm> {
    const vm = await Vm.restore(snapshot, mounts === undefined ? {} : { mounts });
    vms.push(vm);
    return vm;
  }

  let original: Vm;
  let withoutMounts: Snapshot;
  let withMount: Snapshot;
  let originalDir: string;

  before(async () => {
    skip = await vmSkipReason();
    if (skip !== undefined) return;
    base = await mkdtemp(join(tmpdir(), "sm-mount-snap-"));
    original = await Vm.start({ rootfs: await busyboxRootfs(), memoryMiB: 256 });
    vms.push(original);
    withoutMounts = await original.snapshot(join(base, "snap-without"));
    // Now a mount, and a snapshot taken while it is attached.
    originalDir = await hostDir("original");
    await original.mount({ hostPath: originalDir, guestPath: "/work", ...owner });
    await sh(original, "echo before-snapshot > /work/mark");
    withMount = await original.snapshot(join(base, "snap-with"));
  });

  after(async () => {
    await Promise.all(vms.map((vm) => vm.kill()));
    if (base !== undefined) await rm(base, { recursive: true, force: true });
  });

  it("two clones of one snapshot mount different host directories at the same path", async (t) => {
    if (skip !== undefined) return t.skip(skip);
    const [dirA, dirB] = await Promise.all([hostDir("clone-a"), hostDir("clone-b")]);
    // Mounted as the restores come up (RestoreConfig.mounts).
    const [a, b] = await Promise.all([
      restore(withoutMounts, [{ hostPath: dirA, guestPath: "/work", ...owner }]),
      restore(withoutMounts, [{ hostPath: dirB, guestPath: "/work", ...owner }]),
    ]);
    await writeFile(join(dirA, "who"), "a\n");
    await writeFile(join(dirB, "who"), "b\n");
    assert.equal(await sh(a, "cat /work/who"), "a\n");
    assert.equal(await sh(b, "cat /work/who"), "b\n");
    await sh(a, "echo from-a > /work/wrote");
    await sh(b, "echo from-b > /work/wrote");
    assert.equal(await readFile(join(dirA, "wrote"), "utf8"), "from-a\n");
    assert.equal(await readFile(join(dirB, "wrote"), "utf8"), "from-b\n");
    // Host edits after the guest wrote are seen at once.
    await writeFile(join(dirA, "wrote"), "edited on the host\n");
    assert.equal(await sh(a, "cat /work/wrote"), "edited on the host\n");
    await Promise.all([a.unmount("/work"), b.unmount("/work")]);
    assert.deepEqual((await readdir(originalDir)).sort(), ["mark"]);
  });

  it("a snapshot taken with a mount attached restores without it; the original keeps its mount", async (t) => {
    if (skip !== undefined) return t.skip(skip);
    const clone = await restore(withMount);
    assert.deepEqual(clone.mounts, []);
    assert.equal(await sh(clone, "grep -c ' /work ' /proc/mounts; ls -A /work"), "0\n");
    const dir = await hostDir("after-restore");
    await writeFile(join(dir, "fresh"), "fresh\n");
    await clone.mount({ hostPath: dir, guestPath: "/work", ...owner });
    assert.equal(await sh(clone, "cat /work/fresh; ls /work"), "fresh\nfresh\n");
    await clone.unmount("/work");
    // The VM the snapshots were taken from still serves its mount, live.
    await writeFile(join(originalDir, "later"), "after both snapshots\n");
    assert.equal(await sh(original, "cat /work/mark /work/later"), "before-snapshot\nafter both snapshots\n");
  });
});
