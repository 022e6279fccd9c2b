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

import { copyFile, mkdir, rename, rm, stat } from "node:fs/promises";
import { basename, dirname, join, resolve } from "node:path";
import { SupermachineError } from "../errors.ts";
import { nodeCrypto, publish } from "../internal/index.ts";
import {
  assertSnapshotName,
  type BackingFileEntry,
  buildManifest,
  cachedFileDigest,
  hostFacts,
  qcow2BackingFile,
  SNAPSHOT_FILES,
  Snapshot,
  snapshotTempName,
  writeManifest,
} from "../snapshot/index.ts";
import { type LaunchMachineSpec, QemuProcess } from "../vmm/index.ts";
import type { VmParts } from "./vm-parts.ts";

const LOAD_TIMEOUT_MS = 120_000;

export async function saveSnapshot(
  vm: VmParts,
  dir: string,
  options: { name?: string | undefined; signal?: AbortSignal | undefined },
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
  await mkdir(dirname(target), { recursive: true, mode: 0o700 });
  const tmp = join(dirname(target), snapshotTempName("snapshot", basename(target)));
  await mkdir(tmp, { mode: 0o700 });
  const started = performance.now();
  const stream = join(tmp, "full-state");
  const diskPath = join(tmp, SNAPSHOT_FILES.disk);
  const signal = options.signal;
  try {
    // 1. Pause, migrate everything, copy the (flushed, inactive) disk overlay, resume.
    await vm.qemu.pause();
    let pausedMs = 0;
    try {
      await vm.qemu.saveState(stream, { ignoreShared: false, ...(signal === undefined ? {} : { signal }) });
      await copyFile(vm.overlayPath, diskPath);
    } finally {
      await vm.qemu.resume().catch(() => {});
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
      // The same devices; the helper's vCPUs never run, and its network reaches nothing.
      ...(vm.machine.network === undefined ? {} : { network: { restrict: true } }),
      disks: [
        { name: "root", path: diskPath, format: "qcow2", backing: vm.machine.disks?.[0]?.backing ?? [] },
      ],
    };
    const helper = await QemuProcess.launch({ machine, incomingStatePath: stream, sweep: false });
    try {
      await helper.loadState({ ignoreShared: false, timeoutMs: LOAD_TIMEOUT_MS, what: "the saved VM state" });
      await helper.saveState(statePath, { ignoreShared: true, ...(signal === undefined ? {} : { signal }) });
      await helper.stop();
    } catch (error) {
      await helper.kill();
      throw error;
    }
    await rm(stream, { force: true });

    // 3. Manifest: the disk's backing chain as it is, the rest from the VM.
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
    const [kernelDigest, initramfsDigest] = await Promise.all([
      cachedFileDigest(vm.machine.kernelPath ?? ""),
      cachedFileDigest(vm.machine.initramfsPath ?? ""),
    ]);
    const manifest = await buildManifest({
      dir: tmp,
      name,
      image: vm.image,
      host: { qemuVersion: host.qemuVersion, accelerator: vm.machine.accel, kernelDigest, initramfsDigest },
      machine: {
        kernelArgs: vm.machine.kernelArgs ?? [],
        tscKHz: vm.machine.tscKHz,
        memoryMiB: vm.machine.memoryMiB,
        vcpus: vm.machine.vcpus,
        memoryBackendId: backendId,
      },
      network: vm.network,
      execDefaults: vm.defaults,
      warmupTag: vm.source?.manifest.warmupTag ?? "",
      cacheKey: `running-vm:${nodeCrypto().randomBytes(16).toString("hex")}`,
      parent: vm.source?.dir,
      backingChain: chain,
    });
    await writeManifest(tmp, manifest);
    await rename(tmp, target);
    publish("snapshot:save", { name, dir: target, pausedMs, totalMs: performance.now() - started });
    // The chain is the VM's own (its image's store, its source snapshot's): trusted as it is.
    const stores = chain.map((entry) => storeOf(entry.path)).filter((root) => root !== undefined);
    return await Snapshot.open(target, { assets: host.assets, trustedDataDirs: stores });
  } catch (error) {
    await rm(tmp, { recursive: true, force: true });
    throw error;
  }
}

/** The data dir a store file belongs to (`<dataDir>/rootfs/…` or `<dataDir>/snapshots/…`). */
function storeOf(path: string): string | undefined {
  const match = /^(.*)\/(?:rootfs|snapshots)\//.exec(path);
  return match?.[1];
}
