/** Platforms (`os/arch[/variant]`) and choosing a manifest from an index. */

import { PlatformNotFoundError, SupermachineError } from "../errors.ts";

export interface Platform {
  readonly os: string;
  readonly architecture: string;
  readonly variant?: string | undefined;
}

/** The platform pulled when none is asked for: the guest is x86-64 Linux. */
export const DEFAULT_PLATFORM = "linux/amd64";

const ARCH_ALIASES: Readonly<Record<string, [string, string]>> = {
  x86_64: ["amd64", ""],
  "x86-64": ["amd64", ""],
  i386: ["386", ""],
  i686: ["386", ""],
  aarch64: ["arm64", ""],
  armhf: ["arm", "v7"],
  armel: ["arm", "v6"],
};

/** Normalise aliases (`x86_64` → `amd64`, `aarch64` → `arm64`, `arm64/v8` → `arm64`, `arm` → `arm/v7`). */
export function normalizePlatform(p: Platform): { os: string; architecture: string; variant: string } {
  let os = p.os.toLowerCase();
  if (os === "macos") os = "darwin";
  let architecture = p.architecture.toLowerCase();
  let variant = (p.variant ?? "").toLowerCase();
  const alias = ARCH_ALIASES[architecture];
  if (alias !== undefined) {
    architecture = alias[0];
    if (variant === "") variant = alias[1];
  }
  if (architecture === "arm64" && variant === "v8") variant = "";
  if (architecture === "amd64" && variant === "v1") variant = "";
  if (architecture === "arm" && variant === "") variant = "v7";
  if (architecture === "arm" && /^[5-8]$/.test(variant)) variant = `v${variant}`;
  return { os, architecture, variant };
}

/** Parse `os/arch[/variant]`; throws `INVALID_ARGUMENT`. */
export function parsePlatform(s: string): Platform {
  const parts = s.split("/");
  if (parts.length < 2 || parts.length > 3 || parts.some((x) => !/^[A-Za-z0-9_.-]+$/.test(x))) {
    throw new SupermachineError(
      "INVALID_ARGUMENT",
      `invalid platform ${JSON.stringify(s)}: expected os/arch[/variant], e.g. linux/amd64 or linux/arm64/v8`,
    );
  }
  return normalizePlatform({ os: parts[0]!, architecture: parts[1]!, variant: parts[2] });
}

/** `os/arch[/variant]` after normalisation. */
export function formatPlatform(p: Platform): string {
  const n = normalizePlatform(p);
  return `${n.os}/${n.architecture}${n.variant ? `/${n.variant}` : ""}`;
}

/**
 * How well `candidate` serves `wanted`: 0 = exact, higher = worse but usable, undefined = unusable.
 * An unspecified wanted variant takes any variant (exact first); `arm/v7` also runs v6 and v5.
 */
export function platformScore(candidate: Platform, wanted: Platform): number | undefined {
  const c = normalizePlatform(candidate);
  const w = normalizePlatform(wanted);
  if (c.os !== w.os || c.architecture !== w.architecture) return undefined;
  if (c.variant === w.variant) return 0;
  if (w.variant === "" || (w.architecture === "amd64" && c.variant === "")) return 1;
  if (w.architecture === "arm") {
    const cv = Number(c.variant.slice(1));
    const wv = Number(w.variant.slice(1));
    if (c.variant.startsWith("v") && w.variant.startsWith("v") && cv < wv) return 1 + wv - cv;
  }
  return undefined;
}

export interface PlatformEntry {
  readonly platform?: Platform | undefined;
}

/**
 * Pick the entry of an index that best matches `wanted`. Throws {@link PlatformNotFoundError}
 * listing what the index offers (attestation entries `unknown/unknown` are neither chosen nor listed).
 */
export function selectPlatform<T extends PlatformEntry>(
  entries: readonly T[],
  wanted: Platform,
  what: string,
): T {
  let best: T | undefined;
  let bestScore = Number.POSITIVE_INFINITY;
  for (const entry of entries) {
    if (entry.platform === undefined) continue;
    const score = platformScore(entry.platform, wanted);
    if (score !== undefined && score < bestScore) {
      best = entry;
      bestScore = score;
    }
  }
  if (best !== undefined) return best;
  const available = [
    ...new Set(
      entries
        .filter(
          (e) =>
            e.platform !== undefined && e.platform.os !== "unknown" && e.platform.architecture !== "unknown",
        )
        .map((e) => formatPlatform(e.platform!)),
    ),
  ];
  const wantedText = formatPlatform(wanted);
  throw new PlatformNotFoundError(
    `${what} has no image for platform ${wantedText}; available: ${available.length > 0 ? available.join(", ") : "none"}`,
    { platform: wantedText, available },
  );
}
