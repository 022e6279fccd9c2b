/**
 * Image rows of `npm run bench`: pull throughput against curl fetching the same blob from the same
 * loopback registry into a file and syncing it (what a pull promises: the blob durable on disk; runs
 * interleaved), raw curl to /dev/null as information, and flattening the Debian fixture into a
 * filesystem image.
 */
import { execFile } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { promisify } from "node:util";
import { pullImage } from "../src/oci/pull.ts";
import { flattenLayers } from "../src/rootfs/index.ts";
import { fixtureImages } from "../test/helpers/fixtures.ts";
import { makeImage, writeOciLayout } from "../test/helpers/oci-kit.ts";
import { startRegistry } from "../test/helpers/registry.ts";
import { summarize, type Table } from "./table.ts";

const run = promisify(execFile);

export async function pullBench(table: Table, quick: boolean): Promise<void> {
  const sizeBytes = (quick ? 32 : 128) * 1024 * 1024;
  const runs = quick ? 3 : 5;
  const work = await mkdtemp(join(tmpdir(), "sm-pull-bench-"));
  try {
    await using registry = await startRegistry();
    const image = makeImage({ layerSizes: [sizeBytes], compression: "none" });
    await registry.push(await writeOciLayout(join(work, "layout"), { latest: image }), "bench:1");
    await rm(join(work, "layout"), { recursive: true });
    const layer = image.layers[0]!;
    const url = `${registry.url}/v2/bench/blobs/${layer.digest}`;
    const mbps = (ms: number) => layer.size / 1e6 / (ms / 1000);
    const raw: number[] = [];
    const durable: number[] = [];
    const ours: number[] = [];
    for (let i = 0; i < runs; i++) {
      let t0 = performance.now();
      await run("curl", ["-sSf", "-o", "/dev/null", url]);
      raw.push(mbps(performance.now() - t0));
      const out = join(work, "curl.out");
      // The store's durability: data on disk before the blob counts as written.
      t0 = performance.now();
      await run("sh", ["-c", 'curl -sSf -o "$1" "$2" && sync "$1"', "sh", out, url]);
      durable.push(mbps(performance.now() - t0));
      await rm(out);
      const dataDir = join(work, `data${i}`);
      t0 = performance.now();
      await pullImage(`${registry.host}/bench:1`, { dataDir, dockerConfigPath: false });
      ours.push(mbps(performance.now() - t0));
      await rm(dataDir, { recursive: true });
    }
    const mb = (layer.size / 1e6).toFixed(0);
    table.add({ name: `curl of a ${mb} MB blob (raw HTTP)`, unit: "MB/s", summary: summarize(raw) });
    table.add({ name: `curl of the blob to a file + sync`, unit: "MB/s", summary: summarize(durable) });
    table.add({
      name: `pull of the same blob (verified, stored, durable)`,
      unit: "MB/s",
      summary: summarize(ours),
      against: `curl of the blob to a file + sync`,
      budget: "≥ 0.9×",
      higherIsBetter: true,
    });

    const fx = await fixtureImages();
    const debian = await pullImage(`oci:${fx.debian}`, { dataDir: join(work, "debian") });
    const uncompressed = fx.images.debian.layers.reduce((sum, l) => sum + l.uncompressedSize, 0);
    const flatten: number[] = [];
    for (let i = 0; i < (quick ? 2 : 3); i++) {
      const t0 = performance.now();
      await flattenLayers({
        layers: debian.layers.map((l) => ({ path: l.path, mediaType: l.mediaType, digest: l.digest })),
        output: join(work, `debian-${i}.ext4`),
      });
      flatten.push(performance.now() - t0);
      await rm(join(work, `debian-${i}.ext4`));
    }
    table.add({ name: "flatten the Debian fixture (3 layers)", unit: "ms", summary: summarize(flatten) });
    table.add({
      name: `  as throughput (${(uncompressed / 1e6).toFixed(0)} MB of tar)`,
      unit: "MB/s",
      summary: summarize(flatten.map((ms) => uncompressed / 1e6 / (ms / 1000))),
    });
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}
