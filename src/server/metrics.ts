/**
 * `/metrics` in Prometheus' text format (prom-client): VMs by state, pools by state, the
 * utilisation the HorizontalPodAutoscaler scales on, acquire / restore / exec latencies, errors
 * by code, guest memory committed, the accelerator. Gauges are computed from the holdings at
 * scrape time; histograms and counters are fed as things happen. Every series is prefixed
 * `supermachine_`; docs/scale-out.md lists them.
 */

import { subscribe, unsubscribe } from "node:diagnostics_channel";
import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from "prom-client";
import type { VmTimings } from "../index.ts";
import type { Holdings } from "./holdings.ts";

const LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];
const EXEC_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300];

export class ServerMetrics {
  readonly registry = new Registry();
  readonly acquireSeconds: Histogram<"pool">;
  readonly execSeconds: Histogram<"mode">;
  readonly errors: Counter<"code">;
  readonly requests: Counter<"method" | "route" | "status">;
  readonly #restoreSeconds: Histogram<"kind">;
  readonly #onVmStart: (message: unknown) => void;

  constructor(
    holdings: Holdings,
    state: { accelerator: () => string; streams: () => number; draining: () => boolean },
  ) {
    const registry = this.registry;
    collectDefaultMetrics({ register: registry, prefix: "supermachine_process_" });

    new Gauge({
      name: "supermachine_vms",
      help: "VMs held by this server for its clients, by state: running (started through the API), leased (acquired from a pool)",
      labelNames: ["state"],
      registers: [registry],
      collect() {
        this.reset();
        const vms = holdings.vms();
        this.set({ state: "running" }, vms.filter((v) => v.lease === undefined).length);
        this.set({ state: "leased" }, vms.filter((v) => v.lease !== undefined).length);
      },
    });
    new Gauge({
      name: "supermachine_pool_vms",
      help: "VMs of each pool by state: idle, busy, spawning, prestarted, stopping",
      labelNames: ["pool", "snapshot", "state"],
      registers: [registry],
      collect() {
        this.reset();
        for (const held of holdings.pools()) {
          const stats = held.pool.stats();
          for (const state of ["idle", "busy", "spawning", "prestarted", "stopping"] as const) {
            this.set({ pool: held.id, snapshot: held.snapshot, state }, stats[state]);
          }
        }
      },
    });
    new Gauge({
      name: "supermachine_pool_waiters",
      help: "acquire() calls waiting for a VM, per pool",
      labelNames: ["pool", "snapshot"],
      registers: [registry],
      collect() {
        this.reset();
        for (const held of holdings.pools()) {
          this.set({ pool: held.id, snapshot: held.snapshot }, held.pool.stats().waiters);
        }
      },
    });
    new Gauge({
      name: "supermachine_pool_max",
      help: "Each pool's max: the most VMs it may hold",
      labelNames: ["pool", "snapshot"],
      registers: [registry],
      collect() {
        this.reset();
        for (const held of holdings.pools())
          this.set({ pool: held.id, snapshot: held.snapshot }, held.pool.options.max);
      },
    });
    new Gauge({
      name: "supermachine_utilization_ratio",
      help: "(busy pool VMs + waiting acquires + VMs of their own) / --max-vms: what the HorizontalPodAutoscaler scales on",
      registers: [registry],
      collect() {
        let used = holdings.directVms.length;
        for (const held of holdings.pools()) {
          const stats = held.pool.stats();
          used += stats.busy + stats.waiters;
        }
        this.set(holdings.options.maxVms > 0 ? used / holdings.options.maxVms : 0);
      },
    });
    new Gauge({
      name: "supermachine_vm_memory_committed_bytes",
      help: "Guest memory of every VM this server holds (pools' idle, busy, spawning and prestarted VMs included)",
      registers: [registry],
      collect() {
        let mib = 0;
        for (const held of holdings.directVms) mib += held.memoryMiB;
        for (const held of holdings.pools()) {
          const s = held.pool.stats();
          mib += (s.idle + s.busy + s.spawning + s.prestarted) * held.memoryMiB;
        }
        this.set(mib * 1024 * 1024);
      },
    });
    new Gauge({
      name: "supermachine_max_vms",
      help: "This server's --max-vms",
      registers: [registry],
      collect() {
        this.set(holdings.options.maxVms);
      },
    });
    new Gauge({
      name: "supermachine_accelerator_info",
      help: "1 for the accelerator VMs run on: kvm (hardware isolation) or tcg (emulation, not hardware isolation)",
      labelNames: ["accelerator"],
      registers: [registry],
      collect() {
        this.reset();
        this.set({ accelerator: state.accelerator() }, 1);
      },
    });
    new Gauge({
      name: "supermachine_streams",
      help: "Open WebSocket streams (exec sessions, TCP tunnels, watches)",
      registers: [registry],
      collect() {
        this.set(state.streams());
      },
    });
    new Gauge({
      name: "supermachine_draining",
      help: "1 while the server drains after SIGTERM",
      registers: [registry],
      collect() {
        this.set(state.draining() ? 1 : 0);
      },
    });

    this.acquireSeconds = new Histogram({
      name: "supermachine_acquire_duration_seconds",
      help: "Time an acquire from a pool waited for its VM",
      labelNames: ["pool"],
      buckets: LATENCY_BUCKETS,
      registers: [registry],
    });
    this.#restoreSeconds = new Histogram({
      name: "supermachine_vm_start_duration_seconds",
      help: "Time to a running VM, by kind: restore (a snapshot), prestarted (activated), boot",
      labelNames: ["kind"],
      buckets: LATENCY_BUCKETS,
      registers: [registry],
    });
    this.execSeconds = new Histogram({
      name: "supermachine_exec_duration_seconds",
      help: "Wall time of exec requests on the server, by mode: oneshot (a VM's), pool (acquire, run, release), stream",
      labelNames: ["mode"],
      buckets: EXEC_BUCKETS,
      registers: [registry],
    });
    this.errors = new Counter({
      name: "supermachine_errors_total",
      help: "Errors answered, by the library's error code",
      labelNames: ["code"],
      registers: [registry],
    });
    this.requests = new Counter({
      name: "supermachine_http_requests_total",
      help: "Requests answered, by method, route template and status",
      labelNames: ["method", "route", "status"],
      registers: [registry],
    });

    // Every VM the library starts in this process publishes its timings.
    this.#onVmStart = (message) => {
      const timings = (message as { timings?: VmTimings }).timings;
      if (timings !== undefined) this.#restoreSeconds.observe({ kind: timings.kind }, timings.totalMs / 1000);
    };
    subscribe("supermachine:vm:start", this.#onVmStart);
  }

  async text(): Promise<{ contentType: string; body: string }> {
    return { contentType: this.registry.contentType, body: await this.registry.metrics() };
  }

  close(): void {
    unsubscribe("supermachine:vm:start", this.#onVmStart);
  }
}
