/**
 * The QEMU command line for a supermachine VM, as a pure function of a {@link MachineSpec}.
 *
 * The argv is deterministic: the same spec always gives the same arguments in the same order.
 * That matters for snapshots, because QEMU restores device state by device path, and the
 * virtio-mmio slot a device lands in depends on the order in which devices are created. Devices
 * that every VM has (rng, the agent's virtio-serial) come first; optional ones (disks, network)
 * come after them, so adding a disk or a network never moves an earlier device.
 *
 * Why each flag is there: docs/vmm.md.
 */

import { SupermachineError } from "../errors.ts";

/** The hardware accelerator QEMU uses: KVM, or TCG (pure emulation, no hardware isolation). */
export type Accelerator = "kvm" | "tcg";

/**
 * QEMU's seccomp sandbox.
 * - `"strict"`: `-sandbox on` denying obsolete syscalls, privilege changes, process spawning and
 *   resource control. Note that `migrate` to an `exec:` URI spawns a process, and seccomp then
 *   KILLS QEMU (SIGSYS); migrate to `unix:` or `fd:` URIs instead.
 * - `"allow-spawn"`: the same, but QEMU may fork/exec (for `exec:` migration URIs).
 * - `"off"`: no `-sandbox` argument (for QEMU builds without seccomp).
 */
export type SandboxMode = "strict" | "allow-spawn" | "off";

/** One virtio block device. */
export interface DiskSpec {
  /**
   * Stable name of the disk: the block node name, the device id (`blk-<name>`) and the virtio-blk
   * serial number the guest sees in `/sys/block/vdX/serial`. The 6.1 guest kernel names disks
   * `vda`, `vdb`, … in the order of `disks`; the serial identifies one without relying on that.
   * `[a-z][a-z0-9-]*`, at most 20 characters (the virtio-blk serial limit). Default `disk<index>`.
   */
  name?: string;
  /** Path of the image file on the host. */
  path: string;
  /** Image format. A qcow2 overlay opens its backing file (read-only) by itself. */
  format: "raw" | "qcow2";
  /** Attach read-only: QEMU opens the file read-only and the guest cannot write. Default false. */
  readOnly?: boolean;
  /**
   * The backing chain below `path`, top down (a qcow2 overlay's backing file first). Given, QEMU
   * opens exactly these files (read-only) instead of the names in the qcow2 headers. Absent, it
   * follows the headers.
   */
  backing?: readonly { path: string; format: "raw" | "qcow2" }[];
}

/** A host port forwarded into the guest by QEMU's user-mode network (`hostfwd`). */
export interface HostForward {
  /** Default `"tcp"`. */
  protocol?: "tcp" | "udp";
  /** Host address to listen on. Default `127.0.0.1` (never all interfaces unless asked). */
  hostAddress?: string;
  /** Host port; 0 is not allowed here (QEMU would not tell us which port it chose). */
  hostPort: number;
  /** Guest port. */
  guestPort: number;
}

/**
 * Outbound networking through QEMU's user-mode network stack (slirp): guest 10.0.2.15,
 * gateway 10.0.2.2, DNS 10.0.2.3. Each VM has its own stack, so clones do not collide.
 */
export interface NetworkSpec {
  /** Guest MAC address `xx:xx:xx:xx:xx:xx`. Default QEMU's `52:54:00:12:34:56`. */
  mac?: string;
  /** Isolate the guest from the host and the outside world; only `hostForwards` remain. */
  restrict?: boolean;
  /** Forwards installed at start. More can be added at run time with QMP `human-monitor-command hostfwd_add`. */
  hostForwards?: readonly HostForward[];
}

/**
 * Guest RAM.
 * - `anonymous`: ordinary private memory (the default).
 * - `file`: a `memory-backend-file` mapping `path`. `share: true` writes guest RAM through to the
 *   file (baking a snapshot); `share: false` maps it copy-on-write (restoring clones of one file).
 */
export type GuestMemory =
  | { kind: "anonymous" }
  | {
      kind: "file";
      path: string;
      share: boolean;
      /**
       * Id of the memory backend object, which names the RAM block in migration streams. Default
       * `mem`. A stream saved from a VM with anonymous RAM names it `microvm.ram` (QEMU's default
       * backend id for microvm): load such a stream with that id.
       */
      backendId?: string;
    };

