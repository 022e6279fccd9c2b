import { type Channel, channel } from "node:diagnostics_channel";
import { debuglog } from "node:util";

/** Debug traces, enabled with `NODE_DEBUG=supermachine`. */
export const debug = debuglog("supermachine");

/** The channels published on, by name (a handful): looking one up by its full name costs more. */
const channels = new Map<string, Channel>();

/**
 * Publishes `message` on the `node:diagnostics_channel` named `supermachine:<name>` when anyone
 * subscribes. The library never prints; the CLI and users subscribe. A function is called for the
 * message only then (for events of every exec and lease, whose message costs more than the check).
 */
export function publish(name: string, message: object | (() => object)): void {
  let ch = channels.get(name);
  if (ch === undefined) {
    ch = channel(`supermachine:${name}`);
    channels.set(name, ch);
  }
  if (ch.hasSubscribers) ch.publish(typeof message === "function" ? message() : message);
}
