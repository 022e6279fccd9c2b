/**
 * A small Docker-style token server (the "realm" of `WWW-Authenticate: Bearer …`) for tests.
 *
 * `startTokenServer()` listens on `127.0.0.1:0` (node:http) and answers
 *
 *   GET  /token?service=S&scope=repository:NAME:pull,push[&scope=…][&account=…]
 *        Authorization: Basic … (optional)
 *   POST /token  (OAuth2 form: grant_type=password&username=…&password=…&service=…&scope=…)
 *
 * with `{ token, access_token, expires_in, issued_at }`. Tokens are RS256 JWTs signed with a key
 * whose self-signed certificate (made per run with the openssl CLI by `generateTokenCertificate`) is
 * in the JWT `x5c` header; the registry gets that certificate as `rootcertbundle`. Claims: `iss`,
 * `sub`, `aud`, `exp`, `nbf`, `iat`, `jti`, `access: [{ type, name, actions }]`.
 *
 * - Right Basic credentials: every requested action is granted.
 * - No credentials: a token with `access: []` (or pull-only if `anonymousPull`), so the registry
 *   answers `insufficient_scope`.
 * - Wrong credentials: 401 with `WWW-Authenticate: Basic` and a JSON error, no token.
 *
 * Every request is recorded in `requests` so tests can assert what a client asked for.
 */
import { execFile } from "node:child_process";
import { randomBytes, sign } from "node:crypto";
import { readFile } from "node:fs/promises";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { promisify } from "node:util";

const execFileAsync = promisify(execFile);

export interface TokenAccess {
  type: string;
  name: string;
  actions: string[];
}

export interface TokenRequestRecord {
  method: string;
  /** The Basic-auth (or OAuth2 form) user name, or null when the request was anonymous. */
  account: string | null;
  /** Whether credentials were given and correct. */
  authenticated: boolean;
  /** HTTP status the token server answered with. */
  status: number;
  service: string | null;
  /** Raw scope strings as requested (space-separated scopes are split). */
  scopes: string[];
  /** What the issued token grants (empty when no token was issued). */
  granted: TokenAccess[];
}

export interface TokenCertificate {
  keyPath: string;
  certPath: string;
  keyPem: string;
  certPem: string;
}

export interface TokenServerOptions {
  issuer: string;
  service: string;
  username: string;
  password: string;
  certificate: TokenCertificate;
  /** Grant `pull` on any repository to anonymous requests (a public registry). Default false. */
  anonymousPull?: boolean;
  /** Token lifetime. Default 300 s. */
  expiresInSeconds?: number;
}

export interface TokenServer extends AsyncDisposable {
  /** `http://127.0.0.1:PORT/token`: the registry's `auth.token.realm`. */
  readonly realm: string;
  readonly issuer: string;
  readonly service: string;
  readonly requests: TokenRequestRecord[];
  /** Signs a token with arbitrary claims (for tests of expired or foreign tokens). */
  signToken(claims: Record<string, unknown>): string;
  stop(): Promise<void>;
}

/** Makes an RSA key and a self-signed certificate for signing tokens, with the openssl CLI. */
export async function generateTokenCertificate(dir: string): Promise<TokenCertificate> {
  const keyPath = join(dir, "token-signing.key");
  const certPath = join(dir, "token-signing.crt");
  await execFileAsync("openssl", [
    "req",
    "-x509",
    "-newkey",
    "rsa:2048",
    "-nodes",
    "-sha256",
    "-days",
    "2",
    "-subj",
    "/CN=supermachine test token issuer",
    "-keyout",
    keyPath,
    "-out",
    certPath,
  ]);
  const [keyPem, certPem] = await Promise.all([readFile(keyPath, "utf8"), readFile(certPath, "utf8")]);
  return { keyPath, certPath, keyPem, certPem };
}

function base64url(data: Buffer | string): string {
  return Buffer.from(data).toString("base64url");
}

function certificateDerBase64(pem: string): string {
  const match = /-----BEGIN CERTIFICATE-----([\s\S]+?)-----END CERTIFICATE-----/.exec(pem);
  if (!match) throw new Error("token certificate: no PEM certificate block");
  return match[1]!.replace(/\s+/g, "");
}

function parseScope(scope: string): TokenAccess | null {
  const first = scope.indexOf(":");
  const last = scope.lastIndexOf(":");
  if (first <= 0 || last === first) return null;
  const actions = scope
    .slice(last + 1)
    .split(",")
    .filter((a) => a !== "");
  return { type: scope.slice(0, first), name: scope.slice(first + 1, last), actions };
}

