/**
 * What starting a VM under a network policy takes (docs/network.md): QEMU's network device (with
 * `restrict=on` for a `none` VM whose snapshot has a device), and for allow-lists the relay with
 * the rules resolved now, and the names the guest's `/etc/hosts` gets.
 */

import { SupermachineError } from "../errors.ts";
import { type AssetPaths, locateNetRelay, type NetRelaySpec, type NetworkSpec } from "../vmm/index.ts";
import {
  copyNetworkPolicy,
  type NetworkKind,
  type NetworkPolicy,
  parseNetworkPolicy,
  resolveAllowList,
} from "./network-policy.ts";

/** A VM's network, ready for its QEMU. */
export interface NetworkLaunch {
  readonly kind: NetworkKind;
  /** The policy as given (what snapshots of the VM record). */
  readonly policy: NetworkPolicy;
  /** Whether QEMU gets a network device. */
  readonly device: boolean;
  /** QEMU's user-mode network, when there is a device. */
  readonly machine: NetworkSpec | undefined;
  /** The allow-list relay. */
  readonly relay: NetRelaySpec | undefined;
  /** The allow-list's names, resolved now, for the guest's /etc/hosts. */
  readonly hosts: readonly { readonly address: string; readonly name: string }[];
}

/**
 * Checks `policy` and prepares it. `device`: whether the VM has a network device whatever the
 * policy (a snapshot made with one); undefined for a boot, where the policy decides.
 */
export async function prepareNetwork(
  policy: NetworkPolicy,
  options: { what: string; device?: boolean | undefined; assets?: Partial<AssetPaths> | undefined },
): Promise<NetworkLaunch> {
  const parsed = parseNetworkPolicy(policy, options.what);
  const device = options.device ?? parsed.kind !== "none";
  if (!device && parsed.kind !== "none") {
    throw new SupermachineError("INVALID_ARGUMENT", `${options.what}: this VM has no network device`);
  }
  const machine: NetworkSpec | undefined = device ? { restrict: parsed.kind === "none" } : undefined;
  if (parsed.kind !== "allow-list") {
    return {
      kind: parsed.kind,
      policy: copyNetworkPolicy(policy),
      device,
      machine,
      relay: undefined,
      hosts: [],
    };
  }
  const [resolved, relayPath] = await Promise.all([
    resolveAllowList(parsed.rules),
    options.assets?.netRelay ?? locateNetRelay(options.assets).then((found) => found.path),
  ]);
  return {
    kind: parsed.kind,
    policy: copyNetworkPolicy(policy),
    device,
    machine,
    relay: { path: relayPath, rules: resolved.relayRules },
    hosts: resolved.hosts,
  };
}
