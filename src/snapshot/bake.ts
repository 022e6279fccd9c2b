/**
 * Baking: boot an image with its RAM in a shared file, start its workload, run the warm-up, pause
 * and save the device state, and move the result into the store in one rename. Cached by the
 * inputs that decide the result. Sequence and measurements: docs/snapshots.md.
 */

import { createHash } from "node:crypto";
import { mkdir, rename, rm, stat, writeFile } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { ExecStartError, SnapshotError, SupermachineError } from "../errors.ts";
import { throwIfAborted } from "../internal/abort.ts";
import { debug, publish } from "../internal/diagnostics.ts";
import { dataDir } from "../internal/paths.ts";
import type { ImageConfig } from "../oci/image-config.ts";
import { ROOTFS_FORMAT_VERSION } from "../rootfs/index.ts";
import { Vm } from "../vm/vm.ts";
import type { AssetPaths } from "../vmm/asset-paths.ts";
import { hostFacts } from "./host-facts.ts";
import { SNAPSHOT_FILES, SNAPSHOT_FORMAT_VERSION, type SnapshotManifest } from "./manifest.ts";
import { Snapshot, sha256File } from "./snapshot.ts";
import {
  assertSnapshotName,
  defaultSnapshotName,
  snapshotsRoot,
  snapshotTempName,
  sweepSnapshotTemps,
} from "./store.ts";

/** Where a baked workload's output goes in the guest (tmpfs). */
export const WORKLOAD_LOG = "/run/supermachine-workload.log";

export interface BakeInput {
  /** The image: reference, manifest digest, platform, config, flattened root filesystem. */
  image: {
    reference: string;
    digest: string;
    platform: string;
    config: ImageConfig;
    rootfsPath: string;
  };
  /** Exec defaults of the VM (and of every restore). */
  execDefaults: { env: Record<string, string>; cwd: string; user: string };
  /** Argv of the image's workload, started in the background before the warm-up; none: nothing. */
  workload: readonly string[] | undefined;
  name?: string | undefined;
  memoryMiB: number;
  vcpus: number;
  warmup?: ((vm: Vm) => Promise<void>) | undefined;
  warmupTag: string;
  assets?: Partial<AssetPaths> | undefined;
  /** Bake again even when a snapshot with the same inputs exists. */
  force?: boolean | undefined;
  dataDir?: string | undefined;
  bootTimeoutMs?: number | undefined;
  signal?: AbortSignal | undefined;
}

/** The cache key of a bake: everything that decides the snapshot's content and usability. */
export function bakeCacheKey(parts: {
  imageDigest: string;
  memoryMiB: number;
  vcpus: number;
  kernelDigest: string;
  initramfsDigest: string;
  warmupTag: string;
  accelerator: string;
  qemuVersion: string;
  workload: readonly string[] | undefined;
  execDefaults: unknown;
}): string {
  const text = JSON.stringify({
    formatVersion: SNAPSHOT_FORMAT_VERSION,
    rootfsFormatVersion: ROOTFS_FORMAT_VERSION,
    ...parts,
    workload: parts.workload ?? null,
  });
  return createHash("sha256").update(text).digest("hex");
}

