/**
 * Mount rows of `npm run bench` (also runnable alone: `node bench/mounts.ts [--quick]`): sequential
 * write and read of a 64 MiB file and small-file create+stat+delete on a live host-directory
 * mount, against the guest's own disk, and `follow` against `opaque` (the cost of the checks).
 * See docs/mounts.md.
 */
import { chown, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { Vm } from "../src/index.ts";
import { busyboxRootfs } from "../test/helpers/vm.ts";
import { summarize, Table } from "./table.ts";

const FILE_MIB = 64;

export async function mountBench(table: Table, quick: boolean): Promise<void> {
  const runs = quick ? 2 : 3;
  const files = quick ? 100 : 300;
  const base = await mkdtemp(join(tmpdir(), "sm-bench-mounts-"));
  const vm = await Vm.start({ rootfs: await busyboxRootfs(), memoryMiB: 512 });
  try {
    const owner = process.geteuid?.() === 0 ? { owner: { uid: 4242, gid: 4243 } } : {};
    const targets: [string, string][] = [["disk", "/root/bench"]];
    for (const policy of ["opaque", "follow"] as const) {
      const dir = await mkdtemp(join(base, `${policy}-`));
      if (process.geteuid?.() === 0) await chown(dir, 4242, 4243);
      await vm.mount({ hostPath: dir, guestPath: `/mnt/${policy}`, symlinks: policy, ...owner });
      targets.push([`mount (${policy})`, `/mnt/${policy}`]);
    }
    const sh = async (script: string) => {
      const t0 = performance.now();
      await vm.exec(["sh", "-c", script], { timeoutMs: 600_000 });
      return performance.now() - t0;
    };
    await sh("mkdir -p /root/bench");
    const rows: { name: string; unit: string; samples: number[]; against: string | undefined }[] = [];
    const add = (name: string, unit: string, samples: number[], against?: string) => {
      table.add({
        name,
        unit,
        summary: summarize(samples),
        higherIsBetter: true,
        ...(against ? { against } : {}),
      });
      rows.push({ name, unit, samples, against });
    };
    for (const [kind, what] of [
      ["write", `sequential write ${FILE_MIB} MiB`],
      ["read", `sequential read ${FILE_MIB} MiB`],
      ["small", `small files create+stat+delete (${files})`],
    ] as const) {
      for (const [label, dir] of targets) {
        const samples: number[] = [];
        for (let i = 0; i < runs; i++) {
          if (kind === "write") {
            await sh(`rm -f ${dir}/big; sync`);
            const ms = await sh(
              `dd if=/dev/zero of=${dir}/big bs=1M count=${FILE_MIB} conv=fsync 2>/dev/null`,
            );
            samples.push(FILE_MIB / (ms / 1000));
          } else if (kind === "read") {
            await sh(
              `[ -f ${dir}/big ] || dd if=/dev/zero of=${dir}/big bs=1M count=${FILE_MIB} 2>/dev/null; sync; echo 3 > /proc/sys/vm/drop_caches`,
            );
            const ms = await sh(`dd if=${dir}/big of=/dev/null bs=1M 2>/dev/null`);
            samples.push(FILE_MIB / (ms / 1000));
          } else {
            const ms = await sh(
              `cd ${dir} && i=0; while [ $i -lt ${files} ]; do echo x > f$i; i=$((i+1)); done; ` +
                `i=0; while [ $i -lt ${files} ]; do [ -e f$i ]; i=$((i+1)); done; rm -f f*`,
            );
            samples.push((3 * files) / (ms / 1000));
          }
        }
        const against =
          label === "disk"
            ? undefined
            : label === "mount (follow)"
              ? `mount (opaque): ${what}`
              : `disk: ${what}`;
        add(`${label}: ${what}`, kind === "small" ? "ops/s" : "MB/s", samples, against);
      }
      await sh(`rm -f ${targets.map(([, d]) => `${d}/big`).join(" ")}`);
    }
  } finally {
    await vm.kill();
    await rm(base, { recursive: true, force: true });
  }
}

if (import.meta.main) {
  const table = new Table();
  await mountBench(table, process.argv.includes("--quick"));
  process.stdout.write(`${table.render()}\n`);
}
