/**
 * Restoring a VM from a snapshot (docs/snapshots.md): a QEMU of its own maps the snapshot's memory
 * copy-on-write, gets a fresh disk overlay on the snapshot's disk state, loads the device state
 * with its vCPUs stopped, and runs only once the new agent session (new epoch, the host's time,
 * fresh entropy) is on its way. Also the parts of pre-started VMs: QEMU started (and by default
 * restored, warmed and paused) ahead of time.
 */

import { join } from "node:path";
import type { AgentClient, GuestIdentity } from "../agent/index.ts";
import { SupermachineError } from "../errors.ts";
import { throwIfAborted } from "../internal/index.ts";
import type { Snapshot } from "../snapshot/index.ts";
import { type LaunchMachineSpec, QemuProcess } from "../vmm/index.ts";
import { DEFAULT_PATH } from "./exec.ts";
import { configureGuestNetwork } from "./guest-network.ts";
import { checkHostname, guestIdentity, newMachineId } from "./identity.ts";
import { type NetworkLaunch, prepareNetwork } from "./network-launch.ts";
import { networkKind } from "./network-policy.ts";
import { DEFAULT_BOOT_TIMEOUT_MS, type RestoreConfig, type VmTimings } from "./vm-config.ts";
import { connectAgent, endFailedStart, type VmParts } from "./vm-parts.ts";

/** A QEMU started for a snapshot, waiting (`-incoming defer`, vCPUs stopped) for its state. */
export interface LaunchedRestore {
  snapshot: Snapshot;
  qemu: QemuProcess;
  machine: LaunchMachineSpec;
  overlayPath: string;
  rootfsMs: number;
  spawnMs: number;
  network: NetworkLaunch;
  /** The clone's `/etc/machine-id`, given with each of its sessions. */
  machineId: string;
}

/**
 * The machine a snapshot restores into: the baked machine (same devices, memory, kernel and
 * arguments) with its RAM file mapped copy-on-write. The caller adds the disks. A snapshot with a
 * network device gets QEMU's user-mode network, cut off (`restrict=on`) unless `network` says
 * otherwise.
 */
export function restoreMachineSpec(
  snapshot: Snapshot,
  network: LaunchMachineSpec["network"] = { restrict: true },
): LaunchMachineSpec {
  const m = snapshot.manifest;
  const machine: LaunchMachineSpec = {
    accel: m.accelerator,
    memoryMiB: m.memoryMiB,
    vcpus: m.vcpus,
    kernelPath: snapshot.assets.kernel,
    initramfsPath: snapshot.assets.initramfs,
    kernelArgs: m.kernelArgs,
    memory: {
      kind: "file",
      path: snapshot.memoryPath,
      share: false,
      ...(m.memoryBackendId === undefined ? {} : { backendId: m.memoryBackendId }),
    },
  };
  if (m.tscKHz !== undefined) machine.tscKHz = m.tscKHz;
  if (m.network.device) machine.network = network;
  return machine;
}

/**
 * The network a restore of `snapshot` gets: `requested`, else the snapshot's own policy. A
 * snapshot without a network device restores only with `"none"` (`INVALID_ARGUMENT` saying how
 * to bake one with a device otherwise).
 */
export async function restoreNetwork(
  snapshot: Snapshot,
  requested: RestoreConfig["network"],
): Promise<NetworkLaunch> {
  const m = snapshot.manifest;
  const policy = requested ?? m.network.policy;
  if (!m.network.device && networkKind(policy) !== "none") {
    throw new SupermachineError(
      "INVALID_ARGUMENT",
      `snapshot ${snapshot.name} was made without a network device, so it cannot restore with network ` +
        `${JSON.stringify(policy)}: bake it with one (Image.builder(ref).network("outbound") or an allow-list, ` +
        `or VmConfig.network before vm.snapshot()), or restore it with network "none"`,
    );
  }
  return prepareNetwork(policy, {
    what: "RestoreConfig.network",
    device: m.network.device,
    assets: snapshot.assets,
  });
}

