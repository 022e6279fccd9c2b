/**
 * A snapshot dir opened for restoring: its manifest checked against this host and its files
 * checked for damage BEFORE anything starts. See docs/snapshots.md.
 */

import { open, readFile, stat } from "node:fs/promises";
import { basename, dirname, join, resolve } from "node:path";
import { SnapshotError } from "../errors.ts";
import { dataDir } from "../internal/index.ts";
import { type AssetPaths, hostTscKHz, OverlayTemplate } from "../vmm/index.ts";
import { hostFacts } from "./host-facts.ts";
import { parseManifest, SNAPSHOT_FILES, type SnapshotManifest, sha256File } from "./manifest.ts";

const MiB = 1024 * 1024;
const QCOW2_MAGIC = 0x514649fb;

/** Options of {@link Snapshot.open}. */
export interface SnapshotOpenOptions {
  /** Guest kernel and initramfs to check against (default: found by `resolveAssetPaths()`). */
  assets?: Partial<AssetPaths> | undefined;
  /**
   * `"quick"` (default): sizes, qcow2 headers, the device state's sha256, the backing chain.
   * `"full"`: also the sha256 of the memory file (reads all of it).
   */
  verify?: "quick" | "full";
  /**
   * Data dirs whose stores the snapshot's disk may be layered on (its backing files must lie in
   * their `rootfs/` or `snapshots/`), besides `SUPERMACHINE_DATA_DIR` (or the XDG default) and
   * the store the snapshot itself sits in. A manifest naming any other file is refused: a tampered
   * snapshot could otherwise show a guest any host file as a disk.
   */
  trustedDataDirs?: readonly string[] | undefined;
}

/** A validated snapshot dir. Restoring never changes its files. */
export class Snapshot {
  /** Absolute path of the snapshot dir. */
  readonly dir: string;
  readonly manifest: SnapshotManifest;
  /** The guest kernel and initramfs restores use (their digests match the manifest's). */
  readonly assets: AssetPaths;
  readonly #overlays: OverlayTemplate;

  private constructor(dir: string, manifest: SnapshotManifest, assets: AssetPaths) {
    this.dir = dir;
    this.manifest = manifest;
    this.assets = assets;
    this.#overlays = new OverlayTemplate(this.diskPath, "qcow2");
  }

  get memoryPath(): string {
    return join(this.dir, this.manifest.files.memory.path);
  }

  get statePath(): string {
    return join(this.dir, this.manifest.files.state.path);
  }

  get diskPath(): string {
    return join(this.dir, this.manifest.files.disk.path);
  }

  get name(): string {
    return this.manifest.name;
  }

  /**
   * Read and validate the snapshot in `dir`. Throws `SnapshotError` `SNAPSHOT_INCOMPATIBLE` (other
   * accelerator, QEMU version, kernel or initramfs, format version) or `SNAPSHOT_CORRUPT` (missing,
   * truncated or altered files, broken backing chain).
   */
  static async open(dir: string, options: SnapshotOpenOptions = {}): Promise<Snapshot> {
    const snapshotDir = resolve(dir);
    const text = await readFile(join(snapshotDir, SNAPSHOT_FILES.manifest), "utf8").catch(
      (error: NodeJS.ErrnoException) => {
        throw new SnapshotError(
          "SNAPSHOT_CORRUPT",
          `${snapshotDir} is not a snapshot: cannot read manifest.json (${error.code})`,
          { snapshotDir },
          { cause: error },
        );
      },
    );
    const manifest = parseManifest(text, snapshotDir);
    const host = await hostFacts(options.assets);
    const incompatible = (what: string) =>
      new SnapshotError("SNAPSHOT_INCOMPATIBLE", `snapshot ${snapshotDir} cannot be restored here: ${what}`, {
        snapshotDir,
      });
    if (manifest.accelerator !== host.accelerator) {
      throw incompatible(`it was made under ${manifest.accelerator}, this host runs ${host.accelerator}`);
    }
    if (manifest.qemuVersion !== host.qemuVersion) {
      throw incompatible(`it was made by QEMU ${manifest.qemuVersion}, this host has ${host.qemuVersion}`);
    }
    if (manifest.kernelDigest !== host.kernelDigest) {
      throw incompatible(
        `it was made with another guest kernel (sha256 ${manifest.kernelDigest.slice(0, 12)}…, this host has ${host.kernelDigest.slice(0, 12)}… at ${host.assets.kernel})`,
      );
    }
    if (manifest.initramfsDigest !== host.initramfsDigest) {
      throw incompatible(
        `it was made with another initramfs (sha256 ${manifest.initramfsDigest.slice(0, 12)}…, this host has ${host.initramfsDigest.slice(0, 12)}… at ${host.assets.initramfs})`,
      );
    }
    if (manifest.accelerator === "tcg" && manifest.tscKHz !== undefined) {
      const tscKHz = hostTscKHz();
      if (tscKHz !== undefined && tscKHz !== manifest.tscKHz) {
        throw incompatible(
          `it was made on a host with a ${manifest.tscKHz} kHz TSC, this one has ${tscKHz} kHz (guest clocks would run wrong)`,
        );
      }
    }
    const trusted = [...(options.trustedDataDirs ?? []), dataDir()];
    // A snapshot in a store (`<dataDir>/snapshots/<name>`) may use that store.
    if (basename(dirname(snapshotDir)) === "snapshots") trusted.push(dirname(dirname(snapshotDir)));
    await checkFiles(snapshotDir, manifest, options.verify ?? "quick", trusted);
    return new Snapshot(snapshotDir, manifest, host.assets);
  }

