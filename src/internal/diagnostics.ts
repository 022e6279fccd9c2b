import { channel } from "node:diagnostics_channel";
import { debuglog } from "node:util";

/** Debug traces, enabled with `NODE_DEBUG=supermachine`. */
export const debug = debuglog("supermachine");

/**
 * Publishes `message` on the `node:diagnostics_channel` named `supermachine:<name>` when anyone
 * subscribes. The library never prints; the CLI and users subscribe.
 */
export function publish(name: string, message: object): void {
  const ch = channel(`supermachine:${name}`);
  if (ch.hasSubscribers) ch.publish(message);
}
