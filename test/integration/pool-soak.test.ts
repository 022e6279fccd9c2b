/**
 * Soak: acquire → exec → release cycles through a pool of 4 real VMs (the busybox fixture image,
 * baked through the public API; `restoreOnRelease(false)`, so VMs are reused and a fault that
 * leaves a bad VM behind would reach the next user), with faults placed and shaped by a seeded
 * generator:
 *
 * - `exit`: a non-zero exit → `ExecError` (`EXEC_FAILED`) with that exit code; the VM is reused;
 * - `timeout`: a `sleep` past a small `timeoutMs` (half of them ignore SIGTERM: those that got to
 *   say so end by SIGKILL) → `ExecTimeoutError` (`EXEC_TIMEOUT`) with that timeout; the VM is
 *   tainted and discarded;
 * - `signal`: the exec's process killed by another exec, and a shell that signals itself → the
 *   outcome's `signal` and an `ExecError` carrying it; the VM is reused;
 * - `freeze`: QEMU stopped from the host (SIGSTOP) and left so: the guest answers nothing → `ping`
 *   ends in `AGENT_TIMEOUT`, an exec with a timeout in `EXEC_TIMEOUT` (the host's backstop); the VM
 *   is tainted and discarded;
 * - `qemu-kill`: QEMU SIGKILLed from outside during an exec → the exec and every later call fail
 *   with `VM_EXITED`; the VM is discarded.
 *
 * Every other cycle must succeed, no VM a fault ended is ever handed out again, the pool's stats
 * add up, and afterwards nothing is left: no QEMU or other child process, no VM disk dir, no runtime
 * dir but the console logs kept on purpose for VMs whose QEMU died unasked (docs/vmm.md), no
 * listening socket, and no more open descriptors than a small bound.
 *
 * `SOAK_CYCLES` (default 80) and `SOAK_SEED` (default 1) set the run; the full soak is
 * `SOAK_CYCLES=1000 node --test test/integration/pool-soak.test.ts` (docs/pool.md).
 */
