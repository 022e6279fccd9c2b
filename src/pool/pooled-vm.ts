import { VmError } from "../errors.ts";
import type { Vm } from "../vm/index.ts";
import type { PoolableVm } from "./vm-source.ts";

/** How a lease hands its VM back to its pool. */
export type ReturnLease = (lease: PooledVm<PoolableVm>, how: "release" | "discard") => Promise<void>;

/** What the pool may do with a lease that users cannot (set by the class's static block). */
let leases: {
  create<V extends PoolableVm>(vm: V, giveBack: ReturnLease, acquireMs: number): PooledVm<V>;
  revoke(lease: PooledVm<PoolableVm>): void;
};

/**
 * A VM on loan from a {@link Pool}. Use it through `.vm` or the delegated calls, then give it back
 * with {@link PooledVm.release} (or `await using`), or throw it away with {@link PooledVm.discard}.
 * After that, every call throws `VM_STOPPED`: the VM may already serve someone else.
 */
export class PooledVm<V extends PoolableVm = Vm> {
  /** The VM's id. */
  readonly id: string;
  /** Milliseconds `acquire()` waited for this VM. */
  readonly acquireMs: number;

  readonly #vm: V;
  readonly #giveBack: ReturnLease;
  #returned: Promise<void> | undefined;

  static {
    leases = {
      create: (vm, giveBack, acquireMs) => new PooledVm(vm, giveBack, acquireMs),
      revoke: (lease) => {
        lease.#returned ??= Promise.resolve();
      },
    };
  }

  private constructor(vm: V, giveBack: ReturnLease, acquireMs: number) {
    this.#vm = vm;
    this.#giveBack = giveBack;
    this.id = vm.id;
    this.acquireMs = acquireMs;
  }

  /** The underlying VM. Throws `VM_STOPPED` once the lease was released or discarded. */
  get vm(): V {
    if (this.#returned !== undefined) {
      throw new VmError("VM_STOPPED", `VM ${this.id} was returned to its pool: acquire another one`);
    }
    return this.#vm;
  }

  /** True once {@link release} or {@link discard} was called (or the pool was force-closed). */
  get released(): boolean {
    return this.#returned !== undefined;
  }

  /** See {@link Vm.exec}. */
  exec(
    this: PooledVm<PoolableVm & Pick<Vm, "exec">>,
    ...args: Parameters<Vm["exec"]>
  ): ReturnType<Vm["exec"]> {
    return this.vm.exec(...args);
  }

  /** See {@link Vm.spawn}. */
  spawn(
    this: PooledVm<PoolableVm & Pick<Vm, "spawn">>,
    ...args: Parameters<Vm["spawn"]>
  ): ReturnType<Vm["spawn"]> {
    return this.vm.spawn(...args);
  }

  /** See {@link Vm.execBuilder}. */
  execBuilder(this: PooledVm<PoolableVm & Pick<Vm, "execBuilder">>): ReturnType<Vm["execBuilder"]> {
    return this.vm.execBuilder();
  }

  /** See {@link Vm.writeFile}. */
  writeFile(
    this: PooledVm<PoolableVm & Pick<Vm, "writeFile">>,
    ...args: Parameters<Vm["writeFile"]>
  ): ReturnType<Vm["writeFile"]> {
    return this.vm.writeFile(...args);
  }

  /** See {@link Vm.readFile}. */
  readFile(
    this: PooledVm<PoolableVm & Pick<Vm, "readFile">>,
    ...args: Parameters<Vm["readFile"]>
  ): ReturnType<Vm["readFile"]> {
    return this.vm.readFile(...args);
  }

  /**
   * Give the VM back. With `restoreOnRelease(true)` it is stopped and replaced by a fresh one;
   * with `false` it goes back to the idle set as it is. A tainted or dead VM is discarded.
   * Idempotent; resolves once the pool took the VM back (stopping continues in the background).
   */
  release(): Promise<void> {
    this.#returned ??= this.#giveBack(this as PooledVm<PoolableVm>, "release");
    return this.#returned;
  }

  /** Throw the VM away (killed, never handed out again), e.g. after breaking its state. */
  discard(): Promise<void> {
    this.#returned ??= this.#giveBack(this as PooledVm<PoolableVm>, "discard");
    return this.#returned;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.release();
  }
}

/** A new lease (internal: the pool's). */
export function createLease<V extends PoolableVm>(
  vm: V,
  giveBack: ReturnLease,
  acquireMs: number,
): PooledVm<V> {
  return leases.create(vm, giveBack, acquireMs);
}

/** Ends a lease without a call from its holder (internal: the pool's forced close). */
export function revokeLease(lease: PooledVm<PoolableVm>): void {
  leases.revoke(lease);
}