  /**
   * Create a fresh qcow2 overlay (0600) at `path` whose backing file is this snapshot's disk
   * state: a copy of one template overlay per Snapshot object (see docs/snapshots.md for the
   * measured difference against `qemu-img` per restore).
   */
  createOverlay(path: string): Promise<void> {
    return this.#overlays.create(path);
  }
}

async function checkFiles(
  snapshotDir: string,
  manifest: SnapshotManifest,
  verify: "quick" | "full",
  trustedDataDirs: readonly string[],
): Promise<void> {
  const corrupt = (what: string, cause?: unknown) =>
    new SnapshotError(
      "SNAPSHOT_CORRUPT",
      `snapshot ${snapshotDir} is damaged: ${what}`,
      { snapshotDir },
      { cause },
    );
  const sizeOf = async (path: string, label: string) => {
    const info = await stat(path).catch((error: NodeJS.ErrnoException) => {
      throw corrupt(`${label} ${path} is missing (${error.code})`, error);
    });
    if (!info.isFile()) throw corrupt(`${label} ${path} is not a file`);
    return info.size;
  };
  const { memory, state, disk } = manifest.files;
  const memoryPath = join(snapshotDir, memory.path);
  const memorySize = await sizeOf(memoryPath, "memory file");
  if (memorySize !== memory.sizeBytes || memorySize !== manifest.memoryMiB * MiB) {
    throw corrupt(`memory file is ${memorySize} bytes, expected ${manifest.memoryMiB * MiB}`);
  }
  const statePath = join(snapshotDir, state.path);
  if ((await sizeOf(statePath, "device state")) !== state.sizeBytes) {
    throw corrupt(`device state is not ${state.sizeBytes} bytes`);
  }
  if (state.sha256 !== undefined && (await sha256File(statePath)) !== state.sha256) {
    throw corrupt("device state does not match its sha256");
  }
  const diskPath = join(snapshotDir, disk.path);
  if ((await sizeOf(diskPath, "disk state")) !== disk.sizeBytes)
    throw corrupt(`disk state is not ${disk.sizeBytes} bytes`);
  const backing = await qcow2BackingFile(diskPath).catch((error: unknown) => {
    throw corrupt(`disk state ${diskPath} is not a qcow2 image`, error);
  });
  const chain = disk.backingChain;
  if (backing !== (chain[0]?.path ?? undefined)) {
    throw corrupt(
      `disk state's backing file is ${backing ?? "(none)"}, the manifest says ${chain[0]?.path ?? "(none)"}`,
    );
  }
  const inStore = (path: string) =>
    trustedDataDirs.some((root) =>
      ["rootfs", "snapshots"].some((kind) => resolve(path).startsWith(`${join(resolve(root), kind)}/`)),
    );
  for (const entry of chain) {
    if (!inStore(entry.path)) {
      throw corrupt(
        `its disk is layered on ${entry.path}, which is not in a store it may use (${trustedDataDirs.join(", ")}): a snapshot from elsewhere is refused`,
      );
    }
  }
  for (const [index, entry] of chain.entries()) {
    if ((await sizeOf(entry.path, "backing file")) !== entry.sizeBytes) {
      throw corrupt(`backing file ${entry.path} changed size`);
    }
    if (entry.format === "qcow2") {
      const next = await qcow2BackingFile(entry.path).catch((error: unknown) => {
        throw corrupt(`backing file ${entry.path} is not a qcow2 image`, error);
      });
      if (next !== chain[index + 1]?.path)
        throw corrupt(`backing file ${entry.path} does not continue the recorded chain`);
    }
  }
  if (verify === "full" && memory.sha256 !== undefined && (await sha256File(memoryPath)) !== memory.sha256) {
    throw corrupt("memory file does not match its sha256");
  }
}

/** The backing file name recorded in a qcow2 header (undefined: none). Throws if not qcow2. */
export async function qcow2BackingFile(path: string): Promise<string | undefined> {
  const handle = await open(path, "r");
  try {
    const header = Buffer.alloc(20);
    const { bytesRead } = await handle.read(header, 0, 20, 0);
    if (bytesRead < 20 || header.readUInt32BE(0) !== QCOW2_MAGIC) throw new Error("no qcow2 magic");
    const offset = Number(header.readBigUInt64BE(8));
    const size = header.readUInt32BE(16);
    if (offset === 0 || size === 0) return undefined;
    if (size > 4096) throw new Error("backing file name too long");
    const name = Buffer.alloc(size);
    await handle.read(name, 0, size, offset);
    return name.toString("utf8");
  } finally {
    await handle.close();
  }
}

/** The store name a snapshot dir is known by. */
export function snapshotNameOf(dir: string): string {
  return basename(resolve(dir));
}
