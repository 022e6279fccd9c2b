/**
 * A real container registry on loopback for tests: Debian's `docker-registry` (distribution 2.8),
 * one private instance per call, with its own temp storage, config, credentials and port.
 *
 * ```ts
 * import { startRegistry } from "../helpers/registry.ts";
 * import { fixtureImages } from "../helpers/fixtures.ts";
 *
 * const images = await fixtureImages();
 * await using registry = await startRegistry({ auth: "bearer" });    // "none" | "basic" | "bearer"
 * const { digest } = await registry.push(images.busybox, "library/busybox:1");
 * await registry.push(images.multiarch, "multi:latest", { all: true });          // OCI index
 * await registry.push(images.multiarch, "multi:v2s2", { all: true, format: "v2s2" }); // manifest list
 * // pull `${registry.host}/library/busybox:1` with `registry.username` / `registry.password`
 * ```
 *
 * `startRegistry(options)`:
 * - `auth: "none"` (default): open registry.
 * - `auth: "basic"`: htpasswd (bcrypt) auth; a request without or with wrong credentials gets
 *   401 + `WWW-Authenticate: Basic realm="…"`.
 * - `auth: "bearer"`: token auth against `test/helpers/token-server.ts` (started for you, RS256,
 *   `x5c`); 401 + `WWW-Authenticate: Bearer realm="…",service="…",scope="repository:NAME:pull"`.
 *   The right Basic credentials at the realm give a token with the requested actions; anonymous gives
 *   a token with no access (`insufficient_scope`) unless `anonymousPull: true`.
 *   `registry.token` exposes `realm`, `service`, `issuer`, the recorded `requests` and `signToken`.
 * - `tls: true`: HTTPS with a per-run self-signed certificate for IP 127.0.0.1; `caCertPath` /
 *   `caCertPem` are what a client must trust.
 *
 * The handle:
 * - `host` (`127.0.0.1:PORT`, for image references), `url` (`http[s]://127.0.0.1:PORT`),
 *   `username`, `password` (random per run; the same values work for basic and bearer; they are set
 *   even for `auth: "none"`, where nothing checks them).
 * - `push(source, "name:tag", { all?, format? })` copies an image in with `skopeo copy` and resolves
 *   to `{ reference, digest }` (the digest of the manifest or index as stored). `source` is an OCI
 *   layout directory (its only image), a `*.tar` file (docker-archive), or any skopeo source such as
 *   `oci:DIR:REF`. An OCI layout is pushed byte for byte (`--preserve-digests`: same manifest
 *   digest, layers stay zstd or uncompressed, and skopeo's blob-info cache cannot swap in a gzip
 *   blob it pushed earlier). `format: "v2s2"` converts to Docker schema 2 (gzip layers only).
 * - `storageDir`, `blobPath(digest)`, `corruptBlob(digest)` (flips one byte of a stored blob in
 *   place, same length, so a client must detect it by digest), `deleteBlob(digest)`.
 * - `logs()`: the registry's output so far (print it when a test fails).
 * - `stop()` (idempotent), `kill()`, `[Symbol.asyncDispose]`. The registry is also killed when
 *   the test process exits, and (through `setpriv --pdeathsig`) if the test process dies.
 *
 * Requires `docker-registry`, `skopeo`, `htpasswd` (apache2-utils) and `openssl` on PATH.
 */
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, rmSync } from "node:fs";
import { mkdtemp, open, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { generateTokenCertificate, startTokenServer, type TokenServer } from "./token-server.ts";

const execFileAsync = promisify(execFile);

export type RegistryAuth = "none" | "basic" | "bearer";

export interface StartRegistryOptions {
  /** Default "none". */
  auth?: RegistryAuth;
  /** Serve HTTPS with a self-signed certificate for 127.0.0.1. Default false. */
  tls?: boolean;
  /** Bearer mode only: anonymous token requests get `pull`. Default false. */
  anonymousPull?: boolean;
  /** Default "supermachine". */
  username?: string;
  /** Default: random. */
  password?: string;
  /** How long to wait for the registry's "listening on" line. Default 20 s. */
  startTimeoutMs?: number;
}

export interface PushOptions {
  /** Copy every image of an index / manifest list (`skopeo copy --all`). */
  all?: boolean;
  /** Convert the manifest (`skopeo copy --format`). */
  format?: "oci" | "v2s2";
  /**
   * Push the exact manifest and blob bytes (`--preserve-digests`: no recompression, no conversion,
   * no substitution of blobs skopeo pushed before in another compression). Default: true for OCI
   * layout sources without `format`, false otherwise (a docker-archive has no stored manifest).
   */
  preserveDigests?: boolean;
  signal?: AbortSignal;
}

export interface PushResult {
  /** `127.0.0.1:PORT/name:tag` */
  reference: string;
  /** `sha256:…` of the manifest or index the registry now serves for the tag. */
  digest: string;
}

export interface TestRegistry extends AsyncDisposable {
  readonly auth: RegistryAuth;
  /** `127.0.0.1:PORT` */
  readonly host: string;
  /** `http://127.0.0.1:PORT` or `https://…` */
  readonly url: string;
  readonly username: string;
  readonly password: string;
  /** The registry's filesystem storage root. */
  readonly storageDir: string;
  readonly caCertPath: string | undefined;
  readonly caCertPem: string | undefined;
  /** Bearer mode only. */
  readonly token: TokenServer | undefined;
  push(source: string, nameAndTag: string, options?: PushOptions): Promise<PushResult>;
  /** Path of a blob's data file in the storage dir (it may not exist). */
  blobPath(digest: string): string;
  /** Flips one byte in the middle of a stored blob (same length). Returns the data file path. */
  corruptBlob(digest: string): Promise<string>;
  /** Removes a stored blob's data file; the registry then answers 404 for it. */
  deleteBlob(digest: string): Promise<void>;
  logs(): string;
  stop(): Promise<void>;
  kill(): void;
}

const live = new Set<ChildProcess>();
const tempDirs = new Set<string>();
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.once("exit", () => {
    for (const child of live) child.kill("SIGKILL");
    for (const dir of tempDirs) rmSync(dir, { recursive: true, force: true });
  });
}

