/** Temporary directories of a test process, removed when the process exits. */
import { rmSync } from "node:fs";
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";

const dirs = new Set<string>();
let hooked = false;

/** A new directory under the system temp dir, removed with its contents when this process exits. */
export async function scratchDir(prefix: string): Promise<string> {
  if (!hooked) {
    hooked = true;
    process.once("exit", () => {
      for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
    });
  }
  const dir = await mkdtemp(join(tmpdir(), prefix));
  dirs.add(dir);
  return dir;
}
