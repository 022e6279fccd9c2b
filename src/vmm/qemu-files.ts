/**
 * The files a QEMU reads and writes, opened by the host and handed down as descriptors, so that a
 * QEMU running as another (unprivileged) user needs no path to the data dir: disks and their
 * backing chains as fdsets (`-add-fd` + `/dev/fdset/N`: QEMU uses the descriptor as it is), the
 * kernel, initramfs and guest memory through `/proc/self/fd/N` (QEMU 7.2 opens those itself; the
 * file's own permissions still apply, see {@link grantMemoryFile}).
 */

import { closeSync, constants, openSync } from "node:fs";
import { chmod, chown, open, stat } from "node:fs/promises";
import type { QemuIdentity } from "./confinement.ts";
import type { DiskSpec, GuestMemory, MachineSpec } from "./qemu-args.ts";

/** The descriptor QEMU reads an incoming state from, when there is one: the first after stdio. */
export const FIRST_FD = 3;

/** Files opened for one QEMU, and the machine spec rewritten to use them. */
export interface QemuFiles<M extends Partial<MachineSpec>> {
  /** Descriptors in the order QEMU inherits them: `fds[i]` is QEMU's fd `FIRST_FD + i`. */
  fds: number[];
  machine: M;
  addFds: { fd: number; set: number }[];
  /** Closes the host's copies (after QEMU started). Idempotent. */
  close(): void;
}

/**
 * Opens what `machine` names (and the incoming state, which becomes fd {@link FIRST_FD}) and
 * returns the spec with `/dev/fdset/N` and `/proc/self/fd/N` in place of the paths. The opens and
 * closes are synchronous: a handful of local files per VM start, each a short system call, where
 * a request through the thread pool would cost more than the call.
 */
export async function openQemuFiles<M extends Partial<MachineSpec>>(
  machine: M,
  incomingStatePath: string | undefined,
): Promise<QemuFiles<M>> {
  const fds: number[] = [];
  const addFds: { fd: number; set: number }[] = [];
  const close = () => {
    for (const fd of fds.splice(0)) {
      try {
        closeSync(fd);
      } catch {
        // Our own descriptor of a local file: nothing to do if the kernel reports an error on it.
      }
    }
  };
  const add = (path: string, flags: number): number => {
    fds.push(openSync(path, flags));
    return FIRST_FD + fds.length - 1;
  };
  try {
    if (incomingStatePath !== undefined) add(incomingStatePath, constants.O_RDONLY);
    const fdset = (path: string, readOnly: boolean): string => {
      const fd = add(path, readOnly ? constants.O_RDONLY : constants.O_RDWR);
      const set = addFds.length + 1;
      addFds.push({ fd, set });
      return `/dev/fdset/${set}`;
    };
    const disks: DiskSpec[] = [];
    for (const disk of machine.disks ?? []) {
      const backing = [];
      for (const entry of disk.backing ?? []) backing.push({ ...entry, path: fdset(entry.path, true) });
      disks.push({
        ...disk,
        path: fdset(disk.path, disk.readOnly === true),
        ...(disk.backing === undefined ? {} : { backing }),
      });
    }
    const procFd = (path: string) => `/proc/self/fd/${add(path, constants.O_RDONLY)}`;
    const rewritten: M = { ...machine };
    if (machine.disks !== undefined) rewritten.disks = disks;
    if (machine.kernelPath !== undefined) rewritten.kernelPath = procFd(machine.kernelPath);
    if (machine.initramfsPath !== undefined) rewritten.initramfsPath = procFd(machine.initramfsPath);
    const memory = machine.memory;
    if (memory?.kind === "file") {
      const sized = await ensureMemoryFile(memory, machine.memoryMiB ?? 0);
      rewritten.memory = { ...sized, path: procFd(memory.path) };
    }
    return { fds, machine: rewritten, addFds, close };
  } catch (error) {
    close();
    throw error;
  }
}

/** A shared memory file QEMU is to create (a bake's RAM) is created by the host, sparse, 0600. */
async function ensureMemoryFile(memory: GuestMemory & { kind: "file" }, memoryMiB: number) {
  if (!memory.share) return memory;
  const exists = await stat(memory.path).then(
    () => true,
    () => false,
  );
  if (!exists) {
    const handle = await open(memory.path, "wx", 0o600);
    try {
      await handle.truncate(memoryMiB * 1024 * 1024);
    } finally {
      await handle.close();
    }
  }
  return memory;
}

/**
 * Lets QEMU's user open a guest memory file read-write (QEMU 7.2 maps copy-on-write restores from
 * a file it opens read-write; `rom=on` arrives in 8.2): group-owned by QEMU's group, mode 0660.
 * Only when QEMU runs as another user than the host.
 */
export async function grantMemoryFile(path: string, identity: QemuIdentity, selfUid: number): Promise<void> {
  if (identity.uid === selfUid) return;
  const info = await stat(path);
  if (info.gid !== identity.gid) await chown(path, info.uid, identity.gid);
  if ((info.mode & 0o777) !== 0o660) await chmod(path, 0o660);
}
