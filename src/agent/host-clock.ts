/**
 * The host time a new agent session steps the guest clock to. A seam for tests: a test may set
 * `hostClock.nowNs` to prove that a restored guest takes its time from the host (and put it back).
 */
export const hostClock = {
  /** Host `CLOCK_REALTIME` in nanoseconds. */
  nowNs(): bigint {
    return BigInt(Math.round((performance.timeOrigin + performance.now()) * 1000)) * 1000n;
  },
};
