/**
 * Writes an ext4 image from a source directory plus the model of what it should contain:
 * `mke2fs -t ext4 -d DIR` on a sparse file, then one `debugfs -w -f SCRIPT` batch for what an
 * unprivileged host directory cannot carry (owners, exact permission bits, devices, FIFOs, xattrs,
 * times). Deterministic: fixed UUID and hash seed, `E2FSPROGS_FAKE_TIME`, our own `mke2fs.conf`
 * (the host's is ignored), `LC_ALL=C` (mke2fs sorts names with `strcoll`), every inode's times set
 * from the model.
 */
import { spawn } from "node:child_process";
import { constants } from "node:fs";
import { access, mkdir, open, writeFile } from "node:fs/promises";
import { delimiter, join } from "node:path";
import { SupermachineError } from "../errors.ts";
import { mapAbort, throwIfAborted } from "./abort.ts";
import { buildFixupScript, clampTime } from "./debugfs-script.ts";
import type { DirNode, FileTree, HostAttrs, TreeNode } from "./file-tree.ts";

export const BLOCK_SIZE = 4096;
export const INODE_SIZE = 256;
const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
/** Features of Debian 12's ext4 defaults; all supported by Linux ≥ 4.4. */
export const EXT4_FEATURES =
  "has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize,sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr";

const MKE2FS_CONF = `[defaults]
	base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
	default_mntopts = acl,user_xattr
	enable_periodic_fsck = 0
	blocksize = ${BLOCK_SIZE}
	inode_size = ${INODE_SIZE}
	inode_ratio = 16384

[fs_types]
	ext4 = {
		features = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
	}
`;

export interface TreeStats {
  /** Distinct inodes the image will hold (without the ones mke2fs adds). */
  inodes: number;
  /** Bytes the content takes in 4 KiB blocks: file data, directory blocks, long symlinks, xattr blocks. */
  contentBytes: number;
  /** Sum of regular-file sizes. */
  fileBytes: number;
  /** Newest mtime in the tree (whole seconds), 0 if none. */
  newestMtime: number;
}

const blocks = (bytes: number): number => Math.ceil(bytes / BLOCK_SIZE);

export function treeStats(root: DirNode): TreeStats {
  const seen = new Set<TreeNode>();
  let inodes = 1;
  let contentBlocks = 0;
  let fileBytes = 0;
  let newestMtime = root.mtime;
  const visit = (dir: DirNode): void => {
    let dirBytes = 24; // "." and ".."
    for (const [name, node] of dir.children) {
      dirBytes += 8 + ((name.length + 3) & ~3);
      if (node.kind !== "symlink" && node.kind !== "dir" && seen.has(node)) continue;
      seen.add(node);
      inodes++;
      if (node.mtime > newestMtime) newestMtime = node.mtime;
      if (node.xattrs) {
        let xattrBytes = 0;
        for (const [k, v] of node.xattrs) xattrBytes += 16 + ((k.length + 3) & ~3) + ((v.length + 3) & ~3);
        if (xattrBytes > 96) contentBlocks += 1; // beyond what fits in a 256-byte inode
      }
      if (node.kind === "file") {
        fileBytes += node.size;
        const b = blocks(node.size);
        // One extent covers at most 32768 blocks; more than 4 extents need an index block per 340.
        contentBlocks += b + Math.ceil(Math.ceil(b / 32768) / 340);
      } else if (node.kind === "symlink" && node.target.length >= 60) {
        contentBlocks += 1;
      } else if (node.kind === "dir") {
        visit(node);
      }
    }
    // Linear directories: 12 bytes of each block hold the checksum tail; allow for slack.
    contentBlocks += Math.max(1, Math.ceil((dirBytes * 1.25) / (BLOCK_SIZE - 12)));
  };
  visit(root);
  return { inodes, contentBytes: contentBlocks * BLOCK_SIZE, fileBytes, newestMtime };
}

export interface ImageGeometry {
  sizeBytes: number;
  inodes: number;
}

/**
 * Size of the image: content + requested free space + metadata (inode tables, journal, bitmaps,
 * group descriptors, reserved GDT blocks), rounded up to MiB. Free space defaults to
 * max(1 GiB, 2 × content). An explicit `sizeBytes` is taken as is.
 */
