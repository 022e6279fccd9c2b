/**
 * Verifier-loop rows of `npm run bench` (docs/verifier-loop.md): a Rust toolchain image baked with
 * a warm-up that compiles a seed program, a pool of clones, and per cycle acquire → stage a
 * candidate → `rustc -O` → run it (`chain`) → release. Measured at each worker count for:
 *
 * - the recipe: warm bake, `restoreOnRelease(false)`;
 * - a fresh clone per cycle: warm bake, `restoreOnRelease(true)`;
 * - no warm bake: the image snapshotted right after boot, `restoreOnRelease(false)`;
 * - the floor: the same candidates compiled and run by Debian's rustc on the host, as many at once.
 *
 * The image is the rust image of the service checks (test/fixtures/services/build.sh: Debian's
 * rustc, the same compiler version as the host floor's /usr/bin/rustc).
 *
 * `lightBench` is the same loop with little guest work, so that the orchestration shows: the python
 * image of the service checks, each cycle acquire → stage a small program → `python3` on it →
 * release, kept warm and with a fresh clone, against Debian's python3 on the host.
 */
import { execFile } from "node:child_process";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { promisify } from "node:util";
import { Image, type Vm } from "../src/index.ts";
import { serviceImages } from "../test/helpers/service-images.ts";
import { summarize, type Table } from "./table.ts";

const execFileAsync = promisify(execFile);

/** Debian's rustc on the host (package `rustc`, installed by scripts/setup.sh): the floor. */
const HOST_RUSTC = "/usr/bin/rustc";
/** Debian's python3 on the host (package `python3`, installed by scripts/setup.sh): the light loop's floor. */
const HOST_PYTHON = "/usr/bin/python3";
const MEMORY_MIB = 512;
/** Bound of one guest compile + run: far above a compile under TCG on a loaded machine. */
const CYCLE_TIMEOUT_MS = 600_000;

/** The verifier's and the light loop's options. */
export interface VerifierBenchOptions {
  /** Worker counts, each measured in every configuration. */
  readonly workers: readonly number[];
  /** Cycles per worker at each worker count (at least one). */
  readonly cyclesPerWorker: number;
}

/** Candidate `n`: a small program whose output the cycle checks. */
function candidate(n: number): { source: string; expected: string } {
  return {
    source: `fn main() {\n    let n: u64 = ${n};\n    let s: u64 = (1..=n).map(|x| x * x).sum();\n    println!("{} {}", n, s);\n}\n`,
    expected: `${n} ${(n * (n + 1) * (2 * n + 1)) / 6}\n`,
  };
}

/** Candidate `n` of the light loop: the same computation and output in Python. */
function pythonCandidate(n: number): string {
  return `n = ${n}\nprint(n, sum(x * x for x in range(1, n + 1)))\n`;
}

/** The seed program the warm bake compiles (so the compiler's files and libstd are in the page cache). */
const SEED = candidate(1000);

interface LoopResult {
  readonly cycles: number[];
  readonly perSecond: number;
}

/** `jobs` cycles on `workers` concurrent loops; every cycle's output is checked. */
async function runLoop(
  workers: number,
  jobs: number,
  cycle: (n: number) => Promise<string>,
): Promise<LoopResult> {
  const cycles: number[] = [];
  let next = 0;
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: workers }, async () => {
      while (next < jobs) {
        const n = 1000 + next++;
        const c0 = performance.now();
        const out = await cycle(n);
        cycles.push(performance.now() - c0);
        const { expected } = candidate(n);
        if (out !== expected)
          throw new Error(`candidate ${n} printed ${JSON.stringify(out)}, not ${expected}`);
      }
    }),
  );
  return { cycles, perSecond: jobs / ((performance.now() - t0) / 1000) };
}

async function hostRustcVersion(): Promise<string> {
  try {
    return (await execFileAsync(HOST_RUSTC, ["--version"])).stdout.trim();
  } catch {
    throw new Error(
      `the verifier bench's floor needs Debian's rustc at ${HOST_RUSTC}: apt-get install rustc`,
    );
  }
}

/** What a cycle needs of a VM: a lease from a pool or the VM a warm-up gets. */
type Runner = Pick<Vm, "execBuilder">;

