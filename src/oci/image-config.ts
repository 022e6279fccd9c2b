/** The OCI / Docker image configuration (`application/vnd.oci.image.config.v1+json`), parsed defensively. */

import { SupermachineError } from "../errors.ts";
import { isDigest } from "./digest.ts";

/** Largest config blob accepted. Real configs are a few KiB; long histories reach a few hundred. */
export const IMAGE_CONFIG_MAX_BYTES = 8 * 1024 * 1024;

/** What the VM needs from an image's config. Missing fields are empty, never null. */
export interface ImageConfig {
  /** `ENTRYPOINT`, or undefined when unset (distinct from an explicit empty list). */
  readonly entrypoint: readonly string[] | undefined;
  /** `CMD`, or undefined when unset. */
  readonly cmd: readonly string[] | undefined;
  /** `KEY=value` entries, in order. */
  readonly env: readonly string[];
  /** Working directory; "" when unset (meaning "/"). */
  readonly workingDir: string;
  /** `user`, `uid`, `user:group` or `uid:gid`; "" when unset (meaning root). */
  readonly user: string;
  /** `80/tcp`, `53/udp`, … */
  readonly exposedPorts: readonly string[];
  readonly stopSignal: string | undefined;
  readonly labels: Readonly<Record<string, string>>;
  readonly volumes: readonly string[];
  readonly os: string;
  readonly architecture: string;
  readonly variant: string | undefined;
  /** Digests of the uncompressed layers, in order (`rootfs.diff_ids`). */
  readonly diffIds: readonly string[];
  /** Creation time as written in the config (RFC 3339), if any. */
  readonly created: string | undefined;
}

/** The config of an image that has none (a root filesystem booted as it is). */
export const EMPTY_IMAGE_CONFIG: ImageConfig = {
  entrypoint: undefined,
  cmd: undefined,
  env: [],
  workingDir: "",
  user: "",
  exposedPorts: [],
  stopSignal: undefined,
  labels: {},
  volumes: [],
  os: "linux",
  architecture: "amd64",
  variant: undefined,
  diffIds: [],
  created: undefined,
};

export class ImageConfigError extends Error {}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function stringList(v: unknown, what: string, max = 100_000): string[] | undefined {
  if (v === undefined || v === null) return undefined;
  if (typeof v === "string") return [v];
  if (!Array.isArray(v)) throw new ImageConfigError(`${what} is not a list of strings`);
  if (v.length > max) throw new ImageConfigError(`${what} has ${v.length} entries (at most ${max})`);
  return v.map((x, i) => {
    if (typeof x !== "string") throw new ImageConfigError(`${what}[${i}] is not a string`);
    return x;
  });
}

function optString(v: unknown, what: string): string | undefined {
  if (v === undefined || v === null) return undefined;
  if (typeof v !== "string") throw new ImageConfigError(`${what} is not a string`);
  return v;
}

/**
 * Parse an image config. Throws {@link ImageConfigError} (a plain Error; the caller wraps it with
 * the code that fits where the config came from) on anything malformed or oversized.
 */
export function parseImageConfig(bytes: Uint8Array): ImageConfig {
  if (bytes.length > IMAGE_CONFIG_MAX_BYTES) {
    throw new ImageConfigError(`image config is ${bytes.length} bytes (at most ${IMAGE_CONFIG_MAX_BYTES})`);
  }
  let doc: unknown;
  try {
    doc = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch (err) {
    throw new ImageConfigError(`image config is not valid JSON: ${(err as Error).message}`);
  }
  if (!isRecord(doc)) throw new ImageConfigError("image config is not a JSON object");
  const c = doc.config ?? doc.Config ?? {};
  if (!isRecord(c)) throw new ImageConfigError("image config's config field is not an object");

  const exposed = c.ExposedPorts;
  const exposedPorts = isRecord(exposed) ? Object.keys(exposed) : [];
  const volumesField = c.Volumes;
  const volumes = isRecord(volumesField) ? Object.keys(volumesField) : [];
  const labels: Record<string, string> = {};
  if (isRecord(c.Labels)) {
    for (const [k, v] of Object.entries(c.Labels)) if (typeof v === "string") labels[k] = v;
  }

  const rootfs = doc.rootfs;
  let diffIds: string[] = [];
  if (rootfs !== undefined && rootfs !== null) {
    if (!isRecord(rootfs)) throw new ImageConfigError("rootfs is not an object");
    if (rootfs.type !== undefined && rootfs.type !== "layers") {
      throw new ImageConfigError(`rootfs.type is ${JSON.stringify(rootfs.type)}, expected "layers"`);
    }
    diffIds = stringList(rootfs.diff_ids, "rootfs.diff_ids", 10_000) ?? [];
    for (const d of diffIds)
      if (!isDigest(d)) throw new ImageConfigError(`invalid diff_id ${JSON.stringify(d)}`);
  }

  return {
    entrypoint: stringList(c.Entrypoint, "Entrypoint"),
    cmd: stringList(c.Cmd, "Cmd"),
    env: stringList(c.Env, "Env") ?? [],
    workingDir: optString(c.WorkingDir, "WorkingDir") ?? "",
    user: optString(c.User, "User") ?? "",
    exposedPorts,
    stopSignal: optString(c.StopSignal, "StopSignal") || undefined,
    labels,
    volumes,
    os: optString(doc.os, "os") ?? "",
    architecture: optString(doc.architecture, "architecture") ?? "",
    variant: optString(doc.variant, "variant") || undefined,
    diffIds,
    created: optString(doc.created, "created"),
  };
}

/** Exec defaults of an image: its env (as a record), working dir (default `/`), user (default root). */
export function imageExecDefaults(config: ImageConfig): {
  env: Record<string, string>;
  cwd: string;
  user: string;
} {
  const env: Record<string, string> = {};
  for (const entry of config.env) {
    const eq = entry.indexOf("=");
    if (eq > 0) env[entry.slice(0, eq)] = entry.slice(eq + 1);
  }
  return { env, cwd: config.workingDir || "/", user: config.user || "root" };
}

/**
 * Docker's rules for the argv of a container: `entrypoint` replaces the image's Entrypoint (and
 * then the image's Cmd is dropped); non-empty `args` replace Cmd. Throws `INVALID_ARGUMENT` when
 * nothing is left to run.
 */
export function dockerCommand(
  config: Pick<ImageConfig, "entrypoint" | "cmd">,
  overrides: { entrypoint?: readonly string[] | undefined; args?: readonly string[] | undefined } = {},
): string[] {
  const entrypoint = overrides.entrypoint ?? config.entrypoint ?? [];
  const args =
    overrides.args && overrides.args.length > 0
      ? overrides.args
      : overrides.entrypoint !== undefined
        ? []
        : (config.cmd ?? []);
  const argv = [...entrypoint, ...args];
  if (argv.length === 0) {
    throw new SupermachineError(
      "INVALID_ARGUMENT",
      "the image has no Entrypoint or Cmd: give a command to run",
    );
  }
  return argv;
}
