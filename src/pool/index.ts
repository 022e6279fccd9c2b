/** The pool: a warm, auto-scaling set of VMs from one source. */
export { DEFAULT_POOL_OPTIONS, Pool, type PoolOptions, type PoolStats } from "./pool.ts";
export { PoolBuilder } from "./pool-builder.ts";
export { ManualClock, type PoolClock, systemClock } from "./pool-clock.ts";
export { PooledVm } from "./pooled-vm.ts";
export { coldBootSource, type PoolableVm, type PrestartedVmHandle, type VmSource } from "./vm-source.ts";