/** Starts QEMU for `snapshot`, waiting for its state. */
export async function launchRestore(snapshot: Snapshot, config: RestoreConfig): Promise<LaunchedRestore> {
  const started = performance.now();
  const m = snapshot.manifest;
  if (config.memoryMiB !== undefined && config.memoryMiB !== m.memoryMiB) {
    throw new SupermachineError(
      "INVALID_ARGUMENT",
      `snapshot ${snapshot.name} has ${m.memoryMiB} MiB of guest RAM; a restore cannot change it (asked for ${config.memoryMiB})`,
    );
  }
  if (config.vcpus !== undefined && config.vcpus !== m.vcpus) {
    throw new SupermachineError(
      "INVALID_ARGUMENT",
      `snapshot ${snapshot.name} has ${m.vcpus} vCPUs; a restore cannot change it (asked for ${config.vcpus})`,
    );
  }
  checkHostname(config.hostname, "RestoreConfig.hostname");
  const signal = config.signal;
  throwIfAborted(signal, "VM restore");
  const network = await restoreNetwork(snapshot, config.network);
  throwIfAborted(signal, "VM restore");
  const machine = restoreMachineSpec(snapshot, network.machine);
  let overlayPath = "";
  let rootfsMs = 0;
  const qemu = await QemuProcess.launch({
    machine,
    incomingStatePath: snapshot.statePath,
    prepare: async (_stateDir, { diskDir }) => {
      overlayPath = join(diskDir, "rootfs.qcow2");
      await snapshot.createOverlay(overlayPath);
      rootfsMs = performance.now() - started;
      const disks = [
        {
          name: "root",
          path: overlayPath,
          format: "qcow2" as const,
          backing: [
            { path: snapshot.diskPath, format: "qcow2" as const },
            ...snapshot.manifest.files.disk.backingChain.map(({ path, format }) => ({ path, format })),
          ],
        },
      ];
      machine.disks = disks;
      return { disks };
    },
    ...(network.relay === undefined ? {} : { netRelay: network.relay }),
    ...(signal === undefined ? {} : { signal }),
  });
  return {
    snapshot,
    qemu,
    machine,
    overlayPath,
    rootfsMs,
    spawnMs: performance.now() - started,
    network,
    machineId: newMachineId(),
  };
}

/**
 * Loads the state into a launched QEMU and opens a new agent session whose `HELLO` is written
 * before the vCPUs run, so the agent steps the clock and reseeds the RNG first thing.
 */
export async function activateRestore(
  launched: LaunchedRestore,
  config: RestoreConfig,
  started: number,
  prestartMs?: number,
): Promise<VmParts> {
  const { qemu } = launched;
  const signal = config.signal;
  const timeoutMs = config.bootTimeoutMs ?? DEFAULT_BOOT_TIMEOUT_MS;
  try {
    throwIfAborted(signal, "VM restore");
    const agent = await resumeWithSession(launched, config, timeoutMs, signal);
    await configureRestoredNetwork(launched, agent.client, timeoutMs, signal);
    const stateLoadedMs = agent.resumedMs - started;
    const agentReadyMs = performance.now() - started;
    return restoredParts(launched, agent.client, config, {
      kind: prestartMs === undefined ? "restore" : "prestarted",
      stateLoadedMs,
      agentReadyMs,
      started,
      prestartMs,
    });
  } catch (error) {
    throw await endFailedStart(qemu, error);
  }
}

/**
 * The guest's network files for the clone's policy: rewritten when it differs from the snapshot's,
 * and an allow-list's `/etc/hosts` block for the names resolved for this clone.
 */
async function configureRestoredNetwork(
  launched: LaunchedRestore,
  agent: AgentClient,
  timeoutMs: number,
  signal: AbortSignal | undefined,
): Promise<void> {
  const { network, snapshot } = launched;
  await configureGuestNetwork(agent, {
    from: networkKind(snapshot.manifest.network.policy),
    to: network.kind,
    device: network.device,
    hosts: network.hosts,
    timeoutMs,
    signal,
  });
}

/** Load the state, queue the new session's `HELLO`, then run the vCPUs; resolves once the agent answered. */
async function resumeWithSession(
  launched: LaunchedRestore,
  config: RestoreConfig,
  timeoutMs: number,
  signal: AbortSignal | undefined,
): Promise<{ client: AgentClient; resumedMs: number }> {
  const { qemu, snapshot } = launched;
  await qemu.loadState({
    ignoreShared: true,
    timeoutMs,
    what: `snapshot ${snapshot.dir}`,
    ...(signal === undefined ? {} : { signal }),
  });
  const session = connectAgent(qemu, timeoutMs, signal, "restore", cloneIdentity(launched, config));
  session.catch(() => {});
  // The HELLO is written as soon as the agent socket is known; it was connected at launch.
  await qemu.agentSocket;
  await qemu.resume();
  const resumedMs = performance.now();
  return { client: await session, resumedMs };
}

