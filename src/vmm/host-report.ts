/**
 * What this host offers supermachine, in one report: the accelerator and why, QEMU and its
 * seccomp sandbox, how QEMU is confined, the guest assets and where they come from, and the dirs
 * supermachine writes. `supermachine doctor` prints it; a program can check a host with it before
 * it starts VMs. Every probe runs (none stops the others); a failed probe is reported, not thrown.
 */

import { constants } from "node:fs";
import { access, mkdir, statfs } from "node:fs/promises";
import { userInfo } from "node:os";
import { cacheDir, dataDir, runtimeDir } from "../internal/index.ts";
import {
  type AcceleratorChoice,
  detectAccelerator,
  findQemu,
  qemuSupportsSandbox,
  qemuVersion,
} from "./accelerator.ts";
import {
  type AssetSearchOptions,
  type GuestAssets,
  locateGuestAssets,
  locateNetRelay,
} from "./asset-paths.ts";
import { cgroupSupport, confinementTools, hostQemuIdentity, vmQemuIdentity } from "./confinement.ts";
import { probeNetRelay } from "./net-relay.ts";

/** The three dirs supermachine keeps files in (each with an environment override). */
export interface HostPaths {
  /** Pulled images, root filesystems, snapshots: `SUPERMACHINE_DATA_DIR`, else `$XDG_DATA_HOME/supermachine`. */
  readonly dataDir: string;
  /** Built guest assets: `SUPERMACHINE_CACHE_DIR`, else `$XDG_CACHE_HOME/supermachine`. */
  readonly cacheDir: string;
  /** Running VMs' sockets and logs: `SUPERMACHINE_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR` or /tmp, `supermachine-<uid>`. */
  readonly runtimeDir: string;
}

/** The dirs supermachine uses on this host, for this environment. */
export function hostPaths(env: NodeJS.ProcessEnv = process.env): HostPaths {
  return { dataDir: dataDir(env), cacheDir: cacheDir(env), runtimeDir: runtimeDir(env) };
}

/** One dir: whether supermachine can write it (creating it if needed) and the free space there. */
export interface DirReport {
  readonly path: string;
  readonly writable: boolean;
  /** Bytes available to this user on its file system; undefined when it cannot be found out. */
  readonly freeBytes: number | undefined;
  /** Why it is not writable. */
  readonly error?: string;
}

/** What `/dev/kvm` is here. */
export type KvmStatus = "usable" | "missing" | "no-permission" | "unusable" | "disabled";

export interface HostReport {
  readonly host: {
    readonly os: string;
    readonly arch: string;
    readonly supported: boolean;
    readonly user: string;
  };
  /** The accelerator VMs will use; `reason` says why not KVM and what to do. */
  readonly accelerator: AcceleratorChoice & {
    /** `usable`; `missing` (no /dev/kvm); `no-permission`; `unusable` (opens, but QEMU cannot run a KVM VM); `disabled` (SUPERMACHINE_ACCEL=tcg). */
    readonly kvm: KvmStatus;
  };
  readonly qemu:
    | { readonly found: true; readonly path: string; readonly version: string }
    | { readonly found: false; readonly error: string };
  /** How QEMU is confined when it runs (docs/security.md). */
  readonly confinement: {
    /** QEMU runs with its seccomp sandbox (`-sandbox on`, denying spawn, privilege changes, obsolete calls); without it QEMU does not start. */
    readonly seccomp: boolean;
    /** `setpriv`, `prlimit` and `chrt` are there: no capabilities, `no_new_privs`, rlimits, `SCHED_BATCH`, and QEMU dies with the process that started it. */
    readonly tools: boolean;
    /** Who QEMU runs as: `self` (this user) on a non-root host; on a root host a uid of its own per VM (`uid` is the group's base) or `SUPERMACHINE_QEMU_USER`. */
    readonly user:
      | { readonly source: string; readonly uid: number; readonly gid: number }
      | { readonly error: string };
    /** Per-VM cgroups: available here or not, and why. */
    readonly cgroup: { readonly available: boolean; readonly reason: string };
  };
  readonly assets:
    | { readonly found: true; readonly assets: GuestAssets }
    | { readonly found: false; readonly error: string };
  /**
   * Network allow-lists (docs/network.md; `none` and `outbound` need nothing more): the relay
   * `sm-net`, and whether it can build its user + network namespace here, tried as QEMU's user.
   */
  readonly network: {
    readonly relay:
      | { readonly found: true; readonly path: string; readonly source: string }
      | { readonly found: false; readonly error: string };
    /** `available` is undefined when it could not be tried (no relay). */
    readonly userNamespaces: { readonly available: boolean | undefined; readonly reason: string };
  };
  readonly dirs: { readonly data: DirReport; readonly cache: DirReport; readonly runtime: DirReport };
}

