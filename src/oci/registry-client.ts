/**
 * Client for the Distribution (Docker Registry HTTP API v2) protocol: manifests, blobs, auth.
 *
 * Transport: `node:http` / `node:https`, a blob's body on a connection of its own (http-get.ts). HTTPS everywhere (trusting `NODE_EXTRA_CA_CERTS`), except that
 * loopback registries (127.0.0.0/8, ::1, localhost) and registries listed in `insecureRegistries`
 * are tried over HTTPS first and fall back to plain HTTP when the server does not speak TLS.
 *
 * Auth: anonymous, Basic, or Bearer tokens. The client pings `/v2/` once to learn the challenge,
 * answers it (a token from the realm with `service` and `scope`, sending Basic credentials when it
 * has some), caches tokens per scope until they expire, and retries a request once after a 401.
 */

import { AbortError, DigestMismatchError, RegistryError } from "../errors.ts";
import { debug } from "../internal/index.ts";
import { BlobSizeError, type BlobWriter } from "./content-store.ts";
import { digestOf, parseDigest } from "./digest.ts";
import { loadDockerCredentials, type RegistryCredentials, registryKey } from "./docker-config.ts";
import { httpGet } from "./http-get.ts";
import type { HttpBody, HttpResponse } from "./http-response.ts";
import { MANIFEST_MAX_BYTES } from "./manifest.ts";
import { bareMediaType, MANIFEST_ACCEPT } from "./media-types.ts";
import { type AuthChallenge, parseWwwAuthenticate } from "./www-authenticate.ts";

export type CredentialsOption =
  | RegistryCredentials
  | ((registry: string) => RegistryCredentials | undefined | Promise<RegistryCredentials | undefined>);

export interface RegistryClientOptions {
  /** Registries (`host` or `host:port`) that may be reached over plain HTTP. Loopback always may. */
  readonly insecureRegistries?: readonly string[] | undefined;
  /**
   * Credentials: one pair (used for the registry being pulled from), or a function of the
   * registry host. Without them (or when the function returns undefined) the Docker config is read.
   */
  readonly credentials?: CredentialsOption | undefined;
  /** Docker config file to read credentials from; `false` to never read one. */
  readonly dockerConfigPath?: string | false | undefined;
  /** Retries after a 5xx/429 answer or a connection error (default 4). */
  readonly retries?: number | undefined;
  /** First retry delay; doubles each time, with jitter, capped at 10 s (default 200 ms). */
  readonly retryDelayMs?: number | undefined;
  readonly userAgent?: string | undefined;
}

export interface FetchedManifest {
  readonly bytes: Buffer;
  /** Digest of the bytes (the algorithm of the requested digest, else sha256). */
  readonly digest: string;
  /** Media type from the Content-Type header, if any. */
  readonly contentType: string | undefined;
}

export interface BlobDescriptor {
  readonly digest: string;
  readonly size: number;
}

/** True for 127.0.0.0/8, ::1 and localhost (host with or without port/brackets). */
export function isLoopbackHost(hostPort: string): boolean {
  let host = hostPort.toLowerCase();
  if (host.startsWith("[")) host = host.slice(1, host.indexOf("]") >= 0 ? host.indexOf("]") : undefined);
  else if (host.includes(":") && host.indexOf(":") === host.lastIndexOf(":"))
    host = host.slice(0, host.indexOf(":"));
  if (host === "localhost" || host === "::1" || host === "0:0:0:0:0:0:0:1") return true;
  return (
    /^127\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.test(host) && host.split(".").every((p) => Number(p) <= 255)
  );
}

/** Redirects followed for one request. */
const MAX_REDIRECTS = 10;

function hostOnly(hostPort: string): string {
  if (hostPort.startsWith("[")) return hostPort.slice(0, hostPort.indexOf("]") + 1);
  const colon = hostPort.lastIndexOf(":");
  return colon >= 0 ? hostPort.slice(0, colon) : hostPort;
}

