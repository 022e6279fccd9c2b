/**
 * The snapshot directory's `manifest.json`: what the snapshot was made from and of, so that a
 * restore can refuse a host it would not work on, or files that were damaged, before it starts
 * anything. Format: docs/snapshots.md.
 */

import { createReadStream } from "node:fs";
import { stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { SnapshotError } from "../errors.ts";
import { nodeCrypto } from "../internal/index.ts";
import type { ImageConfig } from "../oci/index.ts";
import { ROOTFS_FORMAT_VERSION } from "../rootfs/index.ts";

/** Bumped whenever the layout of a snapshot dir or the meaning of a field changes (2: `network`). */
export const SNAPSHOT_FORMAT_VERSION = 2;

/** File names inside a snapshot dir. */
export const SNAPSHOT_FILES = {
  manifest: "manifest.json",
  memory: "memory",
  state: "state",
  disk: "disk.qcow2",
} as const;

/** One file of the snapshot, relative to its dir. */
export interface SnapshotFileEntry {
  readonly path: string;
  readonly sizeBytes: number;
  /** sha256 hex of the content; recorded for the small files (device state). */
  readonly sha256?: string | undefined;
}

/** A file below the snapshot's disk state in its qcow2 backing chain (absolute path). */
export interface BackingFileEntry {
  readonly path: string;
  readonly format: "raw" | "qcow2";
  readonly sizeBytes: number;
}

/**
 * A snapshot's network: whether the VM had a network device (a restore needs the same devices),
 * and the policy the guest was configured for (`VmConfig.network`, as given; restores default to
 * it). See docs/network.md.
 */
export interface SnapshotNetwork {
  readonly device: boolean;
  readonly policy: "none" | "outbound" | { readonly allow: readonly string[] };
}

export interface SnapshotManifest {
  readonly formatVersion: number;
  /** Name in the snapshot store (`<dataDir>/snapshots/<name>`), or the dir's base name. */
  readonly name: string;
  /** The image reference it was baked from ("" for a root filesystem without a reference). */
  readonly reference: string;
  readonly platform: string;
  /** Digest of the image manifest (the root filesystem is a function of it and `rootfsFormatVersion`). */
  readonly imageDigest: string;
  readonly rootfsFormatVersion: number;
  readonly imageConfig: ImageConfig;
  /** `major.minor.micro (package)` of the QEMU that made it: restores need exactly this one. */
  readonly qemuVersion: string;
  readonly machine: string;
  readonly accelerator: "kvm" | "tcg";
  readonly cpuModel: string;
  /** sha256 hex of the guest kernel and initramfs it booted. */
  readonly kernelDigest: string;
  readonly initramfsDigest: string;
  /** Kernel arguments after the base ones, and the TSC frequency given to the guest: restores reuse them verbatim. */
  readonly kernelArgs: readonly string[];
  readonly tscKHz: number | undefined;
  readonly memoryMiB: number;
  readonly vcpus: number;
  /**
   * Id of QEMU's memory backend, which names the RAM block in the device state. Absent: `mem`.
   * `microvm.ram` for snapshots of VMs that booted with anonymous RAM (`vm.snapshot()`).
   */
  readonly memoryBackendId?: string | undefined;
  /** The network device and policy of the VM it was made from. */
  readonly network: SnapshotNetwork;
  /** Exec defaults (env, cwd, user) of the VM it was made from. */
  readonly execDefaults: {
    readonly env: Readonly<Record<string, string>>;
    readonly cwd: string;
    readonly user: string;
  };
  /** The warm-up's tag ("" without a warm-up). */
  readonly warmupTag: string;
  /** Key of the bake inputs: a build with the same key reuses the snapshot. */
  readonly cacheKey: string;
  /** Snapshot this one was taken from (`vm.snapshot` of a restored VM), if any. */
  readonly parent: string | undefined;
  readonly createdAt: string;
  readonly files: {
    readonly memory: SnapshotFileEntry;
    readonly state: SnapshotFileEntry;
    readonly disk: SnapshotFileEntry & { readonly backingChain: readonly BackingFileEntry[] };
  };
}

/** Parse and check the shape of a manifest. Throws `SNAPSHOT_CORRUPT` / `SNAPSHOT_INCOMPATIBLE`. */
export function parseManifest(text: string, snapshotDir: string): SnapshotManifest {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (error) {
    throw new SnapshotError(
      "SNAPSHOT_CORRUPT",
      `${snapshotDir}/manifest.json is not valid JSON`,
      { snapshotDir },
      { cause: error },
    );
  }
  const corrupt = (what: string) =>
    new SnapshotError("SNAPSHOT_CORRUPT", `${snapshotDir}/manifest.json: ${what}`, { snapshotDir });
  if (typeof value !== "object" || value === null) throw corrupt("not an object");
  const m = value as Record<string, unknown>;
  if (m.formatVersion !== SNAPSHOT_FORMAT_VERSION) {
    throw new SnapshotError(
      "SNAPSHOT_INCOMPATIBLE",
      `${snapshotDir} has snapshot format ${String(m.formatVersion)}; this version of supermachine reads format ${SNAPSHOT_FORMAT_VERSION}`,
      { snapshotDir },
    );
  }
  const strings = [
    "name",
    "reference",
    "platform",
    "imageDigest",
    "qemuVersion",
    "machine",
    "accelerator",
    "cpuModel",
    "kernelDigest",
    "initramfsDigest",
    "warmupTag",
    "cacheKey",
    "createdAt",
  ];
  for (const key of strings) if (typeof m[key] !== "string") throw corrupt(`${key} must be a string`);
  for (const key of ["memoryMiB", "vcpus", "rootfsFormatVersion"]) {
    if (!Number.isSafeInteger(m[key]) || (m[key] as number) < 1)
      throw corrupt(`${key} must be a positive integer`);
  }
  if (m.accelerator !== "kvm" && m.accelerator !== "tcg") throw corrupt("accelerator must be kvm or tcg");
  if (!Array.isArray(m.kernelArgs) || !m.kernelArgs.every((a) => typeof a === "string")) {
    throw corrupt("kernelArgs must be a list of strings");
  }
  if (m.tscKHz !== undefined && !Number.isSafeInteger(m.tscKHz)) throw corrupt("tscKHz must be an integer");
  if (
    m.memoryBackendId !== undefined &&
    (typeof m.memoryBackendId !== "string" || !/^[a-z][a-z0-9._-]*$/.test(m.memoryBackendId))
  ) {
    throw corrupt("memoryBackendId must be a QEMU object id");
  }
  if (typeof m.imageConfig !== "object" || m.imageConfig === null) throw corrupt("imageConfig missing");
  if (!isSnapshotNetwork(m.network)) {
    throw corrupt('network must be { device: boolean, policy: "none" | "outbound" | { allow: [strings] } }');
  }
  const defaults = m.execDefaults as Record<string, unknown> | undefined;
  if (
    typeof defaults !== "object" ||
    defaults === null ||
    typeof defaults.cwd !== "string" ||
    typeof defaults.user !== "string" ||
    typeof defaults.env !== "object" ||
    defaults.env === null
  ) {
    throw corrupt("execDefaults missing");
  }
  const files = m.files as Record<string, unknown> | undefined;
  if (typeof files !== "object" || files === null) throw corrupt("files missing");
  for (const key of ["memory", "state", "disk"]) {
    const entry = files[key] as Record<string, unknown> | undefined;
    if (
      typeof entry !== "object" ||
      entry === null ||
      typeof entry.path !== "string" ||
      entry.path === "" ||
      entry.path.includes("/") ||
      !Number.isSafeInteger(entry.sizeBytes)
    ) {
      throw corrupt(`files.${key} must name a file in the snapshot dir and its size`);
    }
  }
  const chain = (files.disk as Record<string, unknown>).backingChain;
  if (
    !Array.isArray(chain) ||
    !chain.every(
      (b) =>
        typeof b === "object" &&
        b !== null &&
        typeof b.path === "string" &&
        b.path.startsWith("/") &&
        (b.format === "raw" || b.format === "qcow2") &&
        Number.isSafeInteger(b.sizeBytes),
    )
  ) {
    throw corrupt("files.disk.backingChain must list absolute paths with formats and sizes");
  }
  return value as SnapshotManifest;
}

function isSnapshotNetwork(value: unknown): value is SnapshotNetwork {
  if (typeof value !== "object" || value === null) return false;
  const { device, policy } = value as Record<string, unknown>;
  if (typeof device !== "boolean") return false;
  if (policy === "none" || policy === "outbound") return policy === "outbound" ? device : true;
  if (typeof policy !== "object" || policy === null) return false;
  const allow = (policy as Record<string, unknown>).allow;
  return device && Array.isArray(allow) && allow.every((rule) => typeof rule === "string");
}

/** What a snapshot records of the image it was made from. */
export interface ImageIdentity {
  /** Canonical reference or local source (`oci:/dir:tag`, `rootfs:/dir`); "" when unknown. */
  readonly reference: string;
  /** Digest of the image manifest (or the fingerprint of a root filesystem). */
  readonly digest: string;
  /** `os/arch[/variant]`. */
  readonly platform: string;
  readonly config: ImageConfig;
}

/** Everything {@link buildManifest} needs besides the files already in the snapshot dir. */
export interface ManifestInput {
  /** The dir holding the memory, state and disk files (sizes and digests are read from there). */
  dir: string;
  name: string;
  image: ImageIdentity;
  host: { qemuVersion: string; accelerator: "kvm" | "tcg"; kernelDigest: string; initramfsDigest: string };
  machine: {
    kernelArgs: readonly string[];
    tscKHz: number | undefined;
    memoryMiB: number;
    vcpus: number;
    /** Absent or `mem`: the default backend id. */
    memoryBackendId?: string | undefined;
  };
  network: SnapshotNetwork;
  execDefaults: SnapshotManifest["execDefaults"];
  warmupTag: string;
  cacheKey: string;
  parent: string | undefined;
  backingChain: readonly BackingFileEntry[];
}

/**
 * The one way a manifest is made, by bakes and by `vm.snapshot()` alike: the inputs, plus the
 * sizes and sha256 digests of the files in `input.dir`.
 */
export async function buildManifest(input: ManifestInput): Promise<SnapshotManifest> {
  const path = (name: string) => join(input.dir, name);
  const [memorySize, stateSize, diskSize, memorySha, stateSha] = await Promise.all([
    stat(path(SNAPSHOT_FILES.memory)).then((s) => s.size),
    stat(path(SNAPSHOT_FILES.state)).then((s) => s.size),
    stat(path(SNAPSHOT_FILES.disk)).then((s) => s.size),
    sha256File(path(SNAPSHOT_FILES.memory)),
    sha256File(path(SNAPSHOT_FILES.state)),
  ]);
  const backendId = input.machine.memoryBackendId;
  return {
    formatVersion: SNAPSHOT_FORMAT_VERSION,
    name: input.name,
    reference: input.image.reference,
    platform: input.image.platform,
    imageDigest: input.image.digest,
    rootfsFormatVersion: ROOTFS_FORMAT_VERSION,
    imageConfig: input.image.config,
    qemuVersion: input.host.qemuVersion,
    machine: "microvm",
    accelerator: input.host.accelerator,
    cpuModel: input.host.accelerator === "kvm" ? "host" : "max",
    kernelDigest: input.host.kernelDigest,
    initramfsDigest: input.host.initramfsDigest,
    kernelArgs: [...input.machine.kernelArgs],
    tscKHz: input.machine.tscKHz,
    memoryMiB: input.machine.memoryMiB,
    vcpus: input.machine.vcpus,
    ...(backendId === undefined || backendId === "mem" ? {} : { memoryBackendId: backendId }),
    network: input.network,
    execDefaults: input.execDefaults,
    warmupTag: input.warmupTag,
    cacheKey: input.cacheKey,
    parent: input.parent,
    createdAt: new Date().toISOString(),
    files: {
      memory: { path: SNAPSHOT_FILES.memory, sizeBytes: memorySize, sha256: memorySha },
      state: { path: SNAPSHOT_FILES.state, sizeBytes: stateSize, sha256: stateSha },
      disk: { path: SNAPSHOT_FILES.disk, sizeBytes: diskSize, backingChain: input.backingChain },
    },
  };
}

/** Write `manifest` into `dir` (0600). */
export async function writeManifest(dir: string, manifest: SnapshotManifest): Promise<void> {
  await writeFile(join(dir, SNAPSHOT_FILES.manifest), `${JSON.stringify(manifest, null, 2)}\n`, {
    mode: 0o600,
  });
}

/** sha256 hex of a file's content. */
export async function sha256File(path: string): Promise<string> {
  const hash = nodeCrypto().createHash("sha256");
  for await (const chunk of createReadStream(path, { highWaterMark: 1024 * 1024 }))
    hash.update(chunk as Buffer);
  return hash.digest("hex");
}
