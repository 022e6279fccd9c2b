/**
 * `npm run bench`: measures supermachine against floors measured in the same run and prints one
 * table (min/median/p95/max, ratio to the floor, budget). Budgets: docs/SPECIFICATION.md.
 *
 *   node bench/main.ts [--quick] [--only SECTION[,SECTION…]] [--write]
 *                      [--verifier-workers 1,2,4,8] [--verifier-cycles N] [--vcpu-cycles N]
 *
 * Sections, in order: spine, restore, pull, mounts, network, verifier, light, vcpus, ports, serve, cli
 * (all by default).
 * `--verifier-workers`: worker counts of the verifier loop (default 1,2,4,8, 1 with --quick: a
 * guest `rustc -O` takes 6–70 s under TCG here, depending on the shared host's day, so the default
 * takes from ten minutes to the better part of an hour);
 * `--verifier-cycles`: cycles per worker at each worker count (default 2: the first in a VM is cold);
 * the light loop (`light`) runs at the same worker counts, 10 cycles per worker (3 with --quick);
 * `--vcpu-cycles`: restore → exec → stop cycles per vCPU count (default 100, 20 with --quick).
 * `--write`: each section that ran replaces its block of docs/benchmarks.md (bench/report.ts).
 */
import { spawnSync } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { parseArgs } from "node:util";
import { hostAccelerator, resolveAssetPaths, Vm } from "../src/index.ts";
import { QemuProcess } from "../src/vmm/qemu-process.ts";
import { busyboxInitramfs } from "../test/helpers/hostile-initramfs.ts";
import { busyboxRootfs } from "../test/helpers/vm.ts";
import { CEILING_BYTES, channelCeiling } from "./channel-ceiling.ts";
import { cliStartBench } from "./cli-start.ts";
import { mountBench } from "./mounts.ts";
import { networkBench } from "./network.ts";
import { portsBench } from "./ports.ts";
import { pullBench } from "./pull.ts";
import { startRun, writeReport } from "./report.ts";
import { restoreBench } from "./restore.ts";
import { serveBench } from "./serve.ts";
import { summarize, Table } from "./table.ts";
import { vcpuBench } from "./vcpus.ts";
import { lightBench, verifierBench } from "./verifier.ts";

const SECTIONS = [
  "spine",
  "restore",
  "pull",
  "mounts",
  "network",
  "verifier",
  "light",
  "vcpus",
  "ports",
  "serve",
  "cli",
] as const;
type Section = (typeof SECTIONS)[number];

function usage(message: string): never {
  process.stderr.write(`bench: ${message} (see the usage at the top of bench/main.ts)\n`);
  process.exit(2);
}

function counts(flag: string, text: string | undefined, fallback: number[]): number[] {
  if (text === undefined) return fallback;
  const values = text.split(",").map(Number);
  if (values.some((n) => !Number.isInteger(n) || n < 1))
    usage(`--${flag} takes positive integers separated by commas, not ${JSON.stringify(text)}`);
  return values;
}

const { values: args } = (() => {
  try {
    return parseArgs({
      options: {
        quick: { type: "boolean", default: false },
        write: { type: "boolean", default: false },
        only: { type: "string" },
        "verifier-workers": { type: "string" },
        "verifier-cycles": { type: "string" },
        "vcpu-cycles": { type: "string" },
      },
    });
  } catch (error) {
    return usage((error as Error).message);
  }
})();
const quick = args.quick;
const only = args.only?.split(",") ?? [...SECTIONS];
for (const name of only)
  if (!(SECTIONS as readonly string[]).includes(name))
    usage(`unknown section ${name}: one of ${SECTIONS.join(", ")}`);
const runs = (section: Section) => only.includes(section);
const verifierWorkers = counts("verifier-workers", args["verifier-workers"], quick ? [1] : [1, 2, 4, 8]);
const [verifierCycles] = counts("verifier-cycles", args["verifier-cycles"], [2]);
const [vcpuCycles] = counts("vcpu-cycles", args["vcpu-cycles"], [quick ? 20 : 100]);
const table = new Table();
const run = startRun(process.argv.slice(2));

async function time(fn: () => Promise<unknown>): Promise<number> {
  const t0 = performance.now();
  await fn();
  return performance.now() - t0;
}

async function repeat(n: number, fn: () => Promise<unknown>): Promise<number[]> {
  const samples: number[] = [];
  for (let i = 0; i < n; i++) samples.push(await time(fn));
  return samples;
}