const setprivPath = ["/usr/bin/setpriv", "/bin/setpriv"].find((p) => existsSync(p));

/** Spawns `command` so that it gets SIGKILL when this process dies, where setpriv allows it. */
function spawnTied(command: string, args: string[], env: NodeJS.ProcessEnv): ChildProcess {
  const [cmd, argv] = setprivPath
    ? [setprivPath, ["--pdeathsig", "KILL", "--", command, ...args]]
    : [command, args];
  const child = spawn(cmd, argv, { env, stdio: ["ignore", "pipe", "pipe"] });
  live.add(child);
  child.once("exit", () => live.delete(child));
  return child;
}

function registryEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [key, value] of Object.entries(process.env)) {
    if (!key.startsWith("REGISTRY_") && !key.startsWith("OTEL_")) env[key] = value;
  }
  return env;
}

function hexOf(digest: string): string {
  const match = /^sha256:([0-9a-f]{64})$/.exec(digest);
  if (!match) throw new Error(`not a sha256 digest: ${digest}`);
  return match[1]!;
}

/** A self-signed certificate for 127.0.0.1 (openssl), valid two days. */
export async function makeTlsCertificate(dir: string): Promise<{ certPath: string; keyPath: string }> {
  const certPath = join(dir, "registry.crt");
  const keyPath = join(dir, "registry.key");
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
    "/CN=127.0.0.1",
    "-addext",
    "subjectAltName=IP:127.0.0.1",
    "-keyout",
    keyPath,
    "-out",
    certPath,
  ]);
  return { certPath, keyPath };
}

function yamlString(value: string): string {
  return JSON.stringify(value); // a JSON string is a valid YAML double-quoted scalar
}

