/**
 * A guest that abuses its own resources — forks without end, fills its disk, takes all its memory —
 * hurts only itself: the host's memory and disk stay bounded, and the VM stays usable or ends with a
 * typed error. (Lies on the agent channel: vm-hostile.test.ts and the contract tests.)
 */
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { readdir, stat } from "node:fs/promises";
import { dirname, join } from "node:path";
import { describe } from "node:test";
import { dataDir } from "../../src/internal/index.ts";
import { vmTest } from "../helpers/vm.ts";

/** Resident memory of a process in bytes (from /proc). */
function rssOf(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  return Number(/^VmRSS:\s+(\d+) kB/m.exec(status)?.[1] ?? 0) * 1024;
}

/** Bytes allocated on disk under a folder. */
async function diskUsage(dir: string): Promise<number> {
  let total = 0;
  for (const entry of await readdir(dir, { withFileTypes: true, recursive: true })) {
    if (entry.isFile()) total += (await stat(join(entry.parentPath, entry.name))).blocks * 512;
  }
  return total;
}

/** The QEMU process of a VM (its command line names the VM's id). */
function qemuPid(vmId: string): number {
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    const cmdline = readFileSync(`/proc/${name}/cmdline`, "utf8");
    if (cmdline.includes("qemu-system") && cmdline.includes(`supermachine-${vmId}`)) return Number(name);
  }
  throw new Error(`no QEMU for VM ${vmId}`);
}

describe("a guest that abuses its own resources", () => {
  vmTest("a fork bomb ends at its exec's timeout; the VM answers again", async ({ start }) => {
    const vm = await start({ memoryMiB: 256 });
    const outcome = await vm.exec(["sh", "-c", "b() { b | b & }; b; sleep 60"], {
      timeoutMs: 3_000,
      killGraceMs: 500,
      reject: false,
    });
    assert.equal(outcome.timedOut, true);
    // The bomb's processes were in the exec's process group: all gone; the guest works.
    const ps = await vm.exec(["sh", "-c", "ls /proc | grep -c '^[0-9]'"], { timeoutMs: 60_000 });
    assert.ok(Number(ps.stdoutText) < 50, `${ps.stdoutText.trim()} processes left`);
    assert.ok(rssOf(qemuPid(vm.id)) < (256 + 512) * 1024 * 1024);
  });

  vmTest(
    "filling the disk ends in ENOSPC in the guest; the host keeps at most the VM's disk size for it",
    async ({ start }) => {
      const vm = await start({ memoryMiB: 256 });
      const fill = await vm.exec(
        ["sh", "-c", "dd if=/dev/zero of=/fill bs=1M; echo dd:$?; sync; cat /sys/block/vda/size"],
        { timeoutMs: 600_000, reject: false },
      );
      assert.match(fill.stdoutText, /^dd:[1-9]/m, "dd failed");
      assert.match(fill.stderrText, /No space left on device/);
      const diskBytes = Number(fill.stdoutText.trim().split("\n").at(-1)) * 512;
      assert.ok(diskBytes > 0);
      // What the host keeps for this VM: its disk dir (the overlay) and its runtime dir (logs).
      const used =
        (await diskUsage(join(dataDir(), "vms", vm.id))) + (await diskUsage(dirname(vm.consoleLogPath)));
      assert.ok(used > diskBytes / 4, `the overlay holds the guest's writes (${used} bytes)`);
      assert.ok(
        used < diskBytes + 64 * 1024 * 1024,
        `the VM's dirs use ${used} bytes for a ${diskBytes}-byte disk`,
      );
      assert.equal((await vm.exec(["echo", "still here"])).stdoutText, "still here\n");
    },
    { timeout: 900_000 },
  );

  vmTest(
    "taking all memory ends with the guest's OOM killer; QEMU's memory stays bounded",
    async ({ start }) => {
      const vm = await start({ memoryMiB: 256 });
      // `tail -n 1` keeps the current line: 1 GiB without a newline does not fit in 256 MiB.
      const hog = await vm.exec(["sh", "-c", "head -c 1073741824 /dev/zero | tail -n 1 >/dev/null"], {
        timeoutMs: 600_000,
        reject: false,
      });
      assert.notEqual(hog.exitCode, 0);
      assert.ok(
        rssOf(qemuPid(vm.id)) < (256 + 512) * 1024 * 1024,
        "QEMU's RSS is bounded by guest RAM + overhead",
      );
      assert.equal((await vm.exec(["echo", "alive"])).stdoutText, "alive\n");
    },
    { timeout: 900_000 },
  );
});
