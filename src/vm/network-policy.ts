/**
 * A VM's network policy (docs/network.md): what the user writes, checked and normalized, and — for
 * allow-lists — resolved into the relay's rules and the guest's `/etc/hosts` lines.
 *
 * - `"none"`: no network device at all.
 * - `"outbound"`: QEMU's user-mode network (slirp): TCP, UDP and DNS to everything the host
 *   reaches, the host's own loopback included (at 10.0.2.2).
 * - `{ allow: [...] }`: the same device, but QEMU runs in a network namespace whose only way out is
 *   the relay `sm-net`, which admits the listed TCP destinations and nothing else (no UDP, no DNS).
 *
 * Rules: `CIDR:PORT` (`10.1.2.0/24:443`), `IP:PORT`, `NAME:PORT` (resolved on the host at every
 * start; the guest finds the name in `/etc/hosts`), `host:PORT` (the host's loopback port, which
 * the guest reaches at 10.0.2.2:PORT).
 */

import { SupermachineError } from "../errors.ts";
import { nodeDns } from "../internal/index.ts";

/** What a VM may reach on the network. Default `"none"`. See docs/network.md. */
export type NetworkPolicy = "none" | "outbound" | { readonly allow: readonly string[] };

/** The kind of a policy: `allow-list` for `{ allow }`. */
export type NetworkKind = "none" | "outbound" | "allow-list";

/** One allow-list entry, parsed. Addresses are numbers (host byte order). */
export type AllowRule =
  | { readonly kind: "cidr"; readonly net: number; readonly prefix: number; readonly port: number }
  | { readonly kind: "name"; readonly name: string; readonly port: number }
  | { readonly kind: "host"; readonly port: number };

/** A policy checked and normalized. */
export type ParsedNetwork =
  | { readonly kind: "none" }
  | { readonly kind: "outbound" }
  | { readonly kind: "allow-list"; readonly rules: readonly AllowRule[] };

/** An allow-list resolved at a VM's start: the relay's rules and the guest's `/etc/hosts` lines. */
export interface ResolvedAllowList {
  /** `A.B.C.D/N:PORT`; `127.0.0.1/32:PORT` for the host's loopback. */
  readonly relayRules: readonly string[];
  /** `address name` pairs, in the order of the rules. */
  readonly hosts: readonly { readonly address: string; readonly name: string }[];
}

/** Guest addresses of QEMU's user-mode network (slirp). */
export const GUEST_NETWORK = {
  address: "10.0.2.15",
  prefix: 24,
  gateway: "10.0.2.2",
  dns: "10.0.2.3",
} as const;

/** Entries an allow-list may have, and relay rules it may resolve to (the relay's own limit). */
export const MAX_ALLOW_RULES = 256;
/** How long resolving one name on the host may take. */
const RESOLVE_TIMEOUT_MS = 5_000;