/** The host API requests go to (Docker Hub's API lives on registry-1.docker.io). */
export function apiHost(registry: string): string {
  return registryKey(registry) === "docker.io" ? "registry-1.docker.io" : registry;
}

function errorCode(err: unknown): string | undefined {
  let e: unknown = err;
  for (let depth = 0; depth < 4 && e !== undefined && e !== null; depth++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === "string") return code;
    e = (e as { cause?: unknown }).cause;
  }
  return undefined;
}

function describe(err: unknown): string {
  const cause = (err as { cause?: unknown })?.cause;
  const inner = cause instanceof Error ? cause.message : undefined;
  const outer = err instanceof Error ? err.message : String(err);
  return inner && inner !== outer ? `${outer}: ${inner.split("\n")[0]}` : outer;
}

const CERT_ERRORS = new Set([
  "DEPTH_ZERO_SELF_SIGNED_CERT",
  "SELF_SIGNED_CERT_IN_CHAIN",
  "UNABLE_TO_VERIFY_LEAF_SIGNATURE",
  "UNABLE_TO_GET_ISSUER_CERT_LOCALLY",
  "CERT_HAS_EXPIRED",
  "CERT_NOT_YET_VALID",
  "ERR_TLS_CERT_ALTNAME_INVALID",
]);

function isNotTls(err: unknown): boolean {
  const code = errorCode(err);
  return code !== undefined && (code.startsWith("ERR_SSL_") || code === "EPROTO" || code === "ECONNRESET");
}

function isAbort(err: unknown, signal: AbortSignal | undefined): boolean {
  return signal?.aborted === true || (err instanceof Error && err.name === "AbortError");
}

function abortError(signal: AbortSignal | undefined, cause?: unknown): AbortError {
  return new AbortError("pull aborted", { cause: signal?.reason ?? cause });
}

