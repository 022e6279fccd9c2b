/**
 * Pool policy with a fake VM source and a manual clock: spawning, caps, waiters, eviction,
 * release modes, discards, failures, close.
 */
import assert from "node:assert/strict";
import { subscribe, unsubscribe } from "node:diagnostics_channel";
import { describe, it } from "node:test";
import { SupermachineError } from "../../src/errors.ts";
import type { Pool, PoolBuilder } from "../../src/pool/index.ts";
import { ManualClock, type PoolableVm, poolBuilder, type VmSource } from "../../src/testing.ts";

class FakeVm implements PoolableVm {
  readonly id: string;
  readonly done: Promise<Error | undefined>;
  tainted = false;
  ended: "stopped" | "killed" | "died" | undefined;
  execs: string[][] = [];
  #resolve!: (error: Error | undefined) => void;

  constructor(id: string) {
    this.id = id;
    this.done = new Promise((resolve) => {
      this.#resolve = resolve;
    });
  }

  async stop(): Promise<void> {
    this.ended ??= "stopped";
    this.#resolve(undefined);
  }

  async kill(): Promise<void> {
    this.ended ??= "killed";
    this.#resolve(undefined);
  }

  /** The VM's process died on its own. */
  die(): void {
    this.ended ??= "died";
    this.tainted = true;
    this.#resolve(new SupermachineError("VM_EXITED", `${this.id} died`));
  }

  async exec(argv: string[]): Promise<string> {
    this.execs.push(argv);
    return argv.join(" ");
  }
}

interface Deferred<T> {
  resolve(value: T): void;
  reject(error: Error): void;
}

/** Creates FakeVms: at once, or held until the test releases them (`hold = true`). */
class FakeSource implements VmSource<FakeVm> {
  vms: FakeVm[] = [];
  creates = 0;
  hold = false;
  held: Deferred<FakeVm>[] = [];
  failures = 0;
  failForever = false;
  signals: (AbortSignal | undefined)[] = [];
  prestarts = 0;
  activations = 0;
  disposed = 0;
  prestartEnabled = false;

  constructor(prestart = false) {
    this.prestartEnabled = prestart;
    if (!prestart) this.prestart = undefined;
  }

  describe(): string {
    return "fake";
  }

  create(signal?: AbortSignal): Promise<FakeVm> {
    this.creates++;
    this.signals.push(signal);
    if (this.failForever || this.failures > 0) {
      if (this.failures > 0) this.failures--;
      return Promise.reject(new SupermachineError("VMM_FAILED", `create #${this.creates} failed`));
    }
    const vm = new FakeVm(`vm${this.creates}`);
    if (!this.hold) {
      this.vms.push(vm);
      return Promise.resolve(vm);
    }
    return new Promise((resolve, reject) => {
      this.held.push({
        resolve: () => {
          this.vms.push(vm);
          resolve(vm);
        },
        reject,
      });
    });
  }

  prestart?: () => Promise<{ activate(): Promise<FakeVm>; kill(): Promise<void> }> = async () => {
    this.prestarts++;
    const n = this.prestarts;
    let used = false;
    return {
      activate: async () => {
        assert.equal(used, false, "activate() twice");
        used = true;
        this.activations++;
        const vm = new FakeVm(`pre${n}`);
        this.vms.push(vm);
        return vm;
      },
      kill: async () => {
        used = true;
        this.disposed++;
      },
    };
  };

  releaseHeld(): void {
    const next = this.held.shift();
    assert.ok(next, "no create() is held");
    next.resolve(undefined as unknown as FakeVm);
  }

  alive(): FakeVm[] {
    return this.vms.filter((vm) => vm.ended === undefined);
  }
}

function builder(source: FakeSource, clock = new ManualClock()): PoolBuilder<FakeVm> {
  return poolBuilder(source, { clock });
}

async function closeAndCheck(pool: Pool<FakeVm>, source: FakeSource, clock: ManualClock): Promise<void> {
  await pool.close({ force: true });
  assert.deepEqual(source.alive(), [], "every VM is stopped after close");
  assert.equal(clock.pendingTimers, 0, "no timer left behind");
}

