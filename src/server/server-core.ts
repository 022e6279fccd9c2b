/** What every route handler gets from the server. */

import type { WireLimits } from "../wire/index.ts";
import type { Holdings } from "./holdings.ts";
import type { LogFn } from "./log.ts";
import type { ServerMetrics } from "./metrics.ts";

export interface Readiness {
  ready: boolean;
  draining: boolean;
  accelerator: "kvm" | "tcg" | undefined;
  /** Why the accelerator is what it is (e.g. why not KVM). */
  acceleratorReason: string | undefined;
  checks: Record<string, { ok: boolean; detail?: string }>;
}

export interface ServerCore {
  readonly holdings: Holdings;
  readonly metrics: ServerMetrics;
  readonly limits: WireLimits;
  readonly log: LogFn;
  readonly serverId: string;
  readonly version: string;
  readonly insecureRegistries: readonly string[];
  readonly draining: boolean;
  /** The accelerator VMs get here (known after the first readiness check). */
  accelerator(): "kvm" | "tcg";
  readiness(): Promise<Readiness>;
  /** Counts a stream against `maxStreams` (`LIMIT_EXCEEDED` past it); call the result when it ends. */
  openStream(): () => void;
}
