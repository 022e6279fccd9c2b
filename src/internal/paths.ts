import { homedir } from "node:os";
import { join } from "node:path";

/**
 * The three places supermachine keeps files on the host. Each has an environment override so tests
 * and packagers can relocate it.
 */

/** Built guest assets (kernel, initramfs) and other rebuildable caches. */
export function cacheDir(env: NodeJS.ProcessEnv = process.env): string {
  return env.SUPERMACHINE_CACHE_DIR || join(env.XDG_CACHE_HOME || join(homedir(), ".cache"), "supermachine");
}

/** Pulled images, flattened root filesystems and snapshots. */
export function dataDir(env: NodeJS.ProcessEnv = process.env): string {
  return (
    env.SUPERMACHINE_DATA_DIR || join(env.XDG_DATA_HOME || join(homedir(), ".local", "share"), "supermachine")
  );
}

/** State of running VMs (sockets, pid files, console logs); swept when its owner is gone. */
export function runtimeDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.SUPERMACHINE_RUNTIME_DIR) return env.SUPERMACHINE_RUNTIME_DIR;
  const uid = typeof process.getuid === "function" ? process.getuid() : 0;
  return join(env.XDG_RUNTIME_DIR || "/tmp", `supermachine-${uid}`);
}
