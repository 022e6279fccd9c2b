/**
 * What a pool needs from a VM: an id, a `done` promise that settles when the VM is over (never
 * rejects), a `tainted` flag (set after an exec timeout or a failure), and `stop()`/`kill()`.
 * `Vm` is one.
 */
export interface PoolableVm {
  readonly id: string;
  /** Settles when the VM is over: `undefined` after stop/kill, the error when it died. Never rejects. */
  readonly done: Promise<Error | undefined>;
  /** True once the VM's state cannot be trusted for reuse. */
  readonly tainted: boolean;
  /** Graceful and idempotent. */
  stop(): Promise<void>;
  /** Forced. */
  kill(): Promise<void>;
}

/** A VM process started ahead of time: restored, warmed and paused, or waiting for its state (see {@link VmSource.prestart}). */
export interface PrestartedVmHandle<V extends PoolableVm> {
  /** Turn the waiting process into a running VM. Called at most once. */
  activate(): Promise<V>;
  /** End the waiting process without activating it. Idempotent. */
  kill(): Promise<void>;
}

/**
 * Where a pool gets its VMs: a snapshot restore, a cold boot, or a fake in tests.
 */
export interface VmSource<V extends PoolableVm> {
  /** A fresh VM, ready for work. Honours `signal` (the pool aborts it when closed). */
  create(signal?: AbortSignal): Promise<V>;
  /**
   * Optional: start the expensive part (the QEMU process) ahead of time; `activate()` finishes
   * the job. Pools with `prestarted(n)` keep `n` of these ready.
   */
  prestart?(): Promise<PrestartedVmHandle<V>>;
  /** Human-readable name of the source, used in error messages. */
  describe(): string;
}
