/** What a snapshot depends on about this host: accelerator, QEMU version, guest kernel and initramfs. */

import { stat } from "node:fs/promises";
import { memoize } from "../internal/index.ts";
import { type AssetPaths, hostAccelerator, hostQemuVersion, resolveAssetPaths } from "../vmm/index.ts";
import { sha256File } from "./manifest.ts";

export interface HostFacts {
  accelerator: "kvm" | "tcg";
  /** `7.2.22 (Debian …)`. */
  qemuVersion: string;
  cpuModel: string;
  assets: AssetPaths;
  kernelDigest: string;
  initramfsDigest: string;
}

/** sha256 of a file, keyed by (path, size, mtime), remembered for the life of the process. */
const digestOf = memoize((key: string) => sha256File(key.slice(0, key.indexOf("\0"))));

/** sha256 of a file, cached per (path, size, mtime) for the life of the process. */
export async function cachedFileDigest(path: string): Promise<string> {
  const info = await stat(path);
  return digestOf(`${path}\0${info.size}\0${info.mtimeMs}`);
}

export async function hostFacts(overrides: Partial<AssetPaths> = {}): Promise<HostFacts> {
  const [choice, qemuVersion, assets] = await Promise.all([
    hostAccelerator(),
    hostQemuVersion(),
    resolveAssetPaths(overrides),
  ]);
  const [kernelDigest, initramfsDigest] = await Promise.all([
    cachedFileDigest(assets.kernel),
    cachedFileDigest(assets.initramfs),
  ]);
  return {
    accelerator: choice.accel,
    qemuVersion,
    cpuModel: choice.accel === "kvm" ? "host" : "max",
    assets,
    kernelDigest,
    initramfsDigest,
  };
}
