import { execFile } from "node:child_process";
import { createReadStream, type Dirent, readFileSync } from "node:fs";
import { access, constants, readdir, readFile, stat } from "node:fs/promises";
import { createRequire } from "node:module";
import { dirname, join, relative, sep } from "node:path";
import { fileURLToPath } from "node:url";
import { DigestMismatchError, SupermachineError } from "../errors.ts";
import { cacheDir, nodeCrypto, once } from "../internal/index.ts";

/**
 * Where the guest kernel (an uncompressed, PVH-bootable `vmlinux`) and the initramfs are, and the
 * host's network relay `sm-net` (needed only by VMs with a network allow-list; docs/network.md).
 */
export interface AssetPaths {
  kernel: string;
  initramfs: string;
  /** The allow-list relay (`hosttools/sm-net.c`). Absent when it was not found. */
  netRelay?: string;
}

/** Where {@link resolveAssetPaths} looks; the defaults fit an installed package. */
export interface AssetSearchOptions {
  /** Package root holding `kernel/`, `scripts/`, `guest/` and `dist/guest-assets.json`. Default: this package. */
  packageDir?: string;
  /** The prebuilt guest package's dir. Default: `@supermachine/guest-<os>-<cpu>` as Node resolves it from `packageDir`. */
  guestPackageDir?: string;
  /** Environment to read `SUPERMACHINE_*`, `XDG_CACHE_HOME` from. Default: `process.env`. */
  env?: NodeJS.ProcessEnv;
  /**
   * Version of Debian's `linux-source-6.1` (part of the kernel's cache key); `null` = unknown, which
   * falls back to the newest cached kernel. Default: asked from `dpkg-query`, once per process.
   */
  linuxSourceVersion?: string | null;
}

/** Where a guest asset was found. */
export interface AssetLocation {
  readonly path: string;
  /**
   * `option`: given by the caller; `env`: `SUPERMACHINE_KERNEL` / `SUPERMACHINE_INITRAMFS` /
   * `SUPERMACHINE_NET_RELAY`; `cache`: built from this package's sources by `scripts/build-assets.sh`; `package`: the
   * prebuilt guest package, its sha256 checked against the one this package records; `newest`: the
   * newest kernel in the cache (its key could not be computed on this host).
   */
  readonly source: "option" | "env" | "cache" | "package" | "newest";
  /** `sha256:<hex>` when it was checked (source `package`). */
  readonly sha256?: string;
}

/** Both guest assets and where each came from (what `supermachine doctor` shows). */
export interface GuestAssets {
  readonly kernel: AssetLocation;
  readonly initramfs: AssetLocation;
  /** The network relay, when found (it is needed only for allow-lists, so its absence is no error here). */
  readonly netRelay?: AssetLocation;
}

const LINUX_SOURCE_PACKAGE = "linux-source-6.1";
const BUILD_COMMAND = "npm run assets";
/** The per-platform package of prebuilt guest assets (an optional dependency of this package). */
export const GUEST_PACKAGE = `@supermachine/guest-${process.platform}-${process.arch}`;
/** In a packed package: the guest package's `assets.json`, recorded at pack time (scripts/build.ts). */
const RECORDED_GUEST_ASSETS = join("dist", "guest-assets.json");

/**
 * The package root: the nearest dir above this file whose package.json names `supermachine`
 * (`src/vmm/` from source; `dist/` or `dist/chunks/` when bundled).
 */
const packageRoot: () => string = once(() => {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    try {
      const manifest = JSON.parse(readFileSync(join(dir, "package.json"), "utf8")) as { name?: unknown };
      if (manifest.name === "supermachine") return dir;
    } catch {}
    const parent = dirname(dir);
    if (parent === dir) return join(dirname(fileURLToPath(import.meta.url)), "..", "..");
    dir = parent;
  }
});

/**
 * Finds the guest kernel and initramfs. Each is taken from the first of: `overrides`, the env
 * variables `SUPERMACHINE_KERNEL` / `SUPERMACHINE_INITRAMFS`, the cache that `scripts/build-assets.sh`
 * installs into (keyed exactly as the scripts key it, so a checkout uses what its sources build),
 * the prebuilt guest package `@supermachine/guest-linux-x64` (checked against the sha256 this
 * package recorded when it was packed: a mismatch is `DIGEST_MISMATCH`), and at last, when the
 * kernel's key cannot be computed here, the newest cached kernel. Throws `ASSET_MISSING` naming
 * what is missing and how to get it.
 */
