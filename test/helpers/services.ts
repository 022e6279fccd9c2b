/**
 * Shared setup of the service checks (`test/integration/services-*.test.ts`): a server image from
 * `test/fixtures/services/build.sh` is pushed to a private registry on loopback, pulled and baked
 * with the public API (`Image.builder(ref)…build()`, its workload started at bake) once per test
 * file, and every check gets a fresh clone restored from that snapshot.
 *
 * ```ts
 * const service = serviceSuite("nginx", { memoryMiB: 256, readyPort: 80 });
 * service.it("serves a page", async (vm) => {
 *   await using port = await vm.exposeTcp(0, 80);
 *   await run("curl", ["-fsS", `http://127.0.0.1:${port.hostPort}/`]);
 * });
 * ```
 *
 * Cases are skipped where VM tests cannot run (with CI=true that is a failure, like every VM test).
 * A failing case prints the clone's console log and the bake's timings.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { readFile } from "node:fs/promises";
import { after, before, it } from "node:test";
import { promisify } from "node:util";
import { Image, type Vm } from "../../src/index.ts";
import { startRegistry, type TestRegistry } from "./registry.ts";
import { scratchDir } from "./scratch.ts";
import { type ServiceImages, type ServiceName, serviceImages } from "./service-images.ts";
import { vmSkipReason } from "./vm.ts";

const execFileAsync = promisify(execFile);

export interface ServiceSuiteOptions {
  /** Guest RAM of the snapshot. */
  memoryMiB: number;
  /** Start the image's Entrypoint + Cmd at bake (default true). */
  workload?: boolean;
  /** Wait at bake (in the guest) until something listens on this TCP port: the clones start serving. */
  readyPort?: number;
  /** More warm-up after the port is ready (in the snapshot, before it is saved). */
  warmup?: (vm: Vm) => Promise<void>;
}

export interface ServiceSuite {
  /** A case with a fresh clone of the baked snapshot, killed afterwards. */
  it(name: string, fn: (vm: Vm) => Promise<void>): void;
  /** The baked image (valid inside cases). */
  image(): Image;
  /** The images' facts (valid inside cases). */
  images(): ServiceImages;
}

/** Milliseconds the bake may wait for the workload's port. */
const READY_TIMEOUT_MS = 120_000;

/**
 * A shell script that waits until a socket listens on TCP `port` (IPv4 or IPv6), reading
 * /proc/net/tcp{,6} every 50 ms (the images have no client of their own for every service), and
 * exits 3 as soon as process `pid` (the workload) is gone.
 */
export function waitForListenScript(port: number, pid: number): string {
  const hex = port.toString(16).toUpperCase().padStart(4, "0");
  return `until grep -qE '^ *[0-9]+: [0-9A-F]+:${hex} [0-9A-F]+:[0-9A-F]+ 0A ' /proc/net/tcp /proc/net/tcp6 2>/dev/null; do [ -d /proc/${pid} ] || exit 3; sleep 0.05; done`;
}

/** Waits until the VM's workload listens on `port`; fails with its status and output if it ends first. */
export async function waitForWorkloadPort(vm: Vm, port: number): Promise<void> {
  const status = await vm.workloadStatus();
  const out =
    status.state === "running" && status.pid !== null
      ? await vm.exec(["/bin/sh", "-c", waitForListenScript(port, status.pid)], {
          timeoutMs: READY_TIMEOUT_MS,
          reject: false,
        })
      : undefined;
  if (out?.exitCode === 0) return;
  let logs = "";
  for await (const chunk of vm.workloadLogs()) logs += chunk.toString();
  throw new Error(
    `the workload did not listen on port ${port} (${JSON.stringify(await vm.workloadStatus())}); its output:\n${logs.slice(-4096)}`,
  );
}

