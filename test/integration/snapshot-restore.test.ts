/**
 * Snapshots end to end on real QEMU: bake the busybox fixture image once, then restore clones and
 * check what DESIGN.md's "Clone correctness" and "Writes" promise, the typed refusals, the bake
 * cache, and long runs of restore → exec → stop cycles without leaks at 1 and at 2 vCPUs.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { link, mkdir, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { Image, type ImageStartConfig, SnapshotError, Store, Vm } from "../../src/index.ts";
import { assertClonesDiffer, restoreExecStopCycle } from "../helpers/clones.ts";
import { fixtureImages } from "../helpers/fixtures.ts";
import { qemuPidsOf } from "../helpers/processes.ts";
import { busyboxRootfs, vmSkipReason } from "../helpers/vm.ts";

/**
 * Restore → exec → stop cycles, run at 1 and again at 2 vCPUs. Under TCG a 2-vCPU cycle costs about
 * what a 1-vCPU one does (~0.6 s on a quiet machine), so both run the full count (the reliability run of docs/snapshots.md: 100 cycles).
 */
const CYCLES = Number(process.env.SNAPSHOT_CYCLES ?? 100);

async function sha256(path: string): Promise<string> {
  const hash = createHash("sha256");
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest("hex");
}

describe("snapshots of the busybox image", { timeout: 1_200_000 }, () => {
  let skipReason: string | undefined;
  let dataDir: string;
  let runtimeDir: string;
  let image: Image;
  let image2: Image;
  let reference: string;
  const vms: Vm[] = [];
  const bakeOptions = (vcpus = 1) =>
    Image.builder(reference)
      .name(vcpus === 1 ? "busybox-test" : `busybox-test-${vcpus}vcpus`)
      .memoryMiB(256)
      .vcpus(vcpus)
      .withWarmup(async (vm) => {
        await vm.exec(["sh", "-c", "echo warmed > /warm.txt && mkdir -p /data && echo baked > /data/state"]);
      });

  before(async () => {
    skipReason = await vmSkipReason();
    if (skipReason !== undefined) return;
    dataDir = await mkdtemp(join(tmpdir(), "sm-snap-data-"));
    runtimeDir = await mkdtemp(join(tmpdir(), "sm-snap-run-"));
    process.env.SUPERMACHINE_DATA_DIR = dataDir;
    process.env.SUPERMACHINE_RUNTIME_DIR = runtimeDir;
    reference = `oci:${(await fixtureImages()).busybox}`;
    image = await bakeOptions().warmupTag("v1").build();
    image2 = await bakeOptions(2).warmupTag("v1").build();
  });

  after(async () => {
    await Promise.all(vms.map((vm) => vm.kill()));
    if (dataDir !== undefined) await rm(dataDir, { recursive: true, force: true });
    if (runtimeDir !== undefined) await rm(runtimeDir, { recursive: true, force: true });
  });

  const start = async (config: ImageStartConfig = {}) => {
    const vm = await image.start(config);
    vms.push(vm);
    return vm;
  };

  const snapIt = (name: string, fn: () => Promise<void>) =>
    it(name, async (t) => {
      if (skipReason !== undefined) return t.skip(skipReason);
      try {
        await fn();
      } catch (error) {
        for (const vm of vms) {
          const log = await readFile(vm.consoleLogPath, "utf8").catch(() => "(none)");
          t.diagnostic(`console log of VM ${vm.id}, last 2 KiB:\n${log.slice(-2048)}`);
        }
        throw error;
      }
    });

  snapIt("the snapshot dir holds manifest, memory, device state and disk state", async () => {
    const snapshot = image.snapshot!;
    assert.equal(snapshot.dir, join(dataDir, "snapshots", "busybox-test"));
    assert.deepEqual((await readdir(snapshot.dir)).sort(), [
      "disk.qcow2",
      "manifest.json",
      "memory",
      "state",
    ]);
    const m = snapshot.manifest;
    assert.equal(m.memoryMiB, 256);
    assert.equal(m.vcpus, 1);
    assert.equal(m.warmupTag, "v1");
    assert.equal(m.accelerator, "tcg");
    assert.equal(m.files.memory.sizeBytes, 256 * 1024 * 1024);
    assert.ok(
      m.files.state.sizeBytes < 1024 * 1024,
      `device state is small (${m.files.state.sizeBytes} bytes)`,
    );
    const listed = await new Store().snapshots();
    assert.deepEqual(listed.map((s) => s.name).sort(), ["busybox-test", "busybox-test-2vcpus"]);
    assert.equal(image2.snapshot!.manifest.vcpus, 2);
  });

  snapIt("a restored VM runs commands and has what the warm-up wrote", async () => {
    const vm = await start();
    assert.equal(vm.timings.kind, "restore");
    assert.ok(vm.timings.stateLoadedMs! <= vm.timings.agentReadyMs);
    const out = await vm.exec(["cat", "/warm.txt", "/data/state"]);
    assert.equal(out.stdoutText, "warmed\nbaked\n");
    await vm.stop();
    assert.equal(await vm.done, undefined);
  });

  snapIt("clones read different random bytes and see the host's time", async () => {
    // The bake must lie far enough in the past for a clone without a clock step to fail.
    const age = Date.now() - Date.parse(image.snapshot!.manifest.createdAt);
    if (age < 3000) await new Promise((resolve) => setTimeout(resolve, 3000 - age));
    const [a, b] = await Promise.all([start(), start()]);
    await assertClonesDiffer(a, b);
    await Promise.all([a.stop(), b.stop()]);
  });

  snapIt("a clone takes the hostname it is given; the rest of /etc/hosts stays", async () => {
    const vm = await start({ hostname: "web-1" });
    const out = await vm.exec([
      "sh",
      "-c",
      "hostname; cat /etc/hostname; grep -c localhost /etc/hosts; grep 127.0.1.1 /etc/hosts",
    ]);
    assert.equal(out.stdoutText, "web-1\nweb-1\n2\n127.0.1.1\tweb-1\n");
    await vm.stop();
  });

  snapIt(
    "a file written in one clone is visible neither in another clone nor in a fresh restore",
    async () => {
      const [a, b] = await Promise.all([start(), start()]);
      await a.exec(["sh", "-c", "echo from-a > /data/state && echo new > /data/new && sync"]);
      const inB = await b.exec(["sh", "-c", "cat /data/state; ls /data"]);
      assert.equal(inB.stdoutText, "baked\nstate\n");
      await a.stop();
      const c = await start();
      assert.equal((await c.exec(["sh", "-c", "cat /data/state; ls /data"])).stdoutText, "baked\nstate\n");
      await Promise.all([b.stop(), c.stop()]);
    },
  );

  snapIt("memory written in a clone does not change the snapshot's files", async () => {
    const snapshot = image.snapshot!;
    const memoryBefore = snapshot.manifest.files.memory.sha256!;
    const diskBefore = await sha256(snapshot.diskPath);
    const vm = await start();
    // 32 MiB into tmpfs (guest RAM), and disk writes.
    await vm.exec([
      "sh",
      "-c",
      "dd if=/dev/urandom of=/dev/shm/fill bs=1M count=32 2>/dev/null && echo x > /x && sync",
    ]);
    await vm.stop();
    assert.equal(await sha256(snapshot.memoryPath), memoryBefore);
    assert.equal(await sha256(snapshot.diskPath), diskBefore);
  });

  snapIt("fromSnapshot refuses another accelerator and missing files with typed errors", async () => {
    const snapshot = image.snapshot!;
    const copy = async (name: string, files: string[]) => {
      const dir = join(dataDir, "copies", name);
      await mkdir(dir, { recursive: true });
      for (const f of files) await link(join(snapshot.dir, f), join(dir, f));
      return dir;
    };
    const kvm = await copy("kvm", ["memory", "state", "disk.qcow2"]);
    await writeFile(join(kvm, "manifest.json"), JSON.stringify({ ...snapshot.manifest, accelerator: "kvm" }));
    await assert.rejects(Image.fromSnapshot(kvm), (error: unknown) => {
      assert.ok(error instanceof SnapshotError);
      assert.equal(error.code, "SNAPSHOT_INCOMPATIBLE");
      assert.equal(error.snapshotDir, kvm);
      return true;
    });
    const noMemory = await copy("no-memory", ["manifest.json", "state", "disk.qcow2"]);
    await assert.rejects(Image.fromSnapshot(noMemory), (error: unknown) => {
      assert.ok(error instanceof SnapshotError);
      assert.equal(error.code, "SNAPSHOT_CORRUPT");
      return true;
    });
    const badState = await copy("bad-state", ["manifest.json", "memory", "disk.qcow2"]);
    const state = await readFile(snapshot.statePath);
    const middle = state.length >> 1;
    state[middle] = (state[middle] ?? 0) ^ 0xff;
    await writeFile(join(badState, "state"), state);
    await assert.rejects(Image.fromSnapshot(badState), { code: "SNAPSHOT_CORRUPT" });
    // The intact snapshot opens by name and by dir.
    const byName = await Image.fromSnapshot("busybox-test");
    assert.equal(byName.snapshot!.dir, snapshot.dir);
  });

  snapIt(
    "a second build with the same inputs reuses the snapshot; a new warm-up tag bakes again",
    async () => {
      const first = image.snapshot!.manifest.createdAt;
      const again = await bakeOptions().warmupTag("v1").build();
      assert.equal(again.snapshot!.manifest.createdAt, first, "same inputs baked again");
      const retagged = await bakeOptions().warmupTag("v2").build();
      assert.notEqual(retagged.snapshot!.manifest.createdAt, first, "a changed tag reused the old snapshot");
      assert.equal(retagged.snapshot!.manifest.warmupTag, "v2");
      image = retagged;
      const vm = await start();
      assert.equal((await vm.exec(["cat", "/warm.txt"])).stdoutText, "warmed\n");
      await vm.stop();
    },
  );

  snapIt("a prestarted VM activates into a working clone", async () => {
    const prestarted = await image.prestart();
    assert.ok(prestarted.ready);
    const vm = await prestarted.activate();
    vms.push(vm);
    assert.equal(vm.timings.kind, "prestarted");
    assert.equal((await vm.exec(["cat", "/warm.txt"])).stdoutText, "warmed\n");
    await vm.stop();
    const unused = await image.prestart();
    await unused.kill();
    assert.equal(unused.ready, false);
  });

  snapIt(
    "vm.snapshot() of a restored VM keeps it running and restores with its memory and disk",
    async () => {
      const a = await start();
      // A tmpfs file lives in guest RAM, a root file on the disk overlay.
      await a.exec(["sh", "-c", "echo in-ram > /dev/shm/mark && echo on-disk > /data/second && sync"]);
      const dir = join(dataDir, "snapshots", "second-level");
      const second = await a.snapshot(dir);
      assert.equal(second.manifest.parent, image.snapshot!.dir);
      assert.deepEqual(
        second.manifest.files.disk.backingChain.map((b) => b.path),
        [image.snapshot!.diskPath, ...image.snapshot!.manifest.files.disk.backingChain.map((b) => b.path)],
      );
      // The source VM goes on.
      assert.equal((await a.exec(["cat", "/dev/shm/mark"])).stdoutText, "in-ram\n");
      await a.exec(["sh", "-c", "echo after > /data/second"]);
      const restored = await Image.fromSnapshot("second-level");
      const b = await restored.start();
      vms.push(b);
      assert.equal(
        (await b.exec(["cat", "/dev/shm/mark", "/data/second", "/warm.txt"])).stdoutText,
        "in-ram\non-disk\nwarmed\n",
      );
      await Promise.all([a.stop(), b.stop()]);
      await assert.rejects(new Store().removeSnapshot(image.snapshot!.name), { code: "INVALID_ARGUMENT" });
      await new Store().removeSnapshot("second-level");
    },
  );

  snapIt("vm.snapshot() of a booted VM restores with its memory; its processes run on in both", async () => {
    const booted = await Vm.start({ rootfs: await busyboxRootfs(), memoryMiB: 256 });
    vms.push(booted);
    await booted.exec(["sh", "-c", "echo booted-ram > /dev/shm/mark"]);
    await booted.startWorkload(["sh", "-c", "while :; do echo tick >> /dev/shm/ticks; sleep 0.05; done"]);
    const snapshot = await booted.snapshot(join(dataDir, "snapshots", "from-boot"));
    assert.equal(snapshot.manifest.parent, undefined);
    assert.equal(snapshot.manifest.memoryBackendId, "microvm.ram");
    const clone = await (await Image.fromSnapshot("from-boot")).start();
    vms.push(clone);
    assert.equal((await clone.exec(["cat", "/dev/shm/mark"])).stdoutText, "booted-ram\n");
    // Saved frozen (FREEZE), thawed after the save and by the clone's HELLO: the workload ticks on.
    const ticksOn =
      "n=$(wc -l < /dev/shm/ticks); while [ $(wc -l < /dev/shm/ticks) -le $n ]; do sleep 0.05; done; cat /sys/fs/cgroup/sm/cgroup.freeze /etc/machine-id";
    const [inBooted, inClone] = await Promise.all([
      booted.exec(["sh", "-c", ticksOn]),
      clone.exec(["sh", "-c", ticksOn]),
    ]);
    const [frozenB, idB] = inBooted.stdoutText.split("\n");
    const [frozenC, idC] = inClone.stdoutText.split("\n");
    assert.deepEqual([frozenB, frozenC], ["0", "0"]);
    assert.notEqual(idB, idC, "the clone has a machine id of its own");
    await Promise.all([booted.stop(), clone.stop()]);
  });

  const cyclesIt = (vcpus: number, count: number, current: () => Image) =>
    snapIt(
      `${count} restore → exec → stop cycles at ${vcpus} vCPU${vcpus === 1 ? "" : "s"} without failures or leaks`,
      async () => {
        const cycleImage = current();
        assert.equal(cycleImage.snapshot!.manifest.vcpus, vcpus);
        const times: number[] = [];
        const ids: string[] = [];
        const started = performance.now();
        for (let i = 0; i < count; i++) {
          const t0 = performance.now();
          // The first clone also checks that it runs with the snapshot's vCPUs.
          await restoreExecStopCycle(cycleImage, i, { started: ids, ...(i === 0 ? { vcpus } : {}) });
          times.push(performance.now() - t0);
        }
        times.sort((x, y) => x - y);
        const pct = (p: number) =>
          times[Math.min(times.length - 1, Math.floor((p / 100) * times.length))]!.toFixed(0);
        console.log(
          `# vcpus ${vcpus}: ${count} cycles in ${((performance.now() - started) / 1000).toFixed(1)} s; per cycle ms: min ${pct(0)} p50 ${pct(50)} p90 ${pct(90)} max ${pct(100)}`,
        );
        assert.deepEqual(qemuPidsOf(ids), [], "QEMU processes left behind");
        const left = await readdir(join(runtimeDir, "vms")).catch(() => [] as string[]);
        assert.deepEqual(left, [], "VM runtime dirs (sockets, overlays) left behind");
        const tempLeft = (await readdir(join(dataDir, "snapshots"))).filter((n) => n.startsWith("."));
        assert.deepEqual(tempLeft, [], "bake temp dirs left behind");
      },
    );

  cyclesIt(1, CYCLES, () => image);
  cyclesIt(2, CYCLES, () => image2);
});
