/** QEMU never outlives its host process, and the next start sweeps what a killed host left. */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { existsSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { setTimeout as delay } from "node:timers/promises";
import { scratchDir } from "../helpers/scratch.ts";
import { busyboxRootfs, vmTest } from "../helpers/vm.ts";

const index = new URL("../../src/index.ts", import.meta.url).href;
const cli = new URL("../../bin/supermachine", import.meta.url).pathname;

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** No event tells us when an unrelated process is gone: look, boundedly. */
async function waitGone(pid: number, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (!alive(pid)) return true;
    await delay(25);
  }
  return !alive(pid);
}

vmTest("kill -9 of the host leaves no QEMU, and the next command sweeps its state", async () => {
  const runtime = await scratchDir("sm-rt-");
  const env = { ...process.env, SUPERMACHINE_RUNTIME_DIR: runtime };
  const rootfs = await busyboxRootfs();
  const host = spawn(
    process.execPath,
    [
      "--input-type=module",
      "-e",
      `import { Vm } from ${JSON.stringify(index)};
       const vm = await Vm.start({ rootfs: ${JSON.stringify(rootfs)}, memoryMiB: 128 });
       console.log(vm.id);
       setInterval(() => {}, 1000);`,
    ],
    { env, stdio: ["ignore", "pipe", "inherit"] },
  );
  const [line] = (await once(createInterface({ input: host.stdout! }), "line")) as [string];
  const id = line.trim();
  const owner = JSON.parse(await readFile(join(runtime, "vms", id, "owner.json"), "utf8")) as {
    qemuPid: number;
  };
  assert.ok(alive(owner.qemuPid), "QEMU runs while its host does");

  host.kill("SIGKILL");
  await once(host, "exit");
  assert.ok(await waitGone(owner.qemuPid, 5_000), "QEMU died with its host");
  assert.ok(existsSync(join(runtime, "vms", id)), "the killed host could not clean up");

  const next = spawn(cli, ["run", "--rootfs", rootfs, "--", "true"], { env, stdio: "inherit" });
  const [code] = (await once(next, "exit")) as [number];
  assert.equal(code, 0);
  assert.ok(!existsSync(join(runtime, "vms", id)), "the next start swept the stale VM dir");
});
