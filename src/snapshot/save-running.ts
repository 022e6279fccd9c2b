/**
 * `vm.snapshot(dir)`: save a running VM as a snapshot and keep it running.
 *
 * A running VM's RAM is private (anonymous, or the copy-on-write mapping of the snapshot it was
 * restored from), so it cannot be left in place the way a bake leaves its shared memory file.
 * Instead: pause the VM, migrate its whole state (RAM included) into a temporary stream, copy its
 * disk overlay, resume it; then load the stream into a helper QEMU whose RAM is a shared file in
 * the new snapshot dir, and save that helper's device state with `x-ignore-shared` exactly as a
 * bake does. The result restores like a baked snapshot. See docs/snapshots.md.
 */

import { randomBytes } from "node:crypto";
import { copyFile, mkdir, open, rename, rm, stat, writeFile } from "node:fs/promises";
import { basename, dirname, join, resolve } from "node:path";
import { SupermachineError, VmError } from "../errors.ts";
import { publish } from "../internal/diagnostics.ts";
import { EMPTY_IMAGE_CONFIG } from "../oci/image-config.ts";
import { ROOTFS_FORMAT_VERSION } from "../rootfs/index.ts";
import type { ExecDefaults } from "../vm/exec-builder.ts";
import { migrateToFile } from "../vm/vm.ts";
import { type LaunchMachineSpec, QemuProcess } from "../vmm/qemu-process.ts";
import { cachedFileDigest, hostFacts } from "./host-facts.ts";
import {
  type BackingFileEntry,
  SNAPSHOT_FILES,
  SNAPSHOT_FORMAT_VERSION,
  type SnapshotManifest,
} from "./manifest.ts";
import { qcow2BackingFile, Snapshot, sha256File } from "./snapshot.ts";
import { assertSnapshotName, snapshotTempName } from "./store.ts";

export interface RunningVmParts {
  qemu: QemuProcess;
  machine: LaunchMachineSpec;
  overlayPath: string;
  source: Snapshot | undefined;
  defaults: ExecDefaults;
}

const LOAD_TIMEOUT_MS = 120_000;

