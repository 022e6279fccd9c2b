/**
 * Builds the one `debugfs -w -f SCRIPT` batch that fixes what `mke2fs -d` copied from an
 * unprivileged host directory: owners, permission bits, times, device nodes / FIFOs, xattrs.
 *
 * debugfs reads its script with `fgets` into an 8 KiB buffer and splits lines with the `ss`
 * parser: whitespace separates words, `"…"` quotes, `""` inside quotes is a literal `"`. So the
 * script walks the tree with relative `cd "./name"` / `cd ".."` (a line never holds more than one
 * name, at most 255 bytes) and names every file relative to the current directory as `"./name"`
 * (so a name like `<12>` is never taken for an inode number). A name containing a line break
 * cannot be expressed: that is a `ROOTFS_BUILD` error.
 */
import { SupermachineError } from "../errors.ts";
import { compareBytes, type DirNode, type HostAttrs, type TreeNode } from "./file-tree.ts";
import { displayName } from "./tar-reader.ts";

/** ext4 stores seconds as signed 32 bits plus two epoch bits. */
export const EXT4_MIN_TIME = -(2 ** 31);
export const EXT4_MAX_TIME = 2 ** 34 - 2 ** 31 - 1;

export function clampTime(t: number): number {
  return Math.min(EXT4_MAX_TIME, Math.max(EXT4_MIN_TIME, t));
}

/** xattr namespaces ext4 (and libext2fs's `ext2fs_xattr_set`) can store. */
const XATTR_PREFIXES = [
  "user.",
  "trusted.",
  "security.",
  "system.posix_acl_access",
  "system.posix_acl_default",
];

export function storableXattr(name: string): boolean {
  return XATTR_PREFIXES.some((p) =>
    p.endsWith(".") ? name.startsWith(p) && name.length > p.length : name === p,
  );
}

export interface FixupScript {
  /** The script, as bytes (names are byte strings). */
  script: Buffer;
  /** Values for `ea_set -f`: file path → value. */
  xattrValues: Map<string, Buffer>;
  /** Commands in the script. */
  commands: number;
  /** xattrs dropped because ext4 has no namespace for them. */
  skippedXattrs: { path: string; name: string }[];
}

export interface FixupOptions {
  /** What mke2fs gave the root inode (root_owner, 0755, its fake time). */
  rootProduced: HostAttrs;
  /** Directory for xattr value files (paths are put into the script). */
  xattrDir: string;
}

function quote(name: string): string {
  if (name.includes("\n") || name.includes("\r")) {
    throw new SupermachineError(
      "ROOTFS_BUILD",
      `cannot write file name ${JSON.stringify(displayName(name))} into an ext4 image: names with line breaks are not supported`,
    );
  }
  return `"${name.replaceAll('"', '""')}"`;
}

export function buildFixupScript(root: DirNode, options: FixupOptions): FixupScript {
  const lines: string[] = [];
  const xattrValues = new Map<string, Buffer>();
  const skippedXattrs: { path: string; name: string }[] = [];
  const done = new Set<TreeNode>();
  let commands = 0;

  const emit = (line: string): void => {
    lines.push(line);
    commands++;
  };

  /** Fix-ups for one inode, addressed as `ref` (already quoted). */
  const fix = (ref: string, node: TreeNode, produced: HostAttrs | undefined, path: string): void => {
    const type =
      node.kind === "dir"
        ? 0o040000
        : node.kind === "file"
          ? 0o100000
          : node.kind === "symlink"
            ? 0o120000
            : node.kind === "char"
              ? 0o020000
              : node.kind === "block"
                ? 0o060000
                : node.kind === "fifo"
                  ? 0o010000
                  : 0o140000;
    // A node not produced by mke2fs was made by `mknod`: owner 0, no permission bits, fake times.
    const have: HostAttrs = produced ?? { uid: 0, gid: 0, mode: 0, mtime: Number.NaN, atime: Number.NaN };
    const mtime = clampTime(node.mtime);
    if (node.uid !== have.uid) emit(`sif ${ref} uid ${node.uid}`);
    if (node.gid !== have.gid) emit(`sif ${ref} gid ${node.gid}`);
    if (node.mode !== have.mode) emit(`sif ${ref} mode 0${(type | node.mode).toString(8)}`);
    if (mtime !== have.mtime) emit(`sif ${ref} mtime @${mtime}`);
    if (mtime !== have.atime) emit(`sif ${ref} atime @${mtime}`);
    emit(`sif ${ref} ctime @${mtime}`); // the host's ctime is the time of staging: always replaced
    if (node.xattrs) {
      for (const [name, value] of [...node.xattrs].sort(([a], [b]) => compareBytes(a, b))) {
        if (!storableXattr(name)) {
          skippedXattrs.push({ path: displayName(path), name: displayName(name) });
          continue;
        }
        const file = `${options.xattrDir}/${xattrValues.size}`;
        xattrValues.set(file, value);
        emit(`ea_set -f ${quote(file)} ${ref} ${quote(name)}`);
      }
    }
  };

  fix(`"/"`, root, options.rootProduced, "/");

  const visit = (dir: DirNode, path: string): void => {
    const names = [...dir.children.keys()].sort(compareBytes);
    for (const name of names) {
      const node = dir.children.get(name)!;
      const ref = quote(`./${name}`);
      const childPath = `${path}${name}`;
      if (node.kind === "char" || node.kind === "block" || node.kind === "fifo" || node.kind === "socket") {
        if (node.host === undefined) {
          // Not in the staging dir: create it. Each name gets its own inode (see docs/rootfs.md).
          const q = quote(name);
          if (node.kind === "fifo") emit(`mknod ${q} p`);
          else if (node.kind === "socket") throw new Error("sockets cannot come from a layer");
          else if (node.major <= 0xffff && node.minor <= 0xffff) {
            emit(`mknod ${q} ${node.kind === "char" ? "c" : "b"} ${node.major} ${node.minor}`);
          } else {
            // Beyond what debugfs' mknod accepts: store the new-style encoding by hand.
            emit(`mknod ${q} ${node.kind === "char" ? "c" : "b"} 0 0`);
            const dev = (node.minor & 0xff) | (node.major << 8) | ((node.minor & ~0xff) << 12);
            emit(`sif ${ref} block[0] 0`);
            emit(`sif ${ref} block[1] ${dev >>> 0}`);
          }
          fix(ref, node, undefined, childPath);
          continue;
        }
      }
      // Symlinks are one inode per name in the image (mke2fs does not hardlink them).
      if (node.kind !== "symlink" && node.kind !== "dir") {
        if (done.has(node)) continue;
        done.add(node);
      }
      fix(ref, node, node.host, childPath);
      if (node.kind === "dir" && node.children.size > 0) {
        emit(`cd ${ref}`);
        visit(node, `${childPath}/`);
        emit(`cd ".."`);
      }
    }
  };
  emit(`cd "/"`);
  visit(root, "/");

  return { script: Buffer.from(`${lines.join("\n")}\n`, "latin1"), xattrValues, commands, skippedXattrs };
}
