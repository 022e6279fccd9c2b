/**
 * Cold boot: QEMU starts the guest kernel with our init, which mounts the root filesystem (through
 * a per-VM qcow2 overlay) and answers the agent handshake.
 */

import { join } from "node:path";
import { SupermachineError } from "../errors.ts";
import { throwIfAborted } from "../internal/index.ts";
import { EMPTY_IMAGE_CONFIG } from "../oci/index.ts";
import { resolveRootfs } from "../rootfs/index.ts";
import type { ImageIdentity } from "../snapshot/index.ts";
import {
  type Accelerator,
  createBootOverlay,
  type GuestMemory,
  hostAccelerator,
  hostTscKHz,
  kernelCommandLine,
  type LaunchMachineSpec,
  QemuProcess,
  resolveAssetPaths,
} from "../vmm/index.ts";
import { DEFAULT_PATH } from "./exec.ts";
import { configureGuestNetwork, NET_KERNEL_ARG } from "./guest-network.ts";
import { checkHostname, guestIdentity } from "./identity.ts";
import { prepareNetwork } from "./network-launch.ts";
import { DEFAULT_BOOT_TIMEOUT_MS, DEFAULT_MEMORY_MIB, DEFAULT_VCPUS, type VmConfig } from "./vm-config.ts";
import { connectAgent, endFailedStart, type VmParts } from "./vm-parts.ts";

/** Kernel arguments of every VM, before `VmConfig.kernelArgs`. */
const BOOT_KERNEL_ARGS = ["quiet", "sm.root=/dev/vda", "sm.rootfstype=ext4"];

/**
 * The kernel command line a boot with `accel` starts from (without the host's TSC rate and the
 * per-VM arguments): what a baked snapshot depends on, so part of its cache key.
 */
export function bootCommandLine(accel: Accelerator): string {
  return kernelCommandLine({ accel, kernelArgs: BOOT_KERNEL_ARGS });
}

/** How a boot differs from a plain `Vm.start`. */
export interface BootOptions {
  /** The image the root filesystem belongs to (recorded by snapshots of the VM). */
  image?: ImageIdentity | undefined;
  /**
   * For baking: guest RAM in this file (`share=on`, so the file IS the RAM) and the root disk
   * overlay at `overlayPath`, kept after the VM ends.
   */
  bake?: { memoryPath: string; overlayPath: string } | undefined;
}

/** The image identity of a root filesystem booted without an image. */
export function plainRootfsIdentity(): ImageIdentity {
  return {
    reference: "",
    digest: "",
    platform: `linux/${process.arch === "x64" ? "amd64" : process.arch}`,
    config: EMPTY_IMAGE_CONFIG,
  };
}

/** Boots `config.rootfs` and waits for the agent. */
export async function bootVm(config: VmConfig, options: BootOptions = {}): Promise<VmParts> {
  const started = performance.now();
  const signal = config.signal;
  validateConfig(config);
  throwIfAborted(signal, "VM start");
  const [choice, assets, rootfs] = await Promise.all([
    hostAccelerator(),
    resolveAssetPaths(config.assets),
    resolveRootfs(config.rootfs, { signal }),
  ]);
  const rootfsMs = performance.now() - started;
  throwIfAborted(signal, "VM start");
  const network = await prepareNetwork(config.network ?? "none", { what: "VmConfig.network", assets });
  throwIfAborted(signal, "VM start");

  const memory: GuestMemory =
    options.bake === undefined
      ? { kind: "anonymous" }
      : { kind: "file", path: options.bake.memoryPath, share: true };
  const machine: LaunchMachineSpec = {
    accel: choice.accel,
    memoryMiB: config.memoryMiB ?? DEFAULT_MEMORY_MIB,
    vcpus: config.vcpus ?? DEFAULT_VCPUS,
    kernelPath: assets.kernel,
    initramfsPath: assets.initramfs,
    kernelArgs: [
      ...BOOT_KERNEL_ARGS,
      ...(network.device ? [NET_KERNEL_ARG] : []),
      ...(config.kernelArgs ?? []),
    ],
    memory,
    ...(network.machine === undefined ? {} : { network: network.machine }),
  };
  if (choice.accel === "tcg") {
    const tscKHz = hostTscKHz();
    if (tscKHz !== undefined) machine.tscKHz = tscKHz;
  }
  let overlayPath = options.bake?.overlayPath ?? "";
  const qemu = await QemuProcess.launch({
    machine,
    prepare: async (_stateDir, { diskDir }) => {
      overlayPath = options.bake?.overlayPath ?? join(diskDir, "rootfs.qcow2");
      await createBootOverlay(rootfs.imagePath, overlayPath, signal);
      const disks = [
        {
          name: "root",
          path: overlayPath,
          format: "qcow2" as const,
          backing: [{ path: rootfs.imagePath, format: "raw" as const }],
        },
      ];
      machine.disks = disks;
      return { disks };
    },
    ...(network.relay === undefined ? {} : { netRelay: network.relay }),
    ...(signal === undefined ? {} : { signal }),
  });
  const spawnMs = performance.now() - started;
  try {
    const timeoutMs = config.bootTimeoutMs ?? DEFAULT_BOOT_TIMEOUT_MS;
    const agent = await connectAgent(
      qemu,
      timeoutMs,
      signal,
      "boot",
      guestIdentity(qemu.id, config.hostname),
    );
    await configureGuestNetwork(agent, {
      from: undefined,
      to: network.kind,
      device: network.device,
      hosts: network.hosts,
      timeoutMs,
      signal,
    });
    const agentReadyMs = performance.now() - started;
    return {
      qemu,
      agent,
      accelerator: choice.accel,
      defaults: {
        env: { PATH: DEFAULT_PATH, ...config.env },
        cwd: config.cwd ?? "/",
        user: config.user ?? "root",
      },
      timings: { kind: "boot", rootfsMs, spawnMs, agentReadyMs, totalMs: performance.now() - started },
      machine,
      overlayPath,
      image: options.image ?? plainRootfsIdentity(),
      source: undefined,
      network: { device: network.device, policy: network.policy },
    };
  } catch (error) {
    throw await endFailedStart(qemu, error);
  }
}

function validateConfig(config: VmConfig): void {
  if (typeof config.rootfs !== "string" || config.rootfs === "") {
    throw new SupermachineError("INVALID_ARGUMENT", "VmConfig.rootfs must name an image file or a directory");
  }
  const positiveInt = (value: number | undefined, name: string, max: number) => {
    if (value !== undefined && (!Number.isSafeInteger(value) || value < 1 || value > max)) {
      throw new SupermachineError("INVALID_ARGUMENT", `VmConfig.${name} must be an integer from 1 to ${max}`);
    }
  };
  positiveInt(config.memoryMiB, "memoryMiB", 1024 * 1024);
  positiveInt(config.vcpus, "vcpus", 255);
  positiveInt(config.bootTimeoutMs, "bootTimeoutMs", 24 * 3600 * 1000);
  checkHostname(config.hostname, "VmConfig.hostname");
}
