/**
 * Docker/OCI image references: parsing, validation and normalisation, following the grammar of
 * `github.com/distribution/reference` (the one `docker pull` uses):
 *
 * ```
 * reference        := name [ ":" tag ] [ "@" digest ]
 * name             := [ domain "/" ] path-component { "/" path-component }
 * domain           := host [ ":" port ]
 * host             := domain-name | IPv4 | "[" IPv6 "]"
 * path-component   := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
 * tag              := [A-Za-z0-9_] [A-Za-z0-9_.-]{0,127}
 * digest           := algorithm ":" hex        (sha256: 64 lowercase hex, sha512: 128)
 * ```
 *
 * Normalisation: the first component is a registry only if it contains `.` or `:`, is `localhost`,
 * or has an uppercase letter; otherwise the registry is `docker.io`. `index.docker.io` becomes
 * `docker.io`; single-component Docker Hub names get `library/`; with neither tag nor digest the
 * tag is `latest`.
 */

import { SupermachineError } from "../errors.ts";
import { parseDigest } from "./digest.ts";

/** The registry images without an explicit registry come from. */
export const DEFAULT_REGISTRY = "docker.io";
/** Tag used when a reference names neither tag nor digest. */
export const DEFAULT_TAG = "latest";
/** Longest allowed name (registry + "/" + repository), as in distribution/reference. */
export const NAME_MAX_LENGTH = 255;

/** A parsed, normalised image reference. */
export interface ImageReference {
  /** Registry host with optional port: `docker.io`, `localhost:5000`, `[::1]:5000`. */
  readonly registry: string;
  /** Repository path inside the registry: `library/alpine`, `a/b`. */
  readonly repository: string;
  /** Tag, or undefined when only a digest was given. `latest` when neither was given. */
  readonly tag: string | undefined;
  /** Content digest (`sha256:…`), when given. It wins over the tag when pulling. */
  readonly digest: string | undefined;
  /** `registry/repository`. */
  readonly name: string;
  /** Short form as Docker prints it: `alpine:3.20`, `user/app@sha256:…`, `localhost:5000/a:b`. */
  readonly familiar: string;
  /** Canonical form: `docker.io/library/alpine:latest`, `registry/repo:tag@sha256:…`. */
  toString(): string;
}

const PATH_COMPONENT = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/;
const DOMAIN_COMPONENT = /^(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])$/;
const IPV6_HOST = /^\[[a-fA-F0-9:]+\]$/;
const TAG = /^[\w][\w.-]{0,127}$/;
const HEX64 = /^[a-f0-9]{64}$/;

function invalid(input: string, why: string): SupermachineError {
  return new SupermachineError(
    "INVALID_REFERENCE",
    `invalid image reference ${JSON.stringify(input)}: ${why}`,
  );
}

/** Why `host[:port]` is not a valid registry, or undefined when it is. */
export function registryProblem(domain: string): string | undefined {
  let host = domain;
  let port: string | undefined;
  if (domain.startsWith("[")) {
    const close = domain.indexOf("]");
    if (close < 0) return `registry ${JSON.stringify(domain)} has an unterminated IPv6 address`;
    host = domain.slice(0, close + 1);
    const rest = domain.slice(close + 1);
    if (rest !== "") {
      if (!rest.startsWith(":")) return `unexpected ${JSON.stringify(rest)} after IPv6 address`;
      port = rest.slice(1);
    }
    if (!IPV6_HOST.test(host)) return `registry host ${JSON.stringify(host)} is not a valid IPv6 address`;
  } else {
    const colon = domain.indexOf(":");
    if (colon >= 0) {
      host = domain.slice(0, colon);
      port = domain.slice(colon + 1);
    }
    if (host === "") return "registry host is empty";
    for (const component of host.split(".")) {
      if (!DOMAIN_COMPONENT.test(component)) {
        return `registry host ${JSON.stringify(host)} is not a valid host name (letters, digits, '-' and '.', no empty labels)`;
      }
    }
  }
  if (port !== undefined) {
    if (!/^[0-9]+$/.test(port)) return `registry port ${JSON.stringify(port)} is not a number`;
    const n = Number(port);
    if (n < 1 || n > 65535) return `registry port ${port} is out of range (1-65535)`;
  }
  return undefined;
}

/**
 * Split a name into registry and repository the way Docker does: the part before the first `/`
 * is a registry when it contains `.` or `:`, is `localhost`, or is not all lowercase.
 */
function splitDomain(name: string): { registry: string; repository: string; explicit: boolean } {
  const slash = name.indexOf("/");
  if (slash < 0) return { registry: DEFAULT_REGISTRY, repository: name, explicit: false };
  const first = name.slice(0, slash);
  const isDomain =
    first.includes(".") || first.includes(":") || first === "localhost" || first.toLowerCase() !== first;
  if (!isDomain) return { registry: DEFAULT_REGISTRY, repository: name, explicit: false };
  return { registry: first, repository: name.slice(slash + 1), explicit: true };
}

class ParsedReference implements ImageReference {
  readonly registry: string;
  readonly repository: string;
  readonly tag: string | undefined;
  readonly digest: string | undefined;

  constructor(registry: string, repository: string, tag: string | undefined, digest: string | undefined) {
    this.registry = registry;
    this.repository = repository;
    this.tag = tag;
    this.digest = digest;
  }