async function spine(): Promise<void> {
  const { accel } = await hostAccelerator();
  const assets = await resolveAssetPaths();
  const rootfs = await busyboxRootfs();
  const boots = quick ? 3 : 5;

  // Floor: the same kernel with the same command line (QemuProcess adds the TCG arguments; only
  // sm-init's own sm.* arguments are left out) booting an init that reboots at once (QEMU exits).
  const floorDir = await mkdtemp(join(tmpdir(), "sm-floor-"));
  const floorInitramfs = await busyboxInitramfs("#!/bin/busybox sh\n/bin/busybox reboot -f\n", floorDir);
  const floor = await repeat(boots, async () => {
    const qemu = await QemuProcess.launch({
      machine: {
        accel,
        memoryMiB: 256,
        vcpus: 1,
        kernelPath: assets.kernel,
        initramfsPath: floorInitramfs,
        kernelArgs: ["quiet"],
      },
      agent: false,
    });
    await qemu.exited;
    await qemu.stop();
  });
  await rm(floorDir, { recursive: true, force: true });
  table.add({ name: "boot floor: QEMU start → kernel → init → exit", unit: "ms", summary: summarize(floor) });

  const bootSamples: number[] = [];
  let vm: Vm | undefined;
  for (let i = 0; i < boots; i++) {
    const t0 = performance.now();
    const v = await Vm.start({ rootfs, memoryMiB: 256 });
    bootSamples.push(performance.now() - t0);
    if (i < boots - 1) await v.stop();
    else vm = v;
  }
  table.add({
    name: "cold boot to agent ready",
    unit: "ms",
    summary: summarize(bootSamples),
    against: "boot floor: QEMU start → kernel → init → exit",
    budget: "≤ 700 ms (TCG)",
  });

  try {
    const pings = await repeat(quick ? 200 : 1000, () => vm!.ping());
    table.add({ name: "channel round trip (ping)", unit: "ms", summary: summarize(pings) });

    const hostForkExec: number[] = [];
    for (let i = 0; i < 200; i++) {
      const t0 = performance.now();
      spawnSync("/bin/true");
      hostForkExec.push(performance.now() - t0);
    }
    table.add({ name: "host fork+exec /bin/true", unit: "ms", summary: summarize(hostForkExec) });
    const execs = await repeat(200, () => vm!.exec(["true"]));
    table.add({
      name: "exec round trip `true`",
      unit: "ms",
      summary: summarize(execs),
      against: "host fork+exec /bin/true",
    });

    // Floor: the same bytes produced in the guest and thrown away there.
    const bytes = 64 * 1024 * 1024;
    const dd = ["dd", "if=/dev/zero", "bs=1048576", "count=64"];
    const mbps = (samples: number[]) => summarize(samples.map((ms) => bytes / 1e6 / (ms / 1000)));
    const inGuest = await repeat(quick ? 2 : 5, () =>
      vm!.exec(["sh", "-c", `${dd.join(" ")} of=/dev/null 2>/dev/null`]),
    );
    table.add({ name: "guest dd 64 MiB to /dev/null", unit: "MB/s", summary: mbps(inGuest) });
    const throughput = await repeat(quick ? 2 : 5, () => vm!.exec(dd));
    table.add({
      name: "stdout throughput (dd 64 MiB to the host)",
      unit: "MB/s",
      summary: mbps(throughput),
      against: "guest dd 64 MiB to /dev/null",
      budget: "≥ 0.5×",
      higherIsBetter: true,
    });
  } finally {
    await vm?.stop();
  }

  const ceiling = await channelCeiling(accel, assets, quick ? 2 : 5);
  const ceilingMbps = (samples: number[]) =>
    summarize(samples.map((ms) => CEILING_BYTES / 1e6 / (ms / 1000)));
  const bareDd = "bare guest (no agent): dd 64 MiB to /dev/null";
  table.add({ name: bareDd, unit: "MB/s", summary: ceilingMbps(ceiling.devNull) });
  table.add({
    name: "bare guest (no agent): the same dd straight into the channel's port",
    unit: "MB/s",
    summary: ceilingMbps(ceiling.port),
    against: bareDd,
    higherIsBetter: true,
    reading:
      "The channel's own ceiling: no agent, no pipe, no frames; stdout goes through a pipe and the agent on top of this.",
  });
}

const sections: Record<Section, () => Promise<void>> = {
  spine,
  restore: () => restoreBench(table, quick),
  pull: () => pullBench(table, quick),
  mounts: () => mountBench(table, quick),
  network: () => networkBench(table, quick),
  verifier: () => verifierBench(table, { workers: verifierWorkers, cyclesPerWorker: verifierCycles! }),
  light: () => lightBench(table, { workers: verifierWorkers, cyclesPerWorker: quick ? 3 : 10 }),
  vcpus: () => vcpuBench(table, { runs: quick ? 2 : 3, cycles: vcpuCycles! }),
  ports: () => portsBench(table, quick),
  serve: () => serveBench(table, quick),
  cli: () => cliStartBench(table, quick),
};
for (const section of SECTIONS) {
  if (!runs(section)) continue;
  table.section = section;
  await sections[section]();
}
process.stdout.write(`\n${table.render()}\n`);
if (args.write) await writeReport(new URL("../docs/benchmarks.md", import.meta.url).pathname, table, run);
