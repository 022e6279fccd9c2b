/**
 * The root-filesystem cache under the data dir: `rootfs/images/` (flattened images, by manifest
 * digest) and `rootfs/dirs/` (directory trees made into images, by a fingerprint of the tree).
 * Both are rebuildable; `prune` removes what no stored image or snapshot uses.
 */

import { chmod, copyFile, lstat, mkdir, open, readdir, readlink, rename, rm, stat } from "node:fs/promises";
import { join, resolve } from "node:path";
import { SupermachineError } from "../errors.ts";
import { dataDir, nodeCrypto } from "../internal/index.ts";
import {
  buildImageFromDirectory,
  flattenLayers,
  ROOTFS_FORMAT_VERSION,
  type RootfsProgress,
} from "./build.ts";

/** A root filesystem image ready to attach (read-only base; VMs write to overlays). */
export interface CachedRootfs {
  readonly imagePath: string;
  /** What identifies its content: the tree's fingerprint, or the image file's path, size and mtime. */
  readonly key: string;
}

/** Where the flattened root filesystem of an image lives. */
export function imageRootfsPath(manifestDigest: string, root = dataDir()): string {
  const hex = manifestDigest.replace(/^[a-z0-9]+:/, "");
  return join(root, "rootfs", "images", `${hex}-f${ROOTFS_FORMAT_VERSION}.ext4`);
}

/** The flattened root filesystem of a pulled image: from the cache, else flattened now. */
export async function flattenedImageRootfs(image: {
  manifestDigest: string;
  layers: readonly { path: string; mediaType: string; digest: string }[];
  dataDir?: string | undefined;
  signal?: AbortSignal | undefined;
  onProgress?: ((event: RootfsProgress) => void) | undefined;
}): Promise<string> {
  const output = imageRootfsPath(image.manifestDigest, image.dataDir ?? dataDir());
  const existing = await stat(output).catch(() => undefined);
  if (existing?.isFile()) return output;
  await flattenLayers({
    layers: image.layers.map((layer) => ({
      path: layer.path,
      mediaType: layer.mediaType,
      digest: layer.digest,
    })),
    output,
    signal: image.signal,
    onProgress: image.onProgress,
  });
  return output;
}

/**
 * Removes cached root filesystems that are not in `keep` (absolute paths): flattened images of
 * images no longer stored (or of older formats) and directory trees' images. Returns how many.
 */
export async function pruneRootfsCache(keep: ReadonlySet<string>, root = dataDir()): Promise<number> {
  let removed = 0;
  for (const kind of ["images", "dirs"]) {
    const dir = join(root, "rootfs", kind);
    for (const name of await readdir(dir).catch(() => [] as string[])) {
      const path = join(dir, name);
      if (keep.has(path) || !name.endsWith(".ext4")) continue;
      await rm(path, { force: true });
      removed++;
    }
  }
  return removed;
}

const EXT4_MAGIC_OFFSET = 1080;
const EXT4_MAGIC = 0xef53;

/**
 * `path` is an ext4 image (used as it is) or a directory tree (made into an image once, cached
 * under the data dir by a fingerprint of the tree: names, types, modes, owners, sizes, mtimes,
 * link targets).
 */
export async function resolveRootfs(
  path: string,
  opts: {
    signal?: AbortSignal | undefined;
    dataDir?: string | undefined;
    /** Copy an image file into the cache too (what a snapshot's disk may be layered on). */
    intoStore?: boolean | undefined;
  } = {},
): Promise<CachedRootfs> {
  const absolute = resolve(path);
  const info = await stat(absolute).catch((error: NodeJS.ErrnoException) => {
    throw new SupermachineError("INVALID_ARGUMENT", `rootfs ${path} does not exist (${error.code})`, {
      cause: error,
    });
  });
  if (info.isFile()) {
    await assertExt4(absolute);
    const key = `file:${absolute}:${info.size}:${info.mtimeMs}:${info.ino}`;
    if (opts.intoStore !== true) return { imagePath: absolute, key };
    const dir = join(opts.dataDir ?? dataDir(), "rootfs", "dirs");
    await mkdir(dir, { recursive: true, mode: 0o700 });
    const imagePath = join(
      dir,
      `${nodeCrypto().createHash("sha256").update(key).digest("hex").slice(0, 32)}.ext4`,
    );
    if ((await stat(imagePath).catch(() => undefined))?.isFile()) return { imagePath, key };
    const tmp = `${imagePath}.${process.pid}.tmp`;
    await copyFile(absolute, tmp);
    await chmod(tmp, 0o600);
    await rename(tmp, imagePath);
    return { imagePath, key };
  }
  if (!info.isDirectory()) {
    throw new SupermachineError(
      "INVALID_ARGUMENT",
      `rootfs ${path} is neither an image file nor a directory`,
    );
  }
  const key = await fingerprintTree(absolute);
  const dir = join(opts.dataDir ?? dataDir(), "rootfs", "dirs");
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const imagePath = join(dir, `${key}.ext4`);
  const existing = await stat(imagePath).catch(() => undefined);
  if (existing?.isFile()) return { imagePath, key: `tree:${key}` };
  await buildImageFromDirectory({ dir: absolute, output: imagePath, signal: opts.signal });
  return { imagePath, key: `tree:${key}` };
}

async function assertExt4(file: string): Promise<void> {
  const handle = await open(file, "r");
  try {
    const buf = Buffer.alloc(2);
    const { bytesRead } = await handle.read(buf, 0, 2, EXT4_MAGIC_OFFSET);
    if (bytesRead !== 2 || buf.readUInt16LE(0) !== EXT4_MAGIC) {
      throw new SupermachineError(
        "INVALID_ARGUMENT",
        `rootfs ${file} is not an ext4 filesystem image: give an ext4 image or a directory tree`,
      );
    }
  } finally {
    await handle.close();
  }
}

/** A hash of everything in the tree that the image depends on. Never follows symlinks. */
export async function fingerprintTree(root: string): Promise<string> {
  const hash = nodeCrypto().createHash("sha256");
  hash.update(`rootfs-format ${ROOTFS_FORMAT_VERSION}\n`);
  const walk = async (rel: string): Promise<void> => {
    const names = (await readdir(join(root, rel))).sort();
    for (const name of names) {
      const childRel = rel === "" ? name : `${rel}/${name}`;
      const full = join(root, childRel);
      const st = await lstat(full, { bigint: true });
      hash.update(
        `${childRel}\0${st.mode}\0${st.uid}\0${st.gid}\0${st.size}\0${st.mtimeNs}\0${st.rdev}\0${st.ino}\n`,
      );
      if (st.isSymbolicLink()) hash.update(`${await readlink(full)}\n`);
      else if (st.isDirectory()) await walk(childRel);
    }
  };
  const top = await lstat(root, { bigint: true });
  hash.update(`.\0${top.mode}\0${top.uid}\0${top.gid}\n`);
  await walk("");
  return hash.digest("hex").slice(0, 32);
}