const SLIRP_NET = ipv4("10.0.2.0")!;
const LOOPBACK_NET = ipv4("127.0.0.0")!;
const NAME =
  /^(?=.{1,253}$)([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$/;

/** Checks and normalizes `policy`; throws `INVALID_ARGUMENT` with one line saying what is wrong. */
export function parseNetworkPolicy(policy: unknown, what = "network"): ParsedNetwork {
  if (policy === "none" || policy === "outbound") return { kind: policy };
  if (typeof policy !== "object" || policy === null || Array.isArray(policy)) {
    throw invalid(`${what} must be "none", "outbound" or { allow: [...] }, got ${describe(policy)}`);
  }
  const keys = Object.keys(policy);
  const extra = keys.filter((key) => key !== "allow");
  if (extra.length > 0) throw invalid(`${what} has unknown field ${extra[0]}: only { allow: [...] }`);
  const allow = (policy as { allow?: unknown }).allow;
  if (!Array.isArray(allow))
    throw invalid(`${what}.allow must be a list of "CIDR:PORT", "NAME:PORT" or "host:PORT"`);
  if (allow.length > MAX_ALLOW_RULES) {
    throw invalid(`${what}.allow has ${allow.length} entries; at most ${MAX_ALLOW_RULES}`);
  }
  return {
    kind: "allow-list",
    rules: allow.map((entry, index) => parseRule(entry, `${what}.allow[${index}]`)),
  };
}

/** The kind of a (checked) policy. */
export function networkKind(policy: NetworkPolicy): NetworkKind {
  return typeof policy === "string" ? policy : "allow-list";
}

function parseRule(entry: unknown, where: string): AllowRule {
  if (typeof entry !== "string")
    throw invalid(`${where} must be a string like "10.1.2.0/24:443", got ${describe(entry)}`);
  const colon = entry.lastIndexOf(":");
  const target = colon < 0 ? "" : entry.slice(0, colon);
  const portText = colon < 0 ? "" : entry.slice(colon + 1);
  const bad = (why: string) => invalid(`${where} ${JSON.stringify(entry)}: ${why}`);
  if (colon < 0 || target === "")
    throw bad('write TARGET:PORT ("10.1.2.0/24:443", "example.org:443", "host:8080")');
  if (target.includes(":") || target.startsWith("[")) throw bad("IPv6 destinations are not supported yet");
  if (!/^\d{1,5}$/.test(portText) || Number(portText) < 1 || Number(portText) > 65535) {
    throw bad("the port must be a number from 1 to 65535");
  }
  const port = Number(portText);
  if (target === "host") return { kind: "host", port };
  if (/^[\d./]+$/.test(target)) {
    const [ip, prefixText, ...more] = target.split("/");
    const net = ipv4(ip!);
    if (net === undefined || more.length > 0) throw bad("not an IPv4 address or CIDR");
    let prefix = 32;
    if (prefixText !== undefined) {
      if (!/^\d{1,2}$/.test(prefixText) || Number(prefixText) > 32)
        throw bad("the prefix length must be 0 to 32");
      prefix = Number(prefixText);
    }
    if ((net & ~maskOf(prefix)) >>> 0 !== 0) {
      throw bad(
        `the address has bits set beyond its /${prefix} prefix; write ${ipText(net & maskOf(prefix))}/${prefix}`,
      );
    }
    if (within(net, prefix, LOOPBACK_NET, 8)) {
      throw bad('the host\'s loopback is written "host:PORT" (the guest reaches it at 10.0.2.2:PORT)');
    }
    if (within(net, prefix, SLIRP_NET, 24)) {
      throw bad("10.0.2.0/24 is the guest's own network (10.0.2.2 is the host: write host:PORT)");
    }
    return { kind: "cidr", net, prefix, port };
  }
  if (!NAME.test(target) || /^[\d.]+$/.test(target)) throw bad("not an IPv4 address, CIDR or host name");
  const name = target.replace(/\.$/, "").toLowerCase();
  if (name === "localhost" || name.endsWith(".localhost")) {
    throw bad("the host's loopback is written \"host:PORT\" (the guest's own localhost stays its own)");
  }
  return { kind: "name", name, port };
}

/**
 * Resolves an allow-list on the host: every name to its IPv4 addresses (each becomes a `/32` rule
 * and an `/etc/hosts` line). Throws `INVALID_ARGUMENT` when a name does not resolve, resolves to a
 * loopback address or into the guest's own network, or when the rules exceed the relay's limit.
 */
export async function resolveAllowList(
  rules: readonly AllowRule[],
  resolve: (name: string) => Promise<string[]> = resolveIpv4,
): Promise<ResolvedAllowList> {
  const relayRules: string[] = [];
  const hosts: { address: string; name: string }[] = [];
  const add = (rule: string) => {
    if (!relayRules.includes(rule)) relayRules.push(rule);
  };
  const names = new Map<string, Promise<string[]>>();
  for (const rule of rules) {
    if (rule.kind === "name" && !names.has(rule.name)) {
      const pending = resolve(rule.name);
      pending.catch(() => {});
      names.set(rule.name, pending);
    }
  }
  for (const rule of rules) {
    if (rule.kind === "host") add(`127.0.0.1/32:${rule.port}`);
    else if (rule.kind === "cidr") add(`${ipText(rule.net)}/${rule.prefix}:${rule.port}`);
    else {
      let addresses: string[];
      try {
        addresses = await names.get(rule.name)!;
      } catch (error) {
        const code = (error as NodeJS.ErrnoException).code ?? (error as Error).message;
        throw invalid(
          `network allow-list: ${rule.name} does not resolve on the host (${code}): check the name, or list its address instead`,
        );
      }
      if (addresses.length === 0) {
        throw invalid(
          `network allow-list: ${rule.name} has no IPv4 address on the host; list an IPv4 address instead`,
        );
      }
      for (const address of addresses) {
        const ip = ipv4(address);
        if (ip === undefined) continue;
        if (within(ip, 32, LOOPBACK_NET, 8)) {
          throw invalid(
            `network allow-list: ${rule.name} resolves to the host's loopback (${address}); write host:${rule.port} for a host service (the guest reaches it at 10.0.2.2)`,
          );
        }
        if (within(ip, 32, SLIRP_NET, 24)) {
          throw invalid(
            `network allow-list: ${rule.name} resolves into the guest's own network (${address})`,
          );
        }
        add(`${address}/32:${rule.port}`);
        if (!hosts.some((h) => h.address === address && h.name === rule.name))
          hosts.push({ address, name: rule.name });
      }
    }
  }
  if (relayRules.length > MAX_ALLOW_RULES) {
    throw invalid(
      `network allow-list: its names resolve to ${relayRules.length} address:port rules; at most ${MAX_ALLOW_RULES}`,
    );
  }
  return { relayRules, hosts };
}

/** The host's IPv4 addresses for `name` (`getaddrinfo`, like every program on the host), bounded in time. */
async function resolveIpv4(name: string): Promise<string[]> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(Object.assign(new Error("timed out"), { code: "ETIMEDOUT" })),
      RESOLVE_TIMEOUT_MS,
    );
  });
  try {
    const found = await Promise.race([nodeDns().lookup(name, { all: true, family: 4 }), timeout]);
    return [...new Set(found.map((entry) => entry.address))];
  } finally {
    clearTimeout(timer);
  }
}