export async function saveRunningVm(
  vm: RunningVmParts,
  dir: string,
  options: { name?: string; signal?: AbortSignal },
): Promise<Snapshot> {
  const target = resolve(dir);
  const name = options.name ?? basename(target);
  assertSnapshotName(name);
  if (
    await stat(target).then(
      () => true,
      () => false,
    )
  ) {
    throw new SupermachineError("INVALID_ARGUMENT", `${target} exists: vm.snapshot() needs a new dir`);
  }
  await mkdir(dirname(target), { recursive: true });
  const tmp = join(dirname(target), snapshotTempName("snapshot", basename(target)));
  await mkdir(tmp);
  const started = performance.now();
  const stream = join(tmp, "full-state");
  const diskPath = join(tmp, SNAPSHOT_FILES.disk);
  try {
    // 1. Pause, migrate everything, copy the (flushed, inactive) disk overlay, resume.
    const qmp = vm.qemu.qmp;
    await qmp.execute("stop");
    let pausedMs = 0;
    try {
      await qmp.execute("migrate-set-capabilities", {
        capabilities: [
          { capability: "x-ignore-shared", state: false },
          { capability: "events", state: true },
        ],
      });
      await migrateToFile(vm.qemu, stream, options.signal);
      await copyFile(vm.overlayPath, diskPath);
    } finally {
      await qmp.execute("cont").catch(() => {});
      pausedMs = performance.now() - started;
    }

    // 2. Load the stream into a helper whose RAM is the snapshot's shared memory file; save it.
    const memoryPath = join(tmp, SNAPSHOT_FILES.memory);
    const statePath = join(tmp, SNAPSHOT_FILES.state);
    const sourceMemory = vm.machine.memory ?? { kind: "anonymous" };
    const backendId = sourceMemory.kind === "file" ? (sourceMemory.backendId ?? "mem") : "microvm.ram";
    const machine: LaunchMachineSpec = {
      ...vm.machine,
      // The stream names the RAM block after the source's backend: anonymous RAM is QEMU's default `microvm.ram`.
      memory: { kind: "file", path: memoryPath, share: true, backendId },
      disks: [{ name: "root", path: diskPath, format: "qcow2" }],
      incoming: "defer",
      paused: true,
    };
    const input = await open(stream, "r");
    let helper: QemuProcess;
    try {
      helper = await QemuProcess.launch({ machine, extraFds: [input.fd], sweep: false });
    } finally {
      await input.close();
    }
    try {
      const hq = helper.qmp;
      await hq.execute("migrate-set-capabilities", { capabilities: [{ capability: "events", state: true }] });
      const loaded = hq.waitForEvent("MIGRATION", {
        filter: (event) => ["completed", "failed", "cancelled"].includes(String(event.data?.status)),
        timeoutMs: LOAD_TIMEOUT_MS,
      });
      loaded.catch(() => {});
      await hq.execute("migrate-incoming", { uri: "fd:3" });
      const event = await loaded;
      if (event.data?.status !== "completed") {
        // QEMU exits after a failed load, with the reason on stderr.
        await Promise.race([helper.exited, new Promise((resolve) => setTimeout(resolve, 2000).unref())]);
        throw new VmError("VMM_FAILED", `re-loading the saved VM state failed: ${helper.stderrTail.trim()}`, {
          consoleLogPath: helper.consoleLogPath,
        });
      }
      await hq.execute("migrate-set-capabilities", {
        capabilities: [{ capability: "x-ignore-shared", state: true }],
      });
      await migrateToFile(helper, statePath, options.signal);
      await helper.stop();
    } catch (error) {
      await helper.kill();
      throw error;
    }
    await rm(stream, { force: true });

    // 3. Manifest: the disk's backing chain as it is, the rest from the source snapshot or the VM.
    const backing = await qcow2BackingFile(diskPath);
    const chain: BackingFileEntry[] = [];
    if (backing !== undefined) {
      if (vm.source !== undefined && backing === vm.source.diskPath) {
        chain.push({ path: backing, format: "qcow2", sizeBytes: (await stat(backing)).size });
        chain.push(...vm.source.manifest.files.disk.backingChain);
      } else {
        chain.push({ path: backing, format: "raw", sizeBytes: (await stat(backing)).size });
      }
    }
    const host = await hostFacts({ kernel: vm.machine.kernelPath, initramfs: vm.machine.initramfsPath });
    const src = vm.source?.manifest;
    const [memorySize, stateSize, diskSize, memorySha, stateSha, kernelDigest, initramfsDigest] =
      await Promise.all([
        stat(memoryPath).then((s) => s.size),
        stat(statePath).then((s) => s.size),
        stat(diskPath).then((s) => s.size),
        sha256File(memoryPath),
        sha256File(statePath),
        cachedFileDigest(vm.machine.kernelPath ?? ""),
        cachedFileDigest(vm.machine.initramfsPath ?? ""),
      ]);
    const manifest: SnapshotManifest = {
      formatVersion: SNAPSHOT_FORMAT_VERSION,
      name,
      reference: src?.reference ?? "",
      platform: src?.platform ?? "linux/amd64",
      imageDigest: src?.imageDigest ?? "",
      rootfsFormatVersion: src?.rootfsFormatVersion ?? ROOTFS_FORMAT_VERSION,
      imageConfig: src?.imageConfig ?? EMPTY_IMAGE_CONFIG,
      qemuVersion: host.qemuVersion,
      machine: "microvm",
      accelerator: vm.machine.accel,
      cpuModel: vm.machine.accel === "kvm" ? "host" : "max",
      kernelDigest,
      initramfsDigest,
      kernelArgs: vm.machine.kernelArgs ?? [],
      tscKHz: vm.machine.tscKHz,
      memoryMiB: vm.machine.memoryMiB,
      vcpus: vm.machine.vcpus,
      ...(backendId === "mem" ? {} : { memoryBackendId: backendId }),
      execDefaults: { env: vm.defaults.env, cwd: vm.defaults.cwd, user: vm.defaults.user },
      warmupTag: src?.warmupTag ?? "",
      cacheKey: `running-vm:${randomBytes(16).toString("hex")}`,
      parent: vm.source?.dir,
      createdAt: new Date().toISOString(),
      files: {
        memory: { path: SNAPSHOT_FILES.memory, sizeBytes: memorySize, sha256: memorySha },
        state: { path: SNAPSHOT_FILES.state, sizeBytes: stateSize, sha256: stateSha },
        disk: { path: SNAPSHOT_FILES.disk, sizeBytes: diskSize, backingChain: chain },
      },
    };
    await writeFile(join(tmp, SNAPSHOT_FILES.manifest), `${JSON.stringify(manifest, null, 2)}\n`);
    await rename(tmp, target);
    publish("snapshot:save", { name, dir: target, pausedMs, totalMs: performance.now() - started });
    return await Snapshot.open(target, { assets: host.assets });
  } catch (error) {
    await rm(tmp, { recursive: true, force: true });
    throw error;
  }
}