export function planGeometry(stats: TreeStats, sizeBytes?: number, freeBytes?: number): ImageGeometry {
  const free = freeBytes ?? Math.max(GiB, 2 * stats.contentBytes);
  // Room for the files a VM creates: one inode per 16 KiB of free space, at least 16384.
  const inodes = stats.inodes + Math.max(16384, Math.ceil(free / 16384)) + 16;
  if (sizeBytes !== undefined) return { sizeBytes, inodes };
  const base = stats.contentBytes + free + inodes * INODE_SIZE;
  const journalBlocks =
    base / BLOCK_SIZE < 256 * 1024
      ? 4096
      : base / BLOCK_SIZE < 512 * 1024
        ? 8192
        : base / BLOCK_SIZE < 4096 * 1024
          ? 16384
          : base / BLOCK_SIZE < 8192 * 1024
            ? 32768
            : base / BLOCK_SIZE < 16384 * 1024
              ? 65536
              : base / BLOCK_SIZE < 32768 * 1024
                ? 131072
                : 262144;
  const overhead = journalBlocks * BLOCK_SIZE * 2 + base * 0.02 + 16 * MiB;
  return { sizeBytes: Math.ceil((base + overhead) / MiB) * MiB, inodes };
}

/** Finds an e2fsprogs binary in PATH, then in the sbin directories a non-root PATH often lacks. */
export async function findTool(name: string): Promise<string> {
  const dirs = [
    ...(process.env.PATH ?? "").split(delimiter).filter(Boolean),
    "/usr/sbin",
    "/sbin",
    "/usr/local/sbin",
  ];
  for (const dir of dirs) {
    const candidate = join(dir, name);
    try {
      await access(candidate, constants.X_OK);
      return candidate;
    } catch {}
  }
  throw new SupermachineError(
    "HOST_UNSUPPORTED",
    `${name} not found: install e2fsprogs ≥ 1.47.0 (apt-get install e2fsprogs) to build root filesystem images`,
  );
}

interface RunResult {
  stdout: string;
  stderr: string;
  code: number | null;
}

const MAX_CAPTURE = 4 * MiB;

function run(
  file: string,
  args: string[],
  env: NodeJS.ProcessEnv,
  signal: AbortSignal | undefined,
  stdoutMode: "ignore" | "capture" | "debugfs",
): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, {
      env,
      stdio: ["ignore", "pipe", "pipe"],
      signal,
      killSignal: "SIGKILL",
    });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("latin1");
    child.stderr.setEncoding("latin1");
    child.stdout.on("data", (d: string) => {
      if (stdoutMode === "ignore" || stdout.length >= MAX_CAPTURE) return;
      if (stdoutMode === "capture") {
        stdout += d;
        return;
      }
      // Keep only what is not an echo of a script line (debugfs prints "debugfs: CMD" for each).
      for (const line of d.split("\n")) {
        if (line === "" || line.startsWith("debugfs: ") || line.startsWith("Allocated inode:")) continue;
        stdout += `${line}\n`;
      }
    });
    child.stderr.on("data", (d: string) => {
      if (stderr.length < MAX_CAPTURE) stderr += d;
    });
    child.on("error", reject);
    child.on("close", (code) => resolve({ stdout, stderr, code }));
  });
}

function tail(text: string, lines = 20): string {
  return text.trim().split("\n").slice(-lines).join("\n");
}

export interface Mke2fsWriteOptions {
  tree: FileTree;
  /** Directory `mke2fs -d` copies. */
  sourceDir: string;
  /** Image file to create (must not exist). */
  imagePath: string;
  /** Scratch directory for the config, the script and xattr values. */
  workDir: string;
  sizeBytes?: number | undefined;
  freeBytes?: number | undefined;
  uuid: string;
  hashSeed: string;
  label: string;
  /** Let mke2fs copy the source directory's xattrs (directory builds); layer builds set them all from the model. */
  copyHostXattrs: boolean;
  signal?: AbortSignal | undefined;
  onPhase?: ((phase: "mkfs" | "fixup") => void) | undefined;
}

export interface Mke2fsWriteResult {
  sizeBytes: number;
  /** Free space in the file system after building (what a VM can write). */
  freeBytes: number;
  /** Free inodes after building. */
  freeInodes: number;
  inodes: number;
  contentBytes: number;
  fileBytes: number;
  fixupCommands: number;
  skippedXattrs: { path: string; name: string }[];
  /** Seconds since the epoch used for every time e2fsprogs would otherwise take from the clock. */
  fakeTime: number;
  mkfsMs: number;
  fixupMs: number;
}

