import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import type { Dirent } from "node:fs";
import { access, constants, readdir, readFile, stat } from "node:fs/promises";
import { dirname, join, relative, sep } from "node:path";
import { fileURLToPath } from "node:url";
import { SupermachineError } from "../errors.ts";
import { cacheDir, once } from "../internal/index.ts";

/** Where the guest kernel (an uncompressed, PVH-bootable `vmlinux`) and the initramfs are. */
export interface AssetPaths {
  kernel: string;
  initramfs: string;
}

/** Where {@link resolveAssetPaths} looks; the defaults fit an installed package. */
export interface AssetSearchOptions {
  /** Package root holding `kernel/`, `scripts/`, `guest/` and optionally `assets/`. Default: this package. */
  packageDir?: string;
  /** Environment to read `SUPERMACHINE_*`, `XDG_CACHE_HOME` from. Default: `process.env`. */
  env?: NodeJS.ProcessEnv;
  /**
   * Version of Debian's `linux-source-6.1` (part of the kernel's cache key); `null` = unknown, which
   * falls back to the newest cached kernel. Default: asked from `dpkg-query`, once per process.
   */
  linuxSourceVersion?: string | null;
}

const LINUX_SOURCE_PACKAGE = "linux-source-6.1";
const BUILD_COMMAND = "npm run assets";

/** The package root: two levels above this file (`src/vmm/` when run from source, `dist/vmm/` when built). */
const PACKAGE_DIR = join(dirname(fileURLToPath(import.meta.url)), "..", "..");

/**
 * Finds the guest kernel and initramfs. Each is taken from the first of: `overrides`, the env
 * variables `SUPERMACHINE_KERNEL` / `SUPERMACHINE_INITRAMFS`, the package's prebuilt
 * `assets/vmlinux` / `assets/initramfs.cpio`, the cache that `scripts/build-assets.sh` installs into
 * (keyed exactly as the scripts key it). Throws `ASSET_MISSING` naming what is missing and how to
 * build it.
 */
export async function resolveAssetPaths(
  overrides: Partial<AssetPaths> = {},
  options: AssetSearchOptions = {},
): Promise<AssetPaths> {
  const env = options.env ?? process.env;
  const packageDir = options.packageDir ?? PACKAGE_DIR;
  const dir = cacheDir(env);

  const missing: string[] = [];
  const find = async (
    name: keyof AssetPaths,
    label: string,
    envName: string,
    packaged: string,
    fromCache: () => Promise<{ path: string | undefined; lookedFor: string }>,
  ): Promise<string> => {
    const given = overrides[name];
    if (given !== undefined) {
      if (await isReadableFile(given)) return given;
      missing.push(`${label} ${given} (given as ${name})`);
      return "";
    }
    const fromEnv = env[envName];
    if (fromEnv) {
      if (await isReadableFile(fromEnv)) return fromEnv;
      missing.push(`${label} ${fromEnv} (given by ${envName})`);
      return "";
    }
    if (await isReadableFile(packaged)) return packaged;
    const cached = await fromCache();
    if (cached.path !== undefined) return cached.path;
    missing.push(`${label} (looked for ${packaged} and ${cached.lookedFor})`);
    return "";
  };

  const kernel = await find(
    "kernel",
    "guest kernel",
    "SUPERMACHINE_KERNEL",
    join(packageDir, "assets", "vmlinux"),
    async () => {
      const path = await cachedKernelPath(packageDir, dir, options.linuxSourceVersion);
      if (path !== undefined)
        return { path: (await isReadableFile(path)) ? path : undefined, lookedFor: path };
      // The key cannot be computed here: take the newest kernel any build left in the cache.
      return { path: await newestCachedKernel(dir), lookedFor: join(dir, "kernel", "*", "vmlinux") };
    },
  );
  const initramfs = await find(
    "initramfs",
    "guest initramfs",
    "SUPERMACHINE_INITRAMFS",
    join(packageDir, "assets", "initramfs.cpio"),
    async () => {
      const path = await cachedInitramfsPath(packageDir, dir);
      return { path: (await isReadableFile(path)) ? path : undefined, lookedFor: path };
    },
  );
  if (missing.length > 0) {
    throw new SupermachineError(
      "ASSET_MISSING",
      `guest assets missing: ${missing.join("; ")}. Build them with \`${BUILD_COMMAND}\` in ${packageDir} ` +
        "(runs scripts/build-assets.sh; the kernel takes ~15 min the first time), " +
        "or set SUPERMACHINE_KERNEL / SUPERMACHINE_INITRAMFS",
    );
  }
  return { kernel, initramfs };
}

