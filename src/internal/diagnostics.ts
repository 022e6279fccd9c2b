import { type Channel, channel } from "node:diagnostics_channel";
import { debuglog } from "node:util";

/** Debug traces, enabled with `NODE_DEBUG=supermachine`. */
export const debug = debuglog("supermachine");

/** The channels published on, by name (a handful): looking one up by its full name costs more. */
const channels = new Map<string, Channel>();

/**
 * Publishes `message` on the `node:diagnostics_channel` named `supermachine:<name>` when anyone
 * subscribes. The library never prints; the CLI and users subscribe.
 */
export function publish(name: string, message: object): void {
  let ch = channels.get(name);
  if (ch === undefined) {
    ch = channel(`supermachine:${name}`);
    channels.set(name, ch);
  }
  if (ch.hasSubscribers) ch.publish(message);
}
