/**
 * What this host offers the VMM: the accelerator (KVM or TCG), the host TSC frequency, the QEMU
 * binary and its version and features.
 */

import { execFile, spawn } from "node:child_process";
import { constants, readFileSync } from "node:fs";
import { access, open } from "node:fs/promises";
import path from "node:path";
import { SupermachineError, VmError } from "../errors.ts";
import { memoize, once, publish } from "../internal/index.ts";
import type { Accelerator } from "./qemu-args.ts";

/** The accelerator to use, and when it is TCG, why KVM is not available and how to get it. */
export interface AcceleratorChoice {
  accel: Accelerator;
  /** Set when `accel` is `"tcg"`: a sentence for a human, saying what to do to get KVM. */
  reason?: string;
}

const TCG_NOTE =
  "Running under TCG: QEMU emulates the CPU, which is much slower and is NOT hardware isolation.";

/**
 * The accelerator VMs of this process use, detected once; published once on the diagnostics
 * channel `supermachine:vm:accelerator` (the CLI tells a person at a terminal about TCG).
 */
export const hostAccelerator: () => Promise<AcceleratorChoice> = once(() =>
  detectAccelerator().then((choice) => {
    publish("vm:accelerator", choice);
    return choice;
  }),
);

/**
 * KVM when `/dev/kvm` can be opened read-write, else TCG with the reason.
 * `SUPERMACHINE_ACCEL=tcg` forces TCG. Cheap (one `open`); not cached.
 */
export async function detectAccelerator(
  options: {
    devicePath?: string;
    env?: NodeJS.ProcessEnv;
    /** Starts a KVM machine and says why it failed (undefined: it works). Default: {@link probeKvm}. */
    probe?: () => Promise<string | undefined>;
  } = {},
): Promise<AcceleratorChoice> {
  const env = options.env ?? process.env;
  const device = options.devicePath ?? "/dev/kvm";
  if (env.SUPERMACHINE_ACCEL === "tcg") {
    return { accel: "tcg", reason: `SUPERMACHINE_ACCEL=tcg forces TCG. ${TCG_NOTE}` };
  }
  try {
    const handle = await open(device, constants.O_RDWR);
    await handle.close();
  } catch (error) {
    const reason = kvmOpenFailure((error as NodeJS.ErrnoException).code ?? String(error), device);
    return { accel: "tcg", reason: `${reason} ${TCG_NOTE}` };
  }
  const failure = await (options.probe ?? (async () => probeKvm(await findQemu(env))))();
  if (failure === undefined) return { accel: "kvm" };
  return {
    accel: "tcg",
    reason:
      `${device} opens, but QEMU cannot run a VM with it (${failure}): the host's KVM is incomplete ` +
      `(a nested or emulated KVM?); set SUPERMACHINE_ACCEL=tcg to skip this check. ${TCG_NOTE}`,
  };
}

/** Why `device` could not be opened (an errno code), and what to do about it. */
export function kvmOpenFailure(code: string, device = "/dev/kvm"): string {
  if (code === "ENOENT") {
    return (
      `${device} does not exist: this host does not offer KVM. Enable virtualization (VT-x/AMD-V) in ` +
      "the firmware, or nested virtualization if this host is itself a VM, and load the kvm_intel " +
      "or kvm_amd module."
    );
  }
  if (code === "EACCES" || code === "EPERM") {
    return (
      `no permission to open ${device}: add your user to the kvm group ` +
      "(sudo usermod -aG kvm $USER) and log out and in again."
    );
  }
  return `cannot open ${device} (${code}).`;
}

/**
 * Whether this QEMU can start a KVM microvm with `-cpu host` (some nested or emulated KVMs open but
 * fail at the first vCPU reset). Undefined when it can; else the last line QEMU printed. Found out
 * once per QEMU binary by starting a paused machine and quitting it (~60 ms).
 */