export async function resolveAssetPaths(
  overrides: Partial<AssetPaths> = {},
  options: AssetSearchOptions = {},
): Promise<AssetPaths> {
  const found = await locateGuestAssets(overrides, options);
  return {
    kernel: found.kernel.path,
    initramfs: found.initramfs.path,
    ...(found.netRelay === undefined ? {} : { netRelay: found.netRelay.path }),
  };
}

/** {@link resolveAssetPaths}, saying where each asset came from. */
export async function locateGuestAssets(
  overrides: Partial<AssetPaths> = {},
  options: AssetSearchOptions = {},
): Promise<GuestAssets> {
  const env = options.env ?? process.env;
  const packageDir = options.packageDir ?? packageRoot();
  const dir = cacheDir(env);
  const prebuilt = await prebuiltGuestPackage(packageDir, options.guestPackageDir);

  const missing: string[] = [];
  const find = async (
    name: "kernel" | "initramfs",
    label: string,
    envName: string,
    fromCache: () => Promise<{ path: string | undefined; lookedFor: string }>,
    newest?: () => Promise<string | undefined>,
  ): Promise<AssetLocation> => {
    const none = { path: "", source: "option" as const };
    const given = overrides[name];
    if (given !== undefined) {
      if (await isReadableFile(given)) return { path: given, source: "option" };
      missing.push(`${label} ${given} (given as ${name})`);
      return none;
    }
    const fromEnv = env[envName];
    if (fromEnv) {
      if (await isReadableFile(fromEnv)) return { path: fromEnv, source: "env" };
      missing.push(`${label} ${fromEnv} (given by ${envName})`);
      return none;
    }
    const cached = await fromCache();
    if (cached.path !== undefined) return { path: cached.path, source: "cache" };
    const lookedFor = [cached.lookedFor];
    if (prebuilt.kind === "found") {
      const path = join(prebuilt.dir, prebuilt.record[name].file);
      return { path, source: "package", sha256: await verify(path, prebuilt.record[name].sha256, label) };
    }
    lookedFor.push(prebuilt.why);
    const last = await newest?.();
    if (last !== undefined) return { path: last, source: "newest" };
    missing.push(`${label} (looked for ${lookedFor.join(", ")})`);
    return none;
  };

  const kernel = await find(
    "kernel",
    "guest kernel",
    "SUPERMACHINE_KERNEL",
    async () => {
      const path = await cachedKernelPath(packageDir, dir, options.linuxSourceVersion);
      if (path !== undefined)
        return { path: (await isReadableFile(path)) ? path : undefined, lookedFor: path };
      return { path: undefined, lookedFor: join(dir, "kernel", "*", "vmlinux") };
    },
    // The key cannot be computed here: take the newest kernel any build left in the cache.
    async () =>
      (await cachedKernelPath(packageDir, dir, options.linuxSourceVersion)) === undefined
        ? newestCachedKernel(dir)
        : undefined,
  );
  const initramfs = await find("initramfs", "guest initramfs", "SUPERMACHINE_INITRAMFS", async () => {
    const path = await cachedInitramfsPath(packageDir, dir);
    return { path: (await isReadableFile(path)) ? path : undefined, lookedFor: path };
  });
  if (missing.length > 0) {
    throw new SupermachineError(
      "ASSET_MISSING",
      `guest assets missing: ${missing.join("; ")}. Install the prebuilt ${GUEST_PACKAGE} ` +
        `(an optional dependency of supermachine), build them from source with \`${BUILD_COMMAND}\` ` +
        `(bash ${join(packageDir, "scripts", "build-assets.sh")}; the kernel takes ~15 min the first time), ` +
        "or set SUPERMACHINE_KERNEL / SUPERMACHINE_INITRAMFS",
    );
  }
  const netRelay = await findNetRelay(overrides, env, packageDir, dir, prebuilt);
  return { kernel, initramfs, ...("path" in netRelay ? { netRelay } : {}) };
}

/**
 * Finds the network relay `sm-net` like the guest assets: `overrides.netRelay`,
 * `SUPERMACHINE_NET_RELAY`, the cache `scripts/build-hosttools.sh` installs into (keyed by the
 * sources of `hosttools/`), the prebuilt guest package (sha256 checked). Throws `ASSET_MISSING`
 * saying where it looked and how to get it.
 */
