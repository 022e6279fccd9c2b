/**
 * Restore timing, printed for docs/snapshots.md: restore → first exec byte through the public API,
 * against a bare restore of the same snapshot (QEMU started, state loaded, vCPUs running, agent
 * handshake; no Vm, no exec) measured alternately in the same run, and a prestarted activation.
 * Asserts only that every path works; the numbers are for reading.
 */
import assert from "node:assert/strict";
import { mkdtemp, open, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { AgentClient } from "../../src/agent/agent-client.ts";
import { Image } from "../../src/index.ts";
import { QemuProcess } from "../../src/vmm/qemu-process.ts";
import { fixtureImages } from "../helpers/fixtures.ts";
import { missingVmPrerequisite } from "../helpers/vm.ts";

const RUNS = Number(process.env.SNAPSHOT_TIMING_RUNS ?? 10);

function stats(xs: number[]) {
  const s = [...xs].sort((a, b) => a - b);
  const median = s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
  return { min: Math.round(s[0]!), median: Math.round(median), max: Math.round(s[s.length - 1]!) };
}

describe("snapshot restore timing", { timeout: 600_000 }, () => {
  let skipReason: string | undefined;
  let dataDir: string;
  let image: Image;

  before(async () => {
    skipReason = await missingVmPrerequisite();
    if (skipReason !== undefined) {
      if (process.env.CI === "true") throw new Error(`VM tests cannot run: ${skipReason}`);
      return;
    }
    dataDir = await mkdtemp(join(tmpdir(), "sm-snap-timing-"));
    process.env.SUPERMACHINE_DATA_DIR = dataDir;
    image = await Image.builder(`oci:${(await fixtureImages()).busybox}`)
      .name("timing")
      .memoryMiB(256)
      .build();
  });

  after(async () => {
    if (dataDir !== undefined) await rm(dataDir, { recursive: true, force: true });
  });

  /** QEMU + state + cont + HELLO (+ one exec's first output byte, on the raw agent client), nothing else. */
  async function bareRestore(): Promise<{ hello: number; execByte: number }> {
    const snapshot = image.snapshot!;
    const m = snapshot.manifest;
    const t0 = performance.now();
    const state = await open(snapshot.statePath, "r");
    const qemu = await QemuProcess.launch({
      machine: {
        accel: m.accelerator,
        memoryMiB: m.memoryMiB,
        vcpus: m.vcpus,
        kernelPath: snapshot.assets.kernel,
        initramfsPath: snapshot.assets.initramfs,
        kernelArgs: m.kernelArgs,
        ...(m.tscKHz === undefined ? {} : { tscKHz: m.tscKHz }),
        memory: { kind: "file", path: snapshot.memoryPath, share: false },
        incoming: "defer",
        paused: true,
      },
      extraFds: [state.fd],
      prepare: async (dir) => {
        await snapshot.createOverlay(join(dir, "rootfs.qcow2"));
        return { disks: [{ name: "root", path: join(dir, "rootfs.qcow2"), format: "qcow2" }] };
      },
    });
    await state.close();
    try {
      await qemu.qmp.execute("migrate-set-capabilities", {
        capabilities: [
          { capability: "x-ignore-shared", state: true },
          { capability: "events", state: true },
        ],
      });
      const loaded = qemu.qmp.waitForEvent("MIGRATION", {
        filter: (e) => e.data?.status === "completed",
        timeoutMs: 60_000,
      });
      await qemu.qmp.execute("migrate-incoming", { uri: "fd:3" });
      await loaded;
      await qemu.qmp.execute("cont");
      const agent = await AgentClient.connect(await qemu.agentSocket, { timeoutMs: 60_000 });
      const hello = performance.now() - t0;
      const exec = agent.exec({ argv: ["echo", "x"], env: { PATH: "/bin:/usr/bin" } });
      await exec.read();
      const execByte = performance.now() - t0;
      await exec.exited;
      agent.close();
      return { hello, execByte };
    } finally {
      await qemu.kill();
    }
  }

  it("restore → first exec byte vs bare restore vs prestarted activation", async (t) => {
    if (skipReason !== undefined) return t.skip(skipReason);
    const rows = {
      bare: [] as number[],
      bareFirstExecByte: [] as number[],
      apiAgentReady: [] as number[],
      apiFirstExecByte: [] as number[],
      prestartedFirstExecByte: [] as number[],
    };
    const firstByte = async (vm: Awaited<ReturnType<Image["start"]>>, t0: number) => {
      const handle = await vm.execBuilder().argv(["echo", "x"]).spawn();
      await new Promise<void>((resolve) => handle.stdout.once("data", () => resolve()));
      const ms = performance.now() - t0;
      await handle.wait();
      return ms;
    };
    for (let i = 0; i < RUNS; i++) {
      const bare = await bareRestore();
      rows.bare.push(bare.hello);
      rows.bareFirstExecByte.push(bare.execByte);
      let t0 = performance.now();
      const vm = await image.start();
      rows.apiAgentReady.push(vm.timings.agentReadyMs);
      rows.apiFirstExecByte.push(await firstByte(vm, t0));
      await vm.stop();
      const prestarted = await image.prestart();
      t0 = performance.now();
      const pvm = await prestarted.activate();
      rows.prestartedFirstExecByte.push(await firstByte(pvm, t0));
      await pvm.stop();
    }
    const bare = stats(rows.bareFirstExecByte).median;
    for (const [name, xs] of Object.entries(rows)) {
      const s = stats(xs);
      console.log(
        `# ${name.padEnd(24)} ms min ${s.min} median ${s.median} max ${s.max}  (median / bare first exec byte median ${(s.median / bare).toFixed(2)})`,
      );
    }
    console.log(`# load average: ${(await import("node:fs")).readFileSync("/proc/loadavg", "utf8").trim()}`);
    assert.equal(rows.apiFirstExecByte.length, RUNS);
  });
});
