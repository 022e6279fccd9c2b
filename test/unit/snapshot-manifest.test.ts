/** Snapshot manifest parsing, store names, cache keys and qcow2 header reading (no QEMU). */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, it } from "node:test";
import { SnapshotError } from "../../src/errors.ts";
import { bakeCacheKey } from "../../src/image/index.ts";
import { parseManifest, SNAPSHOT_FORMAT_VERSION } from "../../src/snapshot/manifest.ts";
import { qcow2BackingFile } from "../../src/snapshot/snapshot.ts";
import { assertSnapshotName, defaultSnapshotName, snapshotDirOf } from "../../src/snapshot/store.ts";

const valid = {
  formatVersion: SNAPSHOT_FORMAT_VERSION,
  name: "x",
  reference: "oci:/a:b",
  platform: "linux/amd64",
  imageDigest: "sha256:00",
  rootfsFormatVersion: 1,
  imageConfig: { env: [] },
  qemuVersion: "7.2.0",
  machine: "microvm",
  accelerator: "tcg",
  cpuModel: "max",
  kernelDigest: "k",
  initramfsDigest: "i",
  kernelArgs: ["quiet"],
  tscKHz: 2000000,
  memoryMiB: 256,
  vcpus: 1,
  network: { device: true, policy: "outbound" },
  execDefaults: { env: {}, cwd: "/", user: "root" },
  warmupTag: "",
  cacheKey: "c",
  createdAt: "2026-01-01T00:00:00Z",
  files: {
    memory: { path: "memory", sizeBytes: 268435456 },
    state: { path: "state", sizeBytes: 10, sha256: "s" },
    disk: {
      path: "disk.qcow2",
      sizeBytes: 1,
      backingChain: [{ path: "/r.ext4", format: "raw", sizeBytes: 5 }],
    },
  },
};

describe("snapshot manifest", () => {
  it("accepts a complete manifest", () => {
    assert.equal(parseManifest(JSON.stringify(valid), "/d").memoryMiB, 256);
    for (const network of [
      { device: false, policy: "none" },
      { device: true, policy: "none" },
      { device: true, policy: { allow: ["host:80", "10.1.2.0/24:443"] } },
    ]) {
      assert.deepEqual(parseManifest(JSON.stringify({ ...valid, network }), "/d").network, network);
    }
  });

  it("refuses the format before network devices were recorded (1) as incompatible", () => {
    assert.equal(SNAPSHOT_FORMAT_VERSION, 2);
    const { network: _, ...old } = valid;
    assert.throws(
      () => parseManifest(JSON.stringify({ ...old, formatVersion: 1 }), "/d"),
      (e: unknown) => e instanceof SnapshotError && e.code === "SNAPSHOT_INCOMPATIBLE",
    );
  });

  it("refuses another format version as incompatible", () => {
    assert.throws(
      () => parseManifest(JSON.stringify({ ...valid, formatVersion: 99 }), "/d"),
      (e: unknown) =>
        e instanceof SnapshotError && e.code === "SNAPSHOT_INCOMPATIBLE" && e.snapshotDir === "/d",
    );
  });

  it("refuses broken JSON, missing fields and paths outside the dir as corrupt", () => {
    const corrupt = (text: string) =>
      assert.throws(
        () => parseManifest(text, "/d"),
        (e: unknown) => e instanceof SnapshotError && e.code === "SNAPSHOT_CORRUPT",
      );
    corrupt("{");
    corrupt(JSON.stringify({ ...valid, memoryMiB: 0 }));
    corrupt(JSON.stringify({ ...valid, accelerator: "hvf" }));
    const { network: _, ...withoutNetwork } = valid;
    corrupt(JSON.stringify(withoutNetwork));
    corrupt(JSON.stringify({ ...valid, network: { device: "yes", policy: "none" } }));
    corrupt(JSON.stringify({ ...valid, network: { device: true, policy: "everything" } }));
    corrupt(JSON.stringify({ ...valid, network: { device: true, policy: { allow: [443] } } }));
    // A policy with a network needs the device.
    corrupt(JSON.stringify({ ...valid, network: { device: false, policy: "outbound" } }));
    corrupt(JSON.stringify({ ...valid, network: { device: false, policy: { allow: [] } } }));
    corrupt(
      JSON.stringify({ ...valid, files: { ...valid.files, memory: { path: "../memory", sizeBytes: 1 } } }),
    );
    corrupt(
      JSON.stringify({
        ...valid,
        files: {
          ...valid.files,
          disk: {
            path: "disk.qcow2",
            sizeBytes: 1,
            backingChain: [{ path: "rel", format: "raw", sizeBytes: 1 }],
          },
        },
      }),
    );
  });
});

