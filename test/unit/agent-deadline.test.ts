import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { Watchdog } from "../../src/agent/deadline.ts";

/** A watchdog whose expiries are counted and awaitable. */
function watched(timeoutMs: number) {
  let expiries = 0;
  let resolve!: () => void;
  const expired = new Promise<void>((r) => {
    resolve = r;
  });
  const watchdog = new Watchdog(timeoutMs, () => {
    expiries++;
    resolve();
  });
  return { watchdog, expired, count: () => expiries };
}

/** Resolves once the event loop has run its timers past `ms` milliseconds from now. */
const after = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

describe("Watchdog (one shared timer)", () => {
  test("an armed watchdog expires once; a disarmed one due at the same time does not", async () => {
    const a = watched(30);
    const b = watched(30);
    a.watchdog.arm();
    b.watchdog.arm();
    b.watchdog.disarm();
    await a.expired;
    await after(40);
    assert.equal(a.count(), 1);
    assert.equal(b.count(), 0);
    a.watchdog.arm(); // expired for good: arming again does nothing
    await after(40);
    assert.equal(a.count(), 1);
  });

  test("progress pushes the deadline back past the shared timer's wakeup", async () => {
    const steady = watched(1000);
    const later = watched(1500);
    steady.watchdog.arm();
    later.watchdog.arm();
    const ticks = setInterval(() => steady.watchdog.progress(), 10);
    try {
      await later.expired;
      assert.equal(steady.count(), 0, "a watchdog making progress expired");
    } finally {
      clearInterval(ticks);
    }
    await steady.expired;
    assert.equal(steady.count(), 1);
  });

  test("a watchdog armed with a nearer deadline than the timer's is not kept waiting for it", async () => {
    const far = watched(60_000);
    const near = watched(20);
    far.watchdog.arm();
    near.watchdog.arm();
    await near.expired;
    assert.equal(far.count(), 0);
    far.watchdog.stop();
  });

  test("stop() ends it for good, armed or not", async () => {
    const a = watched(20);
    a.watchdog.arm();
    a.watchdog.stop();
    a.watchdog.arm();
    await after(40);
    assert.equal(a.count(), 0);
  });

  test("a watchdog re-armed after disarm gets its full timeout from then", async () => {
    const a = watched(30);
    const b = watched(30);
    a.watchdog.arm();
    a.watchdog.disarm();
    b.watchdog.arm();
    await b.expired;
    assert.equal(a.count(), 0);
    a.watchdog.arm();
    await a.expired;
    assert.equal(a.count(), 1);
  });
});
