/**
 * Pre-warmed prestarted VMs on real QEMU: restored, warmed up with one exec, paused; activation
 * resumes them and opens a new agent session. Clone correctness (random bytes, clock, disk) holds
 * for clones activated from them; activation → first exec byte is printed as a diagnostic.
 */
import assert from "node:assert/strict";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it, type TestContext } from "node:test";
import { hostClock } from "../../src/agent/index.ts";
import { Image, type Vm } from "../../src/index.ts";
import { assertClonesDiffer } from "../helpers/clones.ts";
import { fixtureImages } from "../helpers/fixtures.ts";
import { vmSkipReason } from "../helpers/vm.ts";

describe("pre-warmed prestarted VMs", { timeout: 600_000 }, () => {
  let skipReason: string | undefined;
  let dataDir: string;
  let runtimeDir: string;
  let image: Image;
  const vms: Vm[] = [];

  before(async () => {
    skipReason = await vmSkipReason();
    if (skipReason !== undefined) return;
    dataDir = await mkdtemp(join(tmpdir(), "sm-prewarm-data-"));
    runtimeDir = await mkdtemp(join(tmpdir(), "sm-prewarm-run-"));
    process.env.SUPERMACHINE_DATA_DIR = dataDir;
    process.env.SUPERMACHINE_RUNTIME_DIR = runtimeDir;
    const reference = `oci:${(await fixtureImages()).busybox}`;
    image = await Image.builder(reference)
      .name("busybox-prewarm")
      .memoryMiB(256)
      .withWarmup(async (vm) => {
        await vm.exec(["sh", "-c", "echo warmed > /warm.txt"]);
      })
      .warmupTag("v1")
      .build();
  });

  after(async () => {
    await Promise.all(vms.map((vm) => vm.kill()));
    if (dataDir !== undefined) await rm(dataDir, { recursive: true, force: true });
    if (runtimeDir !== undefined) await rm(runtimeDir, { recursive: true, force: true });
  });

  const vmIt = (name: string, fn: (t: TestContext) => Promise<void>) =>
    it(name, async (t) => {
      if (skipReason !== undefined) return t.skip(skipReason);
      try {
        await fn(t);
      } catch (error) {
        for (const vm of vms) {
          const log = await readFile(vm.consoleLogPath, "utf8").catch(() => "(none)");
          t.diagnostic(`console log of VM ${vm.id}, last 2 KiB:\n${log.slice(-2048)}`);
        }
        throw error;
      }
    });

  vmIt("prestart() pre-warms by default; activate() gives a working clone; kill() kills QEMU", async () => {
    const prestarted = await image.prestart();
    assert.equal(prestarted.warm, true);
    assert.ok(prestarted.ready);
    const vm = await prestarted.activate();
    vms.push(vm);
    assert.equal(prestarted.ready, false);
    assert.equal(vm.timings.kind, "prestarted");
    assert.equal(vm.timings.prestartMs, prestarted.prestartMs);
    assert.ok(vm.timings.agentReadyMs <= vm.timings.totalMs);
    assert.equal((await vm.exec(["cat", "/warm.txt"])).stdoutText, "warmed\n");
    await assert.rejects(prestarted.activate(), /already used/);
    await vm.stop();

    const unused = await image.prestart();
    assert.ok(unused.ready);
    await unused.kill();
    assert.equal(unused.ready, false);
    await unused.exited; // QEMU is gone
    await unused.kill(); // idempotent
  });

  vmIt("two clones from pre-warmed VMs: different random bytes, host time, separate disks", async () => {
    const [pa, pb] = await Promise.all([image.prestart(), image.prestart()]);
    // The host says it is an hour later: the clones' clocks must follow the host, not the snapshot.
    const realNowNs = hostClock.nowNs;
    hostClock.nowNs = () => realNowNs() + 3600n * 1_000_000_000n;
    let a: Vm;
    let b: Vm;
    try {
      [a, b] = await Promise.all([pa.activate(), pb.activate()]);
    } finally {
      hostClock.nowNs = realNowNs;
    }
    vms.push(a, b);
    await assertClonesDiffer(a, b, 3600);
    await a.exec(["sh", "-c", "echo only-a > /only-a && sync"]);
    assert.equal((await a.exec(["cat", "/only-a"])).stdoutText, "only-a\n");
    const inB = await b.execBuilder().argv(["test", "-e", "/only-a"]).reject(false).output();
    assert.notEqual(inB.exitCode, 0, "a file written in one clone is visible in the other");
    await Promise.all([a.stop(), b.stop()]);
  });
});