export function serviceSuite(name: ServiceName, options: ServiceSuiteOptions): ServiceSuite {
  let skipReason: string | undefined;
  let registry: TestRegistry | undefined;
  let image: Image | undefined;
  let facts: ServiceImages | undefined;
  let bakeMs = 0;
  before(async () => {
    skipReason = await vmSkipReason();
    if (skipReason !== undefined) return;
    facts = await serviceImages();
    registry = await startRegistry();
    const tag = `library/${name}:${facts.images[name].version.replace(/[^A-Za-z0-9_.-]/g, "_")}`;
    const { reference } = await registry.push(facts.images[name].source, tag);
    const dataDir = await scratchDir(`sm-${name}-`);
    const started = performance.now();
    const builder = Image.builder(reference)
      .memoryMiB(options.memoryMiB)
      .workload(options.workload ?? true)
      .pullOptions({ dataDir });
    if (options.readyPort !== undefined || options.warmup !== undefined) {
      const port = options.readyPort;
      const warmup = options.warmup;
      builder
        .withWarmup(async (vm) => {
          if (port !== undefined) await waitForWorkloadPort(vm, port);
          await warmup?.(vm);
        })
        .warmupTag("ready");
    }
    image = await builder.build();
    bakeMs = performance.now() - started;
  });
  after(async () => {
    await registry?.stop();
  });
  return {
    it(caseName, fn) {
      it(caseName, async (t) => {
        if (skipReason !== undefined) return t.skip(skipReason);
        const vm = await image!.start();
        try {
          await fn(vm);
        } catch (error) {
          const log = await readFile(vm.consoleLogPath, "utf8").catch(() => "(none)");
          t.diagnostic(`pull + bake of ${name}: ${Math.round(bakeMs)} ms`);
          t.diagnostic(`console log of VM ${vm.id} (${vm.consoleLogPath}), last 4 KiB:\n${log.slice(-4096)}`);
          throw error;
        } finally {
          await vm.kill();
        }
      });
    },
    image: () => image!,
    images: () => facts!,
  };
}

/** The user names of the guest's processes whose command name (`/proc/PID/comm`) is `comm`. */
export async function processUsers(vm: Vm, comm: string): Promise<string[]> {
  const out = await vm.exec([
    "/bin/sh",
    "-c",
    'for p in /proc/[0-9]*; do read -r c <"$p/comm" 2>/dev/null && [ "$c" = "$1" ] && stat -c %U "$p"; done; true',
    "sh",
    comm,
  ]);
  return out.stdoutText.split("\n").filter(Boolean);
}

/** Runs a host program (a real client from Debian); rejects with its output when it fails. */
export async function run(
  file: string,
  args: readonly string[],
  options: { env?: NodeJS.ProcessEnv; input?: string; timeoutMs?: number } = {},
): Promise<{ stdout: string; stderr: string }> {
  try {
    const child = execFileAsync(file, args, {
      env: { ...process.env, ...options.env },
      timeout: options.timeoutMs ?? 60_000,
      maxBuffer: 16 * 1024 * 1024,
    });
    child.child.stdin?.end(options.input ?? "");
    return await child;
  } catch (error) {
    const e = error as Error & { stdout?: string; stderr?: string };
    throw new Error(
      `${file} ${args.join(" ")} failed: ${e.message}\nstdout: ${e.stdout}\nstderr: ${e.stderr}`,
      {
        cause: error,
      },
    );
  }
}

/**
 * wrk against `port` for 3 s (2 threads, 8 connections): its summary must say it made requests,
 * with no socket errors and no non-2xx/3xx responses. wrk's own 2 s request timeout would be a
 * timing assertion on a loaded host: a request may take up to 60 s.
 */
export async function assertWrkClean(port: number): Promise<void> {
  const { stdout } = await run(
    "wrk",
    ["-t", "2", "-c", "8", "-d", "3s", "--timeout", "60s", `http://127.0.0.1:${port}/`],
    {
      timeoutMs: 120_000,
    },
  );
  const requests = /(\d+) requests in/.exec(stdout);
  assert.ok(requests && Number(requests[1]) > 0, `wrk made no requests:\n${stdout}`);
  assert.doesNotMatch(stdout, /Socket errors|Non-2xx or 3xx responses/, stdout);
}

/**
 * The check of an interpreter image (node, python): `program`, staged at `argv[1]` and run as
 * `argv` plus `/tmp/result.json`, reads its stdin and writes `{ lines, words, sha256, …version }`
 * of it to that file, which the host reads back and compares.
 */
export async function assertCountingProgram(
  vm: Vm,
  argv: readonly [string, string],
  program: string,
  version: Record<string, string>,
): Promise<void> {
  const input = "héllo wörld\nfrom the host\n".repeat(500);
  const out = await vm
    .execBuilder()
    .stageFile(argv[1], program)
    .argv([...argv, "/tmp/result.json"])
    .stdin(input)
    .timeout(60_000)
    .output();
  assert.equal(out.stdoutText, "wrote /tmp/result.json\n");
  const result = JSON.parse(new TextDecoder().decode(await vm.readFile("/tmp/result.json")));
  assert.deepEqual(result, {
    lines: 1000,
    words: 2500,
    sha256: createHash("sha256").update(input).digest("hex"),
    ...version,
  });
}
