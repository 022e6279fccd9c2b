/**
 * The ceiling of the agent channel itself, for the stdout row of `npm run bench`: a VM whose /init
 * is a busybox script, no agent and no pipe, runs `dd` of 64 MiB to /dev/null and then the same
 * `dd` straight into the `sm.agent` port, round after round, each run announced by one byte. The
 * host times both from those bytes' arrival and reads the port's bytes as they come.
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import type { Accelerator, AssetPaths } from "../src/index.ts";
import { socketReads } from "../src/internal/index.ts";
import { QemuProcess } from "../src/vmm/qemu-process.ts";
import { busyboxInitramfs, FIND_PORT } from "../test/helpers/hostile-initramfs.ts";

export const CEILING_BYTES = 64 * 1024 * 1024;

/** Milliseconds of each round's `dd` to /dev/null and of its `dd` into the port. */
export interface CeilingSamples {
  devNull: number[];
  port: number[];
}

export async function channelCeiling(
  accel: Accelerator,
  assets: AssetPaths,
  rounds: number,
): Promise<CeilingSamples> {
  const dd = `/bin/busybox dd if=/dev/zero bs=1048576 count=${CEILING_BYTES / 1048576}`;
  const script =
    `${FIND_PORT}exec 3>"$port"\n` +
    `for i in ${Array.from({ length: rounds }, (_, i) => i).join(" ")}; do\n` +
    `  /bin/busybox printf a >&3\n  ${dd} of=/dev/null 2>/dev/null\n` +
    `  /bin/busybox printf b >&3\n  ${dd} >&3 2>/dev/null\n` +
    "done\n/bin/busybox sleep 1000\n";
  const dir = await mkdtemp(join(tmpdir(), "sm-ceiling-"));
  try {
    const initramfsPath = await busyboxInitramfs(script, dir);
    await using qemu = await QemuProcess.launch({
      machine: {
        accel,
        memoryMiB: 256,
        vcpus: 1,
        kernelPath: assets.kernel,
        initramfsPath,
        kernelArgs: ["quiet"],
      },
    });
    const socket = await qemu.agentSocket;
    const reads = socketReads(socket);
    if (reads === undefined) throw new Error("the agent channel is not read through SocketReads");
    const samples: CeilingSamples = { devNull: [], port: [] };
    await new Promise<void>((resolve, reject) => {
      void qemu.exited.then(() => reject(new Error("QEMU exited before the rounds ended")));
      let phase: "a" | "b" | "port" = "a";
      let started = 0;
      let left = 0;
      reads.read((chunk) => {
        const now = performance.now();
        let at = 0;
        while (at < chunk.length) {
          if (phase === "port") {
            const take = Math.min(left, chunk.length - at);
            left -= take;
            at += take;
            if (left > 0) continue;
            samples.port.push(now - started);
            if (samples.port.length === rounds) return resolve();
            phase = "a";
            continue;
          }
          const byte = String.fromCharCode(chunk[at++]!);
          if (byte !== phase) return reject(new Error(`the ceiling's guest sent ${JSON.stringify(byte)}`));
          if (phase === "b") {
            samples.devNull.push(now - started);
            left = CEILING_BYTES;
            phase = "port";
          } else phase = "b";
          started = now;
        }
      });
    });
    return samples;
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
