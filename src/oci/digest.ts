/** Content digests (`sha256:<hex>`, `sha512:<hex>`): validation and hashing. */

import type { Hash } from "node:crypto";
import { nodeCrypto } from "../internal/index.ts";

export type DigestAlgorithm = "sha256" | "sha512";

const HEX_LENGTH: Record<DigestAlgorithm, number> = { sha256: 64, sha512: 128 };

export interface ParsedDigest {
  readonly algorithm: DigestAlgorithm;
  readonly hex: string;
}

/** Split a digest this library can verify; undefined for anything else (bad syntax, other algorithms). */
export function parseDigest(digest: unknown): ParsedDigest | undefined {
  if (typeof digest !== "string") return undefined;
  const colon = digest.indexOf(":");
  if (colon < 0) return undefined;
  const algorithm = digest.slice(0, colon);
  if (algorithm !== "sha256" && algorithm !== "sha512") return undefined;
  const hex = digest.slice(colon + 1);
  if (hex.length !== HEX_LENGTH[algorithm] || !/^[a-f0-9]+$/.test(hex)) return undefined;
  return { algorithm, hex };
}

export function isDigest(digest: unknown): digest is string {
  return parseDigest(digest) !== undefined;
}

/** A streaming hasher for the algorithm of `digest` (sha256 or sha512). */
export function hasherFor(algorithm: DigestAlgorithm): Hash {
  return nodeCrypto().createHash(algorithm);
}

/** Digest of a byte string, `sha256:<hex>` by default. */
export function digestOf(bytes: Uint8Array, algorithm: DigestAlgorithm = "sha256"): string {
  return `${algorithm}:${nodeCrypto().createHash(algorithm).update(bytes).digest("hex")}`;
}
