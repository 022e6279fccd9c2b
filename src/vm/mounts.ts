/**
 * Live host directories in a VM (docs/mounts.md): a 9P2000.L server of our own (src/ninep) per
 * mount, carried over the guest's `sm.mounts` port (src/agent's MountChannel) and mounted by the
 * guest kernel. Mounts are attached at start, at restore, or at run time, and never captured by a
 * snapshot (they are detached while one is taken).
 */

import { stat } from "node:fs/promises";
import { resolve } from "node:path";
import { MountChannel, type MountHandle } from "../agent/index.ts";
import { SupermachineError } from "../errors.ts";
import {
  type MountOwner,
  type NinepServer,
  SYMLINK_POLICIES,
  type SymlinkPolicy,
  serve9p,
} from "../ninep/index.ts";
import type { QemuProcess } from "../vmm/index.ts";

/** A host directory to mount in the guest. */
export interface MountSpec {
  /** The host directory (must exist). */
  hostPath: string;
  /** Where the guest sees it (absolute; created if missing). */
  guestPath: string;
  /** Every write, create, rename, chmod, truncate and xattr set fails with `EROFS`. Default false. */
  readOnly?: boolean;
  /**
   * `"opaque"` (default): the guest may create symlinks, stored verbatim, never followed by the
   * host; existing symlinks that leave the mount root are refused. `"deny"`: the guest cannot
   * create symlinks either (`EPERM`). `"follow"`: symlinks are followed wherever they point —
   * trusted, single-tenant use only.
   */
  symlinks?: SymlinkPolicy;
  /**
   * Owner of the files the guest creates, when this process runs as root. Default: the owner of
   * `hostPath` (a writable mount of a root-owned directory needs `{ uid: 0, gid: 0 }` said
   * explicitly). Ignored otherwise: files belong to this process's user.
   */
  owner?: MountOwner;
}

/** A mount attached to a VM. */
export interface VmMount {
  readonly hostPath: string;
  readonly guestPath: string;
  readonly readOnly: boolean;
  readonly symlinks: SymlinkPolicy;
}

function invalid(message: string): SupermachineError {
  return new SupermachineError("INVALID_ARGUMENT", message);
}

/** Checks a mount spec (typed `INVALID_ARGUMENT`, naming the field) and returns a normalised copy. */
export async function checkMountSpec(
  spec: MountSpec,
): Promise<Required<Omit<MountSpec, "owner">> & Pick<MountSpec, "owner">> {
  if (typeof spec?.hostPath !== "string" || spec.hostPath === "")
    throw invalid("mount hostPath must be a directory path");
  if (
    typeof spec.guestPath !== "string" ||
    !spec.guestPath.startsWith("/") ||
    spec.guestPath.includes("\0")
  ) {
    throw invalid(`mount guestPath ${JSON.stringify(spec.guestPath)} must be an absolute path`);
  }
  if (spec.guestPath === "/" || spec.guestPath.split("/").includes("..")) {
    throw invalid(
      `mount guestPath ${JSON.stringify(spec.guestPath)} must name a directory below / without ".."`,
    );
  }
  const symlinks = spec.symlinks ?? "opaque";
  if (!(SYMLINK_POLICIES as readonly string[]).includes(symlinks)) {
    throw invalid(
      `mount symlinks must be one of ${SYMLINK_POLICIES.join(", ")}, got ${JSON.stringify(symlinks)}`,
    );
  }
  const hostPath = resolve(spec.hostPath);
  const info = await stat(hostPath).catch(() => undefined);
  if (!info?.isDirectory()) throw invalid(`mount hostPath ${hostPath} is not a directory`);
  return {
    hostPath,
    guestPath: spec.guestPath.replace(/\/+$/, ""),
    readOnly: spec.readOnly === true,
    symlinks,
    ...(spec.owner === undefined ? {} : { owner: spec.owner }),
  };
}

/** The mounts of one running VM, over one mounts channel opened on first use. */
export class VmMounts {
  readonly #qemu: QemuProcess;
  #channel: Promise<MountChannel> | undefined;
  readonly #mounts = new Map<string, { view: VmMount; spec: MountSpec; handle: MountHandle<NinepServer> }>();

  constructor(qemu: QemuProcess) {
    this.#qemu = qemu;
  }

  /** What is mounted now. */
  get list(): VmMount[] {
    return [...this.#mounts.values()].map((m) => m.view);
  }

  #open(): Promise<MountChannel> {
    this.#channel ??= this.#qemu.mountSocket.then((socket) => MountChannel.connect(socket));
    const channel = this.#channel;
    channel.catch(() => {
      if (this.#channel === channel) this.#channel = undefined;
    });
    return channel;
  }

  /** Mounts `spec`; rejects with `INVALID_ARGUMENT` for a bad spec or a guest path in use, `GuestIoError` when the guest cannot mount it. */
  async mount(spec: MountSpec, options: { signal?: AbortSignal; timeoutMs?: number } = {}): Promise<VmMount> {
    const m = await checkMountSpec(spec);
    if (this.#mounts.has(m.guestPath))
      throw invalid(`${m.guestPath} is already a mount point of this VM: unmount it first`);
    const channel = await this.#open();
    const handle = await channel.mount({
      guestPath: m.guestPath,
      readOnly: m.readOnly,
      ...(options.signal === undefined ? {} : { signal: options.signal }),
      ...(options.timeoutMs === undefined ? {} : { timeoutMs: options.timeoutMs }),
      serve: (stream, { guestPath, msizeBytes }) =>
        serve9p(stream, {
          root: m.hostPath,
          label: guestPath,
          maxMsize: msizeBytes,
          readOnly: m.readOnly,
          symlinks: m.symlinks,
          ...(m.owner === undefined ? {} : { owner: m.owner }),
        }),
    });
    const view: VmMount = {
      hostPath: m.hostPath,
      guestPath: m.guestPath,
      readOnly: m.readOnly,
      symlinks: m.symlinks,
    };
    this.#mounts.set(m.guestPath, { view, spec, handle });
    void handle.closed.then(() => {
      if (this.#mounts.get(m.guestPath)?.handle === handle) this.#mounts.delete(m.guestPath);
    });
    return view;
  }

  /** Unmounts the mount at `guestPath` (lazily in the guest: open files keep it until closed). */
  async unmount(guestPath: string): Promise<void> {
    const entry = this.#mounts.get(guestPath.replace(/\/+$/, ""));
    if (entry === undefined) throw invalid(`${guestPath} is not a mount point of this VM`);
    this.#mounts.delete(entry.view.guestPath);
    await entry.handle.unmount();
  }

  /** Unmounts everything (before a snapshot); returns the specs, to mount again after. */
  async detachAll(): Promise<MountSpec[]> {
    const specs = [...this.#mounts.values()].map((m) => m.spec);
    const handles = [...this.#mounts.values()].map((m) => m.handle);
    this.#mounts.clear();
    await Promise.all(handles.map((h) => h.unmount()));
    return specs;
  }

  /** Ends every mount's host side (the VM is going). */
  close(): void {
    this.#mounts.clear();
    void this.#channel?.then((channel) => channel.close()).catch(() => {});
  }
}
