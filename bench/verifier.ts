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
 */
import { execFile } from "node:child_process";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { promisify } from "node:util";
import { Image } from "../src/index.ts";
import { serviceImages } from "../test/helpers/service-images.ts";
import { summarize, type Table } from "./table.ts";

const execFileAsync = promisify(execFile);

/** Debian's rustc on the host (package `rustc`, installed by scripts/setup.sh): the floor. */
const HOST_RUSTC = "/usr/bin/rustc";
const MEMORY_MIB = 512;
/** Bound of one guest compile + run: far above a compile under TCG on a loaded machine. */
const CYCLE_TIMEOUT_MS = 600_000;

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

async function hostLoop(workers: number, jobs: number): Promise<LoopResult> {
  const dir = await mkdtemp(join(tmpdir(), "sm-bench-rustc-"));
  try {
    return await runLoop(workers, jobs, async (n) => {
      const src = join(dir, `c${n}.rs`);
      const bin = join(dir, `c${n}`);
      await writeFile(src, candidate(n).source);
      await execFileAsync(HOST_RUSTC, ["-O", "-o", bin, src]);
      return (await execFileAsync(bin)).stdout;
    });
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

async function vmLoop(
  image: Image,
  restoreOnRelease: boolean,
  workers: number,
  jobs: number,
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
    const out = await vm
      .execBuilder()
      .stageFile("/tmp/candidate.rs", candidate(n).source)
      .argv(["rustc", "-O", "-o", "/tmp/candidate", "/tmp/candidate.rs"])
      .chain(["/tmp/candidate"])
      .timeout(CYCLE_TIMEOUT_MS)
      .output();
    return out.stdoutText;
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
      const configs: [string, () => Promise<LoopResult>][] = [
        [floorName, () => hostLoop(workers, jobs)],
        [`verifier: warm bake, kept warm, ${workers} worker(s)`, () => vmLoop(warm, false, workers, jobs)],
        [`verifier: warm bake, fresh clone, ${workers} worker(s)`, () => vmLoop(warm, true, workers, jobs)],
        [`verifier: no warm bake, kept warm, ${workers} worker(s)`, () => vmLoop(cold, false, workers, jobs)],
      ];
      for (const [name, run] of configs) {
        const { cycles, perSecond } = await run();
        const against = name === floorName ? {} : { against: floorName };
        table.add({ name, unit: "ms/cycle", summary: summarize(cycles), ...against });
        table.add({
          name: `  ${name}: throughput`,
          unit: "cycles/s",
          summary: summarize([perSecond]),
          higherIsBetter: true,
          ...(name === floorName ? {} : { against: `  ${floorName}: throughput` }),
        });
      }
    }
  } finally {
    await rm(dataDir, { recursive: true, force: true });
  }
}