export async function startRegistry(options: StartRegistryOptions = {}): Promise<TestRegistry> {
  const auth = options.auth ?? "none";
  const username = options.username ?? "supermachine";
  const password = options.password ?? randomBytes(12).toString("hex");
  installExitHook();
  const dir = await mkdtemp(join(tmpdir(), "supermachine-registry-"));
  tempDirs.add(dir);
  const storageDir = join(dir, "storage");
  let token: TokenServer | undefined;
  let child: ChildProcess | undefined;
  try {
    const config: string[] = [
      "version: 0.1",
      "log:",
      "  level: info",
      "  formatter: text",
      "  accesslog:",
      "    disabled: true",
      "storage:",
      "  filesystem:",
      `    rootdirectory: ${yamlString(storageDir)}`,
      "  delete:",
      "    enabled: true",
      "  maintenance:",
      "    uploadpurging:",
      "      enabled: false",
      "http:",
      "  addr: 127.0.0.1:0",
      `  secret: ${randomBytes(16).toString("hex")}`,
    ];
    let caCertPath: string | undefined;
    let caCertPem: string | undefined;
    if (options.tls) {
      const cert = await makeTlsCertificate(dir);
      caCertPath = cert.certPath;
      caCertPem = await readFile(cert.certPath, "utf8");
      config.push(
        "  tls:",
        `    certificate: ${yamlString(cert.certPath)}`,
        `    key: ${yamlString(cert.keyPath)}`,
      );
    }
    if (auth === "basic") {
      const htpasswdPath = join(dir, "htpasswd");
      const { stdout } = await execFileAsync("htpasswd", ["-Bbn", username, password]);
      await writeFile(htpasswdPath, stdout);
      config.push(
        "auth:",
        "  htpasswd:",
        "    realm: supermachine-test-registry",
        `    path: ${yamlString(htpasswdPath)}`,
      );
    } else if (auth === "bearer") {
      const certificate = await generateTokenCertificate(dir);
      token = await startTokenServer({
        issuer: "supermachine-test-token-issuer",
        service: "supermachine-test-registry",
        username,
        password,
        certificate,
        anonymousPull: options.anonymousPull ?? false,
      });
      config.push(
        "auth:",
        "  token:",
        `    realm: ${yamlString(token.realm)}`,
        `    service: ${yamlString(token.service)}`,
        `    issuer: ${yamlString(token.issuer)}`,
        `    rootcertbundle: ${yamlString(certificate.certPath)}`,
      );
    }
    const configPath = join(dir, "config.yml");
    await writeFile(configPath, `${config.join("\n")}\n`);

    const started = spawnTied("docker-registry", ["serve", configPath], registryEnv());
    child = started;
    // A registry a test forgot to stop must not keep the test process alive; the exit hook kills it.
    started.unref();
    for (const stream of [started.stdout, started.stderr])
      (stream as { unref?: () => void } | null)?.unref?.();
    let log = "";
    const port = await new Promise<number>((resolve, reject) => {
      const timeoutMs = options.startTimeoutMs ?? 20_000;
      const timer = setTimeout(() => {
        cleanup();
        reject(new Error(`docker-registry did not report its port within ${timeoutMs} ms:\n${log}`));
      }, timeoutMs);
      const onData = (chunk: Buffer): void => {
        log += chunk.toString("utf8");
        const match = /listening on 127\.0\.0\.1:(\d+)/.exec(log);
        if (match) {
          cleanup();
          resolve(Number(match[1]));
        }
      };
      const onExit = (code: number | null, signal: string | null): void => {
        cleanup();
        reject(new Error(`docker-registry exited (${signal ?? code}) before listening:\n${log}`));
      };
      const onError = (err: Error): void => {
        cleanup();
        reject(
          new Error(`cannot start docker-registry (apt-get install docker-registry): ${err.message}`, {
            cause: err,
          }),
        );
      };
      const cleanup = (): void => {
        clearTimeout(timer);
        started.stderr?.off("data", onData);
        started.stdout?.off("data", onData);
        started.off("exit", onExit);
        started.off("error", onError);
      };
      started.stderr?.on("data", onData);
      started.stdout?.on("data", onData);
      started.once("exit", onExit);
      started.once("error", onError);
    });
    // Keep collecting output for logs(); the pipes must be drained anyway.
    const collect = (chunk: Buffer): void => {
      log += chunk.toString("utf8");
      if (log.length > 1_000_000) log = log.slice(-500_000);
    };
    started.stderr?.on("data", collect);
    started.stdout?.on("data", collect);
    const exited = new Promise<void>((resolve) => {
      if (started.exitCode !== null || started.signalCode !== null) resolve();
      else started.once("exit", () => resolve());
    });

    const host = `127.0.0.1:${port}`;
    const url = `${options.tls ? "https" : "http"}://${host}`;

    let stopping: Promise<void> | undefined;
    const stop = (): Promise<void> => {
      stopping ??= (async () => {
        // Waiting for the exit must keep the event loop alive (the child is unref'd above).
        started.ref();
        if (started.exitCode === null && started.signalCode === null) started.kill("SIGTERM");
        await exited;
        await token?.stop();
        await rm(dir, { recursive: true, force: true });
        tempDirs.delete(dir);
      })();
      return stopping;
    };
    const kill = (): void => {
      started.kill("SIGKILL");
    };

    const blobPath = (digest: string): string => {
      const hex = hexOf(digest);
      return join(storageDir, "docker/registry/v2/blobs/sha256", hex.slice(0, 2), hex, "data");
    };

    const push = async (source: string, nameAndTag: string, pushOptions: PushOptions = {}) => {
      let src: string;
      if (/^[a-z-]+:/.test(source) && !source.startsWith("/")) src = source;
      else if (source.endsWith(".tar")) src = `docker-archive:${source}`;
      else src = `oci:${source}`;
      const reference = `${host}/${nameAndTag}`;
      const work = await mkdtemp(join(dir, "push-"));
      const digestFile = join(work, "digest");
      const args = ["--insecure-policy", "--tmpdir", work, "copy", "--quiet", "--dest-tls-verify=false"];
      args.push("--digestfile", digestFile);
      if (pushOptions.all) args.push("--all");
      if (pushOptions.format) args.push("--format", pushOptions.format);
      if (pushOptions.preserveDigests ?? (!pushOptions.format && src.startsWith("oci:"))) {
        args.push("--preserve-digests");
      }
      if (auth === "none") args.push("--dest-no-creds");
      else args.push("--dest-creds", `${username}:${password}`);
      args.push(src, `docker://${reference}`);
      try {
        await runSkopeo(args, work, pushOptions.signal);
        const digest = (await readFile(digestFile, "utf8")).trim();
        return { reference, digest };
      } finally {
        await rm(work, { recursive: true, force: true });
      }
    };

    const corruptBlob = async (digest: string): Promise<string> => {
      const path = blobPath(digest);
      const { size } = await stat(path);
      if (size === 0) throw new Error(`blob ${digest} is empty; nothing to corrupt`);
      const handle = await open(path, "r+");
      try {
        const offset = Math.floor(size / 2);
        const byte = Buffer.alloc(1);
        await handle.read(byte, 0, 1, offset);
        byte[0] = byte[0]! ^ 0xff;
        await handle.write(byte, 0, 1, offset);
      } finally {
        await handle.close();
      }
      return path;
    };

    return {
      auth,
      host,
      url,
      username,
      password,
      storageDir,
      caCertPath,
      caCertPem,
      token,
      push,
      blobPath,
      corruptBlob,
      deleteBlob: async (digest: string) => {
        await rm(blobPath(digest));
      },
      logs: () => log,
      stop,
      kill,
      [Symbol.asyncDispose]: stop,
    };
  } catch (err) {
    child?.kill("SIGKILL");
    await token?.stop();
    await rm(dir, { recursive: true, force: true });
    tempDirs.delete(dir);
    throw err;
  }
}

