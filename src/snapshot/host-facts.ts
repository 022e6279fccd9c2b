/** What a snapshot depends on about this host: accelerator, QEMU version, guest kernel and initramfs. */

import { stat } from "node:fs/promises";
import { detectAccelerator, findQemu, qemuVersion } from "../vmm/accelerator.ts";
import { type AssetPaths, resolveAssetPaths } from "../vmm/asset-paths.ts";
import { sha256File } from "./snapshot.ts";

export interface HostFacts {
  accelerator: "kvm" | "tcg";
  /** `7.2.22 (Debian …)`. */
  qemuVersion: string;
  cpuModel: string;
  assets: AssetPaths;
  kernelDigest: string;
  initramfsDigest: string;
}

let accel: Promise<"kvm" | "tcg"> | undefined;
let version: Promise<string> | undefined;
const digests = new Map<string, Promise<string>>();

/** sha256 of a file, cached per (path, size, mtime) for the life of the process. */
export async function cachedFileDigest(path: string): Promise<string> {
  const info = await stat(path);
  const key = `${path}\0${info.size}\0${info.mtimeMs}`;
  let digest = digests.get(key);
  if (digest === undefined) {
    digest = sha256File(path);
    digests.set(key, digest);
    digest.catch(() => digests.delete(key));
  }
  return digest;
}

export async function hostFacts(overrides: Partial<AssetPaths> = {}): Promise<HostFacts> {
  accel ??= detectAccelerator().then((choice) => choice.accel);
  version ??= findQemu()
    .then(qemuVersion)
    .then((v) => (v.package === "" ? v.text : `${v.text} (${v.package})`));
  const [accelerator, qemu, assets] = await Promise.all([accel, version, resolveAssetPaths(overrides)]);
  const [kernelDigest, initramfsDigest] = await Promise.all([
    cachedFileDigest(assets.kernel),
    cachedFileDigest(assets.initramfs),
  ]);
  return {
    accelerator,
    qemuVersion: qemu,
    cpuModel: accelerator === "kvm" ? "host" : "max",
    assets,
    kernelDigest,
    initramfsDigest,
  };
}