export const probeKvm: (qemuPath: string) => Promise<string | undefined> = memoize(
  (qemuPath) =>
    new Promise((resolve) => {
      const child = spawn(
        qemuPath,
        [
          ...["-machine", "microvm,acpi=off", "-accel", "kvm", "-cpu", "host", "-m", "64M"],
          ...["-nodefaults", "-no-user-config", "-display", "none", "-S", "-monitor", "stdio"],
        ],
        { stdio: ["pipe", "ignore", "pipe"] },
      );
      let stderr = "";
      child.stderr.setEncoding("utf8");
      child.stderr.on("data", (text: string) => {
        stderr = (stderr + text).slice(-4096);
      });
      const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
      child.on("error", (error) => {
        clearTimeout(timer);
        resolve(error.message);
      });
      child.on("close", (code, signal) => {
        clearTimeout(timer);
        const last = stderr.trim().split("\n")[0] ?? "";
        resolve(code === 0 ? undefined : last || `exit ${code ?? signal}`);
      });
      child.stdin.on("error", () => {});
      child.stdin.end("quit\n");
    }),
);

let tscKHz: number | null | undefined;

/**
 * The host's TSC frequency in kHz, for the guest's `tsc_early_khz=` under TCG (where the guest's
 * `rdtsc` reads the host TSC). Sources, best first: `/sys/devices/system/cpu/cpu0/tsc_freq_khz`
 * (kernels that export it); the nominal frequency in an Intel model name (`@ 2.10GHz`: with an
 * invariant TSC it is the TSC rate); `cpu MHz` in /proc/cpuinfo. Cached per process; `undefined`
 * when no source exists.
 */
export function hostTscKHz(): number | undefined {
  if (tscKHz === undefined) tscKHz = readTscKHz() ?? null;
  return tscKHz ?? undefined;
}

/** Parse the TSC rate out of sysfs/cpuinfo text. Exported for tests. */
export function tscKHzFrom(sources: { sysfsTscKHz?: string; cpuinfo?: string }): number | undefined {
  const sysfs = Number.parseInt(sources.sysfsTscKHz?.trim() ?? "", 10);
  if (Number.isSafeInteger(sysfs) && sysfs > 0) return sysfs;
  const cpuinfo = sources.cpuinfo ?? "";
  const flags = /^flags\s*:(.*)$/m.exec(cpuinfo)?.[1]?.split(/\s+/) ?? [];
  const model = /^model name\s*:(.*)$/m.exec(cpuinfo)?.[1] ?? "";
  const nominal = /Intel.*@\s*([0-9.]+)\s*GHz/.exec(model)?.[1];
  if (nominal !== undefined && flags.includes("constant_tsc")) {
    const khz = Math.round(Number.parseFloat(nominal) * 1_000_000);
    if (khz > 0) return khz;
  }
  const mhz = /^cpu MHz\s*:\s*([0-9.]+)/m.exec(cpuinfo)?.[1];
  if (mhz !== undefined) {
    const khz = Math.round(Number.parseFloat(mhz) * 1000);
    if (khz > 0) return khz;
  }
  return undefined;
}

function readTscKHz(): number | undefined {
  const read = (file: string) => {
    try {
      return readFileSync(file, "utf8");
    } catch {
      return undefined;
    }
  };
  return tscKHzFrom({
    sysfsTscKHz: read("/sys/devices/system/cpu/cpu0/tsc_freq_khz"),
    cpuinfo: read("/proc/cpuinfo"),
  });
}

const QEMU_BINARY = "qemu-system-x86_64";
const INSTALL_HINT = "install qemu-system-x86 (apt-get install qemu-system-x86) or set SUPERMACHINE_QEMU";

/** Fail with `HOST_UNSUPPORTED` unless this is an x86-64 Linux host. */
export function assertHostSupported(): void {
  if (process.platform !== "linux" || process.arch !== "x64") {
    throw new SupermachineError(
      "HOST_UNSUPPORTED",
      `supermachine runs VMs on x86-64 Linux hosts only; this host is ${process.platform}/${process.arch}`,
    );
  }
}

/**
 * The QEMU binary: `SUPERMACHINE_QEMU`, else `qemu-system-x86_64` on `PATH`. Found once per value
 * of the two (every launch asks; a failed lookup is tried again next time).
 */
export function findQemu(env: NodeJS.ProcessEnv = process.env): Promise<string> {
  return lookUpQemu(`${env.SUPERMACHINE_QEMU ?? ""}\0${env.PATH ?? ""}`);
}