describe("pool policy", () => {
  it("spawns lazily: no VM until the first acquire", async () => {
    const source = new FakeSource();
    const clock = new ManualClock();
    const pool = await builder(source, clock).max(3).build();
    assert.equal(source.creates, 0);
    assert.equal(pool.stats().idle, 0);
    const vm = await pool.acquire();
    assert.equal(source.creates, 1);
    assert.equal(vm.id, "vm1");
    assert.deepEqual(
      { ...pool.stats(), restoreLatencyMs: undefined },
      {
        idle: 0,
        busy: 1,
        spawning: 0,
        prestarted: 0,
        waiters: 0,
        stopping: 0,
        totalSpawned: 1,
        totalEvicted: 0,
        totalDiscarded: 0,
        totalAcquired: 1,
        totalSpawnFailures: 0,
        restoreLatencyMs: undefined,
      },
    );
    await vm.release();
    await closeAndCheck(pool, source, clock);
  });

  it("build() waits for min VMs and acquires refill min in the background", async () => {
    const source = new FakeSource();
    const clock = new ManualClock();
    const pool = await builder(source, clock).min(2).max(4).build();
    assert.equal(pool.stats().idle, 2);
    const a = await pool.acquire();
    await pool.settled();
    assert.equal(pool.stats().idle, 2, "refilled to min");
    assert.equal(pool.stats().busy, 1);
    assert.equal(pool.stats().totalSpawned, 3);
    const b = await pool.acquire();
    const c = await pool.acquire();
    await pool.settled();
    // 3 busy + at most 1 more under max 4.
    assert.equal(pool.stats().busy, 3);
    assert.equal(pool.stats().idle, 1);
    assert.equal(source.creates, 4);
    for (const lease of [a, b, c]) await lease.release();
    await closeAndCheck(pool, source, clock);
  });

  it("never exceeds max: the next acquire waits for a release", async () => {
    const source = new FakeSource();
    const clock = new ManualClock();
    const pool = await builder(source, clock).max(2).restoreOnRelease(false).build();
    const a = await pool.acquire();
    const b = await pool.acquire();
    let third: string | undefined;
    const waiting = pool.acquire().then((lease) => {
      third = lease.id;
      return lease;
    });
    await pool.settled();
    assert.equal(third, undefined);
    assert.equal(source.creates, 2);
    assert.equal(pool.stats().waiters, 1);
    await a.release();
    const c = await waiting;
    assert.equal(c.id, a.id, "the released VM is reused");
    assert.equal(pool.stats().waiters, 0);
    await b.release();
    await c.release();
    await closeAndCheck(pool, source, clock);
  });

  it("serves waiters first come, first served", async () => {
    const source = new FakeSource();
    const clock = new ManualClock();
    const pool = await builder(source, clock).max(1).restoreOnRelease(false).build();
    const first = await pool.acquire();
    const order: string[] = [];
    const waiters = ["B", "C", "D"].map((name) =>
      pool.acquire().then(async (lease) => {
        order.push(name);
        await pool.settled();
        await lease.release();
      }),
    );
    await pool.settled();
    assert.equal(pool.stats().waiters, 3);
    await first.release();
    await Promise.all(waiters);
    assert.deepEqual(order, ["B", "C", "D"]);
    assert.equal(source.creates, 1);
    await closeAndCheck(pool, source, clock);
  });

  it("times out a waiter with PoolTimeoutError and removes it from the queue", async () => {
    const source = new FakeSource();
    const clock = new ManualClock();
    const pool = await builder(source, clock).max(1).acquireTimeout(500).restoreOnRelease(false).build();
    const held = await pool.acquire();
    const late = pool.acquire();
    const rejected = assert.rejects(late, (error: unknown) => {
      assert.ok(SupermachineError.is(error));
      assert.equal(error.code, "POOL_TIMEOUT");
      assert.equal(error.name, "PoolTimeoutError");
      assert.equal((error as { timeoutMs?: number }).timeoutMs, 500);
      return true;
    });
    clock.advance(499);
    await pool.settled();
    assert.equal(pool.stats().waiters, 1);
    clock.advance(1);
    await rejected;
    assert.equal(pool.stats().waiters, 0);
    // The timed-out waiter never gets the VM: it goes back to idle.
    await held.release();
    assert.equal(pool.stats().idle, 1);
    assert.equal(pool.stats().busy, 0);
    await closeAndCheck(pool, source, clock);
  });

  it("evicts idle VMs above min after idleTimeout", async () => {
    const source = new FakeSource();
    const clock = new ManualClock();
    const pool = await builder(source, clock)
      .min(1)
      .max(3)
      .idleTimeout(1_000)
      .restoreOnRelease(false)
      .build();
    const leases = [await pool.acquire(), await pool.acquire(), await pool.acquire()];
    await pool.settled();
    clock.advance(5_000); // busy VMs are never evicted
    for (const lease of leases) await lease.release();
    assert.equal(pool.stats().idle, 3);
    clock.advance(999);
    await pool.settled();
    assert.equal(pool.stats().idle, 3);
    clock.advance(1);
    await pool.settled();
    assert.equal(pool.stats().idle, 1);
    assert.equal(pool.stats().totalEvicted, 2);
    assert.equal(source.alive().length, 1);
    // The most recently used VM is the one kept; evicted ones were stopped gracefully.
    assert.equal(source.alive()[0]?.id, leases[2]?.id);
    assert.deepEqual(
      source.vms.filter((vm) => vm.ended !== undefined).map((vm) => vm.ended),
      ["stopped", "stopped"],
    );
    clock.advance(10_000);
    await pool.settled();
    assert.equal(pool.stats().idle, 1, "min is never evicted");
    await closeAndCheck(pool, source, clock);
  });

  it("restoreOnRelease(true): a released VM is stopped and replaced by a fresh one", async () => {
    const source = new FakeSource();
    const clock = new ManualClock();
    const pool = await builder(source, clock).min(1).max(2).build();
    const a = await pool.acquire();
    await pool.settled();
    await a.release();
    await pool.settled();
    assert.equal(source.vms.find((vm) => vm.id === a.id)?.ended, "killed");
    const b = await pool.acquire();
    assert.notEqual(b.id, a.id);
    await b.release();
    await pool.settled();
    assert.equal(pool.stats().idle, 1);
    assert.equal(pool.stats().totalAcquired, 2);
    await closeAndCheck(pool, source, clock);
  });

  it("restoreOnRelease(false): a released VM is reused with its state", async () => {
    const source = new FakeSource();
    const clock = new ManualClock();
    const pool = await builder(source, clock).max(2).restoreOnRelease(false).build();
    const a = await pool.acquire();
    const aId = a.id;
    await a.release();
    const b = await pool.acquire();
    assert.equal(b.id, aId);
    assert.equal(source.creates, 1);
    await b.release();
    await closeAndCheck(pool, source, clock);
  });

  it("discards a tainted VM on release and a dead busy VM, never handing them out again", async () => {
    const source = new FakeSource();
    const clock = new ManualClock();
    const pool = await builder(source, clock).max(2).restoreOnRelease(false).build();
    const a = await pool.acquire();
    a.vm.tainted = true; // e.g. an exec timed out
    await a.release();
    assert.equal(pool.stats().totalDiscarded, 1);
    assert.equal(pool.stats().idle, 0);
    const b = await pool.acquire();
    assert.notEqual(b.id, a.id);
    b.vm.die();
    await b.release();
    assert.equal(pool.stats().totalDiscarded, 2);
    const c = await pool.acquire();
    assert.notEqual(c.id, b.id);
    assert.equal(source.creates, 3);
    await c.discard();
    assert.equal(pool.stats().totalDiscarded, 3);
    assert.equal(source.vms[2]?.ended, "killed");
    await closeAndCheck(pool, source, clock);
  });

  it("replaces an idle VM that dies", async () => {
    const source = new FakeSource();
    const clock = new ManualClock();
    const pool = await builder(source, clock).min(1).max(2).build();
    const first = source.vms[0] as FakeVm;
    first.die();
    await pool.settled();
    assert.equal(pool.stats().totalDiscarded, 1);
    assert.equal(pool.stats().idle, 1);
    const lease = await pool.acquire();
    assert.notEqual(lease.id, first.id);
    await lease.release();
    await closeAndCheck(pool, source, clock);
  });

  it("skips an idle VM that became tainted without dying", async () => {
    const source = new FakeSource();
    const clock = new ManualClock();
    const pool = await builder(source, clock).min(1).max(2).build();
    const first = source.vms[0] as FakeVm;
    first.tainted = true;
    const lease = await pool.acquire();
    assert.notEqual(lease.id, first.id);
    assert.equal(first.ended, "killed");
    await lease.release();
    await closeAndCheck(pool, source, clock);
  });

  it("close() waits for busy VMs to be released; waiters and later acquires get POOL_CLOSED", async () => {
    const source = new FakeSource();
    const clock = new ManualClock();
    const pool = await builder(source, clock).min(1).max(1).build();
    const busy = await pool.acquire();
    const waiter = pool.acquire();
    let closed = false;
    const closing = pool.close().then(() => {
      closed = true;
    });
    await assert.rejects(waiter, { code: "POOL_CLOSED" });
    await assert.rejects(pool.acquire(), { code: "POOL_CLOSED" });
    await pool.settled();
    assert.equal(closed, false, "close waits for the busy VM");
    assert.equal(busy.vm.ended, undefined);
    await busy.release();
    await closing;
    assert.equal(source.vms[0]?.ended, "stopped");
    assert.deepEqual(source.alive(), []);
    assert.equal(clock.pendingTimers, 0);
  });

  it("close({ force }) kills busy VMs and ends their leases", async () => {
    const source = new FakeSource();
    const clock = new ManualClock();
    const pool = await builder(source, clock).min(2).max(2).build();
    const busy = await pool.acquire();
    await pool.close({ force: true });
    assert.equal(busy.released, true);
    assert.throws(() => busy.vm, { code: "VM_STOPPED" });
    await busy.release(); // harmless
    assert.deepEqual(
      source.vms.map((vm) => vm.ended),
      ["killed", "killed"],
    );
    assert.equal(clock.pendingTimers, 0);
  });

  it("a forced close escalates a graceful one that waits for busy VMs", async () => {
    const source = new FakeSource();
    const clock = new ManualClock();
    const pool = await builder(source, clock).max(1).build();
    const busy = await pool.acquire();
    const graceful = pool.close();
    await pool.settled();
    await pool.close({ force: true });
    await graceful;
    assert.equal(busy.released, true);
    assert.equal(source.vms[0]?.ended, "killed");
  });

  it("close() stops VMs still being created once they are ready, and aborts create()", async () => {
    const source = new FakeSource();
    source.hold = true;
    const clock = new ManualClock();
    const pool = await builder(source, clock).max(2).build();
    const waiter = pool.acquire();
    assert.equal(pool.stats().spawning, 1);
    const closing = pool.close();
    await assert.rejects(waiter, { code: "POOL_CLOSED" });
    assert.equal(source.signals[0]?.aborted, true);
    source.releaseHeld();
    await closing;
    assert.equal(source.vms[0]?.ended, "stopped");
  });

  it("reports restore latency percentiles", async () => {
    const source = new FakeSource();
    source.hold = true;
    const clock = new ManualClock();
    const pool = await builder(source, clock).max(10).build();
    const leases = [];
    for (const ms of [100, 200, 300, 400, 1_000]) {
      const pending = pool.acquire();
      clock.advance(ms);
      source.releaseHeld();
      leases.push(await pending);
    }
    const { restoreLatencyMs } = pool.stats();
    assert.deepEqual(restoreLatencyMs, { p50: 300, p95: 1_000, count: 5 });
    assert.deepEqual(
      leases.map((lease) => lease.acquireMs),
      [100, 200, 300, 400, 1_000],
    );
    for (const lease of leases) await lease.release();
    await closeAndCheck(pool, source, clock);
  });

  it("an aborted acquire leaves the queue and never gets a VM", async () => {
    const source = new FakeSource();
    const clock = new ManualClock();
    const pool = await builder(source, clock).max(1).restoreOnRelease(false).build();
    const held = await pool.acquire();
    const controller = new AbortController();
    const aborted = pool.acquire({ signal: controller.signal });
    const next = pool.acquire();
    await pool.settled();
    assert.equal(pool.stats().waiters, 2);
    controller.abort();
    await assert.rejects(aborted, { code: "ABORTED" });
    assert.equal(pool.stats().waiters, 1);
    await held.release();
    const lease = await next;
    assert.equal(lease.id, held.id);
    await assert.rejects(pool.acquire({ signal: AbortSignal.abort() }), { code: "ABORTED" });
    await lease.release();
    await closeAndCheck(pool, source, clock);
  });

  it("a failing create() rejects the waiter, backs off, and recovers", async () => {
    const source = new FakeSource();
    const clock = new ManualClock();
    const pool = await builder(source, clock).max(2).build();
    source.failures = 1;
    await assert.rejects(pool.acquire(), { code: "VMM_FAILED" });
    assert.equal(pool.stats().totalSpawnFailures, 1);
    // During the back-off the next acquire waits; then it gets a VM.
    const next = pool.acquire();
    await pool.settled();
    assert.equal(source.creates, 1);
    clock.advance(100);
    const lease = await next;
    assert.equal(source.creates, 2);
    await lease.release();
    await closeAndCheck(pool, source, clock);
  });

  it("a permanently failing source does not spin", async () => {
    const source = new FakeSource();
    source.failForever = true;
    const clock = new ManualClock();
    const pool = await builder(source, clock).max(4).acquireTimeout(Number.POSITIVE_INFINITY).build();
    await assert.rejects(pool.acquire(), { code: "VMM_FAILED" });
    // Waiters arriving during the back-off wait for one probe at a time.
    const waiters = [1, 2, 3].map(() =>
      pool.acquire().then(
        () => "ok",
        (error: SupermachineError) => error.code,
      ),
    );
    await pool.settled();
    assert.equal(source.creates, 1);
    for (let ms = 0; ms < 1_000; ms += 50) {
      clock.advance(50);
      await pool.settled();
    }
    // Probes after 100, 200 and 400 ms of back-off (at 100, 300 and 700 ms), each failing one waiter.
    assert.equal(source.creates, 4);
    assert.deepEqual(await Promise.all(waiters), ["VMM_FAILED", "VMM_FAILED", "VMM_FAILED"]);
    await closeAndCheck(pool, source, clock);
  });

  it("build() fails and leaves nothing running when min VMs cannot be created", async () => {
    const source = new FakeSource();
    source.failures = 1;
    const clock = new ManualClock();
    await assert.rejects(builder(source, clock).min(2).max(2).build(), { code: "VMM_FAILED" });
    assert.deepEqual(source.alive(), []);
    assert.equal(clock.pendingTimers, 0);
  });

  it("keeps pre-started VM processes and activates them on demand", async () => {
    const source = new FakeSource(true);
    const clock = new ManualClock();
    const pool = await builder(source, clock).max(2).prestarted(2).build();
    assert.equal(pool.stats().prestarted, 2);
    const lease = await pool.acquire();
    assert.equal(lease.id, "pre1");
    assert.equal(source.creates, 0);
    await pool.settled();
    assert.equal(pool.stats().prestarted, 2, "refilled");
    await lease.release();
    await pool.close();
    assert.equal(source.disposed, 2);
    assert.equal(source.activations, 1);
  });

  it("falls back to create() when a pre-started process cannot be activated", async () => {
    const source = new FakeSource(true);
    const clock = new ManualClock();
    const pool = await builder(source, clock).max(2).prestarted(1).build();
    const original = source.prestart;
    source.prestart = async () => {
      const handle = await (original as NonNullable<FakeSource["prestart"]>)();
      return {
        ...handle,
        activate: () => Promise.reject(new SupermachineError("VM_EXITED", "died waiting")),
      };
    };
    // The handle made at build() activates; replace it with a broken one.
    const first = await pool.acquire();
    assert.equal(first.id, "pre1");
    await pool.settled();
    const second = await pool.acquire();
    assert.equal(second.id, "vm1", "created instead");
    assert.ok(source.disposed >= 1, "the broken handle was disposed of");
    await first.release();
    await second.release();
    await closeAndCheck(pool, source, clock);
  });

  it("backs off when pre-starting fails, without failing acquires", async () => {
    const source = new FakeSource(true);
    const clock = new ManualClock();
    const pool = await builder(source, clock).max(2).prestarted(1).build();
    let attempts = 0;
    source.prestart = () => {
      attempts++;
      return Promise.reject(new SupermachineError("VMM_FAILED", "no QEMU"));
    };
    const lease = await pool.acquire(); // uses the handle made at build()
    await pool.settled();
    assert.equal(attempts, 1);
    clock.advance(99);
    await pool.settled();
    assert.equal(attempts, 1);
    clock.advance(1);
    await pool.settled();
    assert.equal(attempts, 2);
    clock.advance(200);
    await pool.settled();
    assert.equal(attempts, 3);
    const other = await pool.acquire();
    assert.equal(other.id, "vm1");
    await lease.release();
    await other.release();
    await closeAndCheck(pool, source, clock);
  });

  it("delegates calls to the VM and refuses them after release", async () => {
    const source = new FakeSource();
    const clock = new ManualClock();
    const pool = await builder(source, clock).build();
    const lease = await pool.acquire();
    assert.equal(await lease.vm.exec(["echo", "hi"]), "echo hi");
    await lease.release();
    assert.throws(() => lease.vm, { code: "VM_STOPPED" });
    await closeAndCheck(pool, source, clock);
  });

  it("rejects impossible settings", async () => {
    const source = new FakeSource();
    await assert.rejects(poolBuilder(source).min(3).max(2).build(), { code: "INVALID_ARGUMENT" });
    await assert.rejects(poolBuilder(source).max(0).build(), { code: "INVALID_ARGUMENT" });
    await assert.rejects(poolBuilder(source).acquireTimeout(-1).build(), { code: "INVALID_ARGUMENT" });
    assert.equal(source.creates, 0);
  });

  it("publishes acquire, release and discard on diagnostics channels", async () => {
    const source = new FakeSource();
    const clock = new ManualClock();
    const seen: string[] = [];
    const listeners = ["acquire", "release", "discard"].map((event) => {
      const listener = (message: unknown) => seen.push(`${event}:${(message as { vmId: string }).vmId}`);
      subscribe(`supermachine:pool:${event}`, listener);
      return [event, listener] as const;
    });
    try {
      const pool = await builder(source, clock).restoreOnRelease(false).build();
      const a = await pool.acquire();
      await a.release();
      const b = await pool.acquire();
      await b.discard();
      await closeAndCheck(pool, source, clock);
    } finally {
      for (const [event, listener] of listeners) unsubscribe(`supermachine:pool:${event}`, listener);
    }
    assert.deepEqual(seen, ["acquire:vm1", "release:vm1", "acquire:vm1", "release:vm1", "discard:vm1"]);
  });

  it("with the real clock, a closed pool leaves no timers behind", async () => {
    const source = new FakeSource();
    const timers = () => process.getActiveResourcesInfo().filter((kind) => kind === "Timeout").length;
    const before = timers();
    const pool = await poolBuilder(source).min(1).max(1).idleTimeout(60_000).acquireTimeout(60_000).build();
    const held = await pool.acquire();
    const waiter = pool.acquire();
    assert.ok(timers() > before);
    await held.release();
    await (await waiter).release();
    await pool.close();
    assert.equal(timers(), before);
  });
});