/**
 * The paths `scripts/build-kernel.sh` and `scripts/build-initramfs.sh` install to (built or not),
 * computed from the package's own sources. `kernel` is undefined when its key cannot be computed
 * (no `dpkg-query`, no `linux-source-6.1`, or the package lacks the kernel sources).
 */
export async function cachedAssetPaths(
  options: AssetSearchOptions = {},
): Promise<{ cacheDir: string; kernel: string | undefined; initramfs: string }> {
  const packageDir = options.packageDir ?? PACKAGE_DIR;
  const dir = cacheDir(options.env ?? process.env);
  return {
    cacheDir: dir,
    kernel: await cachedKernelPath(packageDir, dir, options.linuxSourceVersion),
    initramfs: await cachedInitramfsPath(packageDir, dir),
  };
}

async function cachedKernelPath(
  packageDir: string,
  dir: string,
  version: string | null | undefined,
): Promise<string | undefined> {
  const known = version !== undefined ? version : await linuxSourceVersion();
  if (known === null) return undefined;
  const key = await kernelCacheKey(packageDir, known);
  return key === undefined ? undefined : join(dir, "kernel", key, "vmlinux");
}

async function cachedInitramfsPath(packageDir: string, dir: string): Promise<string> {
  return join(dir, "initramfs", await initramfsCacheKey(packageDir), "initramfs.cpio");
}

/** Key of `scripts/build-kernel.sh`: sha256 of the manifest of its inputs, first 16 hex digits. */
async function kernelCacheKey(packageDir: string, version: string): Promise<string | undefined> {
  const lines: string[] = [];
  for (const path of ["kernel/supermachine.config", "scripts/build-kernel.sh"]) {
    const digest = await fileSha256(join(packageDir, path));
    if (digest === undefined) return undefined;
    lines.push(`${digest}  ${path}\n`);
  }
  lines.push(`${LINUX_SOURCE_PACKAGE} ${version}\n`);
  return sha256(lines.join("")).slice(0, 16);
}

/** Key of `scripts/build-initramfs.sh`: the same manifest scheme over the guest sources and the script. */
async function initramfsCacheKey(packageDir: string): Promise<string> {
  const paths: string[] = [];
  if (await isFile(join(packageDir, "guest", "Makefile"))) paths.push("guest/Makefile");
  for (const dir of ["guest/src", "guest/include"]) {
    let entries: Dirent[];
    try {
      entries = await readdir(join(packageDir, dir), { recursive: true, withFileTypes: true });
    } catch {
      continue;
    }
    for (const entry of entries) {
      if (!entry.isFile()) continue;
      paths.push(relative(packageDir, join(entry.parentPath, entry.name)).split(sep).join("/"));
    }
  }
  paths.push("scripts/build-initramfs.sh");
  paths.sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)));
  let manifest = "";
  for (const path of paths) {
    const digest = await fileSha256(join(packageDir, path));
    manifest += `${digest ?? sha256("")}  ${path}\n`;
  }
  return sha256(manifest).slice(0, 16);
}

/** The newest `<cache>/kernel/<key>/vmlinux`, for hosts where the key cannot be computed. */
async function newestCachedKernel(dir: string): Promise<string | undefined> {
  let keys: string[];
  try {
    keys = await readdir(join(dir, "kernel"));
  } catch {
    return undefined;
  }
  let best: { path: string; mtimeMs: number } | undefined;
  for (const key of keys) {
    const path = join(dir, "kernel", key, "vmlinux");
    try {
      const info = await stat(path);
      if (info.isFile() && (best === undefined || info.mtimeMs > best.mtimeMs))
        best = { path, mtimeMs: info.mtimeMs };
    } catch {}
  }
  return best?.path;
}

/** The installed `linux-source-6.1` package version (it keys the kernel cache), found once. */
const linuxSourceVersion: () => Promise<string | null> = once(
  () =>
    new Promise((resolve) => {
      execFile(
        "dpkg-query",
        // dpkg-query's own ${Version} field, not a template placeholder.
        ["-W", "--showformat=$" + "{Version}", LINUX_SOURCE_PACKAGE],
        { timeout: 10_000 },
        (error, stdout) => resolve(error || stdout.trim() === "" ? null : stdout.trim()),
      );
    }),
);

function sha256(data: string | Buffer): string {
  return createHash("sha256").update(data).digest("hex");
}

async function fileSha256(path: string): Promise<string | undefined> {
  try {
    return sha256(await readFile(path));
  } catch {
    return undefined;
  }
}

async function isFile(path: string): Promise<boolean> {
  try {
    return (await stat(path)).isFile();
  } catch {
    return false;
  }
}

async function isReadableFile(path: string): Promise<boolean> {
  try {
    await access(path, constants.R_OK);
    return (await stat(path)).isFile();
  } catch {
    return false;
  }
}
