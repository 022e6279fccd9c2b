/**
 * Reads regular-file contents from where the tree says they are (a spool file of the build, or a
 * file of a source directory): each source opened once, closed together at the end.
 */
import { closeSync, openSync } from "node:fs";

export class ContentReader {
  readonly #fds = new Map<string, number>();

  /** A read-only descriptor of `path`, opened on first use. */
  fd(path: string | Buffer): number {
    const key = typeof path === "string" ? path : path.toString("latin1");
    let fd = this.#fds.get(key);
    if (fd === undefined) {
      fd = openSync(path, "r");
      this.#fds.set(key, fd);
    }
    return fd;
  }

  close(): void {
    for (const fd of this.#fds.values()) closeSync(fd);
    this.#fds.clear();
  }
}