export async function writeWithMke2fs(options: Mke2fsWriteOptions): Promise<Mke2fsWriteResult> {
  const { tree, signal } = options;
  const [mke2fs, debugfs, dumpe2fs] = await Promise.all([
    findTool("mke2fs"),
    findTool("debugfs"),
    findTool("dumpe2fs"),
  ]);
  if (
    tree.root.children.get("lost+found")?.kind !== undefined &&
    tree.root.children.get("lost+found")?.kind !== "dir"
  ) {
    throw new SupermachineError(
      "ROOTFS_BUILD",
      "the image has a /lost+found that is not a directory; ext4 needs that name",
    );
  }
  const stats = treeStats(tree.root);
  const geometry = planGeometry(stats, options.sizeBytes, options.freeBytes);
  const fakeTime = Math.min(2 ** 32 - 1, Math.max(1, clampTime(stats.newestMtime)));
  const env: NodeJS.ProcessEnv = {
    PATH: process.env.PATH ?? "/usr/sbin:/usr/bin:/sbin:/bin",
    LC_ALL: "C",
    MKE2FS_CONFIG: join(options.workDir, "mke2fs.conf"),
    E2FSPROGS_FAKE_TIME: String(fakeTime),
  };
  await writeFile(env.MKE2FS_CONFIG!, MKE2FS_CONF, { flag: "wx" });

  // A sparse file of the final size; mke2fs assumes it is zeroed (it is) and writes only metadata.
  const fh = await open(options.imagePath, "wx", 0o644);
  try {
    await fh.truncate(geometry.sizeBytes);
  } finally {
    await fh.close();
  }

  options.onPhase?.("mkfs");
  const t0 = performance.now();
  const extended = [
    `hash_seed=${options.hashSeed}`,
    "root_owner=0:0",
    "assume_storage_prezeroed=1",
    "nodiscard",
    ...(options.copyHostXattrs ? [] : ["no_copy_xattrs"]),
  ].join(",");
  const mkfsArgs = [
    "-q",
    "-F",
    "-t",
    "ext4",
    "-b",
    String(BLOCK_SIZE),
    "-I",
    String(INODE_SIZE),
    "-N",
    String(geometry.inodes),
    "-m",
    "0",
    "-L",
    options.label,
    "-U",
    options.uuid,
    "-O",
    EXT4_FEATURES,
    "-E",
    extended,
    "-d",
    options.sourceDir,
    options.imagePath,
  ];
  let result: RunResult;
  try {
    result = await run(mke2fs, mkfsArgs, env, signal, "ignore");
  } catch (err) {
    throw mapAbort(err, signal, "building the image") as Error;
  }
  throwIfAborted(signal, "building the image");
  if (result.code !== 0) {
    const full = /Could not allocate block|No space left|while populating/i.test(result.stderr);
    throw new SupermachineError(
      "ROOTFS_BUILD",
      `mke2fs failed (exit ${result.code})${full ? `; the image (${geometry.sizeBytes} bytes) may be too small for the content (~${stats.contentBytes} bytes)` : ""}: ${tail(result.stderr)}`,
    );
  }
  const mkfsMs = performance.now() - t0;

  options.onPhase?.("fixup");
  const t1 = performance.now();
  const rootProduced: HostAttrs = { uid: 0, gid: 0, mode: 0o755, mtime: fakeTime, atime: fakeTime };
  const xattrDir = join(options.workDir, "xattr");
  const plan = buildFixupScript(tree.root, { rootProduced, xattrDir });
  if (plan.xattrValues.size > 0) {
    await mkdir(xattrDir, { mode: 0o700 });
    for (const [file, value] of plan.xattrValues) await writeFile(file, value, { flag: "wx", mode: 0o600 });
  }
  const scriptPath = join(options.workDir, "fixup.debugfs");
  await writeFile(scriptPath, plan.script, { flag: "wx", mode: 0o600 });
  try {
    result = await run(debugfs, ["-w", "-f", scriptPath, options.imagePath], env, signal, "debugfs");
  } catch (err) {
    throw mapAbort(err, signal, "building the image") as Error;
  }
  throwIfAborted(signal, "building the image");
  // debugfs exits 0 even when commands fail: anything on stderr but its banner is a failure.
  const problems = result.stderr
    .split("\n")
    .filter((l) => l.trim() !== "" && !/^debugfs [0-9.]+ \(/.test(l))
    .concat(result.stdout.split("\n").filter((l) => l.trim() !== ""));
  if (result.code !== 0 || problems.length > 0) {
    throw new SupermachineError(
      "ROOTFS_BUILD",
      `debugfs failed to finish the image (exit ${result.code}): ${problems.slice(0, 20).join("\n")}`,
    );
  }
  const fixupMs = performance.now() - t1;

  result = await run(dumpe2fs, ["-h", options.imagePath], env, signal, "capture").catch((err) => {
    throw mapAbort(err, signal, "building the image");
  });
  const field = (name: string): number => {
    const m = new RegExp(`^${name}:\\s+(\\d+)`, "m").exec(result.stdout + result.stderr);
    return m ? Number(m[1]) : Number.NaN;
  };
  return {
    sizeBytes: geometry.sizeBytes,
    freeBytes: field("Free blocks") * BLOCK_SIZE,
    freeInodes: field("Free inodes"),
    inodes: stats.inodes,
    contentBytes: stats.contentBytes,
    fileBytes: stats.fileBytes,
    fixupCommands: plan.commands,
    skippedXattrs: plan.skippedXattrs,
    fakeTime,
    mkfsMs,
    fixupMs,
  };
}