function sleep(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(abortError(signal));
      return;
    }
    const onAbort = () => {
      clearTimeout(timer);
      reject(abortError(signal));
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/** Read a response body as bytes, failing when it exceeds `max`. */
async function readBounded(res: HttpResponse, max: number, what: () => Error): Promise<Buffer> {
  const declared = Number(res.header("content-length") ?? Number.NaN);
  if (Number.isFinite(declared) && declared > max) {
    res.discard();
    throw what();
  }
  const chunks: Buffer[] = [];
  let total = 0;
  const broken = await res.body.consume((chunk) => {
    total += chunk.length;
    if (total > max) throw what();
    chunks.push(Buffer.from(chunk));
  });
  if (broken !== undefined) throw broken;
  return Buffer.concat(chunks, total);
}

/**
 * Feed a blob's body to `writer` as it arrives (reading waits while the writer is 8 MiB behind).
 * Resolves when the body ended (undefined) or the connection broke (the error: the caller resumes);
 * rejects with what `writer` threw (the body is destroyed) or an abort.
 */
export async function receiveBody(
  body: HttpBody,
  writer: BlobWriter,
  signal: AbortSignal | undefined,
  onBytes: ((bytesDone: number) => void) | undefined,
): Promise<unknown> {
  const broken = await body.consume((chunk) => {
    const more = writer.append(chunk);
    onBytes?.(writer.bytesWritten);
    return more ? undefined : writer.drained();
  });
  if (broken !== undefined && isAbort(broken, signal)) throw abortError(signal, broken);
  return broken;
}

/** `message` of the first error in a registry's JSON error body, if any. */
async function errorDetail(res: HttpResponse): Promise<{ code?: string; message?: string }> {
  try {
    const body = await readBounded(res, 64 * 1024, () => new Error("too long"));
    const parsed = JSON.parse(body.toString("utf8")) as { errors?: { code?: unknown; message?: unknown }[] };
    const first = parsed.errors?.[0];
    return {
      code: typeof first?.code === "string" ? first.code : undefined,
      message: typeof first?.message === "string" ? first.message : undefined,
    };
  } catch {
    return {};
  }
}

interface CachedToken {
  readonly token: string;
  readonly expiresAt: number;
}

export class RegistryClient {
  /** Registry as written in the reference (`docker.io`, `localhost:5000`). */
  readonly registry: string;
  readonly #host: string;
  readonly #options: RegistryClientOptions;
  readonly #retries: number;
  readonly #retryDelayMs: number;
  readonly #insecure: boolean;
  #origin: Promise<string> | undefined;
  #challenge: AuthChallenge | undefined;
  readonly #tokens = new Map<string, Promise<CachedToken>>();
  #credentials: Promise<RegistryCredentials | undefined> | undefined;

  constructor(registry: string, options: RegistryClientOptions = {}) {
    this.registry = registry;
    this.#host = apiHost(registry);
    this.#options = options;
    this.#retries = Math.max(0, options.retries ?? 4);
    this.#retryDelayMs = Math.max(0, options.retryDelayMs ?? 200);
    const key = registryKey(registry);
    const host = hostOnly(registry).toLowerCase();
    this.#insecure = (options.insecureRegistries ?? []).some((r) => {
      const k = registryKey(r);
      return k === key || k === host;
    });
  }

  /** True when plain HTTP may be used for this registry. */
  get allowsPlainHttp(): boolean {
    return this.#insecure || isLoopbackHost(this.#host);
  }

  /**
   * GET `url`, following redirects by hand (at most {@link MAX_REDIRECTS}) so that each hop is
   * checked: never from HTTPS to plain HTTP unless the registry is marked insecure, plain HTTP only
   * to hosts that may be reached that way, and credentials never sent to another origin. `bulk`:
   * a blob's body (http-get.ts).
   */
  async #fetch(
    url: string | URL,
    headers: Record<string, string>,
    signal: AbortSignal | undefined,
    options: { bulk?: boolean } = {},
  ): Promise<HttpResponse> {
    let current = new URL(url);
    let h = headers;
    for (let hop = 0; ; hop++) {
      const res = await httpGet(current, h, signal, options);
      const location = res.header("location");
      if (![301, 302, 303, 307, 308].includes(res.status) || location === undefined) return res;
      res.discard();
      if (hop >= MAX_REDIRECTS) {
        throw this.#error(
          "REGISTRY_ERROR",
          `registry ${this.registry} redirected more than ${MAX_REDIRECTS} times`,
          res.status,
        );
      }
      const next = new URL(location, current);
      const downgrade = current.protocol === "https:" && next.protocol === "http:";
      const plainAllowed =
        next.protocol === "http:" && this.#allowsPlainHttpTo(next.host) && (!downgrade || this.#insecure);
      if (next.protocol !== "https:" && !plainAllowed) {
        throw this.#error(
          "REGISTRY_ERROR",
          `refusing a redirect from ${current.origin} to ${next.origin}: ${downgrade ? "from HTTPS to plain HTTP" : "plain HTTP to a host not marked insecure"} (mark the registry insecure only if you trust the network)`,
          res.status,
        );
      }
      if (next.origin !== current.origin) {
        const { authorization: _dropped, ...rest } = h;
        h = rest;
      }
      debug("registry %s: %d redirect to %s", this.registry, res.status, next.origin);
      current = next;
    }
  }

  #allowsPlainHttpTo(hostPort: string): boolean {
    if (isLoopbackHost(hostPort)) return true;
    const k = registryKey(hostPort);
    return (this.#options.insecureRegistries ?? []).some(
      (r) => registryKey(r) === k || registryKey(r) === hostOnly(k),
    );
  }

  #error(
    code: "REGISTRY_AUTH" | "REGISTRY_UNREACHABLE" | "REGISTRY_ERROR" | "MANIFEST_UNKNOWN",
    message: string,
    httpStatus?: number,
    cause?: unknown,
  ): RegistryError {
    return new RegistryError(
      code,
      message,
      { registry: this.registry, httpStatus },
      cause === undefined ? undefined : { cause },
    );
  }

  #backoffMs(attempt: number, retryAfter?: string | null): number {
    const base = Math.min(10_000, this.#retryDelayMs * 2 ** attempt);
    let ms = base / 2 + Math.random() * (base / 2);
    const seconds = retryAfter ? Number(retryAfter) : Number.NaN;
    if (Number.isFinite(seconds) && seconds >= 0) ms = Math.max(ms, Math.min(seconds * 1000, 30_000));
    return ms;
  }

  #headers(extra: Record<string, string> = {}): Record<string, string> {
    return { "user-agent": this.#options.userAgent ?? "supermachine", ...extra };
  }

  #getCredentials(): Promise<RegistryCredentials | undefined> {
    this.#credentials ??= (async () => {
      const opt = this.#options.credentials;
      if (typeof opt === "function") {
        const c = await opt(this.registry);
        if (c) return c;
      } else if (opt) return opt;
      if (this.#options.dockerConfigPath === false) return undefined;
      return loadDockerCredentials(this.registry, this.#options.dockerConfigPath);
    })();
    return this.#credentials;
  }

  /** Find the scheme (https, or http where allowed and the server does not speak TLS) and ping `/v2/`. */
  #resolveOrigin(signal: AbortSignal | undefined): Promise<string> {
    this.#origin ??= this.#ping(signal);
    const p = this.#origin;
    // A failed ping (aborted, unreachable) is retried by the next request.
    p.catch(() => {
      if (this.#origin === p) this.#origin = undefined;
    });
    return p;
  }

  async #ping(signal: AbortSignal | undefined): Promise<string> {
    const schemes = this.allowsPlainHttp ? ["https", "http"] : ["https"];
    let lastError: unknown;
    for (let attempt = 0; ; attempt++) {
      for (const scheme of schemes) {
        const origin = `${scheme}://${this.#host}`;
        try {
          const res = await this.#fetch(`${origin}/v2/`, this.#headers(), signal);
          if (res.status === 401) this.#learnChallenge(res.header("www-authenticate"));
          res.discard();
          debug("registry %s: %s /v2/ -> %d", this.registry, origin, res.status);
          if (scheme === "http" && res.status === 400 && CERT_ERRORS.has(errorCode(lastError) ?? "")) {
            // It speaks TLS after all ("client sent an HTTP request to an HTTPS server").
            throw this.#error(
              "REGISTRY_UNREACHABLE",
              `TLS certificate of ${this.#host} is not trusted (${errorCode(lastError)}): add its CA with NODE_EXTRA_CA_CERTS`,
              undefined,
              lastError,
            );
          }
          return origin;
        } catch (err) {
          if (err instanceof RegistryError) throw err;
          if (isAbort(err, signal)) throw abortError(signal, err);
          lastError = err;
          const code = errorCode(err);
          if (scheme === "https" && CERT_ERRORS.has(code ?? "") && !this.#insecure) {
            throw this.#error(
              "REGISTRY_UNREACHABLE",
              `TLS certificate of ${this.#host} is not trusted (${code}): add its CA certificate with NODE_EXTRA_CA_CERTS=/path/ca.pem (read when node starts)`,
              undefined,
              err,
            );
          }
          if (scheme === "https" && schemes.length > 1 && (isNotTls(err) || CERT_ERRORS.has(code ?? "")))
            continue;
          break; // the same failure would hit plain HTTP too: back off and retry
        }
      }
      if (attempt >= this.#retries) break;
      await sleep(this.#backoffMs(attempt), signal);
    }
    throw this.#error(
      "REGISTRY_UNREACHABLE",
      `cannot reach registry ${this.registry} (${this.#host}): ${describe(lastError)}`,
      undefined,
      lastError,
    );
  }

  #learnChallenge(header: string | undefined): AuthChallenge | undefined {
    const challenges = parseWwwAuthenticate(header);
    const chosen =
      challenges.find((c) => c.scheme === "bearer") ?? challenges.find((c) => c.scheme === "basic");
    if (chosen) this.#challenge = chosen;
    return chosen;
  }

  async #authorization(
    scope: string,
    signal: AbortSignal | undefined,
    forceNewToken: boolean,
  ): Promise<string | undefined> {
    const challenge = this.#challenge;
    if (challenge === undefined) return undefined;
    if (challenge.scheme === "basic") {
      const c = await this.#getCredentials();
      return c ? `Basic ${Buffer.from(`${c.username}:${c.password}`).toString("base64")}` : undefined;
    }
    if (challenge.scheme === "bearer") {
      const key = `${challenge.params.realm ?? ""}|${challenge.params.service ?? ""}|${scope}`;
      const cached = this.#tokens.get(key);
      if (cached && !forceNewToken) {
        // Concurrent requests share one token request; an expired or failed one is replaced.
        const token = await cached.catch(() => undefined);
        if (token && token.expiresAt > Date.now()) return `Bearer ${token.token}`;
        if (this.#tokens.get(key) !== cached) return this.#authorization(scope, signal, false);
      }
      const pending = this.#fetchToken(challenge, scope, signal);
      this.#tokens.set(key, pending);
      pending.catch(() => {
        if (this.#tokens.get(key) === pending) this.#tokens.delete(key);
      });
      return `Bearer ${(await pending).token}`;
    }
    return undefined;
  }

  async #fetchToken(
    challenge: AuthChallenge,
    scope: string,
    signal: AbortSignal | undefined,
  ): Promise<CachedToken> {
    const realm = challenge.params.realm;
    if (!realm)
      throw this.#error("REGISTRY_AUTH", `registry ${this.registry} sent a Bearer challenge without a realm`);
    let url: URL;
    try {
      url = new URL(realm);
    } catch {
      throw this.#error(
        "REGISTRY_AUTH",
        `registry ${this.registry} sent an invalid token realm ${JSON.stringify(realm)}`,
      );
    }
    const registryOverHttp = (await this.#resolveOrigin(signal)).startsWith("http:");
    if (
      url.protocol !== "https:" &&
      !(url.protocol === "http:" && registryOverHttp && this.#allowsPlainHttpTo(url.host))
    ) {
      throw this.#error(
        "REGISTRY_AUTH",
        `refusing token realm ${realm}: a token realm may use plain HTTP only when the registry itself does, and only to loopback or an insecure registry`,
      );
    }
    if (challenge.params.service) url.searchParams.set("service", challenge.params.service);
    for (const s of scope.split(" ").filter(Boolean)) url.searchParams.append("scope", s);
    const creds = await this.#getCredentials();
    const headers = this.#headers({ accept: "application/json" });
    if (creds)
      headers.authorization = `Basic ${Buffer.from(`${creds.username}:${creds.password}`).toString("base64")}`;

    let res: HttpResponse | undefined;
    let lastError: unknown;
    for (let attempt = 0; ; attempt++) {
      try {
        res = await this.#fetch(url, headers, signal);
        if ((res.status >= 500 || res.status === 429) && attempt < this.#retries) {
          res.discard();
          await sleep(this.#backoffMs(attempt, res.header("retry-after")), signal);
          continue;
        }
        break;
      } catch (err) {
        if (isAbort(err, signal)) throw abortError(signal, err);
        lastError = err;
        if (attempt >= this.#retries) {
          throw this.#error(
            "REGISTRY_UNREACHABLE",
            `cannot reach the token server ${url.origin} of ${this.registry}: ${describe(err)}`,
            undefined,
            err,
          );
        }
        await sleep(this.#backoffMs(attempt), signal);
      }
    }
    if (res === undefined)
      throw this.#error("REGISTRY_UNREACHABLE", `no answer from ${url.origin}`, undefined, lastError);
    if (res.status === 401 || res.status === 403) {
      const detail = await errorDetail(res);
      throw this.#error(
        "REGISTRY_AUTH",
        `token server ${url.origin} refused ${creds ? `the credentials of user ${JSON.stringify(creds.username)}` : "anonymous access"} for ${this.registry} (HTTP ${res.status}${detail.message ? `: ${detail.message}` : ""})`,
        res.status,
      );
    }
    if (!res.ok) {
      res.discard();
      throw this.#error(
        "REGISTRY_ERROR",
        `token server ${url.origin} answered HTTP ${res.status}`,
        res.status,
      );
    }
    let body: Buffer;
    try {
      body = await readBounded(res, 1024 * 1024, () =>
        this.#error("REGISTRY_ERROR", `token from ${url.origin} is larger than 1 MiB`, res.status),
      );
    } catch (err) {
      if (err instanceof RegistryError) throw err;
      if (isAbort(err, signal)) throw abortError(signal, err);
      throw this.#error(
        "REGISTRY_UNREACHABLE",
        `reading the token from ${url.origin} failed: ${describe(err)}`,
        res.status,
        err,
      );
    }
    let parsed: { token?: unknown; access_token?: unknown; expires_in?: unknown };
    try {
      parsed = JSON.parse(body.toString("utf8"));
    } catch {
      throw this.#error(
        "REGISTRY_ERROR",
        `token server ${url.origin} answered with invalid JSON`,
        res.status,
      );
    }
    const token =
      typeof parsed.token === "string" && parsed.token !== ""
        ? parsed.token
        : typeof parsed.access_token === "string" && parsed.access_token !== ""
          ? parsed.access_token
          : undefined;
    if (token === undefined)
      throw this.#error("REGISTRY_ERROR", `token server ${url.origin} returned no token`, res.status);
    const expiresIn = typeof parsed.expires_in === "number" && parsed.expires_in > 0 ? parsed.expires_in : 60;
    debug("registry %s: token for %s (expires in %d s)", this.registry, scope, expiresIn);
    return { token, expiresAt: Date.now() + Math.max(1, expiresIn - 10) * 1000 };
  }

  /**
   * GET `path` with auth, following redirects. Retries connection errors and 5xx/429 with
   * exponential backoff; answers one 401 by (re)authenticating. Other statuses are returned.
   */
  async #get(
    path: string,
    repository: string,
    headers: Record<string, string>,
    signal: AbortSignal | undefined,
    options: { bulk?: boolean } = {},
  ): Promise<HttpResponse> {
    const origin = await this.#resolveOrigin(signal);
    let scope = `repository:${repository}:pull`;
    let authRetried = false;
    let forceNewToken = false;
    for (let attempt = 0; ; ) {
      const h = this.#headers(headers);
      const auth = await this.#authorization(scope, signal, forceNewToken);
      if (auth) h.authorization = auth;
      let res: HttpResponse;
      try {
        res = await this.#fetch(`${origin}${path}`, h, signal, options);
      } catch (err) {
        if (isAbort(err, signal)) throw abortError(signal, err);
        if (attempt >= this.#retries) {
          throw this.#error(
            "REGISTRY_UNREACHABLE",
            `cannot reach registry ${this.registry}: ${describe(err)}`,
            undefined,
            err,
          );
        }
        debug("registry %s: GET %s failed (%s), retrying", this.registry, path, describe(err));
        await sleep(this.#backoffMs(attempt++), signal);
        continue;
      }
      if (res.status === 401) {
        const header = res.header("www-authenticate");
        const before = this.#challenge;
        const challenge = this.#learnChallenge(header);
        const basicRejected = challenge?.scheme === "basic" && auth !== undefined;
        if (!authRetried && challenge !== undefined && !basicRejected) {
          res.discard();
          authRetried = true;
          if (challenge.scheme === "bearer" && challenge.params.scope) scope = challenge.params.scope;
          forceNewToken = auth !== undefined || before !== challenge;
          if (challenge.scheme === "basic" && !(await this.#getCredentials())) {
            throw this.#error(
              "REGISTRY_AUTH",
              `registry ${this.registry} requires a user name and password (HTTP 401): pass credentials or add them to ${this.#options.dockerConfigPath || "~/.docker/config.json"}`,
              401,
            );
          }
          continue;
        }
        const detail = await errorDetail(res);
        const why = challenge?.params.error ? ` (${challenge.params.error})` : "";
        const creds = await this.#getCredentials();
        throw this.#error(
          "REGISTRY_AUTH",
          `registry ${this.registry} denied access to ${repository}${why}: ${
            creds
              ? `check the password of user ${JSON.stringify(creds.username)} and that it may pull ${repository}`
              : "the repository does not exist or needs credentials"
          }${detail.message ? ` (${detail.message})` : ""}`,
          401,
        );
      }
      if (res.status === 403) {
        const detail = await errorDetail(res);
        throw this.#error(
          "REGISTRY_AUTH",
          `registry ${this.registry} forbids pulling ${repository} (HTTP 403${detail.message ? `: ${detail.message}` : ""})`,
          403,
        );
      }
      if ((res.status >= 500 || res.status === 429) && attempt < this.#retries) {
        debug("registry %s: GET %s -> %d, retrying", this.registry, path, res.status);
        res.discard();
        await sleep(this.#backoffMs(attempt++, res.header("retry-after")), signal);
        continue;
      }
      return res;
    }
  }

  /** Fetch a manifest or index by tag or digest, verifying its digest. */
  async getManifest(repository: string, reference: string, signal?: AbortSignal): Promise<FetchedManifest> {
    const path = `/v2/${repository}/manifests/${reference}`;
    const res = await this.#get(path, repository, { accept: MANIFEST_ACCEPT }, signal);
    if (res.status === 404) {
      const detail = await errorDetail(res);
      throw this.#error(
        "MANIFEST_UNKNOWN",
        `${this.registry}/${repository}:${reference} not found (${detail.code ?? "HTTP 404"}${detail.message ? `: ${detail.message}` : ""})`,
        404,
      );
    }
    if (res.status !== 200) {
      const detail = await errorDetail(res);
      throw this.#error(
        "REGISTRY_ERROR",
        `registry ${this.registry} answered HTTP ${res.status} for manifest ${repository}:${reference}${detail.message ? `: ${detail.message}` : ""}`,
        res.status,
      );
    }
    let bytes: Buffer;
    try {
      bytes = await readBounded(res, MANIFEST_MAX_BYTES, () =>
        this.#error(
          "REGISTRY_ERROR",
          `manifest ${repository}:${reference} is larger than ${MANIFEST_MAX_BYTES} bytes`,
          200,
        ),
      );
    } catch (err) {
      if (err instanceof RegistryError) throw err;
      if (isAbort(err, signal)) throw abortError(signal, err);
      throw this.#error(
        "REGISTRY_UNREACHABLE",
        `reading manifest ${repository}:${reference} failed: ${describe(err)}`,
        200,
        err,
      );
    }
    const requested = parseDigest(reference);
    const digest = digestOf(bytes, requested?.algorithm ?? "sha256");
    if (requested !== undefined && digest !== reference) {
      throw new DigestMismatchError(
        `manifest ${repository}@${reference} from ${this.registry} hashes to ${digest}`,
        {
          digest: reference,
          actualDigest: digest,
        },
      );
    }
    const header = res.header("docker-content-digest");
    if (
      requested === undefined &&
      header &&
      parseDigest(header)?.algorithm === "sha256" &&
      header !== digest
    ) {
      throw new DigestMismatchError(
        `manifest ${repository}:${reference} from ${this.registry} hashes to ${digest}, but the registry says ${header}`,
        { digest: header, actualDigest: digest },
      );
    }
    return { bytes, digest, contentType: bareMediaType(res.header("content-type")) };
  }

  /**
   * Stream a blob into `writer`, resuming with an HTTP Range request after a broken connection
   * (from the bytes already written), enforcing the descriptor's size. The digest is checked by
   * the store when the writer is committed. `onBytes` gets the running byte count.
   */
  async fetchBlob(
    repository: string,
    descriptor: BlobDescriptor,
    writer: BlobWriter,
    options: { signal?: AbortSignal | undefined; onBytes?: ((bytesDone: number) => void) | undefined } = {},
  ): Promise<void> {
    const { signal, onBytes } = options;
    const path = `/v2/${repository}/blobs/${descriptor.digest}`;
    const maxAttempts = this.#retries * 4 + 1;
    let failures = 0;
    for (let attempt = 0; ; attempt++) {
      const start = writer.bytesWritten;
      if (start === descriptor.size && descriptor.size > 0) return;
      const headers: Record<string, string> = { "accept-encoding": "identity" };
      if (start > 0) headers.range = `bytes=${start}-`;
      const res = await this.#get(path, repository, headers, signal, { bulk: true });
      if (res.status === 206 && start > 0) {
        const range = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(res.header("content-range") ?? "");
        if (range === null || Number(range[1]) !== start) {
          debug(
            "registry %s: unusable Content-Range %s, restarting %s",
            this.registry,
            res.header("content-range"),
            descriptor.digest,
          );
          res.discard();
          await writer.reset();
          continue;
        }
      } else if (res.status === 200) {
        if (start > 0) {
          debug("registry %s: Range ignored, restarting %s from 0", this.registry, descriptor.digest);
          try {
            await writer.reset();
          } catch (error) {
            res.discard();
            throw error;
          }
        }
      } else if (res.status === 416 && start > 0) {
        res.discard();
        await writer.reset();
        continue;
      } else {
        const detail = await errorDetail(res);
        throw this.#error(
          "REGISTRY_ERROR",
          `registry ${this.registry} answered HTTP ${res.status} for blob ${descriptor.digest} of ${repository}${
            detail.code ? ` (${detail.code})` : ""
          }`,
          res.status,
        );
      }
      const declared = Number(res.header("content-length") ?? Number.NaN);
      if (Number.isFinite(declared) && writer.bytesWritten + declared > descriptor.size) {
        res.discard();
        throw this.#error(
          "REGISTRY_ERROR",
          `registry ${this.registry} sends ${writer.bytesWritten + declared} bytes for blob ${descriptor.digest}, whose descriptor says ${descriptor.size}`,
          res.status,
        );
      }
      const before = writer.bytesWritten;
      let broken: unknown;
      try {
        broken = await receiveBody(res.body, writer, signal, onBytes);
      } catch (err) {
        if (err instanceof BlobSizeError) {
          throw this.#error(
            "REGISTRY_ERROR",
            `registry ${this.registry} sent more than the ${descriptor.size} bytes the descriptor of blob ${descriptor.digest} declares`,
            res.status,
            err,
          );
        }
        throw err;
      }
      if (broken === undefined && writer.bytesWritten === descriptor.size) return;
      // The connection broke or the body ended early: resume from what we have.
      if (writer.bytesWritten > before) failures = 0;
      else failures++;
      const why =
        broken === undefined
          ? `body ended after ${writer.bytesWritten} of ${descriptor.size} bytes`
          : describe(broken);
      if (failures > this.#retries || attempt + 1 >= maxAttempts) {
        throw this.#error(
          "REGISTRY_UNREACHABLE",
          `download of blob ${descriptor.digest} from ${this.registry} failed: ${why}`,
          res.status,
          broken,
        );
      }
      debug(
        "registry %s: blob %s interrupted at %d bytes (%s), resuming",
        this.registry,
        descriptor.digest,
        writer.bytesWritten,
        why,
      );
      await sleep(this.#backoffMs(failures), signal);
    }
  }
}