  get name(): string {
    return `${this.registry}/${this.repository}`;
  }

  get familiar(): string {
    let name = this.name;
    if (this.registry === DEFAULT_REGISTRY) {
      name = this.repository;
      const rest = name.startsWith("library/") ? name.slice("library/".length) : undefined;
      if (rest !== undefined && !rest.includes("/")) name = rest;
    }
    return name + suffix(this.tag, this.digest);
  }

  toString(): string {
    return this.name + suffix(this.tag, this.digest);
  }

  toJSON(): string {
    return this.toString();
  }
}

function suffix(tag: string | undefined, digest: string | undefined): string {
  return (tag !== undefined ? `:${tag}` : "") + (digest !== undefined ? `@${digest}` : "");
}

/**
 * Parse and normalise an image reference (`alpine`, `library/alpine:3.20`, `localhost:5000/a/b:tag`,
 * `registry:5000/x@sha256:…`, `[::1]:5000/x`). Throws `INVALID_REFERENCE` saying what is wrong.
 */
export function parseReference(input: string): ImageReference {
  if (typeof input !== "string") throw invalid(String(input), "not a string");
  if (input === "") throw invalid(input, "reference is empty");
  if (/[\s\u0000-\u001f\u007f]/.test(input))
    throw invalid(input, "contains whitespace or control characters");
  if (input.includes("://")) {
    throw invalid(
      input,
      "a reference has no URL scheme: write registry/repository:tag (e.g. localhost:5000/app:1)",
    );
  }
  if (HEX64.test(input)) {
    throw invalid(input, "a 64-character hexadecimal string is an image ID, not a repository name");
  }

  let rest = input;
  let digest: string | undefined;
  const at = rest.indexOf("@");
  if (at >= 0) {
    if (rest.indexOf("@", at + 1) >= 0) throw invalid(input, "more than one '@'");
    digest = rest.slice(at + 1);
    rest = rest.slice(0, at);
    if (digest === "") throw invalid(input, "empty digest after '@'");
    const problem = digestProblem(digest);
    if (problem !== undefined) throw invalid(input, problem);
  }

  let tag: string | undefined;
  const colon = rest.lastIndexOf(":");
  if (colon > rest.lastIndexOf("/") && !rest.slice(colon).includes("]")) {
    tag = rest.slice(colon + 1);
    rest = rest.slice(0, colon);
    if (tag === "") throw invalid(input, "empty tag after ':'");
    if (!TAG.test(tag)) {
      throw invalid(
        input,
        tag.length > 128
          ? `tag is ${tag.length} characters long (at most 128)`
          : `invalid tag ${JSON.stringify(tag)}: use letters, digits, '_', '.' and '-', not starting with '.' or '-'`,
      );
    }
  }

  if (rest === "") throw invalid(input, "repository name is empty");
  if (rest.length > NAME_MAX_LENGTH) {
    throw invalid(input, `repository name is ${rest.length} characters long (at most ${NAME_MAX_LENGTH})`);
  }

  const split = splitDomain(rest);
  let registry = split.registry;
  let repository = split.repository;
  if (split.explicit) {
    const problem = registryProblem(registry);
    if (problem !== undefined) throw invalid(input, problem);
    if (registry === "index.docker.io") registry = DEFAULT_REGISTRY;
  }
  if (repository === "") throw invalid(input, "repository path is empty");
  if (repository.toLowerCase() !== repository) {
    throw invalid(input, `repository name ${JSON.stringify(repository)} must be lowercase`);
  }
  for (const component of repository.split("/")) {
    if (component === "")
      throw invalid(input, "repository path has an empty component ('//' or a trailing '/')");
    if (!PATH_COMPONENT.test(component)) {
      throw invalid(
        input,
        `invalid repository path component ${JSON.stringify(component)}: use lowercase letters and digits, separated by '.', '_', '__' or '-'`,
      );
    }
  }
  if (registry === DEFAULT_REGISTRY && !repository.includes("/")) repository = `library/${repository}`;
  if (tag === undefined && digest === undefined) tag = DEFAULT_TAG;
  return new ParsedReference(registry, repository, tag, digest);
}

/** Why `digest` is not a digest this library can verify, or undefined when it is fine. */
export function digestProblem(digest: string): string | undefined {
  const colon = digest.indexOf(":");
  if (colon < 0) return `digest ${JSON.stringify(digest)} has no algorithm (expected sha256:<64 hex digits>)`;
  const algorithm = digest.slice(0, colon);
  if (!/^[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*$/.test(algorithm)) {
    return `invalid digest algorithm ${JSON.stringify(algorithm)}`;
  }
  if (parseDigest(digest) !== undefined) return undefined;
  if (algorithm !== "sha256" && algorithm !== "sha512") {
    return `unsupported digest algorithm ${JSON.stringify(algorithm)} (sha256 and sha512 are supported)`;
  }
  const hex = digest.slice(colon + 1);
  const want = algorithm === "sha256" ? 64 : 128;
  return `invalid ${algorithm} digest: expected ${want} lowercase hex digits, got ${JSON.stringify(hex.length > 140 ? `${hex.slice(0, 140)}…` : hex)}`;
}

/** True when `s` is a syntactically valid tag. */
export function isValidTag(s: string): boolean {
  return TAG.test(s);
}