import assert from "node:assert/strict";
import { subscribe, unsubscribe } from "node:diagnostics_channel";
import { mkdtempSync, readdirSync, readFileSync } from "node:fs";
import { rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import {
  type ErrorCode,
  type ErrorOfCode,
  Image,
  type Pool,
  type PooledVm,
  SupermachineError,
  type Vm,
} from "../../src/index.ts";
import { fixtureImages } from "../helpers/fixtures.ts";
import { childProcesses, listeningSockets, openFdCount, processesOf, qemuPid } from "../helpers/processes.ts";
import { prng } from "../helpers/seeded-random.ts";
import { vmSkipReason } from "../helpers/vm.ts";

const CYCLES = Number(process.env.SOAK_CYCLES ?? 80);
const SEED = Number(process.env.SOAK_SEED ?? 1);
const WORKERS = 4;
/** Open descriptors the run may leave beyond those before it (Node opens some lazily). */
const FD_SLACK = 8;

const scratch = mkdtempSync(join(tmpdir(), "sm-soak-"));
const runtimeRoot = join(scratch, "run");
const dataRoot = join(scratch, "data");
process.env.SUPERMACHINE_RUNTIME_DIR = runtimeRoot;
process.env.SUPERMACHINE_DATA_DIR = dataRoot;

type Fault = "exit" | "timeout" | "signal" | "freeze" | "qemu-kill";
type Kind = "none" | Fault;

/** Share of the cycles that inject each fault (at least one of each, whatever the count). */
const SHARES: Record<Fault, number> = {
  exit: 0.06,
  timeout: 0.05,
  signal: 0.06,
  freeze: 0.02,
  "qemu-kill": 0.03,
};

interface Step {
  kind: Kind;
  /** Random draws in [0, 1) that shape the fault (exit code, timeout, signal, variant). */
  draws: [number, number];
}

/** Which cycle injects what: the counts of {@link SHARES}, placed by the seeded generator. */
function plan(cycles: number, seed: number): Step[] {
  const random = prng(seed);
  const kinds: Kind[] = [];
  for (const [fault, share] of Object.entries(SHARES) as [Fault, number][]) {
    for (let i = 0; i < Math.max(1, Math.round(share * cycles)); i++) kinds.push(fault);
  }
  while (kinds.length < cycles) kinds.push("none");
  for (let i = kinds.length - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [kinds[i], kinds[j]] = [kinds[j]!, kinds[i]!];
  }
  return kinds.map((kind) => ({ kind, draws: [random(), random()] }));
}

const pick = <T>(values: readonly T[], draw: number): T => values[Math.floor(draw * values.length)]!;

/** Awaits `promise`, which must reject with a supermachine error of `code`; returns it for more checks. */
async function rejectsWith<C extends ErrorCode>(promise: Promise<unknown>, code: C): Promise<ErrorOfCode<C>> {
  let error: unknown;
  try {
    await promise;
  } catch (caught) {
    error = caught;
  }
  if (error === undefined) assert.fail(`expected ${code}, the call succeeded`);
  if (!SupermachineError.is(error, code)) {
    assert.fail(
      `expected ${code}, got ${(error as Error)?.name}: ${(error as Error)?.message ?? String(error)}`,
    );
  }
  return error;
}

describe(`pool soak: ${CYCLES} cycles through a pool of ${WORKERS} with injected faults (seed ${SEED})`, () => {
  let skipReason: string | undefined;
  let image: Image;

  before(async () => {
    skipReason = await vmSkipReason();
    if (skipReason !== undefined) return;
    image = await Image.builder(`oci:${(await fixtureImages()).busybox}`)
      .name("busybox-soak")
      .memoryMiB(256)
      .vcpus(1)
      .warmupTag("soak")
      .build();
  });

  after(async () => {
    await rm(scratch, { recursive: true, force: true });
  });

  it("every fault surfaces as its typed error, nothing else fails, nothing leaks", {
    timeout: 3_600_000,
  }, async (t) => {
    if (skipReason !== undefined) return t.skip(skipReason);
    const steps = plan(CYCLES, SEED);
    const fdsBefore = openFdCount();
    const listeningBefore = listeningSockets();

    // Every QEMU started, and every discard with its reason, as the library reports them.
    const launched = new Set<string>();
    const discards: Record<string, number> = {};
    const onLaunch = (message: unknown) => launched.add((message as { id: string }).id);
    const onDiscard = (message: unknown) => {
      const { reason } = message as { reason: string };
      discards[reason] = (discards[reason] ?? 0) + 1;
    };
    subscribe("supermachine:vmm:launch", onLaunch);
    subscribe("supermachine:pool:discard", onDiscard);

    const pool: Pool<Vm> = await image
      .pool()
      .max(WORKERS)
      .restoreOnRelease(false)
      .acquireTimeout(300_000)
      .build();
    /** VMs a fault ended: never to be handed out again. */
    const ended = new Set<string>();
    /** VMs whose QEMU was killed from outside: their runtime dirs keep the console log. */
    const killedOutside = new Set<string>();
    const injected: Record<Kind, number> = {
      none: 0,
      exit: 0,
      timeout: 0,
      signal: 0,
      freeze: 0,
      "qemu-kill": 0,
    };
    const surfaced: Record<Kind, number> = { ...injected };
    const failures: string[] = [];
    /** Timed-out execs that ignored SIGTERM and were SIGKILLed after the grace period. */
    let escalated = 0;

    const runStep = async (index: number, step: Step, lease: PooledVm<Vm>): Promise<void> => {
      const [a, b] = step.draws;
      switch (step.kind) {
        case "none": {
          // A VM handed back after an earlier fault must be clean: no process of it left.
          const out = await lease.exec(["sh", "-c", 'echo "cycle $1"; ! pidof sleep', "sh", String(index)], {
            timeoutMs: 120_000,
          });
          assert.equal(out.stdoutText, `cycle ${index}\n`);
          return;
        }
        case "exit": {
          const code = 1 + Math.floor(a * 125);
          const error = await rejectsWith(lease.exec(["sh", "-c", `exit ${code}`]), "EXEC_FAILED");
          assert.equal(error.exitCode, code);
          assert.equal(error.outcome.signal, null);
          assert.equal(lease.vm.tainted, false, "a non-zero exit does not taint the VM");
          return;
        }
        case "timeout": {
          const timeoutMs = 100 + Math.floor(a * 900);
          const stubborn = b < 0.5;
          // The stubborn shell says when it ignores SIGTERM: a loaded guest may not get that far
          // before the timeout, and then SIGTERM ends it (or SIGKILL, when SIGTERM came between
          // the trap and the echo). Once it said so, only SIGKILL can end it.
          const argv = stubborn ? ["sh", "-c", "trap '' TERM; echo ignoring; sleep 600"] : ["sleep", "600"];
          const error = await rejectsWith(lease.exec(argv, { timeoutMs, killGraceMs: 300 }), "EXEC_TIMEOUT");
          assert.equal(error.timeoutMs, timeoutMs);
          assert.equal(error.outcome.timedOut, true);
          if (!stubborn) assert.equal(error.outcome.signal, "SIGTERM");
          else if (error.outcome.stdoutText === "ignoring\n") {
            assert.equal(error.outcome.signal, "SIGKILL");
            escalated++;
          } else {
            assert.equal(error.outcome.stdoutText, "");
            assert.ok(
              ["SIGTERM", "SIGKILL"].includes(error.outcome.signal ?? ""),
              String(error.outcome.signal),
            );
          }
          assert.equal(lease.vm.tainted, true, "a timed-out exec taints the VM");
          ended.add(lease.id);
          return;
        }
        case "signal": {
          const signal = pick(["KILL", "TERM", "INT", "SEGV"], a);
          const victim = await lease.spawn(["sleep", "600"]);
          await lease.exec(["kill", `-${signal}`, String(victim.pid)]);
          const outcome = await victim.wait();
          assert.equal(outcome.signal, `SIG${signal}`);
          assert.equal(outcome.exitCode, null);
          assert.equal(outcome.timedOut, false);
          const error = await rejectsWith(lease.exec(["sh", "-c", `kill -${signal} $$`]), "EXEC_FAILED");
          assert.equal(error.outcome.signal, `SIG${signal}`);
          assert.equal(error.exitCode, null);
          assert.equal(lease.vm.tainted, false, "a killed guest process does not taint the VM");
          return;
        }
        case "freeze": {
          // QEMU stopped from the host, and left stopped: the guest never answers again.
          process.kill(qemuPid(lease.id), "SIGSTOP");
          if (b < 0.5) {
            const error = await rejectsWith(lease.vm.ping(), "AGENT_TIMEOUT");
            assert.equal(error.operation, "ping");
          } else {
            const error = await rejectsWith(
              lease.exec(["true"], { timeoutMs: 200, killGraceMs: 0 }),
              "EXEC_TIMEOUT",
            );
            assert.equal(error.timeoutMs, 200);
          }
          assert.equal(lease.vm.tainted, true, "a VM that stopped answering is tainted");
          ended.add(lease.id);
          return;
        }
        case "qemu-kill": {
          const victim = await lease.spawn(["sleep", "600"]);
          killedOutside.add(lease.id);
          ended.add(lease.id);
          process.kill(qemuPid(lease.id), "SIGKILL");
          await rejectsWith(victim.wait(), "VM_EXITED");
          const died = await lease.vm.done;
          assert.ok(SupermachineError.is(died, "VM_EXITED"), `done: ${died?.message}`);
          await rejectsWith(lease.exec(["true"]), "VM_EXITED");
          return;
        }
      }
    };

    let next = 0;
    const started = performance.now();
    const worker = async (): Promise<void> => {
      while (next < steps.length) {
        const index = next++;
        const step = steps[index]!;
        injected[step.kind]++;
        let lease: PooledVm<Vm> | undefined;
        try {
          lease = await pool.acquire();
          assert.ok(!ended.has(lease.id), `VM ${lease.id}, ended by a fault, was handed out again`);
          await runStep(index, step, lease);
          surfaced[step.kind]++;
        } catch (error) {
          const where =
            lease === undefined ? "acquire" : `VM ${lease.id} (console log: ${lease.vm.consoleLogPath})`;
          failures.push(
            `cycle ${index} (${step.kind}) on ${where}: ${(error as Error).stack ?? String(error)}`,
          );
        } finally {
          await lease?.release();
        }
      }
    };
    await Promise.all(Array.from({ length: WORKERS }, worker));
    const seconds = (performance.now() - started) / 1000;
    await pool.settled();
    const stats = pool.stats();
    t.diagnostic(
      `${CYCLES} cycles in ${seconds.toFixed(1)} s; injected ${JSON.stringify(injected)}; surfaced as expected ${JSON.stringify(surfaced)} (${escalated} timeouts escalated to SIGKILL); discards ${JSON.stringify(discards)}; stats ${JSON.stringify(stats)}`,
    );
    assert.deepEqual(failures, [], `${failures.length} cycles failed`);
    assert.deepEqual(surfaced, injected);

    // The stats add up: every acquire counted, nothing busy, waiting or in flight, and every VM
    // created is idle, evicted or discarded — discarded exactly for the faults that end a VM.
    assert.equal(stats.totalAcquired, CYCLES);
    assert.deepEqual(
      [stats.busy, stats.waiters, stats.spawning, stats.stopping, stats.prestarted, stats.totalSpawnFailures],
      [0, 0, 0, 0, 0, 0],
    );
    assert.ok(stats.idle <= WORKERS);
    assert.equal(stats.totalSpawned, stats.idle + stats.totalEvicted + stats.totalDiscarded);
    assert.equal(stats.totalDiscarded, injected.timeout + injected.freeze + injected["qemu-kill"]);
    assert.deepEqual(discards, {
      tainted: injected.timeout + injected.freeze,
      exited: injected["qemu-kill"],
    });
    assert.equal(stats.restoreLatencyMs.count, Math.min(stats.totalSpawned, 1024));
    assert.equal(launched.size, stats.totalSpawned, "one QEMU per VM");

    await pool.close();
    unsubscribe("supermachine:vmm:launch", onLaunch);
    unsubscribe("supermachine:pool:discard", onDiscard);
    assert.deepEqual([pool.stats().idle, pool.stats().stopping], [0, 0]);

    // Nothing left behind.
    assert.deepEqual(processesOf(launched), [], "QEMU or relay processes left");
    assert.deepEqual(childProcesses(), [], "child processes left");
    assert.deepEqual(readdirSync(join(dataRoot, "vms")), [], "VM disk dirs left");
    const kept = readdirSync(join(runtimeRoot, "vms")).sort();
    assert.deepEqual(
      kept,
      [...killedOutside].sort(),
      "runtime dirs left (only VMs whose QEMU died unasked keep theirs)",
    );
    for (const id of kept) {
      assert.deepEqual(readdirSync(join(runtimeRoot, "vms", id)).sort(), ["console.log", "exit.json"]);
      const exit = JSON.parse(readFileSync(join(runtimeRoot, "vms", id, "exit.json"), "utf8"));
      assert.deepEqual([exit.reason, exit.signal], ["failed", "SIGKILL"]);
    }
    assert.deepEqual(listeningSockets(), listeningBefore, "listening sockets left");
    const fdsAfter = openFdCount();
    t.diagnostic(`open descriptors: ${fdsBefore} before, ${fdsAfter} after`);
    assert.ok(fdsAfter <= fdsBefore + FD_SLACK, `open descriptors grew from ${fdsBefore} to ${fdsAfter}`);
  });
});
