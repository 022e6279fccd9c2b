/**
 * `supermachine/testing`: support for testing code that uses supermachine's pools without VMs —
 * pools over a source of fake VMs, driven by a clock that moves only when told to.
 *
 * ```ts
 * import { ManualClock, poolBuilder } from "supermachine/testing";
 * const clock = new ManualClock();
 * const pool = await poolBuilder(fakeSource, { clock }).max(2).idleTimeout(1_000).build();
 * clock.advance(1_000); // idle VMs above `min` are evicted
 * ```
 */

export {
  ManualClock,
  type Pool,
  type PoolableVm,
  type PoolBuilder,
  type PoolClock,
  type PooledVm,
  type PoolOptions,
  type PoolStats,
  type PrestartedVmHandle,
  poolBuilder,
  type VmSource,
} from "./pool/index.ts";
