/**
 * Snapshot rows of `npm run bench`: restore against QEMU's bare restore of the same snapshot,
 * pre-started restores, warm pool cycles, throughput by worker count, memory of clones.
 */
import { spawn } from "node:child_process";
import { mkdtemp, open, readFile, rm } from "node:fs/promises";
import { createServer, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { encodeFrame, FrameDecoder, MessageType } from "../src/agent/frame-codec.ts";
import { encodeExec, encodeHostHello, PROTOCOL_VERSION } from "../src/agent/messages.ts";
import { Image, Vm } from "../src/index.ts";
import { runtimeDir } from "../src/internal/paths.ts";
import { restoreMachineSpec } from "../src/vm/index.ts";
import { findQemu } from "../src/vmm/accelerator.ts";
import { buildQemuArgs } from "../src/vmm/qemu-args.ts";
import { firstExecByte } from "../test/helpers/clones.ts";
import { fixtureImages } from "../test/helpers/fixtures.ts";
import { summarize, type Table } from "./table.ts";

const FLOOR = "bare QEMU restore → first exec byte";
const BARE_CPU = "  host CPU of that bare restore";

/**
 * The floor: QEMU started by hand with the snapshot's machine, its state loaded over QMP, the
 * guest continued, a HELLO and an EXEC of `echo x` written to the agent channel at once, until
 * the first STDOUT byte comes back. The same guest work as `restore → first exec byte`, with no
 * supervision, no bookkeeping and no client.
 */
async function bareRestore(image: Image): Promise<number> {
  const snapshot = image.snapshot!;
  const _m = snapshot.manifest;
  const dir = await mkdtemp(join(tmpdir(), "sm-floor-"));
  try {
    const overlay = join(dir, "disk.qcow2");
    await snapshot.createOverlay(overlay);
    const qmpPath = join(dir, "q.sock");
    const agentPath = join(dir, "a.sock");
    const mountsPath = join(dir, "m.sock");
    const args = buildQemuArgs({
      ...restoreMachineSpec(snapshot),
      incoming: "defer",
      paused: true,
      disks: [{ name: "root", path: overlay, format: "qcow2" }],
      qmpSocketPath: qmpPath,
      agentSocketPath: agentPath,
      // The snapshot's machine has the mounts port; nothing is mounted, so nobody talks on it.
      mountSocketPath: mountsPath,
    });
    const qemuPath = await findQemu();
    const state = await open(snapshot.statePath, "r");
    const request = Buffer.concat([
      encodeFrame({
        stream: 0,
        type: MessageType.HELLO,
        payload: encodeHostHello({
          version: PROTOCOL_VERSION,
          epoch: 1n,
          timeNs: BigInt(Date.now()) * 1_000_000n,
        }),
      }),
      encodeFrame({
        stream: 1,
        type: MessageType.EXEC,
        payload: encodeExec({ argv: ["echo", "x"], env: ["PATH=/usr/bin:/bin"] }),
      }),
    ]);
    const t0 = performance.now();
    const firstByte = new Promise<number>((resolve, reject) => {
      const agentServer = createServer((socket: Socket) => {
        socket.on("error", () => {}); // QEMU's exit is reported by `exited`
        socket.write(request);
        const decoder = new FrameDecoder();
        socket.on("data", (chunk: Buffer) => {
          for (const frame of decoder.push(chunk)) {
            if (frame.type === MessageType.STDOUT) {
              resolve(performance.now() - t0);
              socket.destroy();
              agentServer.close();
              return;
            }
          }
        });
      }).listen(agentPath);
      const qmpServer = createServer((socket: Socket) => {
        qmpServer.close();
        socket.on("error", () => {});
        let buffer = "";
        const send = (cmd: object) => socket.write(`${JSON.stringify(cmd)}\n`);
        let step = 0;
        socket.on("data", (chunk) => {
          buffer += chunk.toString();
          let nl = buffer.indexOf("\n");
          while (nl !== -1) {
            const msg = JSON.parse(buffer.slice(0, nl)) as Record<string, unknown>;
            buffer = buffer.slice(nl + 1);
            nl = buffer.indexOf("\n");
            if (msg.QMP && step === 0) {
              step = 1;
              send({ execute: "qmp_capabilities" });
              send({
                execute: "migrate-set-capabilities",
                arguments: {
                  capabilities: [
                    { capability: "x-ignore-shared", state: true },
                    { capability: "events", state: true },
                  ],
                },
              });
              send({ execute: "migrate-incoming", arguments: { uri: "fd:3" } });
            } else if (msg.event === "MIGRATION") {
              const status = (msg.data as { status: string }).status;
              if (status === "completed") send({ execute: "cont" });
              if (status === "failed") reject(new Error("bare restore failed"));
            } else if (msg.error) {
              reject(new Error(JSON.stringify(msg.error)));
            }
          }
        });
      }).listen(qmpPath);
    });
    const mountsServer = createServer((socket) => socket.on("error", () => {})).listen(mountsPath);
    const child = spawn(qemuPath, args, { stdio: ["ignore", "ignore", "pipe", state.fd] });
    let stderr = "";
    child.stderr!.on("data", (chunk: Buffer) => {
      stderr = (stderr + chunk.toString()).slice(-2000);
    });
    const exited = new Promise<never>((_, reject) =>
      child.once("exit", (code) =>
        reject(new Error(`bare restore: QEMU exited (${code}): ${stderr.trim()}`)),
      ),
    );
    try {
      return await Promise.race([firstByte, exited]);
    } finally {
      child.kill("SIGKILL");
      await exited.catch(() => {});
      mountsServer.close();
      await state.close();
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/**
 * PSS of a VM's QEMU process: in all, of its guest RAM (the mapping of `memoryPath`) and of TCG's
 * translation buffer (its one executable anonymous mapping; none under KVM).
 */
async function pssKiB(
  vm: Vm,
  memoryPath: string,
): Promise<{ total: number; guestRam: number; tcgCode: number }> {
  const owner = JSON.parse(await readFile(join(runtimeDir(), "vms", vm.id, "owner.json"), "utf8")) as {
    qemuPid: number;
  };
  let total = 0;
  let guestRam = 0;
  let tcgCode = 0;
  let mapping: "ram" | "code" | "other" = "other";
  for (const line of (await readFile(`/proc/${owner.qemuPid}/smaps`, "utf8")).split("\n")) {
    const header = /^[0-9a-f]+-[0-9a-f]+ (\S+) \S+ \S+ \S+\s*(.*)$/.exec(line);
    if (header) {
      mapping =
        header[2] === memoryPath ? "ram" : header[2] === "" && header[1]!.includes("x") ? "code" : "other";
      continue;
    }
    const pss = /^Pss:\s+(\d+) kB/.exec(line);
    if (pss) {
      total += Number(pss[1]);
      if (mapping === "ram") guestRam += Number(pss[1]);
      if (mapping === "code") tcgCode += Number(pss[1]);
    }
  }
  return { total, guestRam, tcgCode };
}

export async function restoreBench(table: Table, quick: boolean): Promise<void> {
  const fx = await fixtureImages();
  const dataDir = await mkdtemp(join(tmpdir(), "sm-bench-"));
  try {
    const bakeStart = performance.now();
    const image = await Image.builder(`oci:${fx.busybox}`)
      .name("bench")
      .memoryMiB(256)
      .pullOptions({ dataDir })
      .force()
      .build();
    table.add({
      name: "bake (busybox, 256 MiB)",
      unit: "ms",
      summary: summarize([performance.now() - bakeStart]),
    });

    const n = quick ? 5 : 10;
    const floor: number[] = [];
    const floorCpu: number[] = [];
    const restores: number[] = [];
    // Interleaved, so load changes hit both alike.
    for (let i = 0; i < n; i++) {
      const cpu = process.cpuUsage();
      floor.push(await bareRestore(image));
      const used = process.cpuUsage(cpu);
      floorCpu.push((used.user + used.system) / 1000);
      const { ms, vm } = await firstExecByte(() => image.start());
      restores.push(ms);
      await vm.kill();
    }
    table.add({ name: FLOOR, unit: "ms", summary: summarize(floor) });
    table.add({
      name: BARE_CPU,
      unit: "ms",
      summary: summarize(floorCpu),
      reading:
        "This process's CPU time (every thread) for the bare restore, its overlay and its teardown: Node spawning QEMU (a fork of this process, then its pages copied on write as it runs on), three sockets, the QMP steps. The floor of a fresh clone's host CPU.",
    });
    table.add({
      name: "restore → first exec byte",
      unit: "ms",
      summary: summarize(restores),
      against: FLOOR,
      budget: "≤ 1.2×",
      reading:
        "Supervision, the overlay, the QMP handshake and the agent session on top of QEMU's own restore.",
    });

    // Pre-started QEMU processes: restored, warmed and paused (the default), or only started and
    // waiting for their state.
    for (const warm of [true, false]) {
      const samples: number[] = [];
      for (let i = 0; i < n; i++) {
        const waiting = await Vm.prestart(image.snapshot!, { warm });
        const { ms, vm } = await firstExecByte(() => waiting.activate());
        samples.push(ms);
        await vm.kill();
      }
      table.add({
        name: warm
          ? "pre-started (warm, paused): activate → first exec byte"
          : "pre-started (waiting for state): activate → first exec byte",
        unit: "ms",
        summary: summarize(samples),
        against: FLOOR,
        ...(warm ? { budget: "≤ 60 ms (TCG)" } : {}),
      });
    }

    // The host's share of a cycle is the CPU time this process (every thread of it: supermachine's
    // code, Node, the kernel's work for its syscalls) spends per cycle, over the cycle's wall
    // time. The rest is the guest under QEMU: the agent, the process, the channel's far end.
    // A kept-warm pool is measured twice: in its first cycles, and again after `later` more, when
    // V8 has optimized the path (the first cycles of a process pay for the compiling too).
    const later = quick ? 300 : 1000;
    const sampled = quick ? 10 : 30;
    for (const restoreOnRelease of [false, true]) {
      await using pool = await image.pool().min(1).max(1).restoreOnRelease(restoreOnRelease).build();
      const cycles = async (count: number) => {
        const ms: number[] = [];
        const cpuMs: number[] = [];
        const shares: number[] = [];
        const outside: number[] = [];
        for (let i = 0; i < count; i++) {
          const cpu = process.cpuUsage();
          const t0 = performance.now();
          const lease = await pool.acquire();
          const out = await lease.exec(["true"]);
          await lease.release();
          const took = performance.now() - t0;
          const used = process.cpuUsage(cpu);
          ms.push(took);
          cpuMs.push((used.user + used.system) / 1000);
          shares.push(((used.user + used.system) / 1000 / took) * 100);
          outside.push(Math.max(0, 1 - out.durationMs / took) * 100);
        }
        return { ms, cpuMs, shares, outside };
      };
      const first = await cycles(sampled);
      const label = restoreOnRelease ? "fresh clone each time" : "kept warm";
      table.add({
        name: `warm cycle acquire → true → release (${label})`,
        unit: "ms",
        summary: summarize(first.ms),
      });
      table.add({
        name: `  host share of that cycle (${label})`,
        unit: "%",
        summary: summarize(first.shares),
        ...(restoreOnRelease ? { budget: "≤ 5 %" } : {}),
        reading: restoreOnRelease
          ? "The bench process's CPU time (every thread) over the cycle: supermachine's own cost; the rest of the cycle is the guest under QEMU."
          : "The same, in the pool's first cycles: V8 is still compiling the path (on the main thread and its workers); the budget is on the steady row below.",
      });
      if (restoreOnRelease) {
        table.add({
          name: "  host CPU of that cycle (fresh clone each time)",
          unit: "ms",
          summary: summarize(first.cpuMs),
          against: BARE_CPU,
          reading:
            "The same CPU time in milliseconds, against the bare restore's: what supervision, the agent session, the exec and the cleanup add to spawning and restoring QEMU.",
        });
      }
      table.add({
        name: `  outside the guest process (host, channel, agent; ${label})`,
        unit: "%",
        summary: summarize(first.outside),
        reading:
          "Everything but the guest process's own run: under TCG mostly the agent's emulated work (frames, pipes, cgroup, fork) and the channel.",
      });
      if (!restoreOnRelease) {
        await cycles(later);
        const steady = await cycles(sampled);
        table.add({
          name: `  host share, ${later} cycles later (kept warm, steady)`,
          unit: "%",
          summary: summarize(steady.shares),
          budget: "≤ 5 %",
          reading: `The same pool's cycles after ${later} more: what a running program pays per cycle, V8's compiling done (its cycle took ${summarize(steady.ms).median.toFixed(1)} ms).`,
        });
      }
    }

    // Rounds of `jobs` execs shared by `workers` callers, each pool built (its VMs warmed) before
    // its round starts. The worker counts take turns round by round, so a change in the shared
    // host's speed meets them alike. The budget: more workers than cores must not cost throughput.
    // The same pool then runs a shell loop of `/bin/true` in every VM at once: the guests' own
    // throughput with as many VMs, no host orchestration in it (the bound of the budget's ratio).
    const throughput = new Map<number, number[]>();
    const inGuest = new Map<number, number[]>();
    const record = (into: Map<number, number[]>, workers: number, perSecond: number) =>
      into.set(workers, [...(into.get(workers) ?? []), perSecond]);
    for (let round = 0; round < (quick ? 2 : 5); round++) {
      for (const workers of [1, 2, 4, 8]) {
        await using pool = await image.pool().min(workers).max(workers).restoreOnRelease(false).build();
        const jobs = quick ? 24 : 48;
        let next = 0;
        const t0 = performance.now();
        await Promise.all(
          Array.from({ length: workers }, async () => {
            while (next < jobs) {
              next++;
              await using lease = await pool.acquire();
              await lease.exec(["true"]);
            }
          }),
        );
        record(throughput, workers, jobs / ((performance.now() - t0) / 1000));
        const loops = quick ? 160 : 800;
        const leases = await Promise.all(Array.from({ length: workers }, () => pool.acquire()));
        try {
          const loop = `i=0; while [ $i -lt ${loops / workers} ]; do /bin/true; i=$((i+1)); done`;
          const t1 = performance.now();
          const ran = await Promise.all(leases.map((lease) => lease.exec(["sh", "-c", loop])));
          const failed = ran.find((out) => out.exitCode !== 0);
          if (failed !== undefined)
            throw new Error(`the in-guest loop exited ${failed.exitCode}: ${failed.stderr}`);
          record(inGuest, workers, loops / ((performance.now() - t1) / 1000));
        } finally {
          await Promise.all(leases.map((lease) => lease.release()));
        }
      }
    }
    // Rows per worker count; from 4 on (more than the cores) against the best count's median.
    const addRates = (
      rates: Map<number, number[]>,
      name: (workers: number) => string,
      beyondCores: { budget?: string; reading: string },
    ) => {
      const best = [...rates].reduce((a, b) => (summarize(b[1]).median > summarize(a[1]).median ? b : a))[0];
      for (const [workers, rounds] of rates) {
        table.add({
          name: name(workers),
          unit: "exec/s",
          summary: summarize(rounds),
          ...(workers >= 4 ? { against: name(best), higherIsBetter: true, ...beyondCores } : {}),
        });
      }
    };
    addRates(throughput, (workers) => `throughput, ${workers} worker(s)`, {
      budget: "≥ 0.9×",
      reading:
        "More workers than cores: the pool's VMs are warmed before they are lent, so they only queue for CPU.",
    });
    addRates(inGuest, (workers) => `in-guest exec loop, ${workers} VM(s) at once`, {
      reading:
        "The guests alone, no host orchestration: a shell loop of `/bin/true` in every VM of the pool at once. What the emulated guests lose with more VMs than cores bounds the throughput budget's ratio.",
    });

    // The 1st clone alone, then the 8th with seven others restored from the same snapshot. The
    // guest RAM is the snapshot file mapped copy-on-write, shared by all clones; QEMU's own
    // memory (heap, TCG's translated code, libraries' private pages) is every clone's own.
    const clones: Vm[] = [];
    const memoryPath = image.snapshot!.memoryPath;
    try {
      const first = await image.start();
      await first.exec(["true"]);
      clones.push(first);
      const firstPss = await pssKiB(first, memoryPath);
      for (let i = 1; i < 8; i++) {
        const vm = await image.start();
        await vm.exec(["true"]);
        clones.push(vm);
      }
      const eighth = await pssKiB(clones[7]!, memoryPath);
      const FIRST = "PSS of the 1st clone (alone)";
      table.add({ name: FIRST, unit: "KiB", summary: summarize([firstPss.total]) });
      table.add({
        name: "PSS of the 8th clone (8 running)",
        unit: "KiB",
        summary: summarize([eighth.total]),
        against: FIRST,
        budget: "≤ 0.4×",
        reading: "The shared snapshot RAM counts an eighth; QEMU's own memory counts whole in every clone.",
      });
      table.add({
        name: "  of it QEMU's own (all but guest RAM)",
        unit: "KiB",
        summary: summarize([eighth.total - eighth.guestRam]),
        against: FIRST,
        reading:
          "The 8th clone's PSS without its guest RAM: TCG's translated code and tables, heap, libraries' private pages. No sharing of guest RAM can take the 8th clone below this ratio.",
      });
      table.add({
        name: "    of that TCG's translated code",
        unit: "KiB",
        summary: summarize([eighth.tcgCode]),
        against: FIRST,
        reading:
          "The touched pages of TCG's translation buffer (2 MiB huge pages): the host code of every guest block run since the restore. None under KVM.",
      });
    } finally {
      await Promise.all(clones.map((vm) => vm.kill()));
    }
  } finally {
    await rm(dataDir, { recursive: true, force: true });
  }
}