export async function locateNetRelay(
  overrides: Partial<AssetPaths> = {},
  options: AssetSearchOptions = {},
): Promise<AssetLocation> {
  const env = options.env ?? process.env;
  const packageDir = options.packageDir ?? packageRoot();
  const prebuilt = await prebuiltGuestPackage(packageDir, options.guestPackageDir);
  const found = await findNetRelay(overrides, env, packageDir, cacheDir(env), prebuilt);
  if ("path" in found) return found;
  throw new SupermachineError(
    "ASSET_MISSING",
    `the network relay sm-net is missing (looked for ${found.lookedFor}); it is needed for network allow-lists. ` +
      `Build it with \`${BUILD_COMMAND}\` (bash ${join(packageDir, "scripts", "build-hosttools.sh")}; needs musl-tools), ` +
      `install the prebuilt ${GUEST_PACKAGE}, or set SUPERMACHINE_NET_RELAY`,
  );
}

async function findNetRelay(
  overrides: Partial<AssetPaths>,
  env: NodeJS.ProcessEnv,
  packageDir: string,
  dir: string,
  prebuilt: PrebuiltGuest,
): Promise<AssetLocation | { lookedFor: string }> {
  const label = "network relay";
  if (overrides.netRelay !== undefined) {
    if (await isExecutableFile(overrides.netRelay)) return { path: overrides.netRelay, source: "option" };
    return { lookedFor: `${overrides.netRelay} (given as netRelay)` };
  }
  const fromEnv = env.SUPERMACHINE_NET_RELAY;
  if (fromEnv) {
    if (await isExecutableFile(fromEnv)) return { path: fromEnv, source: "env" };
    return { lookedFor: `${fromEnv} (given by SUPERMACHINE_NET_RELAY)` };
  }
  const cached = await cachedNetRelayPath(packageDir, dir);
  if (cached !== undefined && (await isExecutableFile(cached))) return { path: cached, source: "cache" };
  const lookedFor = [cached ?? join(dir, "sm-net", "*", "sm-net")];
  if (prebuilt.kind === "found" && prebuilt.record.netRelay !== undefined) {
    const path = join(prebuilt.dir, prebuilt.record.netRelay.file);
    return { path, source: "package", sha256: await verify(path, prebuilt.record.netRelay.sha256, label) };
  }
  lookedFor.push(prebuilt.kind === "found" ? `${prebuilt.dir} (it records no sm-net)` : prebuilt.why);
  return { lookedFor: lookedFor.join(", ") };
}

interface RecordedAsset {
  file: string;
  sha256: string;
}

type PrebuiltGuest =
  | {
      kind: "found";
      dir: string;
      record: { kernel: RecordedAsset; initramfs: RecordedAsset; netRelay?: RecordedAsset | undefined };
    }
  | { kind: "absent"; why: string };

/**
 * The guest package, if it is installed and this package recorded its hashes. Without a record
 * (a checkout, where `dist/guest-assets.json` is written only by packing), an installed guest
 * package is not used: nothing would vouch for its files.
 */
async function prebuiltGuestPackage(packageDir: string, given: string | undefined): Promise<PrebuiltGuest> {
  let dir = given;
  if (dir === undefined) {
    try {
      dir = dirname(createRequire(join(packageDir, "package.json")).resolve(`${GUEST_PACKAGE}/package.json`));
    } catch {
      return { kind: "absent", why: `the package ${GUEST_PACKAGE} (not installed)` };
    }
  }
  const recordPath = join(packageDir, RECORDED_GUEST_ASSETS);
  let record: { kernel: RecordedAsset; initramfs: RecordedAsset; netRelay?: RecordedAsset | undefined };
  try {
    record = JSON.parse(await readFile(recordPath, "utf8"));
  } catch {
    return { kind: "absent", why: `${dir} (unused: this package records no hashes for it in ${recordPath})` };
  }
  // The relay is recorded by packages made since it exists; older records lack it.
  for (const asset of [
    record.kernel,
    record.initramfs,
    ...(record.netRelay === undefined ? [] : [record.netRelay]),
  ]) {
    if (
      typeof asset?.file !== "string" ||
      !/^[0-9a-f]{64}$/.test(String(asset?.sha256)) ||
      asset.file.includes("/")
    )
      return { kind: "absent", why: `${dir} (unused: ${recordPath} is malformed)` };
  }
  return { kind: "found", dir, record };
}

/** Checks a prebuilt file against its recorded sha256, once per (path, size, mtime) in a process. */
async function verify(path: string, expected: string, label: string): Promise<string> {
  let info: Awaited<ReturnType<typeof stat>>;
  try {
    info = await stat(path);
  } catch (error) {
    throw new SupermachineError(
      "ASSET_MISSING",
      `${label} ${path} is missing from ${GUEST_PACKAGE}: reinstall it (npm install)`,
      { cause: error },
    );
  }
  const key = `${path}\0${info.size}\0${info.mtimeMs}`;
  let actual = verified.get(key);
  if (actual === undefined) {
    actual = await fileSha256Stream(path);
    verified.set(key, actual);
  }
  if (actual !== expected) {
    throw new DigestMismatchError(
      `${label} ${path} does not match the sha256 supermachine recorded for it: the ${GUEST_PACKAGE} ` +
        "install is damaged or from another version; reinstall it (npm install)",
      { digest: `sha256:${expected}`, actualDigest: `sha256:${actual}` },
    );
  }
  return `sha256:${actual}`;
}