/** Bake (or reuse) the snapshot for `input`. */
export async function bakeSnapshot(input: BakeInput): Promise<{ snapshot: Snapshot; reused: boolean }> {
  const signal = input.signal;
  const host = await hostFacts(input.assets);
  const cacheKey = bakeCacheKey({
    imageDigest: input.image.digest,
    memoryMiB: input.memoryMiB,
    vcpus: input.vcpus,
    kernelDigest: host.kernelDigest,
    initramfsDigest: host.initramfsDigest,
    warmupTag: input.warmupTag,
    accelerator: host.accelerator,
    qemuVersion: host.qemuVersion,
    workload: input.workload,
    execDefaults: input.execDefaults,
  });
  const name = input.name ?? defaultSnapshotName(input.image.reference, cacheKey);
  assertSnapshotName(name);
  const root = snapshotsRoot(input.dataDir ?? dataDir());
  const dir = join(root, name);

  if (input.force !== true) {
    try {
      const existing = await Snapshot.open(dir, { assets: host.assets });
      if (existing.manifest.cacheKey === cacheKey) {
        publish("snapshot:reuse", { name, dir });
        return { snapshot: existing, reused: true };
      }
      debug("snapshot %s: inputs changed, baking again", name);
    } catch (error) {
      if (!(error instanceof SnapshotError)) throw error;
      debug("snapshot %s: %s; baking", name, error.message);
    }
  }

  throwIfAborted(signal, "bake");
  await mkdir(root, { recursive: true });
  await sweepSnapshotTemps(root);
  const tmp = join(root, snapshotTempName("bake", name));
  await mkdir(tmp);
  const started = performance.now();
  let vm: Vm | undefined;
  try {
    vm = await Vm.bootForSnapshot(
      {
        rootfs: input.image.rootfsPath,
        memoryMiB: input.memoryMiB,
        vcpus: input.vcpus,
        assets: host.assets,
        env: input.execDefaults.env,
        cwd: input.execDefaults.cwd,
        user: input.execDefaults.user,
        ...(input.bootTimeoutMs === undefined ? {} : { bootTimeoutMs: input.bootTimeoutMs }),
        ...(signal === undefined ? {} : { signal }),
      },
      { memoryPath: join(tmp, SNAPSHOT_FILES.memory), overlayPath: join(tmp, SNAPSHOT_FILES.disk) },
    );
    const bootMs = performance.now() - started;
    if (input.workload !== undefined && input.workload.length > 0) await startWorkload(vm, input.workload);
    throwIfAborted(signal, "bake");
    if (input.warmup !== undefined) await input.warmup(vm);
    throwIfAborted(signal, "bake");
    const bootArgs = vm.bootArgs;
    const savedAt = performance.now();
    await vm.saveStateAndQuit(join(tmp, SNAPSHOT_FILES.state), signal === undefined ? {} : { signal });
    const saveMs = performance.now() - savedAt;
    vm = undefined;

    const memoryPath = join(tmp, SNAPSHOT_FILES.memory);
    const statePath = join(tmp, SNAPSHOT_FILES.state);
    const diskPath = join(tmp, SNAPSHOT_FILES.disk);
    const [memorySize, stateSize, diskSize, rootfsSize, memorySha, stateSha] = await Promise.all([
      stat(memoryPath).then((s) => s.size),
      stat(statePath).then((s) => s.size),
      stat(diskPath).then((s) => s.size),
      stat(input.image.rootfsPath).then((s) => s.size),
      sha256File(memoryPath),
      sha256File(statePath),
    ]);
    const manifest: SnapshotManifest = {
      formatVersion: SNAPSHOT_FORMAT_VERSION,
      name,
      reference: input.image.reference,
      platform: input.image.platform,
      imageDigest: input.image.digest,
      rootfsFormatVersion: ROOTFS_FORMAT_VERSION,
      imageConfig: input.image.config,
      qemuVersion: host.qemuVersion,
      machine: "microvm",
      accelerator: host.accelerator,
      cpuModel: host.cpuModel,
      kernelDigest: host.kernelDigest,
      initramfsDigest: host.initramfsDigest,
      kernelArgs: [...bootArgs.kernelArgs],
      tscKHz: bootArgs.tscKHz,
      memoryMiB: input.memoryMiB,
      vcpus: input.vcpus,
      execDefaults: input.execDefaults,
      warmupTag: input.warmupTag,
      cacheKey,
      parent: undefined,
      createdAt: new Date().toISOString(),
      files: {
        memory: { path: SNAPSHOT_FILES.memory, sizeBytes: memorySize, sha256: memorySha },
        state: { path: SNAPSHOT_FILES.state, sizeBytes: stateSize, sha256: stateSha },
        disk: {
          path: SNAPSHOT_FILES.disk,
          sizeBytes: diskSize,
          backingChain: [{ path: input.image.rootfsPath, format: "raw", sizeBytes: rootfsSize }],
        },
      },
    };
    await writeFile(join(tmp, SNAPSHOT_FILES.manifest), `${JSON.stringify(manifest, null, 2)}\n`);
    await moveIntoPlace(tmp, dir);
    publish("snapshot:bake", { name, dir, bootMs, saveMs, totalMs: performance.now() - started });
    return { snapshot: await Snapshot.open(dir, { assets: host.assets }), reused: false };
  } catch (error) {
    await vm?.kill();
    await rm(tmp, { recursive: true, force: true });
    throw error;
  }
}

/**
 * Start the workload so that it outlives its exec stream: the restore's new agent session ends
 * every stream still open (and kills its processes), but not processes whose stream has ended.
 * A shell backgrounds it and exits; its output goes to {@link WORKLOAD_LOG}.
 */
async function startWorkload(vm: Vm, argv: readonly string[]): Promise<void> {
  try {
    await vm
      .execBuilder()
      .argv(["/bin/sh", "-c", `"$@" </dev/null >>${WORKLOAD_LOG} 2>&1 &`, "sh", ...argv])
      .output();
  } catch (error) {
    if (error instanceof ExecStartError) {
      throw new SupermachineError(
        "EXEC_START",
        `cannot start the image's workload in the background (${argv.join(" ")}): the image needs /bin/sh for that; bake without the workload instead`,
        { cause: error },
      );
    }
    throw error;
  }
}

/** Replace `dir` with `tmp` (same filesystem): the old snapshot, if any, goes only after. */
async function moveIntoPlace(tmp: string, dir: string): Promise<void> {
  const old = join(dirname(dir), snapshotTempName("old", basename(dir)));
  const hadOld = await rename(dir, old).then(
    () => true,
    (error: NodeJS.ErrnoException) => {
      if (error.code === "ENOENT") return false;
      throw error;
    },
  );
  await rename(tmp, dir);
  if (hadOld) await rm(old, { recursive: true, force: true });
}
