/**
 * Baking: boot an image with its RAM in a shared file, start its workload, run the warm-up, pause
 * and save the device state, and move the result into the store in one rename. Cached by the
 * inputs that decide the result. Sequence and measurements: docs/snapshots.md.
 */

import { mkdir, rm, stat } from "node:fs/promises";
import { join } from "node:path";
import { SnapshotError } from "../errors.ts";
import { dataDir, debug, nodeCrypto, publish, throwIfAborted } from "../internal/index.ts";
import { ROOTFS_FORMAT_VERSION } from "../rootfs/index.ts";
import {
  assertSnapshotName,
  buildManifest,
  defaultSnapshotName,
  hostFacts,
  type ImageIdentity,
  moveSnapshotIntoPlace,
  SNAPSHOT_FILES,
  SNAPSHOT_FORMAT_VERSION,
  Snapshot,
  snapshotsRoot,
  snapshotTempName,
  sweepSnapshotTemps,
  writeManifest,
} from "../snapshot/index.ts";
import {
  bootCommandLine,
  bootForBake,
  copyNetworkPolicy,
  type NetworkPolicy,
  networkKind,
  saveBakedVm,
  type Vm,
  vmMachine,
} from "../vm/index.ts";
import type { AssetPaths } from "../vmm/index.ts";

export interface BakeInput {
  /** The image and its flattened root filesystem. */
  image: ImageIdentity & { rootfsPath: string };
  /** Exec defaults of the VM (and of every restore). */
  execDefaults: { env: Record<string, string>; cwd: string; user: string };
  /** Argv of the image's workload, started in the background before the warm-up; none: nothing. */
  workload: readonly string[] | undefined;
  name?: string | undefined;
  memoryMiB: number;
  vcpus: number;
  /** The VM's network while baking, and the default of its restores. Default `"none"` (no device). */
  network?: NetworkPolicy | undefined;
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
  /** The kernel command line bakes boot with (`bootCommandLine`). */
  kernelCommandLine: string;
  qemuVersion: string;
  workload: readonly string[] | undefined;
  execDefaults: unknown;
  network: NetworkPolicy;
}): string {
  const text = JSON.stringify({
    formatVersion: SNAPSHOT_FORMAT_VERSION,
    rootfsFormatVersion: ROOTFS_FORMAT_VERSION,
    ...parts,
    workload: parts.workload ?? null,
  });
  return nodeCrypto().createHash("sha256").update(text).digest("hex");
}

/** Bake (or reuse) the snapshot for `input`. */
export async function bakeSnapshot(input: BakeInput): Promise<{ snapshot: Snapshot; reused: boolean }> {
  const signal = input.signal;
  const network = input.network ?? "none";
  const host = await hostFacts(input.assets);
  const cacheKey = bakeCacheKey({
    imageDigest: input.image.digest,
    memoryMiB: input.memoryMiB,
    vcpus: input.vcpus,
    kernelDigest: host.kernelDigest,
    initramfsDigest: host.initramfsDigest,
    warmupTag: input.warmupTag,
    accelerator: host.accelerator,
    kernelCommandLine: bootCommandLine(host.accelerator),
    qemuVersion: host.qemuVersion,
    workload: input.workload,
    execDefaults: input.execDefaults,
    network: input.network ?? "none",
  });
  const name = input.name ?? defaultSnapshotName(input.image.reference, cacheKey);
  assertSnapshotName(name);
  const root = snapshotsRoot(input.dataDir ?? dataDir());
  const dir = join(root, name);

  if (input.force !== true) {
    try {
      const existing = await Snapshot.open(dir, { assets: host.assets, trustedDataDirs: storesOf(input) });
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
  await mkdir(root, { recursive: true, mode: 0o700 });
  await sweepSnapshotTemps(root);
  const tmp = join(root, snapshotTempName("bake", name));
  await mkdir(tmp, { mode: 0o700 });
  const started = performance.now();
  let vm: Vm | undefined;
  try {
    vm = await bootForBake(
      {
        rootfs: input.image.rootfsPath,
        memoryMiB: input.memoryMiB,
        vcpus: input.vcpus,
        assets: host.assets,
        env: input.execDefaults.env,
        cwd: input.execDefaults.cwd,
        user: input.execDefaults.user,
        ...(input.network === undefined ? {} : { network: input.network }),
        ...(input.bootTimeoutMs === undefined ? {} : { bootTimeoutMs: input.bootTimeoutMs }),
        ...(signal === undefined ? {} : { signal }),
      },
      {
        image: input.image,
        bake: { memoryPath: join(tmp, SNAPSHOT_FILES.memory), overlayPath: join(tmp, SNAPSHOT_FILES.disk) },
      },
    );
    const bootMs = performance.now() - started;
    if (input.workload !== undefined && input.workload.length > 0) await startWorkload(vm, input.workload);
    throwIfAborted(signal, "bake");
    if (input.warmup !== undefined) await input.warmup(vm);
    throwIfAborted(signal, "bake");
    const machine = vmMachine(vm);
    const savedAt = performance.now();
    await saveBakedVm(vm, join(tmp, SNAPSHOT_FILES.state), signal);
    const saveMs = performance.now() - savedAt;
    vm = undefined;

    const rootfsSize = (await stat(input.image.rootfsPath)).size;
    const manifest = await buildManifest({
      dir: tmp,
      name,
      image: {
        reference: input.image.reference,
        digest: input.image.digest,
        platform: input.image.platform,
        config: input.image.config,
      },
      host,
      machine: {
        kernelArgs: machine.kernelArgs ?? [],
        tscKHz: machine.tscKHz,
        memoryMiB: input.memoryMiB,
        vcpus: input.vcpus,
      },
      network: { device: networkKind(network) !== "none", policy: copyNetworkPolicy(network) },
      execDefaults: input.execDefaults,
      warmupTag: input.warmupTag,
      cacheKey,
      parent: undefined,
      backingChain: [{ path: input.image.rootfsPath, format: "raw", sizeBytes: rootfsSize }],
    });
    await writeManifest(tmp, manifest);
    await moveSnapshotIntoPlace(tmp, dir);
    publish("snapshot:bake", { name, dir, bootMs, saveMs, totalMs: performance.now() - started });
    return {
      snapshot: await Snapshot.open(dir, { assets: host.assets, trustedDataDirs: storesOf(input) }),
      reused: false,
    };
  } catch (error) {
    await vm?.kill();
    await rm(tmp, { recursive: true, force: true });
    throw error;
  }
}

/**
 * Start the image's workload through the agent: it belongs to the VM, survives the restores of the
 * snapshot, and its output is held (bounded) in the guest for `vm.workloadLogs()`.
 */
async function startWorkload(vm: Vm, argv: readonly string[]): Promise<void> {
  await vm.startWorkload(argv);
}

/** The stores a bake's snapshot may use: its data dir's, and its root filesystem's. */
function storesOf(input: BakeInput): string[] {
  const rootfsStore = /^(.*)\/rootfs\//.exec(input.image.rootfsPath)?.[1];
  return [input.dataDir ?? dataDir(), ...(rootfsStore === undefined ? [] : [rootfsStore])];
}
