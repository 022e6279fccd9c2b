/** The pool: a warm, auto-scaling set of VMs from one source. */
export { DEFAULT_POOL_OPTIONS, Pool, type PoolOptions, type PoolStats } from "./pool.ts";
export { PoolBuilder, poolBuilder } from "./pool-builder.ts";
export { ManualClock, type PoolClock, systemClock } from "./pool-clock.ts";
export { PooledVm } from "./pooled-vm.ts";
export type { PoolableVm, PrestartedVmHandle, VmSource } from "./vm-source.ts";
