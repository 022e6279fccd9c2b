/**
 * Pools on servers: `RemotePool` is one pool per server (the same settings on each), acquires
 * spread over them; a lease stays on the server that holds its VM. `pool.exec()` is the verifier
 * loop's acquire → stage → run → chain → release in one request.
 */

import { type ExecOutcome, SupermachineError } from "../errors.ts";
import type { ExecOptions, PoolOptions, PoolStats } from "../index.ts";
import type { WireAcquired, WireCreatePool, WirePool, WireStartConfig } from "../wire/index.ts";
import type { Cluster } from "./cluster.ts";
import type { Endpoint } from "./endpoint.ts";
import { type ExecSite, execBuilder, type RemoteExecBuilder, runExec } from "./exec.ts";
import { type RemotePooledVm, remoteLease, remoteVm } from "./vm.ts";

interface Member {
  endpoint: Endpoint;
  id: string;
}

let makePool: (cluster: Cluster, members: Member[], info: WirePool, owned: boolean) => RemotePool;

/** Internal: the client's object for pools on servers (`owned`: made by this client, closed with it). */
export function remotePool(cluster: Cluster, members: Member[], info: WirePool, owned: boolean): RemotePool {
  return makePool(cluster, members, info, owned);
}

/** A pool on one or more servers: the library's `Pool` surface (`stats()` is async: it asks the servers). */
export class RemotePool {
  readonly name: string;
  readonly #cluster: Cluster;
  readonly #members: Member[];
  readonly #options: PoolOptions;
  readonly #owned: boolean;
  readonly #untrack: () => void;
  #closing: Promise<void> | undefined;

  static {
    makePool = (cluster, members, info, owned) => new RemotePool(cluster, members, info, owned);
  }

  private constructor(cluster: Cluster, members: Member[], info: WirePool, owned: boolean) {
    this.#cluster = cluster;
    this.#members = members;
    this.#options = info.options;
    this.#owned = owned;
    this.name = `${info.snapshot} on ${members.map((m) => m.endpoint.url).join(", ")}`;
    this.#untrack = cluster.track({ close: () => this.close({ force: true }) });
  }

  get options(): Readonly<PoolOptions> {
    return { ...this.#options };
  }

  get closed(): boolean {
    return this.#closing !== undefined;
  }

  /** The servers this pool is on. */
  get endpoints(): readonly string[] {
    return this.#members.map((m) => m.endpoint.url);
  }

  #check(): void {
    if (this.#closing !== undefined)
      throw new SupermachineError("POOL_CLOSED", `pool ${this.name} is closed`);
  }

  #member(endpoint: Endpoint): Member {
    return this.#members.find((m) => m.endpoint === endpoint)!;
  }

  /** A VM from the next server in turn that can give one (another server when one cannot be reached). */
  async acquire(options: { signal?: AbortSignal } = {}): Promise<RemotePooledVm> {
    this.#check();
    return this.#cluster.first(
      this.#members.map((m) => m.endpoint),
      async (endpoint) => {
        const { id } = this.#member(endpoint);
        const acquired = await endpoint.json<WireAcquired>(
          "POST",
          `/v1/pools/${encodeURIComponent(id)}/acquire`,
          {
            signal: options.signal,
          },
        );
        let untrack = () => {};
        const vm = remoteVm(endpoint, acquired.vm, () => untrack());
        const lease = remoteLease(vm, acquired.acquireMs);
        untrack = this.#cluster.track({ close: () => lease.release() });
        return lease;
      },
    );
  }

  #site(endpoint: Endpoint): ExecSite {
    const { id } = this.#member(endpoint);
    return {
      endpoint,
      path: `/v1/pools/${encodeURIComponent(id)}`,
      vmId: undefined,
      describe: () => `a VM of pool ${id} on ${endpoint.url}`,
    };
  }

  /** Acquire, run, release: one request to the next server in turn. */
  async exec(argv: readonly string[], options: ExecOptions = {}): Promise<ExecOutcome> {
    this.#check();
    return this.#cluster.first(
      this.#members.map((m) => m.endpoint),
      (endpoint) => runExec(this.#site(endpoint), argv, options),
    );
  }

  /** A builder whose `output()` is {@link exec} (a pool has no `spawn()`: acquire a VM for that). */
  execBuilder(): RemoteExecBuilder {
    this.#check();
    const endpoint = this.#cluster.order(this.#members.map((m) => m.endpoint))[0]!;
    return execBuilder(this.#site(endpoint));
  }

  /** The pools' stats, summed over the servers that answer. */
  async stats(): Promise<PoolStats> {
    const all = await this.#cluster.each(
      this.#members.map((m) => m.endpoint),
      (endpoint) =>
        endpoint.json<WirePool>("GET", `/v1/pools/${encodeURIComponent(this.#member(endpoint).id)}`),
    );
    return sumStats(all.map(({ value }) => value.stats));
  }

  /** Close the pools (on every server); their VMs stop. Idempotent. A server's own pool (`serve --pool`) is only let go. */
  close(options: { force?: boolean } = {}): Promise<void> {
    this.#closing ??= (async () => {
      this.#untrack();
      if (!this.#owned) return;
      await Promise.allSettled(
        this.#members.map((m) =>
          m.endpoint.request("DELETE", `/v1/pools/${encodeURIComponent(m.id)}`, {
            query: { force: options.force ? 1 : undefined },
          }),
        ),
      );
    })();
    return this.#closing;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