/**
 * skopeo's blob-info cache (root: /var/lib/containers/cache) remembers compressed variants of
 * layers it has seen; `--preserve-digests` forbids substituting them. HOME/XDG_DATA_HOME point
 * into the push's temp dir so a non-root skopeo keeps its cache there too.
 */
async function runSkopeo(args: string[], work: string, signal: AbortSignal | undefined): Promise<void> {
  const env: NodeJS.ProcessEnv = { ...process.env, XDG_DATA_HOME: join(work, "data") };
  if (process.getuid?.() !== 0) env.HOME = work;
  const child = spawnTied("skopeo", args, env);
  let output = "";
  child.stdout?.on("data", (c: Buffer) => {
    output += c.toString("utf8");
  });
  child.stderr?.on("data", (c: Buffer) => {
    output += c.toString("utf8");
  });
  const onAbort = (): void => {
    child.kill("SIGKILL");
  };
  signal?.addEventListener("abort", onAbort, { once: true });
  try {
    const code = await new Promise<number | string>((resolve, reject) => {
      child.once("error", (err) =>
        reject(new Error(`cannot run skopeo (apt-get install skopeo): ${err.message}`, { cause: err })),
      );
      child.once("exit", (c, s) => resolve(c ?? s ?? "unknown"));
    });
    signal?.throwIfAborted();
    if (code !== 0) throw new Error(`skopeo ${args.join(" ")} failed (${code}):\n${output}`);
  } finally {
    signal?.removeEventListener("abort", onAbort);
  }
}