/**
 * Incoming migration (restore): `"defer"` waits for QMP `migrate-incoming` (the state is then read
 * from the descriptor QEMU inherited; see `LaunchOptions.incomingStatePath`).
 */
export type IncomingMigration = "defer";

/** Everything that decides a VM's QEMU command line. */
export interface MachineSpec {
  /** `kvm` → `-accel kvm -cpu host`; `tcg` → `-accel tcg -cpu max`. */
  accel: Accelerator;
  /** Guest RAM in MiB (`-m`). */
  memoryMiB: number;
  /** Number of vCPUs (`-smp`). */
  vcpus: number;
  /** Guest kernel (an uncompressed `vmlinux` booted via PVH, or a bzImage). Without one, QEMU runs its firmware and idles. */
  kernelPath?: string;
  /** Initramfs (`-initrd`). Requires `kernelPath`. */
  initramfsPath?: string;
  /** Extra kernel command-line arguments, appended after the ones supermachine always sets. */
  kernelArgs?: readonly string[];
  /**
   * Host TSC frequency in kHz. Under TCG the guest's `rdtsc` runs at the host's rate, and telling
   * the kernel (`tsc_early_khz=`) avoids its calibration, which can hang under emulation.
   * Ignored under KVM. `QemuProcess.launch` fills it in from `hostTscKHz()`.
   */
  tscKHz?: number;
  /** Guest RAM backing. Default anonymous. */
  memory?: GuestMemory;
  /** Virtio block devices, attached in this order. */
  disks?: readonly DiskSpec[];
  /** User-mode network. Absent: the VM has no network device at all. */
  network?: NetworkSpec;
  /**
   * QMP: an inherited descriptor of a socket already connected to the host (`qmpFd`), or a unix
   * socket the HOST listens on and QEMU connects to (`qmpSocketPath`). One of the two.
   */
  qmpSocketPath?: string;
  qmpFd?: number;
  /**
   * Unix socket the HOST listens on; QEMU connects the guest's virtio-serial port `sm.agent`
   * (`/dev/virtio-ports/sm.agent`) to it. Absent: no agent channel.
   */
  agentSocketPath?: string;
  /** The agent's port on an inherited, connected socket instead of `agentSocketPath`. */
  agentFd?: number;
  /**
   * The guest's virtio-serial port `sm.mounts` (the mount relay's; live host-directory mounts): a
   * unix socket the host listens on, or an inherited connected socket (`mountFd`). It sits on the
   * agent's virtio-serial device, after the agent's port. Absent: no mounts port.
   */
  mountSocketPath?: string;
  mountFd?: number;
  /** Start as the target of an incoming migration (restore). */
  incoming?: IncomingMigration;
  /** Start with the vCPUs stopped (`-S`); QMP `cont` starts them. */
  paused?: boolean;
  /** Seccomp sandbox. Default `"strict"`. */
  sandbox?: SandboxMode;
  /** Process name (`-name`), shown by `ps` and in QMP `query-name`. */
  name?: string;
  /** Inherited descriptors QEMU files as fdsets (`-add-fd`), referred to as `/dev/fdset/<set>`. */
  addFds?: readonly { fd: number; set: number }[];
  /**
   * Arguments appended verbatim at the end. They must be identical on save and restore when they
   * add devices.
   */
  extraArgs?: readonly string[];
}

/** Name of the virtio-serial port that carries the agent protocol. */
export const AGENT_PORT_NAME = "sm.agent";
/** Name of the virtio-serial port that carries the mounts channel (docs/protocol.md, "Mounts channel"). */
export const MOUNTS_PORT_NAME = "sm.mounts";

/** Kernel arguments supermachine always sets, before `kernelArgs`. */
export const BASE_KERNEL_ARGS: readonly string[] = [
  // The microvm's only UART; the host keeps its output in the console log.
  "console=ttyS0",
  // Reboot by triple fault: with -no-reboot QEMU then exits instead of resetting.
  "reboot=t",
  // Reboot (so: exit QEMU) at once on a panic instead of hanging.
  "panic=-1",
];

/**
 * Kernel arguments every VM gets under TCG, after `tsc_early_khz=`. Measured effect of each:
 * docs/guest-assets.md, "Traps" and "The TCG kernel arguments".
 */
