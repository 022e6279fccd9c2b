import type { AssetPaths } from "../vmm/index.ts";
import type { MountSpec } from "./mounts.ts";
import type { NetworkPolicy } from "./network-policy.ts";

/** What a user asks of a VM. The live state of a running VM is {@link Vm}. */
export interface VmConfig {
  /**
   * The root filesystem: an ext4 image file, or a directory tree that supermachine makes into an
   * image (cached by the tree's contents, like podman's `--rootfs`). The VM never writes to it: its
   * writes go to a per-VM overlay that disappears with the VM.
   */
  rootfs: string;
  /** Guest RAM in MiB. Default 512. */
  memoryMiB?: number;
  /** Number of vCPUs. Default 1. */
  vcpus?: number;
  /** Guest kernel and initramfs. Default: found by `resolveAssetPaths()`. */
  assets?: Partial<AssetPaths>;
  /** Environment of every exec (merged over `PATH` and the image's env). */
  env?: Record<string, string>;
  /** Working directory of every exec. Default `/` (or the image's). */
  cwd?: string;
  /** User of every exec: `name`, `uid`, `name:group` or `uid:gid`. Default `root` (or the image's). */
  user?: string;
  /** Time allowed from QEMU's start to the guest agent's answer. Default 60 000 ms. */
  bootTimeoutMs?: number;
  /** Extra kernel command-line arguments. */
  kernelArgs?: readonly string[];
  /** Host directories mounted once the VM runs (docs/mounts.md). */
  mounts?: readonly MountSpec[];
  /**
   * What the VM may reach on the network (docs/network.md). Default `"none"`: no network device at
   * all (the VM's own services stay reachable from the host through `vm.connect`/`vm.exposeTcp`).
   * `"outbound"`: TCP, UDP and DNS to wherever the host reaches, the host's own loopback included
   * (at 10.0.2.2). `{ allow: ["10.1.2.0/24:443", "example.org:443", "host:8080"] }`: those TCP
   * destinations only, enforced on the host.
   */
  network?: NetworkPolicy;
  /**
   * The guest's hostname (also in `/etc/hostname` and `/etc/hosts`). Default: the VM's id, as
   * docker names a container after its id. Every VM also gets an `/etc/machine-id` of its own.
   */
  hostname?: string;
  /** Cancels the start. */
  signal?: AbortSignal;
}

/**
 * Per-phase timings of a VM's start, in milliseconds since the start was asked for: `Vm.start`
 * (`kind: "boot"`), `Vm.restore`/`image.start()` of a snapshot (`"restore"`), or
 * `PrestartedVm.activate()` (`"prestarted"`: QEMU was already running, so `rootfsMs` and `spawnMs`
 * are 0 and `prestartMs` says what the prestart took).
 */
export interface VmTimings {
  /** How the VM came to be. */
  readonly kind: "boot" | "restore" | "prestarted";
  /** Root filesystem ready (image found or built, overlay created). */
  readonly rootfsMs: number;
  /** QEMU started and its QMP connection ready. */
  readonly spawnMs: number;
  /** Restores only: the snapshot's state loaded into QEMU and the vCPUs running. */
  readonly stateLoadedMs?: number;
  /** The guest agent answered the handshake. */
  readonly agentReadyMs: number;
  /** Everything, until the start resolved. */
  readonly totalMs: number;
  /** Prestarted VMs only: how long starting QEMU ahead of time took (not part of `totalMs`). */
  readonly prestartMs?: number;
}

/** What `Vm.restore` and `image.start()` of a snapshot accept: exec defaults and limits (the machine is the snapshot's). */
export interface RestoreConfig {
  /** Must equal the snapshot's if given. */
  memoryMiB?: number;
  /** Must equal the snapshot's if given. */
  vcpus?: number;
  /** Environment of every exec (merged over the snapshot's). */
  env?: Record<string, string>;
  cwd?: string;
  user?: string;
  /** Time allowed from the state load to the agent's answer. Default 60 000 ms. */
  bootTimeoutMs?: number;
  /** Host directories mounted once the clone runs (a snapshot never holds a mount). */
  mounts?: readonly MountSpec[];
  /**
   * The network policy of the restored VM (docs/network.md). Default: the one the snapshot was
   * made under. A snapshot made without a network device restores only with `"none"` (bake it
   * with `Image.builder(ref).network("outbound")` or an allow-list to restore it with a network).
   */
  network?: NetworkPolicy;
  /**
   * The clone's hostname. Default: its VM id. Each clone also gets an `/etc/machine-id` of its own,
   * written before any of the snapshot's processes runs again.
   */
  hostname?: string;
  signal?: AbortSignal;
}

/** What `Vm.prestart` accepts. */
export interface PrestartConfig extends RestoreConfig {
  /**
   * Default true: restore, warm up and pause now, so `activate()` only resumes the guest and
   * starts a new agent session. False: only start QEMU; `activate()` loads the state.
   */
  warm?: boolean;
}

export const DEFAULT_MEMORY_MIB = 512;
export const DEFAULT_VCPUS = 1;
export const DEFAULT_BOOT_TIMEOUT_MS = 60_000;