function sumStats(list: readonly PoolStats[]): PoolStats {
  const out: PoolStats = {
    idle: 0,
    busy: 0,
    spawning: 0,
    prestarted: 0,
    waiters: 0,
    stopping: 0,
    totalSpawned: 0,
    totalEvicted: 0,
    totalDiscarded: 0,
    totalAcquired: 0,
    totalSpawnFailures: 0,
    restoreLatencyMs: { p50: 0, p95: 0, count: 0 },
  };
  for (const s of list) {
    for (const key of Object.keys(out) as (keyof PoolStats)[]) {
      if (key !== "restoreLatencyMs") out[key] += s[key];
    }
    out.restoreLatencyMs.count += s.restoreLatencyMs.count;
    // Percentiles do not add up: the slowest server's stand for the whole.
    out.restoreLatencyMs.p50 = Math.max(out.restoreLatencyMs.p50, s.restoreLatencyMs.p50);
    out.restoreLatencyMs.p95 = Math.max(out.restoreLatencyMs.p95, s.restoreLatencyMs.p95);
  }
  return out;
}

let makePoolBuilder: (
  cluster: Cluster,
  endpoints: readonly Endpoint[],
  snapshot: string,
  config: WireStartConfig,
) => RemotePoolBuilder;

/** Internal: a builder of pools of `snapshot` on `endpoints`. */
export function remotePoolBuilder(
  cluster: Cluster,
  endpoints: readonly Endpoint[],
  snapshot: string,
  config: WireStartConfig,
): RemotePoolBuilder {
  return makePoolBuilder(cluster, endpoints, snapshot, config);
}

/** The library's `PoolBuilder` against servers: `build()` makes one pool with these settings on each. */
export class RemotePoolBuilder {
  readonly #cluster: Cluster;
  readonly #endpoints: readonly Endpoint[];
  readonly #request: WireCreatePool;

  static {
    makePoolBuilder = (cluster, endpoints, snapshot, config) =>
      new RemotePoolBuilder(cluster, endpoints, snapshot, config);
  }

  private constructor(
    cluster: Cluster,
    endpoints: readonly Endpoint[],
    snapshot: string,
    config: WireStartConfig,
  ) {
    this.#cluster = cluster;
    this.#endpoints = endpoints;
    this.#request = { snapshot, config };
  }

  min(count: number): this {
    this.#request.min = count;
    return this;
  }

  max(count: number): this {
    this.#request.max = count;
    return this;
  }

  idleTimeout(ms: number): this {
    this.#request.idleTimeoutMs = ms;
    return this;
  }

  acquireTimeout(ms: number): this {
    this.#request.acquireTimeoutMs = ms;
    return this;
  }

  restoreOnRelease(enabled: boolean): this {
    this.#request.restoreOnRelease = enabled;
    return this;
  }

  prestarted(count: number): this {
    this.#request.prestarted = count;
    return this;
  }

  async build(options: { signal?: AbortSignal } = {}): Promise<RemotePool> {
    const made = await this.#cluster.each(
      this.#endpoints,
      (endpoint) =>
        endpoint.json<WirePool>("POST", "/v1/pools", { json: this.#request, signal: options.signal }),
      (endpoint, pool) =>
        endpoint.request("DELETE", `/v1/pools/${encodeURIComponent(pool.id)}`, { query: { force: 1 } }),
    );
    const members = made.map(({ endpoint, value }) => ({ endpoint, id: value.id }));
    return remotePool(this.#cluster, members, made[0]!.value, true);
  }
}
