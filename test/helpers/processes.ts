/**
 * What this test process holds on the host, read from /proc: QEMU processes by VM id, child
 * processes, open descriptors and listening sockets. For tests that check that nothing leaks.
 *
 * QEMU's command line names its VM (`-name supermachine-<id>`) but no host path: every file and
 * socket reaches it as a descriptor. So QEMU processes are found by VM id, or as children of this
 * process (setpriv, prlimit and chrt exec QEMU in place).
 */
import { readdirSync, readFileSync, readlinkSync } from "node:fs";

function pids(): number[] {
  return readdirSync("/proc")
    .filter((name) => /^\d+$/.test(name))
    .map(Number);
}

function cmdline(pid: number): string | undefined {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8");
  } catch {
    return undefined; // gone meanwhile
  }
}

/** The processes whose command line names one of `vmIds` (QEMU, and the network relay it runs under). */
export function processesOf(vmIds: Iterable<string>): { pid: number; argv: string[] }[] {
  const names = [...vmIds].map((id) => `supermachine-${id}`);
  if (names.length === 0) return [];
  const found: { pid: number; argv: string[] }[] = [];
  for (const pid of pids()) {
    const argv = cmdline(pid)?.split("\0");
    if (argv?.some((arg) => names.includes(arg))) found.push({ pid, argv });
  }
  return found;
}

/** The QEMU processes running for any of `vmIds`. */
export function qemuPidsOf(vmIds: Iterable<string>): number[] {
  return processesOf(vmIds)
    .filter(({ argv }) => argv[0]?.includes("qemu-system") === true)
    .map(({ pid }) => pid);
}

/** The QEMU process of a running VM. */
export function qemuPid(vmId: string): number {
  const [pid] = qemuPidsOf([vmId]);
  if (pid === undefined) throw new Error(`no QEMU for VM ${vmId}`);
  return pid;
}

/** Live child processes of this process (zombies not yet reaped included), with their command lines. */
export function childProcesses(): { pid: number; cmdline: string }[] {
  const children: { pid: number; cmdline: string }[] = [];
  for (const pid of pids()) {
    let stat: string;
    try {
      stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    } catch {
      continue;
    }
    // Field 4 (ppid) follows the command name, which may contain spaces and parentheses.
    const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
    if (ppid === process.pid) children.push({ pid, cmdline: (cmdline(pid) ?? "").replaceAll("\0", " ") });
  }
  return children;
}

/** Descriptors open in this process. */
export function openFdCount(): number {
  return readdirSync("/proc/self/fd").length;
}

function socketInodes(): Set<string> {
  const inodes = new Set<string>();
  for (const fd of readdirSync("/proc/self/fd")) {
    let target: string;
    try {
      target = readlinkSync(`/proc/self/fd/${fd}`);
    } catch {
      continue;
    }
    const inode = /^socket:\[(\d+)\]$/.exec(target)?.[1];
    if (inode !== undefined) inodes.add(inode);
  }
  return inodes;
}

/**
 * The listening sockets this process holds: TCP (`tcp:<local address>`) and unix
 * (`unix:<path or inode>`).
 */
export function listeningSockets(): string[] {
  const ours = socketInodes();
  const found: string[] = [];
  for (const file of ["/proc/net/tcp", "/proc/net/tcp6"]) {
    for (const line of readFileSync(file, "utf8").split("\n").slice(1)) {
      const fields = line.trim().split(/\s+/);
      // sl local_address rem_address st … inode (field 10); st 0A is LISTEN.
      if (fields[3] === "0A" && ours.has(fields[9] ?? "")) found.push(`tcp:${fields[1]}`);
    }
  }
  for (const line of readFileSync("/proc/net/unix", "utf8").split("\n").slice(1)) {
    const fields = line.trim().split(/\s+/);
    // Num RefCount Protocol Flags Type St Inode [Path]; flag 0x10000 is __SO_ACCEPTCON (listening).
    const flags = Number.parseInt(fields[3] ?? "0", 16);
    if ((flags & 0x10000) !== 0 && ours.has(fields[6] ?? "")) found.push(`unix:${fields[7] ?? fields[6]}`);
  }
  return found.sort();
}
