/**
 * How QEMU is confined (docs/security.md): it is the boundary between untrusted guest code and the
 * host, and under TCG QEMU's own project does not treat it as a security boundary, so the host
 * gives it as little as it can:
 *
 * - never root: a host process running as root starts QEMU as a dedicated unprivileged user
 *   (`SUPERMACHINE_QEMU_USER`, else the system user `supermachine-qemu` when it exists, else
 *   `nobody`); a non-root host process starts it as itself;
 * - no capabilities (bounding, inheritable and ambient sets emptied), `no_new_privs`;
 * - the seccomp sandbox always on (a QEMU without it is a typed error unless the caller opts out);
 * - an empty environment and only the descriptors it needs: every file it reads or writes is
 *   opened by the host and passed down (disks as fdsets, kernel/initramfs/memory through
 *   `/proc/self/fd`), its sockets live in a dir only it and the host can enter;
 * - resource limits: address space, open files, no core dumps;
 * - the `SCHED_BATCH` policy (not wakeup-preempting): with more running VMs than cores, QEMUs take
 *   turns in whole time slices instead of preempting each other at every I/O wakeup, and the host
 *   program (normal policy) still preempts them (docs/vmm.md, "Scheduling").
 *
 * The chain is `setpriv [--reuid/--regid --clear-groups] --no-new-privs --inh-caps=-all
 * [--bounding-set=-all] --ambient-caps=-all --pdeathsig SIGKILL -- prlimit … -- chrt --batch -- 0
 * qemu …`; with a network allow-list, the relay `sm-net … --` comes before QEMU (net-relay.ts).
 */

import { readFileSync } from "node:fs";
import { SupermachineError } from "../errors.ts";
import { once } from "../internal/index.ts";
import { findOnPath } from "./accelerator.ts";

/** The user QEMU runs as. */
export interface QemuIdentity {
  uid: number;
  gid: number;
  /** Where it comes from, for reports: `SUPERMACHINE_QEMU_USER`, `supermachine-qemu`, `nobody`, or `self`. */
  source: string;
}

/** Resource limits of one QEMU (soft = hard). */
export interface QemuLimits {
  addressSpaceBytes: number;
  openFiles: number;
}

/** The name of the dedicated system user `scripts/setup.sh` creates for QEMU. */
export const QEMU_SYSTEM_USER = "supermachine-qemu";

function lookup(file: string, name: string): [number, number] | undefined {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch {
    return undefined;
  }
  for (const line of text.split("\n")) {
    const fields = line.split(":");
    if (fields[0] === name && fields.length >= 4) return [Number(fields[2]), Number(fields[3])];
  }
  return undefined;
}

/**
 * Who QEMU runs as. Non-root hosts: themselves (they cannot switch users). Root: `spec` (`name`,
 * `uid` or `uid:gid`; default `SUPERMACHINE_QEMU_USER`), else {@link QEMU_SYSTEM_USER}, else
 * `nobody`. Never root: `SUPERMACHINE_QEMU_USER=0` is refused.
 */
export function qemuIdentity(
  env: NodeJS.ProcessEnv = process.env,
  self: { uid: number; gid: number } = { uid: process.getuid?.() ?? 0, gid: process.getgid?.() ?? 0 },
  passwd = "/etc/passwd",
): QemuIdentity {
  if (self.uid !== 0) return { uid: self.uid, gid: self.gid, source: "self" };
  const spec = env.SUPERMACHINE_QEMU_USER;
  if (spec !== undefined && spec !== "") {
    const numeric = /^(\d+)(?::(\d+))?$/.exec(spec);
    const ids: [number, number] | undefined = numeric
      ? [Number(numeric[1]), Number(numeric[2] ?? numeric[1])]
      : lookup(passwd, spec);
    if (ids === undefined) {
      throw new SupermachineError(
        "INVALID_ARGUMENT",
        `SUPERMACHINE_QEMU_USER=${spec} is not a user of this host: give a user name, a uid or uid:gid`,
      );
    }
    if (ids[0] === 0 || ids[1] === 0) {
      throw new SupermachineError(
        "INVALID_ARGUMENT",
        `SUPERMACHINE_QEMU_USER=${spec} is root: QEMU never runs as root; give an unprivileged user`,
      );
    }
    return { uid: ids[0], gid: ids[1], source: "SUPERMACHINE_QEMU_USER" };
  }
  const dedicated = lookup(passwd, QEMU_SYSTEM_USER);
  if (dedicated !== undefined) return { uid: dedicated[0], gid: dedicated[1], source: QEMU_SYSTEM_USER };
  return { uid: 65534, gid: 65534, source: "nobody" };
}

/** {@link qemuIdentity} for this process, found once. */
export const hostQemuIdentity: () => QemuIdentity = once(() => qemuIdentity());

/** First uid of the range root hosts give their QEMUs, one per VM (2^31 − 2^16 … 2^31 − 1). */
export const QEMU_UID_BASE = 0x7fff0000;

