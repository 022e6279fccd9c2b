/**
 * Runtime state of running VMs, and the sweep that cleans up after hosts that died.
 *
 * Layout (all private to the user, mode 0700):
 * ```
 * ${SUPERMACHINE_RUNTIME_DIR:-${XDG_RUNTIME_DIR:-/tmp}/supermachine-<uid>}/
 *   vms/<id>/
 *     owner.json    {hostPid, hostStartTime, qemuPid, qemuStartTime, createdAt} while the VM lives
 *     qmp.sock      the host listens, QEMU connects (QMP)
 *     agent.sock    the host listens, QEMU connects (the guest agent's virtio-serial port)
 *     console.log   the guest's serial console, bounded (see console-log.ts)
 *     exit.json     {exitCode, signal, reason, at} once the VM is over and its dir was kept
 * ${SUPERMACHINE_DATA_DIR:-…/supermachine}/vms/<id>/   its disk dir, on disk (the runtime dir may be
 *     state         a tmpfs): the VM's disk overlay; `state` links to the runtime dir above
 * ```
 * A VM's dir is removed when it stops, unless it failed (QEMU exited without being asked to, or
 * launch failed) or the caller asked to keep it: then only `console.log` and `exit.json` remain,
 * at the same path, so an error's `consoleLogPath` stays valid. The disk dir always goes with the
 * VM; a sweep removes disk dirs whose runtime dir is gone. The newest
 * {@link DEFAULT_MAX_KEPT_DIRS} kept dirs survive a sweep; older ones are removed.
 *
 * Start times (field 22 of `/proc/<pid>/stat`, clock ticks since boot) guard every pid against
 * reuse: a pid counts as the recorded process only if its start time matches.
 */

