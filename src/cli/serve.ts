/**
 * `supermachine serve`: the HTTP/WebSocket server (docs/server.md) until SIGTERM or SIGINT,
 * then a drain within the grace period (in-flight requests finish or are cancelled, every VM
 * stops) and exit 0. Logs are JSON lines on standard output.
 */

import { readFile } from "node:fs/promises";
import { isIP } from "node:net";
import { type DeclaredPool, jsonLogger, startServer } from "../server/index.ts";
import { type Cli, positiveInt, UsageError } from "./cli.ts";

export interface ServeFlags {
  listen: string;
  tokenFile?: string;
  maxVms?: string;
  idleTimeout?: string;
  maxLifetime?: string;
  maxStreams?: string;
  maxBodyBytes?: string;
  maxUploadBytes?: string;
  maxOutputBytes?: string;
  mountRoot?: string;
  pool: string[];
  insecureRegistry: string[];
  gracePeriod: string;
  requireKvm?: boolean;
  serverId?: string;
  verbose?: boolean;
}

/** `HOST:PORT`, `[V6]:PORT` or `:PORT` (all interfaces). */
export function parseListen(value: string): { host: string; port: number } {
  const match = /^(?:\[([^\]]+)\]|([^:]*)):(\d{1,5})$/.exec(value);
  const port = Number(match?.[3]);
  if (match === null || port > 65535) {
    throw new UsageError(
      `--listen expects HOST:PORT (e.g. 127.0.0.1:7070, [::1]:7070, :7070), got ${JSON.stringify(value)}`,
    );
  }
  const host = match[1] ?? match[2] ?? "";
  return { host: host === "" ? "0.0.0.0" : host, port };
}

/** True for addresses only this host can reach. */
export function isLoopback(host: string): boolean {
  if (host === "localhost") return true;
  if (isIP(host) === 4) return host.startsWith("127.");
  return host === "::1";
}

/** `500ms`, `30s`, `10m`, `1h`, a bare number of milliseconds, or `0` (never). */
export function parseDuration(value: string, flag: string): number {
  const match = /^(\d+(?:\.\d+)?)(ms|s|m|h)?$/.exec(value.trim());
  if (match === null) {
    throw new UsageError(
      `${flag} expects a duration like 500ms, 30s, 10m or 1h (0: never), got ${JSON.stringify(value)}`,
    );
  }
  const unit = { ms: 1, s: 1_000, m: 60_000, h: 3_600_000 }[match[2] ?? "ms"]!;
  return Math.round(Number(match[1]) * unit);
}

/** `SNAPSHOT[:min=N,max=N,prestarted=N,restore-on-release=BOOL]`. */
export function parsePool(value: string): DeclaredPool {
  const [snapshot, settings] = value.split(/:(.*)/s, 2) as [string, string | undefined];
  if (!/^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/.test(snapshot)) {
    throw new UsageError(`--pool expects SNAPSHOT[:min=N,max=N,prestarted=N], got ${JSON.stringify(value)}`);
  }
  const pool: DeclaredPool = { snapshot };
  for (const pair of settings ? settings.split(",") : []) {
    const [key, raw = ""] = pair.split("=", 2) as [string, string | undefined];
    if (key === "restore-on-release") {
      if (raw !== "true" && raw !== "false")
        throw new UsageError(`--pool ${snapshot}: restore-on-release is true or false`);
      pool.restoreOnRelease = raw === "true";
    } else if (key === "min" || key === "max" || key === "prestarted") {
      if (!/^\d+$/.test(raw))
        throw new UsageError(`--pool ${snapshot}: ${key} expects a whole number, got ${JSON.stringify(raw)}`);
      pool[key] = Number(raw);
    } else {
      throw new UsageError(
        `--pool ${snapshot}: unknown setting ${JSON.stringify(key)} (min, max, prestarted, restore-on-release)`,
      );
    }
  }
  return pool;
}

export async function serveCommand(cli: Cli, flags: ServeFlags, version: string): Promise<number> {
  const { host, port } = parseListen(flags.listen);
  let token: string | undefined;
  if (flags.tokenFile !== undefined) {
    token = (
      await readFile(flags.tokenFile, "utf8").catch((error: NodeJS.ErrnoException) => {
        throw new UsageError(`--token-file ${flags.tokenFile}: ${error.code ?? error.message}`);
      })
    ).trim();
    if (token.length < 16)
      throw new UsageError(`--token-file ${flags.tokenFile}: the token must be at least 16 characters`);
  } else if (!isLoopback(host)) {
    throw new UsageError(
      `listening on ${host} (beyond loopback) needs --token-file FILE: a bearer token every client must send`,
    );
  }
  const log = jsonLogger(process.stdout, flags.verbose === true);
  const maxVms = positiveInt(flags.maxVms, "--max-vms");
  const maxStreams = positiveInt(flags.maxStreams, "--max-streams");
  const maxBodyBytes = positiveInt(flags.maxBodyBytes, "--max-body-bytes");
  const maxUploadBytes = positiveInt(flags.maxUploadBytes, "--max-upload-bytes");
  const maxOutputBytes = positiveInt(flags.maxOutputBytes, "--max-output-bytes");
  const graceMs = parseDuration(flags.gracePeriod, "--grace-period");
  const server = await startServer({
    host,
    port,
    ...(token === undefined ? {} : { token }),
    ...(maxVms === undefined ? {} : { maxVms }),
    ...(maxStreams === undefined ? {} : { maxStreams }),
    ...(maxBodyBytes === undefined ? {} : { maxBodyBytes }),
    ...(maxUploadBytes === undefined ? {} : { maxUploadBytes }),
    ...(maxOutputBytes === undefined ? {} : { maxOutputBytes }),
    ...(flags.idleTimeout === undefined
      ? {}
      : { idleTimeoutMs: parseDuration(flags.idleTimeout, "--idle-timeout") }),
    ...(flags.maxLifetime === undefined
      ? {}
      : { maxLifetimeMs: parseDuration(flags.maxLifetime, "--max-lifetime") }),
    ...(flags.mountRoot === undefined ? {} : { mountRoot: flags.mountRoot }),
    ...(flags.serverId === undefined ? {} : { serverId: flags.serverId }),
    pools: flags.pool.map(parsePool),
    insecureRegistries: flags.insecureRegistry,
    requireKvm: flags.requireKvm === true,
    version,
    log,
  });
  if (token === undefined)
    log("warn", "no --token-file: every local user and process can use this server", {});
  // SIGTERM/SIGINT abort the CLI's signal: drain, then exit 0 (a second signal exits at once).
  await new Promise<void>((resolve) => {
    if (cli.signal.aborted) resolve();
    else cli.signal.addEventListener("abort", () => resolve(), { once: true });
  });
  await server.drain({ graceMs });
  return 0;
}