export const TCG_KERNEL_ARGS: readonly string[] = [
  // The clocksource watchdog compares the TSC with jiffies, which fall behind on a busy host, and
  // would demote the TSC (the guest clock then runs on 4 ms jiffies, slow; so do a bake's clones).
  "tsc=reliable",
  // A 1-vCPU kernel otherwise rewrites every LOCK prefix in its text (SMP -> UP alternatives), which
  // costs 0.3 s of the boot under TCG; the locks cost nothing there. No effect with 2+ vCPUs.
  "noreplace-smp",
  // Skip checking that the PIT's interrupt reaches the IO-APIC (a busy wait of a few ticks): microvm wires it.
  "no_timer_check",
  // QEMU's emulated local APIC counts guest nanoseconds: its timer's clock is 1 GHz. Our kernel takes
  // it from here (kernel/patches/lapic-timer-hz.patch) instead of measuring it and then verifying the
  // measurement, two waits of 100 ms of ticks on every boot. A kernel without the patch passes it on
  // to init's environment and calibrates as before.
  "lapic_timer_hz=1000000000",
];

const DISK_NAME = /^[a-z][a-z0-9-]{0,19}$/;
const MAC = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/i;
const STRICT_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
const SPAWN_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=allow,resourcecontrol=deny";

/** The kernel command line for `spec` (`-append`). */
export function kernelCommandLine(spec: Pick<MachineSpec, "accel" | "tscKHz" | "kernelArgs">): string {
  const args = [...BASE_KERNEL_ARGS];
  if (spec.accel === "tcg") {
    if (spec.tscKHz !== undefined) {
      if (!Number.isSafeInteger(spec.tscKHz) || spec.tscKHz <= 0) {
        throw invalid(`tscKHz must be a positive integer, got ${spec.tscKHz}`);
      }
      args.push(`tsc_early_khz=${spec.tscKHz}`);
    }
    args.push(...TCG_KERNEL_ARGS);
  }
  for (const arg of spec.kernelArgs ?? []) {
    if (arg === "" || /[\s\0]/.test(arg.replace(/"[^"]*"/g, '""'))) {
      throw invalid(`kernel argument ${JSON.stringify(arg)} is empty or contains unquoted whitespace`);
    }
    args.push(arg);
  }
  return args.join(" ");
}

/** Build QEMU's argv (without the executable) for `spec`. Pure; throws `INVALID_ARGUMENT`. */
export function buildQemuArgs(spec: MachineSpec): string[] {
  validate(spec);
  const args: string[] = [];
  const push = (...more: string[]) => args.push(...more);

  if (spec.name !== undefined) push("-name", opt(spec.name));
  push("-nodefaults", "-no-user-config", "-nographic");
  for (const { fd, set } of spec.addFds ?? []) push("-add-fd", `fd=${fd},set=${set}`);
  const sandbox = spec.sandbox ?? "strict";
  if (sandbox !== "off") push("-sandbox", sandbox === "strict" ? STRICT_SANDBOX : SPAWN_SANDBOX);

  const machine = ["microvm", "acpi=off", "pit=on", "pic=on", "rtc=on", "x-option-roms=off"];
  const memory = spec.memory ?? { kind: "anonymous" };
  const backendId = memory.kind === "file" ? (memory.backendId ?? "mem") : "";
  if (memory.kind === "file") machine.push(`memory-backend=${backendId}`);
  push("-M", machine.join(","));
  if (spec.accel === "kvm") push("-accel", "kvm", "-cpu", "host");
  else push("-accel", "tcg", "-cpu", "max");
  push("-m", `${spec.memoryMiB}M`, "-smp", String(spec.vcpus));
  if (memory.kind === "file") {
    push(
      "-object",
      `memory-backend-file,id=${backendId},size=${spec.memoryMiB}M,mem-path=${opt(memory.path)},share=${onOff(memory.share)}`,
    );
  }
  push("-no-reboot");

  if (spec.kernelPath !== undefined) {
    push("-kernel", spec.kernelPath);
    if (spec.initramfsPath !== undefined) push("-initrd", spec.initramfsPath);
    push("-append", kernelCommandLine(spec));
  }

  // Serial console on QEMU's stdout, which the host reads from a pipe.
  push("-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con");
  // QMP: QEMU connects to the host's listening socket.
  push(
    "-chardev",
    `socket,id=qmp,${socketTarget(spec.qmpFd, spec.qmpSocketPath)}`,
    "-mon",
    "chardev=qmp,mode=control",
  );

  // Devices, fixed ones first (see the module comment).
  push("-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-device,rng=rng0,id=rng");
  if (spec.agentSocketPath !== undefined || spec.agentFd !== undefined) {
    push(
      "-device",
      "virtio-serial-device,id=vser0",
      "-chardev",
      `socket,id=agent,${socketTarget(spec.agentFd, spec.agentSocketPath)}`,
      "-device",
      `virtserialport,bus=vser0.0,chardev=agent,name=${AGENT_PORT_NAME},id=agent0`,
    );
    if (spec.mountSocketPath !== undefined || spec.mountFd !== undefined) {
      push(
        "-chardev",
        `socket,id=mounts,${socketTarget(spec.mountFd, spec.mountSocketPath)}`,
        "-device",
        `virtserialport,bus=vser0.0,chardev=mounts,name=${MOUNTS_PORT_NAME},id=mounts0`,
      );
    }
  }
  for (const [index, disk] of (spec.disks ?? []).entries()) {
    const name = disk.name ?? `disk${index}`;
    const readOnly = disk.readOnly === true;
    const chain = disk.backing ?? [];
    // The backing chain bottom up, each node naming the one below it.
    for (let i = chain.length - 1; i >= 0; i--) {
      const entry = chain[i]!;
      const node = `${name}-b${i}`;
      push("-blockdev", `driver=file,node-name=${node}-file,filename=${opt(entry.path)},read-only=on`);
      const below =
        i + 1 < chain.length
          ? [`backing=${name}-b${i + 1}`]
          : entry.format === "qcow2"
            ? ["backing=null"]
            : [];
      push(
        "-blockdev",
        [`driver=${entry.format}`, `node-name=${node}`, `file=${node}-file`, "read-only=on", ...below].join(
          ",",
        ),
      );
    }
    const blockdev = [
      `node-name=${name}`,
      `driver=${disk.format}`,
      `read-only=${onOff(readOnly)}`,
      ...(readOnly ? [] : ["discard=unmap"]),
      "file.driver=file",
      `file.filename=${opt(disk.path)}`,
      ...(disk.backing === undefined || disk.format !== "qcow2"
        ? []
        : [chain.length > 0 ? `backing=${name}-b0` : "backing=null"]),
    ];
    push("-blockdev", blockdev.join(","));
    push("-device", `virtio-blk-device,drive=${name},id=blk-${name},serial=${name}`);
  }
  if (spec.network !== undefined) {
    const netdev = ["user", "id=n0"];
    if (spec.network.restrict === true) netdev.push("restrict=on");
    for (const fwd of spec.network.hostForwards ?? []) {
      netdev.push(
        `hostfwd=${fwd.protocol ?? "tcp"}:${fwd.hostAddress ?? "127.0.0.1"}:${fwd.hostPort}-:${fwd.guestPort}`,
      );
    }
    push("-netdev", netdev.join(","));
    const device = ["virtio-net-device", "netdev=n0", "id=net0"];
    if (spec.network.mac !== undefined) device.push(`mac=${spec.network.mac.toLowerCase()}`);
    push("-device", device.join(","));
  }

  if (spec.incoming !== undefined) push("-incoming", spec.incoming);
  if (spec.paused === true) push("-S");
  push(...(spec.extraArgs ?? []));
  return args;
}

function validate(spec: MachineSpec): void {
  if (spec.accel !== "kvm" && spec.accel !== "tcg")
    throw invalid(`unknown accelerator ${String(spec.accel)}`);
  if (!Number.isSafeInteger(spec.memoryMiB) || spec.memoryMiB < 16) {
    throw invalid(`memoryMiB must be an integer >= 16, got ${spec.memoryMiB}`);
  }
  if (!Number.isSafeInteger(spec.vcpus) || spec.vcpus < 1 || spec.vcpus > 255) {
    throw invalid(`vcpus must be an integer from 1 to 255, got ${spec.vcpus}`);
  }
  if (
    spec.kernelPath === undefined &&
    (spec.initramfsPath !== undefined || (spec.kernelArgs?.length ?? 0) > 0)
  ) {
    throw invalid("initramfsPath and kernelArgs need a kernelPath");
  }
  const names = new Set<string>();
  for (const [index, disk] of (spec.disks ?? []).entries()) {
    const name = disk.name ?? `disk${index}`;
    if (!DISK_NAME.test(name)) throw invalid(`disk name ${JSON.stringify(name)} must match ${DISK_NAME}`);
    if (names.has(name)) throw invalid(`two disks are named ${JSON.stringify(name)}`);
    names.add(name);
    if (disk.format !== "raw" && disk.format !== "qcow2")
      throw invalid(`disk ${name}: unknown format ${disk.format}`);
    if (disk.path === "") throw invalid(`disk ${name}: empty path`);
    for (const entry of disk.backing ?? []) {
      if (entry.format !== "raw" && entry.format !== "qcow2")
        throw invalid(`disk ${name}: unknown backing format ${entry.format}`);
      if (entry.path === "") throw invalid(`disk ${name}: empty backing path`);
    }
  }
  if (spec.network?.mac !== undefined && !MAC.test(spec.network.mac)) {
    throw invalid(`network.mac ${JSON.stringify(spec.network.mac)} is not a MAC address`);
  }
  for (const fwd of spec.network?.hostForwards ?? []) {
    if (!isPort(fwd.hostPort) || !isPort(fwd.guestPort)) {
      throw invalid(`host forward ${fwd.hostPort}->${fwd.guestPort}: ports must be 1-65535`);
    }
    if (fwd.hostAddress !== undefined && !/^[0-9a-fA-F.:]+$/.test(fwd.hostAddress)) {
      throw invalid(`host forward address ${JSON.stringify(fwd.hostAddress)} must be a numeric IP address`);
    }
  }
  if (spec.incoming !== undefined && spec.incoming !== "defer") {
    throw invalid(`unknown incoming migration ${JSON.stringify(spec.incoming)}`);
  }
  if (
    spec.memory?.kind === "file" &&
    spec.memory.backendId !== undefined &&
    !/^[a-z][a-z0-9._-]*$/.test(spec.memory.backendId)
  ) {
    throw invalid(
      `memory backend id ${JSON.stringify(spec.memory.backendId)} must match /^[a-z][a-z0-9._-]*$/`,
    );
  }
  if (spec.sandbox !== undefined && !["strict", "allow-spawn", "off"].includes(spec.sandbox)) {
    throw invalid(`unknown sandbox mode ${spec.sandbox}`);
  }
  for (const { fd, set } of spec.addFds ?? []) {
    if (!Number.isSafeInteger(fd) || fd < 3 || !Number.isSafeInteger(set) || set < 0) {
      throw invalid(`add-fd ${fd}/${set}: fd must be an inherited descriptor >= 3 and set a number`);
    }
  }
  if ((spec.qmpFd === undefined) === (spec.qmpSocketPath === undefined)) {
    throw invalid("give QMP either a socket path or an inherited descriptor (qmpSocketPath or qmpFd)");
  }
  for (const fd of [spec.qmpFd, spec.agentFd, spec.mountFd]) {
    if (fd !== undefined && (!Number.isSafeInteger(fd) || fd < 3))
      throw invalid(`socket fd ${fd} must be >= 3`);
  }
  const hasMounts = spec.mountSocketPath !== undefined || spec.mountFd !== undefined;
  if (hasMounts && spec.agentSocketPath === undefined && spec.agentFd === undefined) {
    throw invalid("the mounts port needs the agent's: it sits on the agent's virtio-serial device");
  }
  for (const path of [
    spec.qmpSocketPath,
    spec.agentSocketPath,
    spec.mountSocketPath,
    spec.kernelPath,
    spec.initramfsPath,
  ]) {
    if (path !== undefined && (path === "" || path.includes("\0")))
      throw invalid(`invalid path ${JSON.stringify(path)}`);
  }
}

/** A socket chardev's target: an inherited connected descriptor, or a path the host listens on. */
function socketTarget(fd: number | undefined, path: string | undefined): string {
  return fd !== undefined ? `fd=${fd}` : `path=${opt(path ?? "")},server=off`;
}

function isPort(port: number): boolean {
  return Number.isSafeInteger(port) && port >= 1 && port <= 65535;
}

/** Escape a value for QEMU's `key=value,...` option syntax: a comma is written as two. */
function opt(value: string): string {
  return value.replaceAll(",", ",,");
}

function onOff(value: boolean): "on" | "off" {
  return value ? "on" : "off";
}

function invalid(message: string): SupermachineError {
  return new SupermachineError("INVALID_ARGUMENT", message);
}
