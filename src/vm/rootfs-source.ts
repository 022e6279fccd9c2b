import { createHash } from "node:crypto";
import { lstat, mkdir, open, readdir, readlink, stat } from "node:fs/promises";
import { join, resolve } from "node:path";
import { SupermachineError } from "../errors.ts";
import { dataDir } from "../internal/paths.ts";
import { buildImageFromDirectory, ROOTFS_FORMAT_VERSION } from "../rootfs/index.ts";

/** A root filesystem image ready to attach (read-only base; VMs write to overlays). */
export interface RootfsImage {
  readonly imagePath: string;
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
  opts: { signal?: AbortSignal | undefined } = {},
): Promise<RootfsImage> {
  const absolute = resolve(path);
  const info = await stat(absolute).catch((error: NodeJS.ErrnoException) => {
    throw new SupermachineError("INVALID_ARGUMENT", `rootfs ${path} does not exist (${error.code})`, {
      cause: error,
    });
  });
  if (info.isFile()) {
    await assertExt4(absolute);
    return { imagePath: absolute };
  }
  if (!info.isDirectory()) {
    throw new SupermachineError(
      "INVALID_ARGUMENT",
      `rootfs ${path} is neither an image file nor a directory`,
    );
  }
  const key = await fingerprintTree(absolute);
  const dir = join(dataDir(), "rootfs", "dirs");
  await mkdir(dir, { recursive: true });
  const imagePath = join(dir, `${key}.ext4`);
  const existing = await stat(imagePath).catch(() => undefined);
  if (existing?.isFile()) return { imagePath };
  await buildImageFromDirectory({ dir: absolute, output: imagePath, signal: opts.signal });
  return { imagePath };
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
  const hash = createHash("sha256");
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
