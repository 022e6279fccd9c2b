/**
 * Free space on the host file systems a build writes to (its scratch directory and the output's
 * directory), checked before flattening, before each entry's data is spooled, every 64 MiB
 * written, and before the image is written: a layer must not fill the host's disk.
 */
import { statfsSync, statSync } from "node:fs";
import { SupermachineError } from "../errors.ts";

/** Free space every build leaves on the host file systems it writes to, by default. */
export const DEFAULT_MIN_FREE_DISK_BYTES = 512 * 1024 * 1024;

export class DiskSpace {
  readonly #dirs: string[];
  readonly #reserve: number;

  /** `dirs`: directories on the file systems written to (one per file system is enough). */
  constructor(dirs: readonly string[], reserveBytes: number) {
    const seen = new Set<number>();
    this.#dirs = dirs.filter((d) => {
      const dev = statSync(d).dev;
      if (seen.has(dev)) return false;
      seen.add(dev);
      return true;
    });
    this.#reserve = reserveBytes;
  }

  /** Bytes that can still be written to the fullest file system before the reserve is reached. */
  available(): number {
    let min = Number.POSITIVE_INFINITY;
    for (const d of this.#dirs) {
      const s = statfsSync(d);
      min = Math.min(min, s.bavail * s.bsize - this.#reserve);
    }
    return min;
  }

  /** Throws `ROOTFS_BUILD` when `bytes` more would leave less than the reserve free; returns what is left then. */
  check(bytes: number, what: string): number {
    const available = this.available();
    if (bytes > available) {
      throw new SupermachineError(
        "ROOTFS_BUILD",
        `not enough disk space for ${what}: it needs ${bytes} bytes, ${Math.max(0, available)} are free above the ${this.#reserve}-byte reserve (${this.#dirs.join(", ")}); free some space, build elsewhere (tmpDir, output) or lower minFreeDiskBytes`,
      );
    }
    return available - bytes;
  }
}
