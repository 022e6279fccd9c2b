/** `supermachine doctor`: what this host offers, what is missing, and how to fix it. */
import { type DirReport, type HostReport, hostReport } from "../index.ts";
import type { Cli } from "./cli.ts";
import { bytes, json } from "./output.ts";

/** Less free space than this in the data dir is a warning (an image's root filesystem and a snapshot's memory). */
const LOW_SPACE_BYTES = 2 * 1024 ** 3;

export async function doctorCommand(cli: Cli, flags: { json?: boolean }): Promise<number> {
  const report = await hostReport();
  const problems = findProblems(report);
  if (flags.json) {
    json(cli, { ...report, ok: problems.length === 0, problems });
    return problems.length === 0 ? 0 : 1;
  }
  for (const line of describe(report)) cli.out(line);
  cli.out("");
  if (problems.length === 0) cli.out("Ready: supermachine can run VMs on this host.");
  else for (const problem of problems) cli.out(`Problem: ${problem}`);
  return problems.length === 0 ? 0 : 1;
}

/** What stops VMs from running here (a slow accelerator does not). */
function findProblems(report: HostReport): string[] {
  const problems: string[] = [];
  if (!report.host.supported)
    problems.push(
      `supermachine runs VMs on x86-64 Linux only; this is ${report.host.os}/${report.host.arch}`,
    );
  if (!report.qemu.found) problems.push(report.qemu.error);
  if (!report.assets.found) problems.push(report.assets.error);
  for (const [name, dir] of Object.entries(report.dirs)) {
    if (!dir.writable)
      problems.push(`the ${name} dir ${dir.path} is not writable: ${dir.error ?? ""}`.trim());
  }
  return problems;
}

function describe(report: HostReport): string[] {
  const lines: string[] = [];
  const item = (label: string, text: string) => lines.push(`${`${label}:`.padEnd(14)}${text}`);
  item("host", `${report.host.os}/${report.host.arch}, running as ${report.host.user}`);

  const accel = report.accelerator;
  if (accel.accel === "kvm") {
    item("accelerator", "KVM (/dev/kvm is usable): hardware virtualization, hardware isolation");
  } else {
    const why: Record<string, string> = {
      missing: "/dev/kvm does not exist",
      "no-permission": "/dev/kvm exists but this user may not open it",
      unusable: "/dev/kvm opens, but QEMU cannot run a KVM VM with it",
      disabled: "SUPERMACHINE_ACCEL=tcg turns KVM off",
      usable: "",
    };
    item("accelerator", `TCG will be used: ${why[accel.kvm]}`);
    lines.push(
      `${"".padEnd(14)}TCG emulates the CPU in software: VMs boot in ~1 s instead of ~0.2 s, run code`,
      `${"".padEnd(14)}several times slower, and the isolation is QEMU's emulator, NOT hardware isolation.`,
    );
    lines.push(`${"".padEnd(14)}To fix, on a machine that has KVM: ${kvmFix(accel.kvm)}`);
  }

  if (report.qemu.found) item("qemu", `${report.qemu.path}, version ${report.qemu.version}`);
  else item("qemu", `not found: ${report.qemu.error}`);

  const c = report.confinement;
  item(
    "sandbox",
    c.seccomp
      ? "QEMU's seccomp sandbox is available and always used (-sandbox on)"
      : "QEMU cannot run with -sandbox (built without seccomp?): VMs will not start; install Debian's qemu-system-x86",
  );
  const user = c.user;
  item(
    "confinement",
    [
      c.tools
        ? "no capabilities, no_new_privs, rlimits, SCHED_BATCH, dies with its host process (setpriv, prlimit, chrt)"
        : "setpriv, prlimit or chrt is missing: VMs will not start; install util-linux",
      "error" in user
        ? `QEMU's user: ${user.error}`
        : user.source === "self"
          ? `QEMU runs as this user (uid ${user.uid})`
          : user.source === "SUPERMACHINE_QEMU_USER"
            ? `QEMU runs as uid ${user.uid}:${user.gid} (SUPERMACHINE_QEMU_USER), never root`
            : `QEMU runs as a uid of its own per VM in group ${user.gid} (${user.source}), never root`,
      c.cgroup.available ? "per-VM cgroups possible (memory, pids)" : `no per-VM cgroup: ${c.cgroup.reason}`,
    ].join("; "),
  );

  if (report.assets.found) {
    const { kernel, initramfs } = report.assets.assets; // the relay is on the network line
    for (const [name, asset] of Object.entries({ kernel, initramfs })) {
      const from: Record<string, string> = {
        option: "given by the caller",
        env: `from SUPERMACHINE_${name.toUpperCase()}`,
        cache: "built from source (cache)",
        package: `prebuilt package, sha256 matches (${asset.sha256?.slice(7, 19)}…)`,
        newest: "the newest built kernel in the cache (its exact build cannot be told here)",
      };
      item(name, `${asset.path} — ${from[asset.source]}`);
    }
  } else {
    item("guest assets", `missing: ${report.assets.error}`);
  }

  const net = report.network;
  if (!net.relay.found) {
    item("network", `none and outbound work; allow-lists do not: ${net.relay.error}`);
  } else if (net.userNamespaces.available === true) {
    item("network", `none, outbound and allow-lists work (relay ${net.relay.path}, ${net.relay.source})`);
  } else {
    item(
      "network",
      `none and outbound work; allow-lists do not: user namespaces are refused here (${net.userNamespaces.reason}). ` +
        "Enable them: sysctl -w kernel.unprivileged_userns_clone=1 user.max_user_namespaces=10000",
    );
  }

  for (const [name, dir] of Object.entries(report.dirs) as [string, DirReport][]) {
    const free = dir.freeBytes === undefined ? "free space unknown" : `${bytes(dir.freeBytes)} free`;
    const low =
      name === "data" && dir.freeBytes !== undefined && dir.freeBytes < LOW_SPACE_BYTES ? " (low)" : "";
    item(
      `${name} dir`,
      `${dir.path} — ${dir.writable ? "writable" : `NOT writable (${dir.error})`}, ${free}${low}`,
    );
  }
  return lines;
}

function kvmFix(status: string): string {
  if (status === "no-permission") return "sudo usermod -aG kvm $USER, then log out and in again.";
  if (status === "disabled") return "unset SUPERMACHINE_ACCEL.";
  if (status === "unusable")
    return "this host's KVM is incomplete (often nested virtualization); use a host with working KVM, or set SUPERMACHINE_ACCEL=tcg to skip the check.";
  return (
    "enable virtualization (VT-x/AMD-V) in the firmware, or nested virtualization if this host is " +
    "a VM, load kvm_intel or kvm_amd, then give your user the device: sudo usermod -aG kvm $USER."
  );
}
