/**
 * Reads regular-file contents from where the tree says they are (a spool file of the build, or a
 * file of a source directory): each source opened once, closed together at the end. A file of a
 * source directory is opened without following a symlink and must still be the inode that was
 * scanned, so a file swapped for a symlink (or a directory on its path swapped for one) between
 * the scan and the write is refused, never followed.
 */
import { closeSync, constants, fstatSync, openSync } from "node:fs";
import { SupermachineError } from "../errors.ts";
import type { ContentRef } from "./file-tree.ts";

export class ContentReader {
  readonly #fds = new Map<string, number>();

  /** A read-only descriptor of `ref`'s file, opened on first use. */
  fd(ref: ContentRef): number {
    const key = typeof ref.path === "string" ? ref.path : ref.path.toString("latin1");
    let fd = this.#fds.get(key);
    if (fd !== undefined) return fd;
    if (ref.identity === undefined) {
      fd = openSync(ref.path, "r");
    } else {
      const changed = (cause?: unknown) =>
        new SupermachineError(
          "ROOTFS_BUILD",
          `${String(ref.path)} changed while the image was built (it is no longer the file that was read); build again from a directory nobody changes`,
          cause === undefined ? undefined : { cause },
        );
      try {
        // O_NONBLOCK: a FIFO swapped in must not block the open.
        fd = openSync(ref.path, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
      } catch (cause) {
        if ((cause as NodeJS.ErrnoException).code === "ELOOP") throw changed(cause); // now a symlink
        throw cause;
      }
      const st = fstatSync(fd);
      if (!st.isFile() || st.ino !== ref.identity.ino || st.dev !== ref.identity.dev) {
        closeSync(fd);
        throw changed();
      }
    }
    this.#fds.set(key, fd);
    return fd;
  }

  /** Done with `ref`'s file: a source-directory file is closed now (spool files stay open). */
  release(ref: ContentRef): void {
    if (ref.identity === undefined) return;
    const key = typeof ref.path === "string" ? ref.path : ref.path.toString("latin1");
    const fd = this.#fds.get(key);
    if (fd === undefined) return;
    this.#fds.delete(key);
    closeSync(fd);
  }

  close(): void {
    for (const fd of this.#fds.values()) closeSync(fd);
    this.#fds.clear();
  }
}
