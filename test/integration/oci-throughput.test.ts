/**
 * Pull throughput against curl fetching the same blob from the same loopback registry, runs
 * interleaved, medians compared: curl to /dev/null (raw HTTP), to a file, and to a file then
 * `sync FILE` (the durability the store provides: blobs are fsynced before they are renamed into
 * place). Prints the figures (`node --test` diagnostics); the assertion compares with curl + sync. The budget in
 * docs/SPECIFICATION.md is ≥ 0.8× raw HTTP; this test fails only below a loose floor
 * (SUPERMACHINE_PULL_RATIO_FLOOR, default 0.25) because the machine running it is usually shared.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { promisify } from "node:util";
import { pullImage } from "../../src/oci/pull.ts";
import { makeImage, writeOciLayout } from "../helpers/oci-kit.ts";
import { startRegistry } from "../helpers/registry.ts";

const execFileAsync = promisify(execFile);

test("pull throughput vs curl from the same loopback registry", async (t) => {
  const sizeBytes = Number(process.env.SUPERMACHINE_PULL_BENCH_BYTES ?? 128 * 1024 * 1024);
  const runs = Number(process.env.SUPERMACHINE_PULL_BENCH_RUNS ?? 5);
  const floor = Number(process.env.SUPERMACHINE_PULL_RATIO_FLOOR ?? 0.25);
  const work = await mkdtemp(join(tmpdir(), "oci-bench-"));
  await using registry = await startRegistry();
  try {
    // Keep only the descriptor: a big heap would slow this process's GC and skew the figures.
    const layer = await (async () => {
      const image = makeImage({ layerSizes: [sizeBytes], compression: "none" });
      await registry.push(await writeOciLayout(join(work, "layout"), { latest: image }), "bench:1");
      return { digest: image.layers[0]!.digest, size: image.layers[0]!.size };
    })();
    await rm(join(work, "layout"), { recursive: true });
    const url = `${registry.url}/v2/bench/blobs/${layer.digest}`;
    const curlNull: number[] = [];
    const curlFile: number[] = [];
    const curlSync: number[] = [];
    const ours: number[] = [];
    const cpu: number[] = [];
    const mbps = (t0: number) => layer.size / ((performance.now() - t0) / 1000) / 1e6;
    for (let i = 0; i < runs; i++) {
      const out = join(work, "curl.out");
      let t0 = performance.now();
      await execFileAsync("curl", ["-sSf", "-o", "/dev/null", url]);
      curlNull.push(mbps(t0));
      t0 = performance.now();
      await execFileAsync("curl", ["-sSf", "-o", out, url]);
      curlFile.push(mbps(t0));
      await rm(out);
      // The same durability as the store: the file's data on disk before it counts as written.
      t0 = performance.now();
      await execFileAsync("sh", ["-c", 'curl -sSf -o "$1" "$2" && sync "$1"', "sh", out, url]);
      curlSync.push(mbps(t0));
      await rm(out);

      const dataDir = join(work, `data${i}`);
      const c0 = process.cpuUsage();
      t0 = performance.now();
      await pullImage(`${registry.host}/bench:1`, { dataDir, dockerConfigPath: false });
      ours.push(mbps(t0));
      const c = process.cpuUsage(c0);
      cpu.push((c.user + c.system) / 1000);
      await rm(dataDir, { recursive: true });
    }
    const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[xs.length >> 1]!;
    const line = (xs: number[]) =>
      `${xs.map((x) => x.toFixed(0)).join(" ")} (median ${median(xs).toFixed(0)})`;
    const ratio = median(ours) / median(curlSync);
    t.diagnostic(`blob ${(layer.size / 1e6).toFixed(0)} MB, ${runs} interleaved runs, MB/s:`);
    t.diagnostic(`curl -o /dev/null:     ${line(curlNull)}`);
    t.diagnostic(`curl -o FILE:          ${line(curlFile)}`);
    t.diagnostic(`curl -o FILE && sync:  ${line(curlSync)}`);
    t.diagnostic(`pullImage:             ${line(ours)}; CPU ms ${cpu.map((x) => x.toFixed(0)).join(" ")}`);
    t.diagnostic(
      `pullImage / curl+sync ${ratio.toFixed(2)}, / curl -o FILE ${(median(ours) / median(curlFile)).toFixed(2)}, / curl -o /dev/null ${(median(ours) / median(curlNull)).toFixed(2)}`,
    );
    assert.ok(ratio >= floor, `pull throughput is ${ratio.toFixed(2)}× that of curl + sync (floor ${floor})`);
  } finally {
    await rm(work, { recursive: true, force: true });
  }
});
