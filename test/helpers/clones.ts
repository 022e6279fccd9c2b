/** Checks and timings shared by the snapshot tests and the bench. */
import assert from "node:assert/strict";
import { performance } from "node:perf_hooks";
import type { Image, Vm } from "../../src/index.ts";

/** Time from asking for a VM (`start`) to the first stdout byte of `echo x` in it. */
export async function firstExecByte(start: () => Promise<Vm>): Promise<{ ms: number; vm: Vm }> {
  const t0 = performance.now();
  const vm = await start();
  const handle = await vm.execBuilder().argv(["echo", "x"]).spawn();
  for await (const event of handle) {
    if (event.kind === "stdout") break;
  }
  const ms = performance.now() - t0;
  await handle.wait().catch(() => undefined);
  return { ms, vm };
}

/**
 * Two clones of one snapshot read different random bytes, have machine ids of their own and their
 * VM ids as hostnames, and each sees the host's time (±1 s).
 */
export async function assertClonesDiffer(a: Vm, b: Vm, hostOffsetSeconds = 0): Promise<void> {
  const read = async (vm: Vm) => {
    const before = Date.now() / 1000 + hostOffsetSeconds;
    const out = await vm.exec([
      "sh",
      "-c",
      "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s; cat /etc/machine-id; hostname",
    ]);
    const after = Date.now() / 1000 + hostOffsetSeconds;
    const [random, seconds, machineId, hostname] = out.stdoutText.trim().split("\n");
    return { random: random!, seconds: Number(seconds), machineId, hostname, before, after };
  };
  const [ra, rb] = await Promise.all([read(a), read(b)]);
  assert.equal(ra.random.length, 64);
  assert.notEqual(ra.random, rb.random, "two clones produced the same random bytes");
  assert.match(ra.machineId ?? "", /^[0-9a-f]{32}$/);
  assert.notEqual(ra.machineId, rb.machineId, "two clones have the same /etc/machine-id");
  assert.deepEqual([ra.hostname, rb.hostname], [a.id, b.id], "each clone is named after its VM id");
  for (const r of [ra, rb]) {
    assert.ok(
      r.seconds >= Math.floor(r.before) - 1 && r.seconds <= Math.ceil(r.after) + 1,
      `guest time ${r.seconds} is not within 1 s of the host's [${r.before}, ${r.after}]`,
    );
  }
}

/**
 * One restore → exec → stop cycle (the snapshot tests' long runs, the bench's reliability rows): a
 * clone of `image` echoes `cycle i` (after counting its CPUs, with `vcpus`), then stops. `started`
 * gets the clone's id as soon as it exists, to look for leftovers afterwards. A clone that answers
 * wrong is killed and the error thrown.
 */
export async function restoreExecStopCycle(
  image: Image,
  i: number,
  options: { vcpus?: number; started?: string[] } = {},
): Promise<void> {
  const vm = await image.start();
  options.started?.push(vm.id);
  try {
    if (options.vcpus !== undefined) {
      const cpus = await vm.exec(["sh", "-c", "grep -c ^processor /proc/cpuinfo"]);
      assert.equal(cpus.stdoutText, `${options.vcpus}\n`, "the clone runs with the snapshot's vCPUs");
    }
    const out = await vm.exec(["echo", `cycle ${i}`]);
    assert.equal(out.stdoutText, `cycle ${i}\n`);
  } catch (error) {
    await vm.kill();
    throw error;
  }
  await vm.stop();
}