import {
  type Dirent,
  lstatSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import {
  chmod,
  lstat,
  mkdir,
  readdir,
  readFile,
  readlink,
  rename,
  rm,
  stat,
  symlink,
  writeFile,
} from "node:fs/promises";
import path from "node:path";
import { SupermachineError } from "../errors.ts";
import { dataDir, debug, nodeCrypto, runtimeDir } from "../internal/index.ts";

/** How many kept (failed) VM dirs a sweep leaves. */
export const DEFAULT_MAX_KEPT_DIRS = 16;
/** A dir with neither owner.json nor exit.json is being created; older than this, it is litter. */
const UNOWNED_GRACE_MS = 60_000;
/** `sun_path` is 108 bytes including the terminating NUL. */
const MAX_SOCKET_PATH_BYTES = 107;
const VM_ID = /^[A-Za-z0-9_-]{1,40}$/;

/**
 * A new VM id: 10 random hex digits, at least one of them a letter. The id is the VM's default
 * hostname, and glibc takes a name of decimal digits alone for a malformed address and never
 * looks it up (`getent hosts 5019670881` finds nothing, whatever `/etc/hosts` says).
 */
export function newVmId(): string {
  for (;;) {
    const id = nodeCrypto().randomBytes(5).toString("hex");
    if (/[a-f]/.test(id)) return id;
  }
}

/** The runtime root for this user (see `runtimeDir` in src/internal/paths.ts). */
export const runtimeRoot = runtimeDir;

/** Where VMs' disk dirs live: on disk, under the data dir. */
export function diskRoot(): string {
  return path.join(dataDir(), "vms");
}

/** What owner.json says. */
export interface OwnerRecord {
  hostPid: number;
  hostStartTime: string;
  qemuPid?: number;
  qemuStartTime?: string;
  createdAt: string;
}

/** What exit.json says about a VM whose dir was kept. */
export interface ExitRecord {
  exitCode: number | null;
  signal: string | null;
  /** `failed`: QEMU exited unasked or did not start; `kept`: the caller asked to keep the dir. */
  reason: "failed" | "kept";
  at: string;
}

/** The start time of a process (clock ticks since boot, as a decimal string), or undefined if it is gone. */
export function procStartTime(pid: number): string | undefined {
  let stat: string;
  try {
    stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  } catch {
    return undefined;
  }
  // Field 2 (comm) may contain spaces and parentheses: parse after the last ')'.
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  // fields[0] is field 3 (state); field 22 (starttime) is fields[19]. A zombie is gone.
  if (fields[0] === "Z" || fields[0] === "X") return undefined;
  return fields[19];
}

/** The argv of a process, or undefined if it is gone or unreadable. */
export function procCmdline(pid: number): string[] | undefined {
  try {
    const raw = readFileSync(`/proc/${pid}/cmdline`, "utf8");
    return raw.split("\0").filter((arg, index, all) => arg !== "" || index < all.length - 1);
  } catch {
    return undefined;
  }
}

let selfStartTime: string | undefined;

function hostRecord(): Pick<OwnerRecord, "hostPid" | "hostStartTime"> {
  selfStartTime ??= procStartTime(process.pid) ?? "unknown";
  return { hostPid: process.pid, hostStartTime: selfStartTime };
}

/** The runtime dir of one VM. */
export class VmStateDir {
  readonly id: string;
  /** The runtime root this dir lives under. */
  readonly root: string;
  /** `<root>/vms/<id>`. */
  readonly path: string;
  /** `<disk root>/<id>`: the VM's disk overlay, on disk. */
  readonly diskDir: string;
  #owner: OwnerRecord;

  private constructor(root: string, id: string, disks: string, owner: OwnerRecord) {
    this.root = root;
    this.id = id;
    this.path = path.join(root, "vms", id);
    this.diskDir = path.join(disks, id);
    this.#owner = owner;
  }

  /**
   * Create a fresh dir for a VM (mode 0700) with owner.json naming this process. `id` defaults to
   * {@link newVmId}. Fails with `HOST_UNSUPPORTED` when the root is not private to this user
   * or its path is too long for unix sockets.
   */
  static async create(options: { root?: string; id?: string; diskRoot?: string } = {}): Promise<VmStateDir> {
    const root = options.root ?? runtimeRoot();
    const disks = options.diskRoot ?? diskRoot();
    const id = options.id ?? newVmId();
    if (!VM_ID.test(id)) {
      throw new SupermachineError("INVALID_ARGUMENT", `VM id ${JSON.stringify(id)} must match ${VM_ID}`);
    }
    await ensurePrivateDir(root);
    await ensurePrivateDir(path.join(root, "vms"));
    await ensurePrivateDir(disks);
    const owner: OwnerRecord = { ...hostRecord(), createdAt: new Date().toISOString() };
    const dir = new VmStateDir(root, id, disks, owner);
    const longest = Math.max(Buffer.byteLength(dir.agentSocketPath), Buffer.byteLength(dir.mountSocketPath));
    if (longest > MAX_SOCKET_PATH_BYTES) {
      throw new SupermachineError(
        "HOST_UNSUPPORTED",
        `the runtime dir ${root} is too long for unix socket paths (${longest} > ${MAX_SOCKET_PATH_BYTES} bytes): ` +
          "set SUPERMACHINE_RUNTIME_DIR to a shorter path",
      );
    }
    try {
      await mkdir(dir.path, { mode: 0o700 });
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "EEXIST") {
        throw new SupermachineError("INVALID_ARGUMENT", `a VM with id ${id} already exists in ${root}`, {
          cause: error,
        });
      }
      throw error;
    }
    dir.#writeOwner();
    try {
      await mkdir(dir.diskDir, { mode: 0o700 });
      await symlink(dir.path, path.join(dir.diskDir, "state"));
    } catch (error) {
      await rm(dir.path, { recursive: true, force: true });
      if ((error as NodeJS.ErrnoException).code === "EEXIST") {
        throw new SupermachineError("INVALID_ARGUMENT", `a VM with id ${id} already exists in ${disks}`, {
          cause: error,
        });
      }
      throw error;
    }
    return dir;
  }

  get qmpSocketPath(): string {
    return path.join(this.path, "qmp.sock");
  }

  get agentSocketPath(): string {
    return path.join(this.path, "agent.sock");
  }

  get mountSocketPath(): string {
    return path.join(this.path, "mounts.sock");
  }

  get consoleLogPath(): string {
    return path.join(this.path, "console.log");
  }

  get ownerPath(): string {
    return path.join(this.path, "owner.json");
  }

  /** Record QEMU's pid and start time in owner.json (synchronously: called right after spawn). */
  recordQemu(pid: number): void {
    const startTime = procStartTime(pid);
    this.#owner = {
      ...this.#owner,
      qemuPid: pid,
      ...(startTime === undefined ? {} : { qemuStartTime: startTime }),
    };
    this.#writeOwner();
  }

  /**
   * The VM is over. `keep: false` removes the dir; `keep: true` leaves console.log plus an
   * exit.json and removes everything else.
   */
  async finish(options: { keep: boolean; exit: Omit<ExitRecord, "at"> }): Promise<void> {
    await removeDiskDir(this.diskDir);
    if (!options.keep) {
      // A few small files: removed at once, which costs less than a thread-pool request per entry.
      rmSync(this.path, { recursive: true, force: true });
      return;
    }
    const record: ExitRecord = { ...options.exit, at: new Date().toISOString() };
    await writeFile(path.join(this.path, "exit.json.tmp"), `${JSON.stringify(record)}\n`, { mode: 0o600 });
    await rename(path.join(this.path, "exit.json.tmp"), path.join(this.path, "exit.json"));
    const entries = await readdir(this.path).catch(() => [] as string[]);
    await Promise.all(
      entries
        .filter((name) => name !== "console.log" && name !== "exit.json")
        .map((name) => rm(path.join(this.path, name), { recursive: true, force: true })),
    );
  }

  #writeOwner(): void {
    const tmp = path.join(this.path, "owner.json.tmp");
    writeFileSync(tmp, `${JSON.stringify(this.#owner)}\n`, { mode: 0o600 });
    renameSync(tmp, this.ownerPath);
  }
}

