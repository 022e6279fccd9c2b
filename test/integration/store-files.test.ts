/**
 * The store's files are private, and a snapshot is trusted only for what this library made: a
 * manifest that layers the disk on a file outside the store is refused.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { cp, readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { describe, it } from "node:test";
import { promisify } from "node:util";
import { bakeSnapshot } from "../../src/image/index.ts";
import { Image } from "../../src/index.ts";
import { EMPTY_IMAGE_CONFIG } from "../../src/oci/index.ts";
import { resolveRootfs } from "../../src/rootfs/index.ts";
import { scratchDir } from "../helpers/scratch.ts";
import { busyboxRootfs, vmSkipReason } from "../helpers/vm.ts";

const run = promisify(execFile);

async function walk(dir: string): Promise<string[]> {
  const out: string[] = [dir];
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) out.push(...(await walk(path)));
    else out.push(path);
  }
  return out;
}

describe("the store's files", { timeout: 600_000 }, () => {
  it("are readable by no other user, and a snapshot layered on a foreign file is refused", async (t) => {
    const skip = await vmSkipReason();
    if (skip !== undefined) return t.skip(skip);
    const dataDir = await scratchDir("sm-store-");
    const rootfs = await resolveRootfs(await busyboxRootfs(), { dataDir });
    const { snapshot } = await bakeSnapshot({
      name: "private",
      image: {
        reference: "busybox",
        digest: rootfs.key,
        platform: "linux/amd64",
        config: EMPTY_IMAGE_CONFIG,
        rootfsPath: rootfs.imagePath,
      },
      execDefaults: { env: {}, cwd: "/", user: "root" },
      workload: undefined,
      memoryMiB: 128,
      vcpus: 1,
      warmupTag: "",
      dataDir,
    });

    const exposed: string[] = [];
    for (const path of await walk(dataDir)) {
      if (((await stat(path)).mode & 0o007) !== 0) exposed.push(path);
    }
    assert.deepEqual(exposed, [], "files or dirs that other users can read or enter");

    // A copy of the snapshot whose disk is layered on a host file that is not in any store.
    const tampered = join(dataDir, "snapshots", "tampered");
    await cp(snapshot.dir, tampered, { recursive: true });
    await rm(join(tampered, "disk.qcow2"));
    await run("qemu-img", [
      "create",
      "-q",
      "-f",
      "qcow2",
      "-u",
      "-F",
      "raw",
      "-b",
      "/etc/passwd",
      join(tampered, "disk.qcow2"),
      "1M",
    ]);
    const manifest = JSON.parse(await readFile(join(tampered, "manifest.json"), "utf8"));
    manifest.name = "tampered";
    manifest.files.disk.sizeBytes = (await stat(join(tampered, "disk.qcow2"))).size;
    manifest.files.disk.backingChain = [
      { path: "/etc/passwd", format: "raw", sizeBytes: (await stat("/etc/passwd")).size },
    ];
    await writeFile(join(tampered, "manifest.json"), JSON.stringify(manifest));
    await assert.rejects(Image.fromSnapshot(tampered, { dataDir }), {
      code: "SNAPSHOT_CORRUPT",
      message: /layered on \/etc\/passwd, which is not in a store it may use/,
    });
  });
});
