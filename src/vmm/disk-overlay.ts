import { execFile } from "node:child_process";
import { resolve } from "node:path";
import { promisify } from "node:util";
import { SupermachineError } from "../errors.ts";

const run = promisify(execFile);

/**
 * Creates a qcow2 overlay at `overlayPath` whose backing file is `basePath`, so a VM writes to its
 * own overlay and never to the shared base image (or snapshot disk state).
 */
export async function createDiskOverlay(
  basePath: string,
  overlayPath: string,
  opts: { baseFormat: "raw" | "qcow2"; signal?: AbortSignal | undefined },
): Promise<void> {
  const qemuImg = process.env.SUPERMACHINE_QEMU_IMG || "qemu-img";
  try {
    await run(
      qemuImg,
      ["create", "-q", "-f", "qcow2", "-F", opts.baseFormat, "-b", resolve(basePath), overlayPath],
      { signal: opts.signal },
    );
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === "ENOENT") {
      throw new SupermachineError(
        "QEMU_NOT_FOUND",
        "qemu-img not found: install qemu-utils (apt-get install qemu-utils) or set SUPERMACHINE_QEMU_IMG",
        { cause: error },
      );
    }
    throw new SupermachineError("VMM_FAILED", `qemu-img could not create a disk overlay on ${basePath}`, {
      cause: error,
    });
  }
}
