/**
 * Published ports (`run -p`), docker's syntax: `[IP:][HOST_PORT:]GUEST_PORT[/tcp]`, with ranges
 * of equal length (`8000-8001:80-81`) and IPv6 addresses in brackets (`[::1]:8080:80`). An absent
 * or 0 host port is any free one; the address defaults to 127.0.0.1 (docker's is every
 * interface: say `0.0.0.0:` for that). Each is a `vm.exposeTcp` listener: a tunnel over the
 * agent channel, so the VM needs no network device.
 */
import { isIP } from "node:net";
import type { Vm } from "../index.ts";
import { UsageError } from "./cli.ts";

/** One port to publish, as asked. */
export interface PortSpec {
  readonly host: string;
  /** 0: any free port. */
  readonly hostPort: number;
  readonly guestPort: number;
}

/** A published port, as bound. */
export interface PublishedPort {
  readonly host: string;
  readonly hostPort: number;
  readonly guestPort: number;
}

const DEFAULT_HOST = "127.0.0.1";
/** Most ports one `-p` may publish (a range). */
const MAX_RANGE = 1024;
const SYNTAX = "expected [IP:][HOST_PORT:]GUEST_PORT[/tcp], e.g. -p 8080:80 or -p 127.0.0.1:0:80";

/** Parses one `-p` value into the ports it publishes. */
export function parsePublish(value: string): PortSpec[] {
  const fail = (why: string) => new UsageError(`-p ${value}: ${why}; ${SYNTAX}`);
  let rest = value;
  const slash = rest.lastIndexOf("/");
  if (slash !== -1) {
    const protocol = rest.slice(slash + 1);
    if (protocol !== "tcp")
      throw new UsageError(
        `-p ${value}: only TCP ports can be published (they are tunnelled over the VM's agent channel)`,
      );
    rest = rest.slice(0, slash);
  }
  let host = DEFAULT_HOST;
  let parts: string[];
  if (rest.startsWith("[")) {
    const close = rest.indexOf("]");
    if (close === -1 || rest[close + 1] !== ":") throw fail("an IPv6 address in brackets is followed by ':'");
    host = rest.slice(1, close);
    if (isIP(host) !== 6) throw fail(`${JSON.stringify(host)} is not an IPv6 address`);
    parts = rest.slice(close + 2).split(":");
    if (parts.length !== 2) throw fail("give HOST_PORT:GUEST_PORT after the address");
  } else {
    parts = rest.split(":");
    if (parts.length === 3) {
      host = parts.shift()!;
      if (isIP(host) !== 4) throw fail(`${JSON.stringify(host)} is not an IPv4 address`);
    } else if (parts.length > 3) {
      throw fail("too many ':' (an IPv6 address goes in brackets)");
    }
  }
  const guest = range(parts.at(-1)!, 1, "GUEST_PORT", fail);
  const hostPorts =
    parts.length === 2 && parts[0] !== "" ? range(parts[0]!, 0, "HOST_PORT", fail) : undefined;
  if (hostPorts !== undefined && hostPorts.length !== guest.length)
    throw fail(
      hostPorts.length === 1 && hostPorts[0] === 0
        ? "host port 0 stands for one port: leave HOST_PORT out to publish a range on free ports"
        : "the host and guest ranges must have the same length",
    );
  return guest.map((guestPort, i) => ({ host, hostPort: hostPorts?.[i] ?? 0, guestPort }));
}

/** `80` or `8000-8010`; ports from `min` to 65535. */
function range(text: string, min: number, what: string, fail: (why: string) => UsageError): number[] {
  const match = /^(\d{1,5})(?:-(\d{1,5}))?$/.exec(text);
  if (match === null) throw fail(`${what} ${JSON.stringify(text)} is not a port or a range`);
  const first = Number(match[1]);
  const last = match[2] === undefined ? first : Number(match[2]);
  for (const port of [first, last])
    if (port < min || port > 65535) throw fail(`${what} ${port} is out of range (${min}-65535)`);
  if (last < first) throw fail(`${what} range ${text} ends before it starts`);
  if (last - first >= MAX_RANGE) throw fail(`${what} range ${text} is longer than ${MAX_RANGE} ports`);
  if (first === 0 && last !== 0) throw fail(`${what} range ${text} includes 0`);
  return Array.from({ length: last - first + 1 }, (_, i) => first + i);
}

/**
 * Listens on each port, forwarding to the VM; they close with the VM. The ports are bound in
 * order, and the first that cannot be is the error (the VM's stop closes the others).
 */
export async function publishPorts(vm: Vm, specs: readonly PortSpec[]): Promise<PublishedPort[]> {
  const published: PublishedPort[] = [];
  for (const spec of specs) {
    const exposed = await vm.exposeTcp(spec.hostPort, spec.guestPort, { host: spec.host });
    published.push({ host: exposed.host, hostPort: exposed.hostPort, guestPort: exposed.guestPort });
  }
  return published;
}

/** `8080/tcp -> 127.0.0.1:49153`, as `docker port` prints it. */
export function portLine(port: PublishedPort): string {
  return `${port.guestPort}/tcp -> ${hostAddress(port)}`;
}

/** `127.0.0.1:49153->8080/tcp`, as `docker ps` shows it. */
export function portColumn(port: PublishedPort): string {
  return `${hostAddress(port)}->${port.guestPort}/tcp`;
}

/** `127.0.0.1:49153` or `[::1]:49153`. */
export function hostAddress(port: PublishedPort): string {
  return `${isIP(port.host) === 6 ? `[${port.host}]` : port.host}:${port.hostPort}`;
}
