/**
 * Every byte a guest process writes to stdout and stderr reaches the host exactly once and in
 * order, however the agent's output path is stressed: many execs at once, sizes around the
 * agent's frame and the pipe's boundaries, processes that exit right after writing, readers that
 * stop taking output (so the agent runs out of credit), a background process that keeps the pipes
 * open after the exec's process exits, and execs in a row. One VM serves the file.
 *
 * The output is the start of random files staged in the guest, so a lost, doubled or reordered
 * byte shows as a mismatch at a known offset.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { describe } from "node:test";
import { type ExecHandle, Vm } from "../../src/index.ts";
import { busyboxRootfs, sharedVm } from "../helpers/vm.ts";

/** What stdout and stderr write: the first bytes of one of these files each. */
const OUT_FILE = "/tmp/output-integrity.out";
const ERR_FILE = "/tmp/output-integrity.err";
const outData = randomBytes(4 * 1024 * 1024);
const errData = randomBytes(4 * 1024 * 1024);

const KiB = 1024;
const MiB = 1024 * KiB;
/** 0, 1, and both sides of a page, the pipe's default size and the agent's read size (256 KiB). */
const SIZES = [
  0,
  1,
  4095,
  4096,
  4097,
  64 * KiB - 1,
  64 * KiB,
  64 * KiB + 1,
  256 * KiB - 1,
  256 * KiB,
  256 * KiB + 1,
];

interface Case {
  out: number;
  err: number;
  /** How the process writes: stdout then stderr; both at once; one write(2) each (dd); a background process keeps both pipes open. */
  how: "sequential" | "concurrent" | "one-write" | "held-open";
}

/** The shell script that writes `c.out` bytes of stdout and `c.err` bytes of stderr from the data. */
function script(c: Case): string {
  const out = `head -c ${c.out} ${OUT_FILE}`;
  const err = `head -c ${c.err} ${ERR_FILE} >&2`;
  switch (c.how) {
    case "sequential":
      return `${out}; ${err}`;
    case "concurrent":
      return `${out} & ${err}; wait`;
    case "one-write": {
      // one write(2) of the whole size each (dd's statistics go to /dev/null, its data to fd 3)
      const dd = (size: number, file: string, fd: number) =>
        size === 0 ? ":" : `dd if=${file} of=/proc/self/fd/3 bs=${size} count=1 3>&${fd} 2>/dev/null`;
      return c.err === 0
        ? dd(c.out, OUT_FILE, 1)
        : `${dd(c.out, OUT_FILE, 1)}; exec ${dd(c.err, ERR_FILE, 2)}`;
    }
    case "held-open":
      // The background process inherits both pipes and outlives the exec's process: the agent
      // must send what the pipes held when that process exited, and end the exec.
      return `tail -f /dev/null & ${out}; ${err}`;
  }
}

function check(c: Case, stdout: Uint8Array, stderr: Uint8Array, label: string): void {
  const what = `${label} (${c.how}, ${c.out} B stdout, ${c.err} B stderr)`;
  assertPrefix(stdout, outData, c.out, `stdout of ${what}`);
  assertPrefix(stderr, errData, c.err, `stderr of ${what}`);
}

/** `got` is exactly the first `size` bytes of `data`; otherwise says where it first differs. */
function assertPrefix(got: Uint8Array, data: Buffer, size: number, what: string): void {
  const want = data.subarray(0, size);
  if (Buffer.from(got).equals(want)) return;
  let i = 0;
  while (i < got.length && i < want.length && got[i] === want[i]) i++;
  assert.fail(`${what}: got ${got.length} bytes, first difference at byte ${i}`);
}

async function run(vm: Vm, c: Case, label: string): Promise<void> {
  const outcome = await vm
    .execBuilder()
    .argv(["sh", "-c", script(c)])
    .output();
  check(c, outcome.stdout, outcome.stderr, label);
}

/** All output of a spawned exec, read only when this is called. */
async function drain(handle: ExecHandle): Promise<{ stdout: Uint8Array; stderr: Uint8Array }> {
  const out: Uint8Array[] = [];
  const err: Uint8Array[] = [];
  for await (const event of handle) {
    if (event.kind === "stdout") out.push(event.data);
    else if (event.kind === "stderr") err.push(event.data);
    else assert.equal(event.exitCode, 0);
  }
  return { stdout: Buffer.concat(out), stderr: Buffer.concat(err) };
}

describe("output integrity in a VM", { timeout: 600_000 }, () => {
  const { it: vmIt } = sharedVm(async () => {
    const vm = await Vm.start({ rootfs: await busyboxRootfs(), memoryMiB: 256 });
    await vm.execBuilder().argv(["true"]).stageFile(OUT_FILE, outData).stageFile(ERR_FILE, errData).output();
    return vm;
  });

  vmIt(
    "keeps stdout and stderr exact for 44 execs at once, sizes around frame and pipe boundaries",
    async (vm) => {
      const hows = ["sequential", "concurrent", "one-write", "held-open"] as const;
      const cases: Case[] = [];
      for (const [i, how] of hows.entries())
        for (const [j, out] of SIZES.entries())
          cases.push({ out, err: SIZES[(j + 3 * i + 1) % SIZES.length]!, how });
      await Promise.all(cases.map((c, i) => run(vm, c, `exec ${i}`)));
    },
  );

  vmIt("keeps output exact while readers that stopped reading hold the agent out of credit", async (vm) => {
    // More than the host's 2 MiB output window each: these block on credit until read below.
    const held: Case[] = [
      { out: 3 * MiB + 7, err: MiB + 1, how: "concurrent" },
      { out: 2 * MiB + 1, err: 2 * MiB + 5, how: "sequential" },
      { out: MiB - 1, err: 3 * MiB + 3, how: "held-open" },
    ];
    const handles = await Promise.all(
      held.map((c) =>
        vm
          .execBuilder()
          .argv(["sh", "-c", script(c)])
          .spawn(),
      ),
    );
    // Meanwhile others run to the end through the same channel.
    const others: Case[] = SIZES.map((out, j) => ({
      out,
      err: SIZES[SIZES.length - 1 - j]!,
      how: j % 2 ? "one-write" : "concurrent",
    }));
    await Promise.all(others.map((c, i) => run(vm, c, `exec ${i} beside the held ones`)));
    const outputs = await Promise.all(handles.map(drain));
    for (const [i, c] of held.entries()) check(c, outputs[i]!.stdout, outputs[i]!.stderr, `held exec ${i}`);
  });

  vmIt("keeps output exact for 40 short execs in a row", async (vm) => {
    const small = SIZES.slice(0, 8);
    for (let i = 0; i < 40; i++) {
      const c: Case = {
        out: small[i % small.length]!,
        err: small[(i * 3 + 1) % small.length]!,
        how: (["sequential", "one-write", "concurrent", "held-open"] as const)[i % 4]!,
      };
      await run(vm, c, `exec ${i} in a row`);
    }
  });
});
