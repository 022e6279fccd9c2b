/**
 * The allow-list relay `sm-net` (hosttools/sm-net.c, docs/network.md): with a network allow-list,
 * QEMU runs in a user + network namespace of its own whose only interface is `lo`, and every
 * connection its user-mode network makes goes through sm-net, which checks the destination and
 * connects from the host. The chain becomes `setpriv … -- prlimit … -- sm-net --allow … -- qemu …`:
 * sm-net runs as QEMU's unprivileged user, QEMU is its child.
 *
 * sm-net is exec'd from a descriptor (`/proc/self/fd/N`, closed by sm-net at once), so on a root
 * host QEMU's uid needs no path to the cache or package it lives in. It reports on a status
 * descriptor, one line each: `ready`, `deny A.B.C.D:PORT`, `fail A.B.C.D:PORT WHY`,
 * `suppressed N`, `error WHAT: WHY` (see the header of sm-net.c).
 */

import { spawn } from "node:child_process";
import { open } from "node:fs/promises";
import { SupermachineError } from "../errors.ts";
import { debug, memoize } from "../internal/index.ts";
import { confinedCommand, confinementTools, type QemuIdentity, qemuLimits } from "./confinement.ts";

/** What a VM's relay admits: rules `A.B.C.D[/N]:PORT`; a rule in 127.0.0.0/8 opens the host's loopback port. */
export interface NetRelaySpec {
  /** The sm-net binary (`AssetPaths.netRelay`). */
  path: string;
  rules: readonly string[];
}

/** One status line of sm-net. */
export type RelayStatus =
  | { kind: "ready" }
  | { kind: "deny"; address: string; port: number }
  | { kind: "fail"; address: string; port: number; reason: string }
  | { kind: "suppressed"; count: number }
  | { kind: "error"; message: string };

/** Connections sm-net relays at once per VM (each holds two 32 KiB buffers). */
export const RELAY_MAX_CONNECTIONS = 256;
/** How long sm-net waits for an allowed destination to accept before resetting the guest's connection. */
export const RELAY_CONNECT_TIMEOUT_MS = 10_000;
/** Longest status line read; sm-net's are shorter (longer ones are dropped). */
const MAX_STATUS_LINE = 512;
const RULE = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})(?:\/(\d{1,2}))?:(\d{1,5})$/;

/**
 * sm-net's arguments up to (and without) the program: `/proc/self/fd/<exeFd> --exe-fd <exeFd>
 * --status-fd <statusFd> --max-conns … --connect-timeout-ms … --allow RULE …`.
 */
export function relayArgs(spec: { exeFd: number; statusFd: number; rules: readonly string[] }): string[] {
  const args = [
    `/proc/self/fd/${spec.exeFd}`,
    "--exe-fd",
    String(spec.exeFd),
    "--status-fd",
    String(spec.statusFd),
    "--max-conns",
    String(RELAY_MAX_CONNECTIONS),
    "--connect-timeout-ms",
    String(RELAY_CONNECT_TIMEOUT_MS),
  ];
  for (const rule of spec.rules) {
    if (!RULE.test(rule)) {
      throw new SupermachineError(
        "INVALID_ARGUMENT",
        `relay rule ${JSON.stringify(rule)} is not A.B.C.D[/N]:PORT`,
      );
    }
    args.push("--allow", rule);
  }
  return args;
}

/** Parses one status line; undefined for a line it does not know (a newer sm-net's). */
export function parseRelayStatus(line: string): RelayStatus | undefined {
  if (line === "ready") return { kind: "ready" };
  const space = line.indexOf(" ");
  const word = space < 0 ? line : line.slice(0, space);
  const rest = space < 0 ? "" : line.slice(space + 1);
  if (word === "error") return { kind: "error", message: rest };
  if (word === "suppressed") {
    const count = Number(rest);
    return Number.isSafeInteger(count) && count > 0 ? { kind: "suppressed", count } : undefined;
  }
  if (word !== "deny" && word !== "fail") return undefined;
  const match = /^(\d{1,3}(?:\.\d{1,3}){3}):(\d{1,5})(?: (.+))?$/.exec(rest);
  if (!match) return undefined;
  const port = Number(match[2]);
  if (port < 1 || port > 65535) return undefined;
  if (word === "deny") return match[3] === undefined ? { kind: "deny", address: match[1]!, port } : undefined;
  return match[3] === undefined ? undefined : { kind: "fail", address: match[1]!, port, reason: match[3] };
}

