/**
 * The guest's side of its network policy, written by the host through the agent's file API: the
 * guest's `/etc/resolv.conf` (QEMU's DNS for `outbound`; a resolver that fails at once under an
 * allow-list or `none`, where DNS leads nowhere) and, for allow-lists, a managed block of
 * `/etc/hosts` with the names resolved on the host. Written after a boot (sm-init configures the
 * interface itself, from `sm.net=user`), and after a restore or an activation when the policy
 * differs from the one the snapshot was made under, or is an allow-list (its names are resolved
 * again for every clone).
 *
 * Like docker, a file that is missing or a regular file is (re)written; a symbolic link (a
 * systemd-resolved stub, say) is left alone, and so is anything else.
 */

import type { AgentClient } from "../agent/index.ts";
import { debug } from "../internal/index.ts";
import { GUEST_NETWORK, type NetworkKind } from "./network-policy.ts";

/** Kernel argument that makes sm-init configure `eth0` for QEMU's user-mode network (10.0.2.15/24 via 10.0.2.2). */
export const NET_KERNEL_ARG = "sm.net=user";

/** The guest's resolv.conf under `outbound`: QEMU's DNS forwarder. */
export const OUTBOUND_RESOLV_CONF = `nameserver ${GUEST_NETWORK.dns}\n`;

/**
 * The guest's resolv.conf where DNS reaches nothing (`none` with a device, allow-lists): the
 * guest's own loopback, where nothing answers, so an unlisted name fails within a second instead
 * of after the resolver's timeouts. Listed names come from /etc/hosts.
 */
export const NO_DNS_RESOLV_CONF =
  "# supermachine: no DNS under this VM's network policy; allowed names are in /etc/hosts (docs/network.md)\n" +
  "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n";

const HOSTS_BEGIN = "# supermachine network allow-list: managed by the host, rewritten at every start";
const HOSTS_END = "# end of the supermachine network allow-list";
/** Largest /etc/hosts the host reads back to update its block. */
const MAX_HOSTS_BYTES = 1024 * 1024;

/** What the guest's files say now, and what they must say. */
export interface GuestNetworkChange {
  /** The policy the guest's files were written for (a snapshot's); undefined after a boot (the image's files). */
  from: NetworkKind | undefined;
  to: NetworkKind;
  /** Whether the VM has a network device (a `none` VM restored from a snapshot with one does). */
  device: boolean;
  /** The allow-list's names, resolved now (empty for other policies). */
  hosts: readonly { readonly address: string; readonly name: string }[];
  timeoutMs: number;
  signal?: AbortSignal | undefined;
}

/** Which resolv.conf a policy wants. */
function resolvConfFor(kind: NetworkKind): string {
  return kind === "outbound" ? OUTBOUND_RESOLV_CONF : NO_DNS_RESOLV_CONF;
}

/** Writes what `change` needs; nothing when the guest's files are already right. */
export async function configureGuestNetwork(agent: AgentClient, change: GuestNetworkChange): Promise<void> {
  const opts = {
    timeoutMs: change.timeoutMs,
    ...(change.signal === undefined ? {} : { signal: change.signal }),
  };
  if (
    change.device &&
    (change.from === undefined || resolvConfFor(change.from) !== resolvConfFor(change.to))
  ) {
    await replaceGuestFile(agent, "/etc/resolv.conf", resolvConfFor(change.to), opts);
  }
  if (change.to === "allow-list" || change.from === "allow-list") {
    const hosts = change.to === "allow-list" ? change.hosts : [];
    await replaceGuestFile(agent, "/etc/hosts", (current) => mergeHostsBlock(current ?? "", hosts), opts);
  }
}

/** `text` with its managed block replaced by one for `hosts` (none when `hosts` is empty). */
export function mergeHostsBlock(
  text: string,
  hosts: readonly { readonly address: string; readonly name: string }[],
): string {
  const lines = text.split("\n");
  if (lines[lines.length - 1] === "") lines.pop();
  const begin = lines.indexOf(HOSTS_BEGIN);
  if (begin >= 0) {
    const end = lines.indexOf(HOSTS_END, begin);
    lines.splice(begin, (end < 0 ? lines.length : end + 1) - begin);
  }
  if (hosts.length > 0) {
    lines.push(HOSTS_BEGIN, ...hosts.map((h) => `${h.address}\t${h.name}`), HOSTS_END);
  }
  return lines.length === 0 ? "" : `${lines.join("\n")}\n`;
}

/**
 * Replaces the regular file (or missing file) at `path` with `content`, or with `content(current)`
 * where `current` is its text (undefined when missing); nothing when that is what it holds (or
 * when it is missing and would stay empty). Leaves symbolic links and other file types alone.
 */
async function replaceGuestFile(
  agent: AgentClient,
  path: string,
  content: string | ((current: string | undefined) => string),
  opts: { timeoutMs: number; signal?: AbortSignal },
): Promise<void> {
  let current: string | undefined;
  try {
    const info = await agent.fs.lstat(path, opts);
    if (!info.isFile()) {
      debug("guest network: %s is not a regular file (a symbolic link?): left alone", path);
      return;
    }
    if (typeof content === "function") {
      current = new TextDecoder().decode(
        await agent.readFileBytes(path, { ...opts, maxBytes: MAX_HOSTS_BYTES }),
      );
    }
  } catch (error) {
    if ((error as { code?: unknown }).code !== "ENOENT") throw error;
  }
  const next = typeof content === "function" ? content(current) : content;
  if (next === current || (current === undefined && next === "")) return;
  await agent.writeFile(path, next, { ...opts, mode: 0o644, uid: 0, gid: 0, mkdirs: true });
}