function ipv4(text: string): number | undefined {
  const parts = text.split(".");
  if (parts.length !== 4) return undefined;
  let value = 0;
  for (const part of parts) {
    if (!/^\d{1,3}$/.test(part) || Number(part) > 255) return undefined;
    value = value * 256 + Number(part);
  }
  return value;
}

function ipText(value: number): string {
  return [24, 16, 8, 0].map((shift) => (value >>> shift) & 255).join(".");
}

function maskOf(prefix: number): number {
  return prefix === 0 ? 0 : (0xffffffff << (32 - prefix)) >>> 0;
}

/** True when `net/prefix` lies inside `outer/outerPrefix`. */
function within(net: number, prefix: number, outer: number, outerPrefix: number): boolean {
  return prefix >= outerPrefix && (net & maskOf(outerPrefix)) >>> 0 === outer;
}

function describe(value: unknown): string {
  if (typeof value === "string") return JSON.stringify(value);
  if (Array.isArray(value)) return "a list";
  return value === null ? "null" : typeof value;
}

function invalid(message: string): SupermachineError {
  return new SupermachineError("INVALID_ARGUMENT", message);
}

/** A plain copy of a checked policy (what snapshots record). */
export function copyNetworkPolicy(policy: NetworkPolicy): NetworkPolicy {
  return typeof policy === "string" ? policy : { allow: [...policy.allow] };
}