/**
 * Reads sm-net's status lines from `stream` (bounded per line) and calls `onStatus` for each one it
 * knows. Ends with the stream.
 */
export function readRelayStatus(
  stream: NodeJS.ReadableStream,
  onStatus: (status: RelayStatus) => void,
): void {
  let pending = "";
  let skipping = false;
  stream.setEncoding?.("latin1");
  stream.on("data", (chunk: string) => {
    let text = pending + chunk;
    pending = "";
    for (let nl = text.indexOf("\n"); nl >= 0; nl = text.indexOf("\n")) {
      const line = text.slice(0, nl);
      text = text.slice(nl + 1);
      if (skipping) {
        skipping = false;
        continue;
      }
      const status = parseRelayStatus(line);
      if (status === undefined) debug("sm-net: unknown status line %j", line.slice(0, 80));
      else onStatus(status);
    }
    if (text.length > MAX_STATUS_LINE) {
      skipping = true; // drop the rest of an overlong line
      text = "";
    }
    pending = text;
  });
  stream.on("error", (error: Error) => debug("sm-net status: %s", error.message));
}

/**
 * Whether sm-net can build its namespace on this host, as `identity` (the user QEMU runs as):
 * runs `sm-net --check` through the same confinement chain. Resolves with undefined when it can,
 * else with why not (one line). Once per (relay, user) per process.
 */
export const probeNetRelay: (key: { path: string; identity: QemuIdentity }) => Promise<string | undefined> = (
  key,
) => probeOnce(`${key.path}\0${key.identity.uid}\0${key.identity.gid}`);

const probeOnce = memoize(async (key: string): Promise<string | undefined> => {
  const [path, uid, gid] = key.split("\0");
  return runProbe(path!, { uid: Number(uid), gid: Number(gid), source: "probe" });
});

async function runProbe(path: string, identity: QemuIdentity): Promise<string | undefined> {
  const tools = await confinementTools();
  let handle: Awaited<ReturnType<typeof open>>;
  try {
    handle = await open(path, "r");
  } catch (error) {
    return `cannot open ${path}: ${(error as Error).message}`;
  }
  try {
    // fd 3: the status socket, fd 4: sm-net itself. A CIDR and a privileged loopback port take
    // the same steps a real allow-list does (a local route, a listener below 1024).
    const argv = [
      ...relayArgs({ exeFd: 4, statusFd: 3, rules: ["10.255.0.0/16:443", "127.0.0.1:80"] }),
      "--check",
    ];
    const command = confinedCommand(tools, argv, identity, qemuLimits(64));
    const child = spawn(command.command, command.argv, {
      stdio: ["ignore", "ignore", "pipe", "pipe", handle.fd],
      env: {},
    });
    let error: string | undefined;
    let stderr = "";
    child.stderr!.setEncoding("utf8");
    child.stderr!.on("data", (text: string) => {
      stderr = (stderr + text).slice(-2048);
    });
    readRelayStatus(child.stdio[3] as NodeJS.ReadableStream, (status) => {
      if (status.kind === "error") error ??= status.message;
    });
    const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
    const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve) => {
      child.once("error", (e) => {
        error ??= e.message;
        resolve([null, null]);
      });
      child.once("close", (c, s) => resolve([c, s]));
    });
    clearTimeout(timer);
    if (code === 0) return undefined;
    const why = error ?? (stderr.trim().split("\n").pop() || `exit ${code ?? signal}`);
    debug("sm-net --check failed: %s", why);
    return why;
  } finally {
    await handle.close();
  }
}

/** The one-line `HOST_UNSUPPORTED` error for a relay that cannot build its namespace here. */
export function relayUnsupported(why: string): SupermachineError {
  return new SupermachineError(
    "HOST_UNSUPPORTED",
    `network allow-lists need unprivileged user namespaces, and this host refused one (${why}): enable them ` +
      "(sysctl -w kernel.unprivileged_userns_clone=1 and user.max_user_namespaces=10000; on Ubuntu 24.04 also " +
      'kernel.apparmor_restrict_unprivileged_userns=0), or use network "none" or "outbound"',
  );
}
