import { homedir } from "node:os";
import { isAbsolute, join, resolve } from "node:path";

/**
 * The three places supermachine keeps files on the host. Each has an environment override so tests
 * and packagers can relocate it; empty or relative XDG values are ignored, as the XDG spec says.
 */

function xdg(env: NodeJS.ProcessEnv, name: string, fallback: string[]): string {
  const value = env[name];
  return value && isAbsolute(value) ? value : join(env.HOME || homedir(), ...fallback);
}

/** Built guest assets (kernel, initramfs) and other rebuildable caches. */
export function cacheDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.SUPERMACHINE_CACHE_DIR) return resolve(env.SUPERMACHINE_CACHE_DIR);
  return join(xdg(env, "XDG_CACHE_HOME", [".cache"]), "supermachine");
}

/** Pulled images, flattened root filesystems and snapshots. */
export function dataDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.SUPERMACHINE_DATA_DIR) return resolve(env.SUPERMACHINE_DATA_DIR);
  return join(xdg(env, "XDG_DATA_HOME", [".local", "share"]), "supermachine");
}

/** State of running VMs (sockets, pid files, console logs); swept when its owner is gone. */
export function runtimeDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.SUPERMACHINE_RUNTIME_DIR) return resolve(env.SUPERMACHINE_RUNTIME_DIR);
  const base = env.XDG_RUNTIME_DIR && isAbsolute(env.XDG_RUNTIME_DIR) ? env.XDG_RUNTIME_DIR : "/tmp";
  return join(base, `supermachine-${process.getuid?.() ?? 0}`);
}