/** Probes this host (~0.1–0.5 s: it starts QEMU twice and may hash the prebuilt guest assets). */
export async function hostReport(
  options: { env?: NodeJS.ProcessEnv; assets?: AssetSearchOptions } = {},
): Promise<HostReport> {
  const env = options.env ?? process.env;
  const paths = hostPaths(env);
  const qemuPath = findQemu(env);
  const [accelerator, kvm, qemu, seccomp, tools, assets, network, data, cache, runtime] = await Promise.all([
    detectAccelerator({ env }),
    kvmStatus(env),
    // QEMU not found, or found and its `--version` failed: either is a finding, not an error.
    qemuPath
      .then(async (path) => {
        const v = await qemuVersion(path);
        return {
          found: true as const,
          path,
          version: v.package === "" ? v.text : `${v.text} (${v.package})`,
        };
      })
      .catch((error: Error) => ({ found: false as const, error: error.message })),
    qemuPath.then(qemuSupportsSandbox, () => false),
    confinementTools().then(
      () => true,
      () => false,
    ),
    locateGuestAssets({}, { env, ...options.assets }).then(
      (found) => ({ found: true as const, assets: found }),
      (error: Error) => ({ found: false as const, error: error.message }),
    ),
    networkReport(env, options.assets),
    dirReport(paths.dataDir),
    dirReport(paths.cacheDir),
    dirReport(paths.runtimeDir),
  ]);
  const effective: KvmStatus = accelerator.accel === "kvm" ? "usable" : kvm === "usable" ? "unusable" : kvm;
  return {
    host: {
      os: process.platform,
      arch: process.arch,
      supported: process.platform === "linux" && process.arch === "x64",
      user: `${userInfo().username} (uid ${process.getuid?.() ?? -1})`,
    },
    accelerator: { ...accelerator, kvm: effective },
    qemu,
    confinement: { seccomp, tools, user: qemuUser(), cgroup: cgroupSupport() },
    assets,
    network,
    dirs: { data, cache, runtime },
  };
}

async function networkReport(
  env: NodeJS.ProcessEnv,
  search: AssetSearchOptions | undefined,
): Promise<HostReport["network"]> {
  let relay: { path: string; source: string };
  try {
    relay = await locateNetRelay({}, { env, ...search });
  } catch (error) {
    return {
      relay: { found: false, error: (error as Error).message },
      userNamespaces: { available: undefined, reason: "not tried: the relay is missing" },
    };
  }
  let why: string | undefined;
  try {
    // As a VM's QEMU would run it (a uid of its own on a root host).
    why = await probeNetRelay({ path: relay.path, identity: vmQemuIdentity("sm-net-probe") });
  } catch (error) {
    why = (error as Error).message;
  }
  return {
    relay: { found: true, path: relay.path, source: relay.source },
    userNamespaces:
      why === undefined
        ? { available: true, reason: "sm-net built its user + network namespace as QEMU's user" }
        : { available: false, reason: why },
  };
}

/** What opening /dev/kvm says, before QEMU is asked (`usable` here may still fail in QEMU). */
async function kvmStatus(env: NodeJS.ProcessEnv): Promise<KvmStatus> {
  if (env.SUPERMACHINE_ACCEL === "tcg") return "disabled";
  try {
    await access("/dev/kvm", constants.R_OK | constants.W_OK);
    return "usable";
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "ENOENT" ? "missing" : "no-permission";
  }
}

async function dirReport(path: string): Promise<DirReport> {
  try {
    await mkdir(path, { recursive: true, mode: 0o700 });
    await access(path, constants.W_OK | constants.X_OK);
  } catch (error) {
    return { path, writable: false, freeBytes: await free(path), error: (error as Error).message };
  }
  return { path, writable: true, freeBytes: await free(path) };
}

async function free(path: string): Promise<number | undefined> {
  // The nearest existing ancestor tells the file system's free space.
  for (let dir = path; ; ) {
    try {
      const info = await statfs(dir);
      return info.bavail * info.bsize;
    } catch {
      const parent = dir.slice(0, dir.lastIndexOf("/")) || "/";
      if (parent === dir) return undefined;
      dir = parent;
    }
  }
}

function qemuUser(): HostReport["confinement"]["user"] {
  try {
    const { source, uid, gid } = hostQemuIdentity();
    return { source, uid, gid };
  } catch (error) {
    return { error: (error as Error).message };
  }
}