/** A file at least this large is unlinked through the thread pool (freeing its blocks takes a while). */
const LARGE_FILE_BYTES = 64 * 1024 * 1024;

/**
 * Removes a VM's disk dir: a large file (an overlay a guest wrote gigabytes into) through the
 * thread pool, then the rest (small overlays, the link to the state dir) at once, which costs less
 * than a thread-pool request per entry.
 */
async function removeDiskDir(dir: string): Promise<void> {
  let entries: Dirent[];
  try {
    entries = readdirSync(dir, { withFileTypes: true });
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return;
    throw error;
  }
  for (const entry of entries) {
    const file = path.join(dir, entry.name);
    const size = entry.isFile() ? (lstatSync(file, { throwIfNoEntry: false })?.blocks ?? 0) * 512 : 0;
    if (size >= LARGE_FILE_BYTES) await rm(file, { force: true });
  }
  rmSync(dir, { recursive: true, force: true });
}

/** Makes `dir` a directory of this user that no one else can enter (0700). */
async function ensurePrivateDir(dir: string): Promise<void> {
  const mode = 0o700;
  const uid = process.getuid?.();
  // Every VM start asks: one lstat answers when the dir is already what it must be.
  const seen = lstatSync(dir, { throwIfNoEntry: false });
  if (seen?.isDirectory() && (uid === undefined || seen.uid === uid) && (seen.mode & 0o777) === mode) return;
  await mkdir(dir, { recursive: true, mode });
  const info = await lstat(dir);
  if (!info.isDirectory() || (uid !== undefined && info.uid !== uid)) {
    throw new SupermachineError(
      "HOST_UNSUPPORTED",
      `${dir} is not a directory owned by this user: remove it or set SUPERMACHINE_RUNTIME_DIR elsewhere`,
    );
  }
  if ((info.mode & 0o777) !== mode) await chmod(dir, mode);
}

/** QEMU's `-name` for a VM: how `ps` and a sweep recognise it. */
export function qemuName(id: string): string {
  return `supermachine-${id}`;
}

/** What a sweep did. */
export interface SweepResult {
  /** QEMU processes killed because their owner is gone. */
  killedPids: number[];
  /** VM dirs removed (stale, litter, or kept dirs beyond the limit). */
  removedDirs: string[];
}

/**
 * Clean up after hosts that are gone: for every VM dir whose owner process no longer exists (pid
 * gone, or reused by a process with another start time), SIGKILL its QEMU if that process is
 * still the same QEMU (start time matches and its command line names this dir), then remove the
 * dir. Also prunes kept dirs beyond `maxKeptDirs`. Cheap: a directory listing and a few small
 * reads per VM.
 */