/** The loop on the host: `cycle` gets a scratch directory of its own run and the candidate's number. */
async function hostLoop(
  workers: number,
  jobs: number,
  cycle: (dir: string, n: number) => Promise<string>,
): Promise<LoopResult> {
  const dir = await mkdtemp(join(tmpdir(), "sm-bench-host-"));
  try {
    return await runLoop(workers, jobs, (n) => cycle(dir, n));
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

async function hostRustcCycle(dir: string, n: number): Promise<string> {
  const src = join(dir, `c${n}.rs`);
  const bin = join(dir, `c${n}`);
  await writeFile(src, candidate(n).source);
  await execFileAsync(HOST_RUSTC, ["-O", "-o", bin, src]);
  return (await execFileAsync(bin)).stdout;
}

async function hostPythonCycle(dir: string, n: number): Promise<string> {
  const src = join(dir, `c${n}.py`);
  await writeFile(src, pythonCandidate(n));
  return (await execFileAsync(HOST_PYTHON, [src])).stdout;
}

/** The loop through a pool of `image` with `workers` VMs: `cycle` runs candidate `n` in a leased VM. */
async function vmLoop(
  image: Image,
  restoreOnRelease: boolean,
  workers: number,
  jobs: number,
  cycle: (vm: Runner, n: number) => Promise<string>,
): Promise<LoopResult> {
  await using pool = await image
    .pool()
    .min(workers)
    .max(workers)
    .restoreOnRelease(restoreOnRelease)
    .acquireTimeout(CYCLE_TIMEOUT_MS)
    .build();
  return await runLoop(workers, jobs, async (n) => {
    await using vm = await pool.acquire();
    return await cycle(vm, n);
  });
}

async function rustcCycle(vm: Runner, n: number): Promise<string> {
  const out = await vm
    .execBuilder()
    .stageFile("/tmp/candidate.rs", candidate(n).source)
    .argv(["rustc", "-O", "-o", "/tmp/candidate", "/tmp/candidate.rs"])
    .chain(["/tmp/candidate"])
    .timeout(CYCLE_TIMEOUT_MS)
    .output();
  return out.stdoutText;
}

async function pythonCycle(vm: Runner, n: number): Promise<string> {
  const out = await vm
    .execBuilder()
    .stageFile("/tmp/candidate.py", pythonCandidate(n))
    .argv(["python3", "/tmp/candidate.py"])
    .timeout(CYCLE_TIMEOUT_MS)
    .output();
  return out.stdoutText;
}

/** One configuration's two rows: time per cycle and cycles per second, against the floor's. */
function addLoopRows(table: Table, name: string, result: LoopResult, floorName?: string): void {
  table.add({
    name,
    unit: "ms/cycle",
    summary: summarize(result.cycles),
    ...(floorName === undefined ? {} : { against: floorName }),
  });
  table.add({
    name: `  ${name}: throughput`,
    unit: "cycles/s",
    summary: summarize([result.perSecond]),
    higherIsBetter: true,
    ...(floorName === undefined ? {} : { against: `  ${floorName}: throughput` }),
  });
}

export async function verifierBench(table: Table, options: VerifierBenchOptions): Promise<void> {
  const version = await hostRustcVersion();
  const rust = (await serviceImages()).images.rust;
  const dataDir = await mkdtemp(join(tmpdir(), "sm-bench-rust-"));
  try {
    const bake = async (warm: boolean): Promise<Image> => {
      const builder = Image.builder(rust.source)
        .name(warm ? "bench-rust-warm" : "bench-rust-cold")
        .memoryMiB(MEMORY_MIB)
        .workload(false)
        .pullOptions({ dataDir })
        .force();
      if (warm)
        builder
          .withWarmup(async (vm) => {
            const out = await vm
              .execBuilder()
              .stageFile("/tmp/seed.rs", SEED.source)
              .argv(["rustc", "-O", "-o", "/tmp/seed", "/tmp/seed.rs"])
              .chain(["/tmp/seed"])
              .timeout(CYCLE_TIMEOUT_MS)
              .output();
            if (out.stdoutText !== SEED.expected) throw new Error(`the seed printed ${out.stdoutText}`);
          })
          .warmupTag("seed");
      const t0 = performance.now();
      const image = await builder.build();
      table.add({
        name: `bake rust ${rust.version} (${MEMORY_MIB} MiB)${warm ? ", warm-up compiling a seed" : ""}`,
        unit: "ms",
        summary: summarize([performance.now() - t0]),
      });
      return image;
    };
    const warm = await bake(true);
    const cold = await bake(false);

    for (const workers of options.workers) {
      const jobs = workers * options.cyclesPerWorker;
      const floorName = `host ${version} -O + run, ${workers} at once`;
      addLoopRows(table, floorName, await hostLoop(workers, jobs, hostRustcCycle));
      const configs: [string, Image, boolean][] = [
        [`verifier: warm bake, kept warm, ${workers} worker(s)`, warm, false],
        [`verifier: warm bake, fresh clone, ${workers} worker(s)`, warm, true],
        [`verifier: no warm bake, kept warm, ${workers} worker(s)`, cold, false],
      ];
      for (const [name, image, restore] of configs)
        addLoopRows(table, name, await vmLoop(image, restore, workers, jobs, rustcCycle), floorName);
    }
  } finally {
    await rm(dataDir, { recursive: true, force: true });
  }
}

/**
 * The light loop: the verifier's cycle with a small Python program instead of a compile, so the
 * cost of leasing, staging, exec and release shows against the guest's work. The image is baked
 * with a warm-up that runs the seed program (the interpreter's files in the page cache).
 */
export async function lightBench(table: Table, options: VerifierBenchOptions): Promise<void> {
  let version: string;
  try {
    version = (await execFileAsync(HOST_PYTHON, ["--version"])).stdout.trim();
  } catch {
    throw new Error(
      `the light loop's floor needs Debian's python3 at ${HOST_PYTHON}: apt-get install python3`,
    );
  }
  const python = (await serviceImages()).images.python;
  const dataDir = await mkdtemp(join(tmpdir(), "sm-bench-python-"));
  try {
    const t0 = performance.now();
    const image = await Image.builder(python.source)
      .name("bench-python-warm")
      .memoryMiB(256)
      .workload(false)
      .pullOptions({ dataDir })
      .force()
      .withWarmup(async (vm) => {
        const out = await pythonCycle(vm, 1000);
        if (out !== SEED.expected) throw new Error(`the seed printed ${out}`);
      })
      .warmupTag("seed")
      .build();
    table.add({
      name: `bake python ${python.version} (256 MiB), warm-up running a seed`,
      unit: "ms",
      summary: summarize([performance.now() - t0]),
    });
    for (const workers of options.workers) {
      const jobs = workers * options.cyclesPerWorker;
      const floorName = `host ${version} + run, ${workers} at once`;
      addLoopRows(table, floorName, await hostLoop(workers, jobs, hostPythonCycle));
      for (const restore of [false, true]) {
        const name = `light loop: ${restore ? "fresh clone" : "kept warm"}, ${workers} worker(s)`;
        addLoopRows(table, name, await vmLoop(image, restore, workers, jobs, pythonCycle), floorName);
      }
    }
  } finally {
    await rm(dataDir, { recursive: true, force: true });
  }
}