/**
 * The user of one VM's QEMU: on a root host without `SUPERMACHINE_QEMU_USER`, a uid of its own
 * (derived from the VM id, in {@link QEMU_UID_BASE}'s range, in the dedicated or `nobody` group),
 * so that QEMUs of different VMs cannot signal or trace each other; otherwise {@link hostQemuIdentity}.
 */
export function vmQemuIdentity(vmId: string): QemuIdentity {
  const base = hostQemuIdentity();
  if (base.source !== QEMU_SYSTEM_USER && base.source !== "nobody") return base;
  let hash = 0;
  for (const ch of vmId) hash = (hash * 31 + ch.charCodeAt(0)) >>> 0;
  return {
    uid: QEMU_UID_BASE + (hash & 0xffff),
    gid: base.gid,
    source: `${base.source} group, uid of its own`,
  };
}

/** Limits for a VM with `memoryMiB` of guest RAM: RAM + 3 GiB of address space (TCG's code buffer, threads). */
export function qemuLimits(memoryMiB: number): QemuLimits {
  return { addressSpaceBytes: (memoryMiB + 3 * 1024) * 1024 * 1024, openFiles: 4096 };
}

/** The util-linux programs of the chain. */
export interface ConfinementTools {
  setpriv: string;
  prlimit: string;
  chrt: string;
}

/**
 * The command and arguments that start `program` (QEMU's path and arguments, or the relay's and
 * then QEMU's) confined: through `setpriv` (dropping the user when we are root, capabilities,
 * `no_new_privs`, dying with the host), `prlimit` and `chrt --batch`.
 */
export function confinedCommand(
  tools: ConfinementTools,
  program: readonly string[],
  identity: QemuIdentity,
  limits: QemuLimits,
  self: { uid: number } = { uid: process.getuid?.() ?? 0 },
): { command: string; argv: string[] } {
  const dropUser =
    self.uid === 0 ? [`--reuid=${identity.uid}`, `--regid=${identity.gid}`, "--clear-groups"] : [];
  // Emptying the bounding set needs CAP_SETPCAP: only root has it (and a non-root host has no
  // capabilities to hand down anyway).
  const bounding = self.uid === 0 ? ["--bounding-set=-all"] : [];
  return {
    command: tools.setpriv,
    argv: [
      ...dropUser,
      "--no-new-privs",
      "--inh-caps=-all",
      ...bounding,
      "--ambient-caps=-all",
      "--pdeathsig",
      "SIGKILL",
      "--",
      tools.prlimit,
      `--as=${limits.addressSpaceBytes}`,
      `--nofile=${limits.openFiles}`,
      "--core=0",
      "--",
      // chrt takes no `--` after its priority: the `--` ends its options, then the priority.
      tools.chrt,
      "--batch",
      "--",
      "0",
      ...program,
    ],
  };
}

/**
 * `setpriv`, `prlimit` and `chrt` from util-linux (on every Debian and most Linux hosts): QEMU is
 * never started without them. Found once per process.
 */
export const confinementTools: () => Promise<ConfinementTools> = once(async () => {
  const names = ["setpriv", "prlimit", "chrt"] as const;
  const found = await Promise.all(names.map((name) => findOnPath(name)));
  const missing = names.filter((_, i) => found[i] === undefined);
  if (missing.length > 0) {
    throw new SupermachineError(
      "HOST_UNSUPPORTED",
      `${missing.join(", ")} not found: QEMU runs confined by util-linux's setpriv, prlimit and chrt; install util-linux (apt-get install util-linux)`,
    );
  }
  const [setpriv, prlimit, chrt] = found as [string, string, string];
  return { setpriv, prlimit, chrt };
});

/** The cgroup v2 controllers QEMU would be limited by, and whether that is possible here. */
export interface CgroupSupport {
  /** True when cgroup v2 is delegated to this process with the memory and pids controllers. */
  readonly available: boolean;
  /** Why not, for reports. */
  readonly reason: string;
}

/**
 * Whether a per-VM cgroup (memory, pids) can be made: the unified hierarchy mounted, this process's
 * cgroup writable, with the `memory` and `pids` controllers. Not yet used to place VMs (see
 * docs/security.md); reported by `doctor`.
 */
export function cgroupSupport(): CgroupSupport {
  let own: string;
  try {
    own = readFileSync("/proc/self/cgroup", "utf8");
  } catch {
    return { available: false, reason: "no /proc/self/cgroup" };
  }
  const unified = own.split("\n").find((line) => line.startsWith("0::"));
  if (unified === undefined) return { available: false, reason: "cgroup v2 is not mounted" };
  let controllers = "";
  for (const root of ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]) {
    try {
      controllers = readFileSync(`${root}/cgroup.controllers`, "utf8");
      break;
    } catch {}
  }
  if (!/\bmemory\b/.test(controllers) || !/\bpids\b/.test(controllers)) {
    return {
      available: false,
      reason:
        "cgroup v2 has no memory and pids controllers here (a hybrid or v1 hierarchy, or not delegated)",
    };
  }
  return { available: true, reason: "cgroup v2 with memory and pids" };
}
