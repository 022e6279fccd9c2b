/** The snapshot store: `<dataDir>/snapshots/<name>/`, one dir per snapshot. */

import { readdir, readFile, rename, rm, stat } from "node:fs/promises";
import { basename, dirname, join, resolve } from "node:path";
import { SupermachineError } from "../errors.ts";
import { dataDir } from "../internal/index.ts";
import { parseManifest, SNAPSHOT_FILES, type SnapshotManifest } from "./manifest.ts";

/** Names in the store: what a directory entry may be called. */
const NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/;

/** One stored snapshot, as listed by `Image.snapshots()`. */
export interface SnapshotInfo {
  readonly name: string;
  readonly dir: string;
  /** Undefined when the manifest is unreadable (the snapshot cannot be restored; remove it). */
  readonly manifest: SnapshotManifest | undefined;
  /** Why the manifest is unusable, if it is. */
  readonly error: string | undefined;
  /** Disk space its files take (allocated blocks; the memory file is sparse). */
  readonly sizeBytes: number;
}

export function snapshotsRoot(root = dataDir()): string {
  return join(root, "snapshots");
}

export function assertSnapshotName(name: string): void {
  if (!NAME.test(name)) {
    throw new SupermachineError(
      "INVALID_ARGUMENT",
      `snapshot name ${JSON.stringify(name)} must be 1-128 characters of letters, digits, "_", "." and "-", not starting with "." or "-"`,
    );
  }
}

/** A store name made from an image reference: `docker.io/library/alpine:3.20` → `alpine-3.20`. */
export function defaultSnapshotName(reference: string, key: string): string {
  const last =
    reference
      .replace(/@sha256:[0-9a-f]+$/, "")
      .split("/")
      .pop() ?? "image";
  const base =
    last
      .replace(/[^A-Za-z0-9_.-]+/g, "-")
      .replace(/^[-.]+/, "")
      .slice(0, 80) || "image";
  return `${base}-${key.slice(0, 12)}`;
}

/** The dir of `nameOrDir`: a path (contains `/` or starts with `.`) as is, else a store name. */
export function snapshotDirOf(nameOrDir: string, root = dataDir()): string {
  if (nameOrDir.includes("/") || nameOrDir.startsWith(".")) return resolve(nameOrDir);
  assertSnapshotName(nameOrDir);
  return join(snapshotsRoot(root), nameOrDir);
}

export async function listSnapshots(options: { dataDir?: string } = {}): Promise<SnapshotInfo[]> {
  const root = snapshotsRoot(options.dataDir ?? dataDir());
  const names = await readdir(root).catch(() => [] as string[]);
  const out: SnapshotInfo[] = [];
  for (const name of names.sort()) {
    if (!NAME.test(name)) continue; // temp dirs of bakes in progress start with "."
    const dir = join(root, name);
    const info = await stat(dir).catch(() => undefined);
    if (!info?.isDirectory()) continue;
    let manifest: SnapshotManifest | undefined;
    let error: string | undefined;
    try {
      manifest = parseManifest(await readFile(join(dir, SNAPSHOT_FILES.manifest), "utf8"), dir);
    } catch (e) {
      error = (e as Error).message;
    }
    out.push({ name, dir, manifest, error, sizeBytes: await allocatedBytes(dir) });
  }
  return out;
}

/**
 * Delete the stored snapshot `name`. Throws `INVALID_ARGUMENT` when it does not exist, or when
 * another stored snapshot's disk is layered on it (unless `force`). VMs restored from it keep
 * running (their QEMU holds the files open).
 */
export async function removeSnapshot(
  name: string,
  options: { dataDir?: string; force?: boolean } = {},
): Promise<void> {
  assertSnapshotName(name);
  const root = options.dataDir ?? dataDir();
  const dir = join(snapshotsRoot(root), name);
  const info = await stat(dir).catch(() => undefined);
  if (!info?.isDirectory()) {
    throw new SupermachineError(
      "INVALID_ARGUMENT",
      `no snapshot named ${JSON.stringify(name)} in ${snapshotsRoot(root)}`,
    );
  }
  if (options.force !== true) {
    const prefix = `${dir}/`;
    const dependents = (await listSnapshots({ dataDir: root })).filter(
      (s) => s.name !== name && s.manifest?.files.disk.backingChain.some((b) => b.path.startsWith(prefix)),
    );
    if (dependents.length > 0) {
      throw new SupermachineError(
        "INVALID_ARGUMENT",
        `snapshot ${name} is the base of ${dependents.map((d) => d.name).join(", ")}: remove those first or pass force`,
      );
    }
  }
  await rm(dir, { recursive: true, force: true });
}

/** Every file path the stored snapshots' disks are layered on (so image pruning keeps them). */
export async function snapshotBackingFiles(options: { dataDir?: string } = {}): Promise<Set<string>> {
  const paths = new Set<string>();
  for (const s of await listSnapshots(options)) {
    for (const b of s.manifest?.files.disk.backingChain ?? []) paths.add(b.path);
  }
  return paths;
}

async function allocatedBytes(dir: string): Promise<number> {
  let total = 0;
  for (const name of await readdir(dir).catch(() => [] as string[])) {
    const info = await stat(join(dir, name)).catch(() => undefined);
    if (info?.isFile()) total += info.blocks * 512;
  }
  return total;
}

/** Temp dir name for work on `name` by this process: `.<kind>-<name>-<pid>-<random>`. */
export function snapshotTempName(kind: "bake" | "old" | "snapshot", name: string): string {
  return `.${kind}-${name}-${process.pid}-${Math.random().toString(16).slice(2, 10)}`;
}

/**
 * Remove temp dirs in the store left by processes that died mid-bake, mid-replace or
 * mid-`vm.snapshot()` (their pid, in the name, is gone). Never touches a live process's work.
 */
export async function sweepSnapshotTemps(root: string): Promise<number> {
  let removed = 0;
  for (const entry of await readdir(root).catch(() => [] as string[])) {
    const match = /^\.(?:bake|old|snapshot)-.+-(\d+)-[0-9a-f]+$/.exec(entry);
    if (match === null) continue;
    const pid = Number(match[1]);
    let alive = true;
    try {
      process.kill(pid, 0);
    } catch (error) {
      alive = (error as NodeJS.ErrnoException).code === "EPERM";
    }
    if (!alive) {
      await rm(join(root, entry), { recursive: true, force: true });
      removed++;
    }
  }
  return removed;
}

/**
 * Put the finished snapshot in `tmp` (a temp dir in the same store) at `dir` in one rename. An
 * existing snapshot there is replaced; it is removed only after the new one is in place.
 */
export async function moveSnapshotIntoPlace(tmp: string, dir: string): Promise<void> {
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
