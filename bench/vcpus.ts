/**
 * Multi-vCPU rows of `npm run bench`: the busybox image baked at 1, 2 and 4 vCPUs; a 2-way parallel
 * CPU workload at 2 vCPUs against the same workload at 1 vCPU (QEMU's multi-threaded TCG runs one
 * host thread per vCPU, so on a 2-core host the ratio tends to 0.5 when the cores are free); and a
 * reliability run of restore → exec → stop cycles at each vCPU count, with failed cycles and
 * leftovers (QEMU processes, runtime dirs) counted.
 */
import { access, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { Image } from "../src/index.ts";
import { runtimeDir } from "../src/internal/paths.ts";
import { restoreExecStopCycle } from "../test/helpers/clones.ts";
import { fixtureImages } from "../test/helpers/fixtures.ts";
import { qemuPidsOf } from "../test/helpers/processes.ts";
import { summarize, type Table } from "./table.ts";

const VCPUS = [1, 2, 4] as const;
/** Iterations of one busy loop: ~10 s of shell arithmetic under TCG on the loaded 2-core machine. */
const LOOP_ITERATIONS = 20_000;
/** Two busy loops of fixed work at once, in the guest's busybox sh. */
const PARALLEL_WORKLOAD = [
  "sh",
  "-c",
  `w() { i=0; while [ $i -lt ${LOOP_ITERATIONS} ]; do i=$((i+1)); done; }; w & w & wait`,
];

export interface VcpuBenchOptions {
  /** Runs of the parallel workload per vCPU count. */
  readonly runs: number;
  /** Restore → exec → stop cycles per vCPU count. */
  readonly cycles: number;
}

export async function vcpuBench(table: Table, options: VcpuBenchOptions): Promise<void> {
  const fx = await fixtureImages();
  const dataDir = await mkdtemp(join(tmpdir(), "sm-bench-vcpus-"));
  try {
    const images = new Map<number, Image>();
    for (const vcpus of VCPUS) {
      const t0 = performance.now();
      images.set(
        vcpus,
        await Image.builder(`oci:${fx.busybox}`)
          .name(`bench-${vcpus}vcpus`)
          .memoryMiB(256)
          .vcpus(vcpus)
          .pullOptions({ dataDir })
          .force()
          .build(),
      );
      table.add({
        name: `bake (busybox, 256 MiB, ${vcpus} vCPU${vcpus === 1 ? "" : "s"})`,
        unit: "ms",
        summary: summarize([performance.now() - t0]),
      });
    }

    // The two vCPU counts alternate on one clone each, so load changes hit both alike.
    const parallelName = (vcpus: number) =>
      `2 busy loops of ${LOOP_ITERATIONS / 1000}k at once, ${vcpus} vCPU${vcpus === 1 ? "" : "s"}`;
    const one = await images.get(1)!.start();
    const two = await images.get(2)!.start();
    try {
      const samples = new Map<number, number[]>([
        [1, []],
        [2, []],
      ]);
      for (let i = 0; i < options.runs; i++) {
        for (const [vcpus, vm] of [
          [1, one],
          [2, two],
        ] as const) {
          const t0 = performance.now();
          await vm.exec(PARALLEL_WORKLOAD, { timeoutMs: 600_000 });
          samples.get(vcpus)!.push(performance.now() - t0);
        }
      }
      table.add({ name: parallelName(1), unit: "ms", summary: summarize(samples.get(1)!) });
      table.add({
        name: parallelName(2),
        unit: "ms",
        summary: summarize(samples.get(2)!),
        against: parallelName(1),
      });
    } finally {
      await Promise.all([one.kill(), two.kill()]);
    }

    for (const vcpus of VCPUS) {
      const times: number[] = [];
      const ids: string[] = [];
      let failures = 0;
      let firstFailure: unknown;
      for (let i = 0; i < options.cycles; i++) {
        const t0 = performance.now();
        try {
          await restoreExecStopCycle(images.get(vcpus)!, i, { started: ids, ...(i === 0 ? { vcpus } : {}) });
          times.push(performance.now() - t0);
        } catch (error) {
          failures++;
          firstFailure ??= error;
        }
      }
      const leftDirs = (
        await Promise.all(
          ids.map((id) =>
            access(join(runtimeDir(), "vms", id)).then(
              () => 1,
              () => 0,
            ),
          ),
        )
      ).reduce((a: number, b: number) => a + b, 0);
      const leftQemu = qemuPidsOf(ids).length;
      const label = `${vcpus} vCPU${vcpus === 1 ? "" : "s"}`;
      if (times.length > 0)
        table.add({ name: `restore → exec → stop cycle, ${label}`, unit: "ms", summary: summarize(times) });
      process.stderr.write(
        `bench: ${label}: ${failures} failed cycle(s), ${leftQemu} QEMU process(es) and ${leftDirs} runtime dir(s) left${firstFailure === undefined ? "" : `; the first failure: ${String(firstFailure)}`}\n`,
      );
      table.add({
        name: `  of ${options.cycles} cycles at ${label}: failed + QEMU left + dirs left`,
        unit: "count",
        summary: summarize([failures + leftQemu + leftDirs]),
        budget: "= 0",
      });
    }
  } finally {
    await rm(dataDir, { recursive: true, force: true });
  }
}