const lookUpQemu = memoize(async (key: string): Promise<string> => {
  const [configured, pathList] = key.split("\0") as [string, string];
  if (configured !== "") {
    if (await isExecutable(configured)) return path.resolve(configured);
    throw new SupermachineError(
      "QEMU_NOT_FOUND",
      `QEMU not found: SUPERMACHINE_QEMU=${configured} is not an executable file; fix it or unset it`,
    );
  }
  const found = await findOnPath(QEMU_BINARY, { PATH: pathList });
  if (found !== undefined) return found;
  throw new SupermachineError("QEMU_NOT_FOUND", `QEMU not found: ${INSTALL_HINT}`);
});

/** Find an executable by name on `PATH`. */
export async function findOnPath(
  name: string,
  env: NodeJS.ProcessEnv = process.env,
): Promise<string | undefined> {
  for (const dir of (env.PATH ?? "").split(path.delimiter)) {
    if (dir === "") continue;
    const candidate = path.join(dir, name);
    if (await isExecutable(candidate)) return candidate;
  }
  return undefined;
}

async function isExecutable(file: string): Promise<boolean> {
  try {
    await access(file, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/** A QEMU version, e.g. 7.2.22 with `package` "Debian 1:7.2+dfsg-7+deb12u18+b3". */
export interface QemuVersion {
  major: number;
  minor: number;
  micro: number;
  /** Distribution package version in parentheses, or "". */
  package: string;
  /** `major.minor.micro`. */
  text: string;
}

/** The version of the QEMU at `qemuPath` (`--version`). Cached per path. */
export const qemuVersion: (qemuPath: string) => Promise<QemuVersion> = memoize(runVersion);

/** The version of the QEMU VMs of this process use, as snapshots record it: `7.2.22 (Debian …)`. */
export const hostQemuVersion: () => Promise<string> = once(async () => {
  const v = await qemuVersion(await findQemu());
  return v.package === "" ? v.text : `${v.text} (${v.package})`;
});

/** Parse `qemu-system-x86_64 --version` output. Exported for tests. */
export function parseQemuVersion(output: string): QemuVersion | undefined {
  const match = /QEMU emulator version (\d+)\.(\d+)\.(\d+)(?:\s*\(([^)]*)\))?/.exec(output);
  if (match === null) return undefined;
  const [major, minor, micro] = [match[1], match[2], match[3]].map((n) => Number.parseInt(n ?? "", 10)) as [
    number,
    number,
    number,
  ];
  return { major, minor, micro, package: match[4] ?? "", text: `${major}.${minor}.${micro}` };
}

function runVersion(qemuPath: string): Promise<QemuVersion> {
  return new Promise((resolve, reject) => {
    execFile(qemuPath, ["--version"], { timeout: 10_000 }, (error, stdout) => {
      if (error !== null) {
        const notFound = (error as NodeJS.ErrnoException).code === "ENOENT";
        reject(
          notFound
            ? new SupermachineError("QEMU_NOT_FOUND", `QEMU not found at ${qemuPath}: ${INSTALL_HINT}`, {
                cause: error,
              })
            : new VmError("VMM_FAILED", `${qemuPath} --version failed`, {}, { cause: error }),
        );
        return;
      }
      const version = parseQemuVersion(stdout);
      if (version === undefined) {
        reject(new VmError("VMM_FAILED", `cannot parse the version of ${qemuPath}: ${stdout.trim()}`));
      } else {
        resolve(version);
      }
    });
  });
}

/**
 * Whether this QEMU can run with the strict seccomp sandbox (built with seccomp, kernel allows
 * it). Found out once per path by starting QEMU with `-machine none` and quitting it (~70 ms).
 */
export const qemuSupportsSandbox: (qemuPath: string) => Promise<boolean> = memoize(probeSandbox);

function probeSandbox(qemuPath: string): Promise<boolean> {
  return new Promise((resolve) => {
    const child = spawn(
      qemuPath,
      [
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-machine",
        "none",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-S",
        "-monitor",
        "stdio",
      ],
      { stdio: ["pipe", "ignore", "ignore"] },
    );
    const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
    child.on("error", () => {
      clearTimeout(timer);
      resolve(false);
    });
    child.on("exit", (code) => {
      clearTimeout(timer);
      resolve(code === 0);
    });
    child.stdin.on("error", () => {});
    child.stdin.end("quit\n");
  });
}