export async function sweepStaleVms(
  options: { root?: string; maxKeptDirs?: number; diskRoot?: string } = {},
): Promise<SweepResult> {
  const root = options.root ?? runtimeRoot();
  const disks = options.diskRoot ?? diskRoot();
  const maxKept = options.maxKeptDirs ?? DEFAULT_MAX_KEPT_DIRS;
  const vmsDir = path.join(root, "vms");
  const result: SweepResult = { killedPids: [], removedDirs: [] };
  let ids: string[];
  try {
    ids = await readdir(vmsDir);
  } catch {
    ids = [];
  }
  const kept: { dir: string; at: number }[] = [];
  for (const id of ids) {
    const dir = path.join(vmsDir, id);
    const owner = await readJson<OwnerRecord>(path.join(dir, "owner.json"));
    if (owner !== undefined) {
      if (procStartTime(owner.hostPid) === owner.hostStartTime) continue; // owner alive
      const qemuPid = findQemu(dir, owner);
      if (qemuPid !== undefined) {
        try {
          process.kill(qemuPid, "SIGKILL");
          result.killedPids.push(qemuPid);
        } catch (error) {
          if ((error as NodeJS.ErrnoException).code !== "ESRCH") {
            debug("sweep: cannot kill QEMU %d of %s: %s", qemuPid, dir, error);
            continue;
          }
        }
      }
      await removeDir(dir, result);
      continue;
    }
    const exitInfo = await stat(path.join(dir, "exit.json")).catch(() => undefined);
    if (exitInfo !== undefined) {
      kept.push({ dir, at: exitInfo.mtimeMs });
      continue;
    }
    const info = await stat(dir).catch(() => undefined);
    if (info?.isDirectory() && Date.now() - info.mtimeMs > UNOWNED_GRACE_MS) await removeDir(dir, result);
  }
  kept.sort((a, b) => b.at - a.at);
  for (const { dir } of kept.slice(maxKept)) await removeDir(dir, result);
  await sweepDiskDirs(disks, result);
  return result;
}

/** Disk dirs whose runtime dir is gone (or never came: past the grace period), from any root. */
async function sweepDiskDirs(disks: string, result: SweepResult): Promise<void> {
  let ids: string[];
  try {
    ids = await readdir(disks);
  } catch {
    return;
  }
  for (const id of ids) {
    const dir = path.join(disks, id);
    const state = await readlink(path.join(dir, "state")).catch(() => undefined);
    if (state !== undefined) {
      const owner = await stat(path.join(state, "owner.json")).catch(() => undefined);
      if (owner !== undefined) continue; // its VM still has an owner record: the runtime sweep decides
    } else {
      const info = await lstat(dir).catch(() => undefined);
      if (info === undefined || Date.now() - info.mtimeMs <= UNOWNED_GRACE_MS) continue;
    }
    await removeDir(dir, result);
  }
}

/** The pid of the QEMU that serves `dir`, if it still runs (its `-name` names the VM). */
function findQemu(dir: string, owner: OwnerRecord): number | undefined {
  const marker = qemuName(path.basename(dir));
  const isOurs = (pid: number) => procCmdline(pid)?.includes(marker) === true;
  if (owner.qemuPid !== undefined) {
    const startTime = procStartTime(owner.qemuPid);
    const sameProcess = owner.qemuStartTime === undefined || startTime === owner.qemuStartTime;
    return startTime !== undefined && sameProcess && isOurs(owner.qemuPid) ? owner.qemuPid : undefined;
  }
  // The host died between spawning QEMU and recording it: look for it.
  for (const name of readdirSync("/proc")) {
    const pid = Number(name);
    if (Number.isSafeInteger(pid) && pid > 0 && procStartTime(pid) !== undefined && isOurs(pid)) return pid;
  }
  return undefined;
}

async function removeDir(dir: string, result: SweepResult): Promise<void> {
  try {
    lstatSync(dir);
  } catch {
    return;
  }
  await rm(dir, { recursive: true, force: true });
  result.removedDirs.push(dir);
}

async function readJson<T>(file: string): Promise<T | undefined> {
  try {
    return JSON.parse(await readFile(file, "utf8")) as T;
  } catch {
    return undefined;
  }
}