function parseBasic(header: string | undefined): { user: string; pass: string } | null {
  if (!header) return null;
  const match = /^Basic\s+(\S+)$/i.exec(header.trim());
  if (!match) return null;
  const decoded = Buffer.from(match[1]!, "base64").toString("utf8");
  const colon = decoded.indexOf(":");
  if (colon < 0) return null;
  return { user: decoded.slice(0, colon), pass: decoded.slice(colon + 1) };
}

async function readBody(req: IncomingMessage): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of req) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString("utf8");
}

export async function startTokenServer(options: TokenServerOptions): Promise<TokenServer> {
  const expiresIn = options.expiresInSeconds ?? 300;
  const x5c = [certificateDerBase64(options.certificate.certPem)];
  const requests: TokenRequestRecord[] = [];

  const signToken = (claims: Record<string, unknown>): string => {
    const header = { typ: "JWT", alg: "RS256", x5c };
    const input = `${base64url(JSON.stringify(header))}.${base64url(JSON.stringify(claims))}`;
    const signature = sign("sha256", Buffer.from(input), options.certificate.keyPem);
    return `${input}.${base64url(signature)}`;
  };

  const handle = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const url = new URL(req.url ?? "/", "http://127.0.0.1");
    const send = (status: number, body: unknown, headers: Record<string, string> = {}): void => {
      res.writeHead(status, { "content-type": "application/json", ...headers });
      res.end(JSON.stringify(body));
    };
    if (url.pathname !== "/token") {
      send(404, { errors: [{ code: "NOT_FOUND", message: "unknown path" }] });
      return;
    }
    let credentials = parseBasic(req.headers.authorization);
    let service = url.searchParams.get("service");
    let rawScopes = url.searchParams.getAll("scope");
    if (req.method === "POST") {
      const form = new URLSearchParams(await readBody(req));
      if (form.get("grant_type") === "password") {
        credentials = { user: form.get("username") ?? "", pass: form.get("password") ?? "" };
      } else if (form.get("grant_type") !== null) {
        send(400, { error: "unsupported_grant_type" });
        return;
      }
      service = form.get("service") ?? service;
      rawScopes = [...rawScopes, ...form.getAll("scope")];
    } else if (req.method !== "GET") {
      send(405, { errors: [{ code: "UNSUPPORTED", message: "GET or POST" }] }, { allow: "GET, POST" });
      return;
    }
    const scopes = rawScopes.flatMap((s) => s.split(" ")).filter((s) => s !== "");
    const record: TokenRequestRecord = {
      method: req.method,
      account: credentials?.user ?? null,
      authenticated: false,
      status: 200,
      service,
      scopes,
      granted: [],
    };
    requests.push(record);
    if (credentials && (credentials.user !== options.username || credentials.pass !== options.password)) {
      record.status = 401;
      send(
        401,
        { errors: [{ code: "UNAUTHORIZED", message: "invalid username or password" }] },
        { "www-authenticate": 'Basic realm="supermachine test token server"' },
      );
      return;
    }
    record.authenticated = credentials !== null;
    const access: TokenAccess[] = [];
    for (const scope of scopes) {
      const parsed = parseScope(scope);
      if (!parsed) continue;
      if (record.authenticated) access.push(parsed);
      else if (options.anonymousPull && parsed.type === "repository" && parsed.actions.includes("pull")) {
        access.push({ ...parsed, actions: ["pull"] });
      }
    }
    record.granted = access;
    const now = Math.floor(Date.now() / 1000);
    const token = signToken({
      iss: options.issuer,
      sub: record.authenticated ? options.username : "",
      aud: service ?? options.service,
      exp: now + expiresIn,
      nbf: now - 10,
      iat: now,
      jti: randomBytes(16).toString("hex"),
      access,
    });
    send(200, {
      token,
      access_token: token,
      expires_in: expiresIn,
      issued_at: new Date(now * 1000).toISOString(),
    });
  };

  const server = createServer((req, res) => {
    handle(req, res).catch((err: unknown) => {
      if (!res.headersSent) res.writeHead(500, { "content-type": "text/plain" });
      res.end(String(err));
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      server.off("error", reject);
      resolve();
    });
  });
  server.unref();
  const { port } = server.address() as AddressInfo;

  let stopped: Promise<void> | undefined;
  const stop = (): Promise<void> => {
    stopped ??= new Promise<void>((resolve) => {
      server.close(() => resolve());
      server.closeAllConnections();
    });
    return stopped;
  };

  return {
    realm: `http://127.0.0.1:${port}/token`,
    issuer: options.issuer,
    service: options.service,
    requests,
    signToken,
    stop,
    [Symbol.asyncDispose]: stop,
  };
}
