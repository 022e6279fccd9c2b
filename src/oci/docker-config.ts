/**
 * Registry credentials from Docker's client config: `$DOCKER_CONFIG/config.json`, else
 * `~/.docker/config.json`. Only the `auths` map is read (`auth` = base64 `user:password`, or
 * `username` + `password`); credential helpers (`credsStore`, `credHelpers`) are not run.
 */

import { readFile } from "node:fs/promises";
import { homedir } from "node:os";
import { join } from "node:path";
import { debug } from "../internal/index.ts";

export interface RegistryCredentials {
  readonly username: string;
  readonly password: string;
}

const DOCKER_HUB_ALIASES = new Set([
  "docker.io",
  "index.docker.io",
  "registry-1.docker.io",
  "registry.hub.docker.com",
]);

/**
 * The key a registry is matched by: host[:port] lowercased, scheme and path dropped, Docker Hub's
 * aliases (`https://index.docker.io/v1/`, `registry-1.docker.io`, …) folded into `docker.io`.
 */
export function registryKey(registryOrUrl: string): string {
  let s = registryOrUrl.trim();
  const scheme = /^[a-z][a-z0-9+.-]*:\/\//i.exec(s);
  if (scheme) s = s.slice(scheme[0].length);
  const slash = s.indexOf("/");
  if (slash >= 0) s = s.slice(0, slash);
  s = s.toLowerCase();
  if (s.endsWith(":443") && DOCKER_HUB_ALIASES.has(s.slice(0, -4))) s = s.slice(0, -4);
  return DOCKER_HUB_ALIASES.has(s) ? "docker.io" : s;
}

/** Path of the Docker config file that would be read. */
export function dockerConfigPath(env: NodeJS.ProcessEnv = process.env): string {
  const dir = env.DOCKER_CONFIG ? env.DOCKER_CONFIG : join(env.HOME || homedir(), ".docker");
  return join(dir, "config.json");
}

function decodeAuthEntry(entry: unknown): RegistryCredentials | undefined {
  if (typeof entry !== "object" || entry === null) return undefined;
  const e = entry as Record<string, unknown>;
  if (typeof e.auth === "string" && e.auth !== "") {
    const decoded = Buffer.from(e.auth, "base64").toString("utf8");
    const colon = decoded.indexOf(":");
    if (colon > 0) return { username: decoded.slice(0, colon), password: decoded.slice(colon + 1) };
    return undefined;
  }
  if (typeof e.username === "string" && e.username !== "" && typeof e.password === "string") {
    return { username: e.username, password: e.password };
  }
  return undefined;
}

/** Find the credentials for `registry` in a parsed Docker config (pure; exported for tests). */
export function credentialsFromDockerConfig(
  config: unknown,
  registry: string,
): RegistryCredentials | undefined {
  if (typeof config !== "object" || config === null) return undefined;
  const auths = (config as Record<string, unknown>).auths;
  if (typeof auths !== "object" || auths === null) return undefined;
  const want = registryKey(registry);
  // Exact key first, then keys written with a scheme or path.
  const entries = Object.entries(auths as Record<string, unknown>);
  for (const [key, entry] of entries) {
    if (key === registry) {
      const c = decodeAuthEntry(entry);
      if (c) return c;
    }
  }
  for (const [key, entry] of entries) {
    if (registryKey(key) === want) {
      const c = decodeAuthEntry(entry);
      if (c) return c;
    }
  }
  return undefined;
}

/** Read the Docker config and return credentials for `registry`; undefined when none or unreadable. */
export async function loadDockerCredentials(
  registry: string,
  path: string = dockerConfigPath(),
): Promise<RegistryCredentials | undefined> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch {
    return undefined;
  }
  try {
    return credentialsFromDockerConfig(JSON.parse(text), registry);
  } catch (err) {
    debug("ignoring unreadable docker config %s: %s", path, (err as Error).message);
    return undefined;
  }
}
