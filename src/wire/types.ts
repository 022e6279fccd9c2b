/** The JSON resources of the server's API (docs/server.md, docs/openapi.json). */

import type { ImageConfig, PoolOptions, PoolStats, SymlinkPolicy, VmTimings } from "../index.ts";
import type { GuestStatsInit } from "../internal/index.ts";

/** Every API route starts with this. */
export const API_PREFIX = "/v1";

/** `GET /v1/info`. */
export interface WireServerInfo {
  version: string;
  /** Name of this server (the pod's name in Kubernetes), for logs and per-endpoint routing. */
  serverId: string;
  accelerator: "kvm" | "tcg";
  limits: WireLimits;
  draining: boolean;
}

export interface WireLimits {
  maxVms: number;
  maxStreams: number;
  maxBodyBytes: number;
  maxUploadBytes: number;
  maxOutputBytes: number;
  idleTimeoutMs: number;
  maxLifetimeMs: number;
  mounts: boolean;
}

/** An image the server can start: a baked snapshot or a pulled image. */
export interface WireImage {
  reference: string;
  digest: string;
  platform: string;
  config: ImageConfig;
  /** The snapshot's name, when backed by one. */
  snapshot?: string;
  memoryMiB?: number;
  vcpus?: number;
}

/** A host directory to mount: `hostPath` relative to the server's `--mount-root`. */
export interface WireMount {
  hostPath: string;
  guestPath: string;
  readOnly?: boolean;
  symlinks?: SymlinkPolicy;
}

/** How to start a VM (`image.start(config)` without host paths the client cannot know). */
export interface WireStartConfig {
  env?: Record<string, string>;
  cwd?: string;
  user?: string;
  memoryMiB?: number;
  vcpus?: number;
  bootTimeoutMs?: number;
  mounts?: WireMount[];
  /** The VM's network policy, passed to the library as is. */
  network?: unknown;
}

/** `POST /v1/vms`: a snapshot's name (restore) or a pulled image's reference (boot). */
export interface WireCreateVm extends WireStartConfig {
  snapshot?: string;
  image?: string;
}

export interface WireVm {
  id: string;
  state: "running" | "stopped";
  accelerator: "kvm" | "tcg";
  timings: VmTimings;
  /** The pool it was acquired from. */
  pool?: string;
  snapshot?: string;
  memoryMiB: number;
  createdAt: string;
}

/** `POST /v1/pools`. */
export interface WireCreatePool extends Partial<PoolOptions> {
  snapshot: string;
  config?: WireStartConfig;
}

export interface WirePool {
  id: string;
  name: string;
  snapshot: string;
  /** `server`: declared with `serve --pool`, lives as long as the server. */
  owner: "server" | "client";
  options: PoolOptions;
  stats: PoolStats;
}

/** `POST /v1/pools/{id}/acquire`. */
export interface WireAcquired {
  vm: WireVm;
  acquireMs: number;
}

/** `POST /v1/snapshots`: bake (pull + boot + workload + warm-up commands + snapshot). */
export interface WireBake {
  reference: string;
  name?: string;
  memoryMiB?: number;
  vcpus?: number;
  env?: Record<string, string>;
  platform?: string;
  /** Commands run in order after the workload started, before the snapshot is taken. */
  warmup?: string[][];
  warmupTag?: string;
  workload?: boolean;
  force?: boolean;
}

/** `GuestStats` on the wire: `stat(2)`'s numbers, nanosecond times as decimal strings. */
export type WireStats = {
  [K in keyof GuestStatsInit]: GuestStatsInit[K] extends bigint ? string : GuestStatsInit[K];
};

export interface WireDirent {
  name: string;
  parentPath: string;
  type: number;
}

/** `POST /v1/vms/{id}/fs`: one `vm.fs` call. */
export type WireFsCall =
  | { op: "stat" | "lstat" | "readlink" | "realpath" | "exists"; path: string }
  | { op: "readdir"; path: string; withFileTypes?: boolean }
  | { op: "mkdir"; path: string; recursive?: boolean; mode?: number }
  | { op: "rm"; path: string; recursive?: boolean; force?: boolean }
  | { op: "rename"; path: string; newPath: string }
  | { op: "chmod"; path: string; mode: number | string }
  | { op: "chown" | "lchown"; path: string; uid: number; gid: number }
  | { op: "symlink"; path: string; target: string }
  | { op: "truncate"; path: string; length?: number }
  | { op: "utimes" | "lutimes"; path: string; atime: number; mtime: number }
  | { op: "access"; path: string; mode?: number };

export const FS_OPS = [
  "stat",
  "lstat",
  "readlink",
  "realpath",
  "exists",
  "readdir",
  "mkdir",
  "rm",
  "rename",
  "chmod",
  "chown",
  "lchown",
  "symlink",
  "truncate",
  "utimes",
  "lutimes",
  "access",
] as const;

/** Headers of `GET /v1/vms/{id}/files`: the file's size when the read started, and its mode. */
export const FILE_SIZE_HEADER = "x-supermachine-size";
export const FILE_MODE_HEADER = "x-supermachine-mode";
export const FILE_UID_HEADER = "x-supermachine-uid";
export const FILE_GID_HEADER = "x-supermachine-gid";