const verified = new Map<string, string>();

async function fileSha256Stream(path: string): Promise<string> {
  const hash = nodeCrypto().createHash("sha256");
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest("hex");
}

/**
 * The paths `scripts/build-kernel.sh` and `scripts/build-initramfs.sh` install to (built or not),
 * computed from the package's own sources. `kernel` is undefined when its key cannot be computed
 * (no `dpkg-query`, no `linux-source-6.1`, or the package lacks the kernel sources).
 */
export async function cachedAssetPaths(options: AssetSearchOptions = {}): Promise<{
  cacheDir: string;
  kernel: string | undefined;
  initramfs: string;
  netRelay: string | undefined;
}> {
  const packageDir = options.packageDir ?? packageRoot();
  const dir = cacheDir(options.env ?? process.env);
  return {
    cacheDir: dir,
    kernel: await cachedKernelPath(packageDir, dir, options.linuxSourceVersion),
    initramfs: await cachedInitramfsPath(packageDir, dir),
    netRelay: await cachedNetRelayPath(packageDir, dir),
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

/**
 * Where `scripts/build-hosttools.sh` installs the relay: its key is the same manifest scheme over
 * the regular files directly in `hosttools/`, `scripts/asset-cache.sh` and the script. Undefined when the package has no
 * `hosttools/` sources.
 */
async function cachedNetRelayPath(packageDir: string, dir: string): Promise<string | undefined> {
  let entries: Dirent[];
  try {
    entries = await readdir(join(packageDir, "hosttools"), { withFileTypes: true });
  } catch {
    return undefined;
  }
  const paths = entries.filter((entry) => entry.isFile()).map((entry) => `hosttools/${entry.name}`);
  paths.push("scripts/asset-cache.sh", "scripts/build-hosttools.sh");
  const manifest = await manifestOf(packageDir, paths.sort(bytewise));
  return manifest === undefined ? undefined : join(dir, "sm-net", sha256(manifest).slice(0, 16), "sm-net");
}

/** Paths in the order of their bytes, as `LC_ALL=C sort` orders them in the build scripts. */
function bytewise(a: string, b: string): number {
  return Buffer.compare(Buffer.from(a), Buffer.from(b));
}

/** The manifest lines `<sha256>  <path>\n` of `paths`, in their order; undefined when one is missing. */
async function manifestOf(packageDir: string, paths: readonly string[]): Promise<string | undefined> {
  let manifest = "";
  for (const path of paths) {
    const digest = await fileSha256(join(packageDir, path));
    if (digest === undefined) return undefined;
    manifest += `${digest}  ${path}\n`;
  }
  return manifest;
}

/** Key of `scripts/build-kernel.sh`: sha256 of the manifest of its inputs, first 16 hex digits. */
async function kernelCacheKey(packageDir: string, version: string): Promise<string | undefined> {
  let patches: string[] = [];
  try {
    patches = (await readdir(join(packageDir, "kernel", "patches"), { withFileTypes: true }))
      .filter((entry) => entry.isFile() && entry.name.endsWith(".patch"))
      .map((entry) => `kernel/patches/${entry.name}`)
      .sort(bytewise);
  } catch (error) {
    // No patches directory: a kernel of the fragment alone.
    if ((error as NodeJS.ErrnoException).code !== "ENOENT") return undefined;
  }
  const manifest = await manifestOf(packageDir, [
    "kernel/supermachine.config",
    "scripts/build-kernel.sh",
    ...patches,
  ]);
  return manifest === undefined
    ? undefined
    : sha256(`${manifest}${LINUX_SOURCE_PACKAGE} ${version}\n`).slice(0, 16);
}

/**
 * Key of `scripts/build-initramfs.sh`: the same manifest scheme over the guest sources,
 * `scripts/asset-cache.sh` and the script.
 */
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
  paths.push("scripts/asset-cache.sh", "scripts/build-initramfs.sh");
  paths.sort(bytewise);
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
  return nodeCrypto().createHash("sha256").update(data).digest("hex");
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

async function isExecutableFile(path: string): Promise<boolean> {
  try {
    await access(path, constants.X_OK);
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