/**
 * Pre-warms a launched QEMU: restore it, run `true` once through a session (the emulator translates
 * the guest's exec paths and the pages it touches fault in), then pause the vCPUs. The agent
 * connection stays open and idle for the activation's new session. Kills QEMU on failure.
 */
export async function warmUp(launched: LaunchedRestore, config: RestoreConfig): Promise<AgentClient> {
  const { qemu, snapshot } = launched;
  const signal = config.signal;
  const timeoutMs = config.bootTimeoutMs ?? DEFAULT_BOOT_TIMEOUT_MS;
  let agent: AgentClient | undefined;
  try {
    throwIfAborted(signal, "VM prestart");
    agent = (await resumeWithSession(launched, config, timeoutMs, signal)).client;
    await configureRestoredNetwork(launched, agent, timeoutMs, signal);
    const m = snapshot.manifest;
    const channel = agent.exec({
      argv: ["true"],
      env: { PATH: DEFAULT_PATH, ...m.execDefaults.env, ...config.env },
      cwd: config.cwd ?? m.execDefaults.cwd,
      user: config.user ?? m.execDefaults.user,
      timeoutMs,
    });
    // An image without `true` still warms the fork/exec paths: only a dead channel counts.
    await Promise.race([channel.exited.catch(() => {}), qemu.exitedError("prestart")]);
    if (agent.closedError) throw agent.closedError;
    throwIfAborted(signal, "VM prestart");
    await qemu.pause();
    return agent;
  } catch (error) {
    agent?.close();
    throw await endFailedStart(qemu, error);
  }
}

/**
 * Activates a pre-warmed, paused VM: the new session's `HELLO` goes out with `cont` (the paused
 * guest reads it as soon as it runs), and resolves once the agent answered it.
 */
export async function activateWarm(
  launched: LaunchedRestore,
  agent: AgentClient,
  config: RestoreConfig,
  prestartMs: number,
): Promise<VmParts> {
  const { qemu } = launched;
  const signal = config.signal;
  const timeoutMs = config.bootTimeoutMs ?? DEFAULT_BOOT_TIMEOUT_MS;
  const started = performance.now();
  try {
    throwIfAborted(signal, "VM activation");
    const session = agent.rehello({
      timeoutMs,
      identity: cloneIdentity(launched, config),
      ...(signal === undefined ? {} : { signal }),
    });
    session.catch(() => {});
    const resumed = qemu.resume().then(() => performance.now() - started);
    const [stateLoadedMs] = await Promise.race([
      Promise.all([resumed, session]),
      qemu.exitedError("activation"),
    ]);
    const agentReadyMs = performance.now() - started;
    return restoredParts(launched, agent, config, {
      kind: "prestarted",
      stateLoadedMs,
      agentReadyMs,
      started,
      prestartMs,
    });
  } catch (error) {
    agent.close();
    throw await endFailedStart(qemu, error);
  }
}

/** The parts of a restored QEMU whose agent session is open. */
function restoredParts(
  launched: LaunchedRestore,
  agent: AgentClient,
  config: RestoreConfig,
  t: {
    kind: VmTimings["kind"];
    stateLoadedMs: number;
    agentReadyMs: number;
    started: number;
    prestartMs: number | undefined;
  },
): VmParts {
  const { snapshot, qemu } = launched;
  const m = snapshot.manifest;
  const timings: VmTimings = {
    kind: t.kind,
    rootfsMs: t.kind === "restore" ? launched.rootfsMs : 0,
    spawnMs: t.kind === "restore" ? launched.spawnMs : 0,
    stateLoadedMs: t.stateLoadedMs,
    agentReadyMs: t.agentReadyMs,
    totalMs: performance.now() - t.started,
    ...(t.prestartMs === undefined ? {} : { prestartMs: t.prestartMs }),
  };
  return {
    qemu,
    agent,
    accelerator: m.accelerator,
    defaults: {
      env: { PATH: DEFAULT_PATH, ...m.execDefaults.env, ...config.env },
      cwd: config.cwd ?? m.execDefaults.cwd,
      user: config.user ?? m.execDefaults.user,
    },
    timings,
    machine: launched.machine,
    overlayPath: launched.overlayPath,
    image: { reference: m.reference, digest: m.imageDigest, platform: m.platform, config: m.imageConfig },
    source: snapshot,
    network: { device: launched.network.device, policy: launched.network.policy },
  };
}

/** The names a clone's sessions give its guest: its hostname (default its id) and machine id. */
function cloneIdentity(launched: LaunchedRestore, config: RestoreConfig): GuestIdentity {
  return guestIdentity(launched.qemu.id, config.hostname, launched.machineId);
}