describe("snapshot store names", () => {
  it("derives a name from a reference and the key", () => {
    assert.equal(
      defaultSnapshotName("docker.io/library/alpine:3.20", "abcdef0123456789"),
      "alpine-3.20-abcdef012345",
    );
    assert.equal(
      defaultSnapshotName("oci:/x/y/busybox:latest", "0123456789abcdef"),
      "busybox-latest-0123456789ab",
    );
  });

  it("refuses names that could escape the store or hide", () => {
    for (const bad of ["", ".hidden", "-x", "a/b", "..", "a b"]) {
      assert.throws(() => assertSnapshotName(bad), { code: "INVALID_ARGUMENT" }, bad);
    }
    assert.equal(snapshotDirOf("name", "/data"), "/data/snapshots/name");
    assert.equal(snapshotDirOf("./rel"), join(process.cwd(), "rel"));
  });
});

describe("bake cache key", () => {
  const parts = {
    imageDigest: "sha256:1",
    memoryMiB: 256,
    vcpus: 1,
    kernelDigest: "k",
    initramfsDigest: "i",
    warmupTag: "v1",
    accelerator: "tcg",
    kernelCommandLine: "console=ttyS0 quiet",
    qemuVersion: "7.2.0",
    workload: ["sh"],
    execDefaults: { env: {}, cwd: "/", user: "root" },
    network: "none" as const,
  };
  it("is stable and changes with every input", () => {
    const key = bakeCacheKey(parts);
    assert.equal(bakeCacheKey({ ...parts }), key);
    for (const change of [
      { warmupTag: "v2" },
      { memoryMiB: 512 },
      { vcpus: 2 },
      { kernelDigest: "k2" },
      { initramfsDigest: "i2" },
      { imageDigest: "sha256:2" },
      { accelerator: "kvm" },
      { kernelCommandLine: "console=ttyS0 quiet noreplace-smp" },
      { qemuVersion: "8.0.0" },
      { workload: undefined },
      { network: "outbound" as const },
      { network: { allow: ["host:80"] } },
    ]) {
      assert.notEqual(bakeCacheKey({ ...parts, ...change }), key, JSON.stringify(change));
    }
  });
});

describe("qcow2 backing file", () => {
  let dir: string | undefined;
  after(async () => {
    if (dir !== undefined) await rm(dir, { recursive: true, force: true });
  });
  it("reads the backing file name from the header and refuses non-qcow2 files", async (t) => {
    try {
      execFileSync("qemu-img", ["--version"], { stdio: "ignore" });
    } catch {
      if (process.env.CI === "true") throw new Error("qemu-img missing");
      return t.skip("qemu-img missing");
    }
    dir = await mkdtemp(join(tmpdir(), "sm-qcow2-"));
    const base = join(dir, "base.raw");
    await writeFile(base, Buffer.alloc(1024 * 1024));
    execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, join(dir, "o.qcow2")]);
    execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", join(dir, "plain.qcow2"), "1M"]);
    assert.equal(await qcow2BackingFile(join(dir, "o.qcow2")), base);
    assert.equal(await qcow2BackingFile(join(dir, "plain.qcow2")), undefined);
    await assert.rejects(qcow2BackingFile(base));
  });
});

describe("memory backend id for restores", () => {
  it("names the backend object and the machine's memory-backend after it", async () => {
    const { buildQemuArgs } = await import("../../src/vmm/qemu-args.ts");
    const args = buildQemuArgs({
      accel: "tcg",
      memoryMiB: 256,
      vcpus: 1,
      qmpSocketPath: "/q.sock",
      memory: { kind: "file", path: "/s/memory", share: false, backendId: "microvm.ram" },
    });
    assert.ok(
      args.includes("microvm,acpi=off,pit=on,pic=on,rtc=on,x-option-roms=off,memory-backend=microvm.ram"),
    );
    assert.ok(
      args.some((a) =>
        a.startsWith("memory-backend-file,id=microvm.ram,size=256M,mem-path=/s/memory,share=off"),
      ),
    );
    assert.throws(
      () =>
        buildQemuArgs({
          accel: "tcg",
          memoryMiB: 256,
          vcpus: 1,
          qmpSocketPath: "/q.sock",
          memory: { kind: "file", path: "/m", share: false, backendId: "x,share=on" },
        }),
      { code: "INVALID_ARGUMENT" },
    );
  });
});
