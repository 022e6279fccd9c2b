/**
 * `supermachine serve`: a host's images, pools and VMs over HTTP/1.1 and WebSocket
 * (docs/server.md). Built only on the public API (src/index.ts).
 *
 * Every request is bounded — body sizes, stream counts, header and request timeouts — and
 * authenticated with a bearer token compared in constant time (except the probes and
 * `/metrics`); every error is a JSON body with the library's error `code`. {@link
 * SupermachineServer.drain} is the SIGTERM path: stop accepting, let in-flight work finish
 * within a grace period, cancel what is left, stop every VM.
 */

import { randomBytes } from "node:crypto";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { hostname } from "node:os";
import type { Duplex } from "node:stream";
import { type WebSocket, WebSocketServer } from "ws";
import { type HostReport, hostReport, type PoolOptions, RemoteError, SupermachineError } from "../index.ts";
import { errorToWire, type WireLimits } from "../wire/index.ts";
import { TokenCheck } from "./auth.ts";
import { Holdings } from "./holdings.ts";
import { errorResponse, sendError } from "./http.ts";
import type { LogFn } from "./log.ts";
import { ServerMetrics } from "./metrics.ts";
import { checkParams, matchRoute, type RequestContext } from "./router.ts";
import { ROUTES } from "./routes.ts";
import type { Readiness, ServerCore } from "./server-core.ts";

/** A pool the server keeps for as long as it runs (`serve --pool`); its id is the snapshot's name. */
export interface DeclaredPool extends Partial<PoolOptions> {
  snapshot: string;
}

export interface ServeOptions {
  /** Default `127.0.0.1`. */
  host?: string;
  /** Default 7070; 0 picks a free port. */
  port?: number;
  /** The bearer token; undefined: no authentication (only sensible on loopback; the CLI insists). */
  token?: string;
  /** Most VMs held at once, counting every pool's `max`. Default 16. */
  maxVms?: number;
  /** A VM unused this long is stopped (a lease released); a client's pool unused this long closes. 0: never. Default 10 min. */
  idleTimeoutMs?: number;
  /** A VM older than this is killed, in use or not. 0: never. Default 1 h. */
  maxLifetimeMs?: number;
  /** Most WebSocket streams at once. Default 256. */
  maxStreams?: number;
  /** Largest JSON body. Default 8 MiB. */
  maxBodyBytes?: number;
  /** Largest file upload. Default 1 GiB. */
  maxUploadBytes?: number;
  /** Most output a one-shot exec collects per stream. Default 16 MiB. */
  maxOutputBytes?: number;
  /** Host directory clients may mount from (relative paths under it); undefined: no mounts. */
  mountRoot?: string;
  /** The library's data dir (snapshots, images). Default: the library's. */
  dataDir?: string;
  insecureRegistries?: string[];
  pools?: DeclaredPool[];
  /** Not ready under TCG. */
  requireKvm?: boolean;
  /** This server's name in logs and `/v1/info`. Default `$HOSTNAME` (a pod's name), else the host name. */
  serverId?: string;
  version?: string;
  log?: LogFn;
}

const MiB = 1024 * 1024;
const HEARTBEAT_MS = 30_000;
/** How long cancelled work may take to wind down once the grace period is over. */
const WIND_DOWN_MS = 10_000;
const HOST_REPORT_TTL_MS = 60_000;

export class SupermachineServer implements ServerCore {
  readonly holdings: Holdings;
  readonly metrics: ServerMetrics;
  readonly limits: WireLimits;
  readonly log: LogFn;
  readonly serverId: string;
  readonly version: string;
  readonly insecureRegistries: readonly string[];
  readonly #options: ServeOptions;
  readonly #http: Server;
  readonly #wss: WebSocketServer;
  readonly #token: TokenCheck;
  /** Aborted when the grace period is over: every request and stream still running is cancelled. */
  readonly #cancelAll = new AbortController();
  #inFlight = 0;
  #streams = 0;
  #idleWaiters: (() => void)[] = [];
  #draining = false;
  #drained: Promise<void> | undefined;
  #report: { at: number; report: Promise<HostReport> } | undefined;
  #accelerator: "kvm" | "tcg" = "tcg";
  #declaredDone = false;
  #declaredError: string | undefined;

  private constructor(options: ServeOptions) {
    this.#options = options;
    this.log = options.log ?? (() => {});
    this.serverId = options.serverId ?? process.env.HOSTNAME ?? hostname();
    this.version = options.version ?? "unknown";
    this.insecureRegistries = options.insecureRegistries ?? [];
    this.limits = {
      maxVms: options.maxVms ?? 16,
      maxStreams: options.maxStreams ?? 256,
      maxBodyBytes: options.maxBodyBytes ?? 8 * MiB,
      maxUploadBytes: options.maxUploadBytes ?? 1024 * MiB,
      maxOutputBytes: options.maxOutputBytes ?? 16 * MiB,
      idleTimeoutMs: options.idleTimeoutMs ?? 600_000,
      maxLifetimeMs: options.maxLifetimeMs ?? 3_600_000,
      mounts: options.mountRoot !== undefined,
    };
    this.#token = new TokenCheck(options.token);
    this.holdings = new Holdings({
      maxVms: this.limits.maxVms,
      idleTimeoutMs: this.limits.idleTimeoutMs,
      maxLifetimeMs: this.limits.maxLifetimeMs,
      mountRoot: options.mountRoot,
      dataDir: options.dataDir,
      onReap: (held, reason) => this.log("info", "vm reaped", { vm: held.id, reason }),
    });
    this.metrics = new ServerMetrics(this.holdings, {
      accelerator: () => this.#accelerator,
      streams: () => this.#streams,
      draining: () => this.#draining,
    });
    this.#http = createServer(
      { headersTimeout: 10_000, requestTimeout: 300_000, keepAliveTimeout: 5_000 },
      (req, res) => void this.#onRequest(req, res),
    );
    this.#http.maxHeadersCount = 100;
    this.#wss = new WebSocketServer({ noServer: true, maxPayload: this.limits.maxBodyBytes });
    this.#http.on("upgrade", (req: IncomingMessage, socket: Duplex, head: Buffer) =>
      this.#onUpgrade(req, socket, head),
    );
    void this.#buildDeclaredPools(options.pools ?? []).finally(() => {
      this.#declaredDone = true;
    });
  }

  /** Starts a server and resolves once it listens. */
  static async start(options: ServeOptions = {}): Promise<SupermachineServer> {
    const server = new SupermachineServer(options);
    await new Promise<void>((resolve, reject) => {
      server.#http.once("error", reject);
      server.#http.listen({ host: options.host ?? "127.0.0.1", port: options.port ?? 7070 }, () => {
        server.#http.off("error", reject);
        resolve();
      });
    });
    // Warms the host report; /readyz reports what it finds, this only logs a failure to find out.
    server
      .readiness()
      .catch((error: Error) => server.log("warn", "host check failed", { error: error.message }));
    server.log("info", "listening", {
      url: server.url,
      serverId: server.serverId,
      authentication: server.#token.required ? "bearer" : "none",
      limits: server.limits,
    });
    return server;
  }

  /** `http://host:port` of the listener. */
  get url(): string {
    const address = this.#http.address();
    if (address === null || typeof address === "string") return String(address);
    const host = address.family === "IPv6" ? `[${address.address}]` : address.address;
    return `http://${host}:${address.port}`;
  }

  get draining(): boolean {
    return this.#draining;
  }

  accelerator(): "kvm" | "tcg" {
    return this.#accelerator;
  }

  openStream(): () => void {
    if (this.#streams >= this.limits.maxStreams) {
      throw new RemoteError(
        "LIMIT_EXCEEDED",
        `this server carries at most ${this.limits.maxStreams} streams at once (--max-streams)`,
        { httpStatus: 429 },
      );
    }
    this.#streams += 1;
    let open = true;
    return () => {
      if (!open) return;
      open = false;
      this.#streams -= 1;
      this.#checkIdle();
    };
  }

  async readiness(): Promise<Readiness> {
    const now = Date.now();
    if (this.#report === undefined || now - this.#report.at > HOST_REPORT_TTL_MS) {
      this.#report = { at: now, report: hostReport() };
    }
    const report = await this.#report.report;
    this.#accelerator = report.accelerator.accel;
    const kvm = report.accelerator.accel === "kvm";
    const settled = this.#declaredDone;
    const checks: Readiness["checks"] = {
      accelerator: {
        ok: kvm || this.#options.requireKvm !== true,
        detail: kvm
          ? "kvm: hardware virtualization"
          : `tcg: software emulation, not hardware isolation (${report.accelerator.reason ?? "no usable /dev/kvm"})`,
      },
      qemu: report.qemu.found
        ? { ok: true, detail: `${report.qemu.path} ${report.qemu.version}` }
        : { ok: false, detail: report.qemu.error },
      assets: report.assets.found ? { ok: true } : { ok: false, detail: report.assets.error },
      pools: settled
        ? this.#declaredError === undefined
          ? { ok: true }
          : { ok: false, detail: this.#declaredError }
        : { ok: false, detail: "declared pools are being built" },
      draining: { ok: !this.#draining },
    };
    return {
      ready: Object.values(checks).every((check) => check.ok),
      draining: this.#draining,
      accelerator: report.accelerator.accel,
      acceleratorReason: report.accelerator.reason,
      checks,
    };
  }

  async #buildDeclaredPools(pools: readonly DeclaredPool[]): Promise<void> {
    for (const { snapshot, ...options } of pools) {
      try {
        await this.holdings.createPool(snapshot, options, {}, "server", this.#cancelAll.signal, snapshot);
        this.log("info", "pool ready", { pool: snapshot, options });
      } catch (error) {
        this.#declaredError = `pool ${snapshot}: ${(error as Error).message}`;
        this.log("error", "declared pool failed", { pool: snapshot, error: (error as Error).message });
      }
    }
  }

  async #onRequest(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const started = performance.now();
    const url = new URL(req.url ?? "/", "http://server");
    const controller = new AbortController();
    const cancel = () => controller.abort(this.#cancelAll.signal.reason);
    this.#cancelAll.signal.addEventListener("abort", cancel, { once: true });
    this.#inFlight += 1;
    res.once("close", () => {
      if (!res.writableFinished) controller.abort(new Error("the client closed the connection"));
      this.#cancelAll.signal.removeEventListener("abort", cancel);
      this.#inFlight -= 1;
      this.#checkIdle();
    });
    const fields: Record<string, unknown> = {};
    let routePath = "(none)";
    let status = 200;
    try {
      const match = matchRoute(ROUTES, req.method ?? "GET", url.pathname);
      const route = match !== undefined && "route" in match ? match.route : undefined;
      if (route?.public !== true && !this.#token.allows(req.headers)) {
        res.setHeader("www-authenticate", 'Bearer realm="supermachine"');
        throw new RemoteError(
          "UNAUTHORIZED",
          "this server needs a bearer token: Authorization: Bearer <token>",
          {
            httpStatus: 401,
          },
        );
      }
      if (this.#draining && route?.public !== true) {
        res.shouldKeepAlive = false;
        throw new RemoteError(
          "SERVER_UNAVAILABLE",
          "this server is draining (shutting down): use another one",
          {
            httpStatus: 503,
          },
        );
      }
      if (match === undefined) throw new RemoteError("NOT_FOUND", `no route ${req.method} ${url.pathname}`);
      if (route === undefined || route.method === "WS") {
        const allowed = "allowed" in match ? match.allowed : [];
        if (allowed.every((m) => m === "WS")) {
          throw new RemoteError(
            "NOT_FOUND",
            `${url.pathname} is a WebSocket: connect with an upgrade request`,
            {
              httpStatus: 426,
            },
          );
        }
        res.setHeader("allow", allowed.filter((m) => m !== "WS").join(", "));
        throw new RemoteError("NOT_FOUND", `${url.pathname} does not take ${req.method}`, {
          httpStatus: 405,
        });
      }
      routePath = route.path;
      const params = (match as { params: Record<string, string> }).params;
      checkParams(params);
      const ctx: RequestContext = {
        req,
        res,
        url,
        params,
        signal: controller.signal,
        core: this,
        note: (more) => Object.assign(fields, more),
      };
      await route.handler(ctx);
      status = res.statusCode;
    } catch (thrown) {
      // Work the drain cancelled ends as the drain's error, not as a plain abort.
      const error =
        this.#cancelAll.signal.aborted && SupermachineError.is(thrown, "ABORTED")
          ? this.#cancelAll.signal.reason
          : thrown;
      // A request whose body was not read is not worth keeping the connection for.
      if (!req.complete) res.shouldKeepAlive = false;
      const sent = sendError(res, error);
      status = sent.status;
      fields.code = sent.code;
      this.metrics.errors.inc({ code: sent.code });
      if (!SupermachineError.is(error)) fields.error = (error as Error)?.stack ?? String(error);
    } finally {
      this.metrics.requests.inc({ method: req.method ?? "?", route: routePath, status: String(status) });
      this.log(status >= 500 ? "error" : "info", "request", {
        method: req.method,
        path: url.pathname,
        route: routePath,
        status,
        durationMs: Math.round((performance.now() - started) * 10) / 10,
        ...fields,
      });
    }
  }

  #onUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer): void {
    const url = new URL(req.url ?? "/", "http://server");
    socket.on("error", () => {});
    let release: (() => void) | undefined;
    try {
      if (!this.#token.allows(req.headers)) {
        throw new RemoteError(
          "UNAUTHORIZED",
          "this server needs a bearer token: Authorization: Bearer <token>",
          {
            httpStatus: 401,
          },
        );
      }
      if (this.#draining) {
        throw new RemoteError(
          "SERVER_UNAVAILABLE",
          "this server is draining (shutting down): use another one",
          {
            httpStatus: 503,
          },
        );
      }
      const match = matchRoute(ROUTES, "WS", url.pathname);
      if (match === undefined || !("route" in match) || match.route.method !== "WS") {
        throw new RemoteError("NOT_FOUND", `no WebSocket route ${url.pathname}`);
      }
      checkParams(match.params);
      release = this.openStream();
      const { route, params } = match;
      this.#wss.handleUpgrade(req, socket, head, (ws: WebSocket) => {
        const controller = new AbortController();
        const cancel = () => controller.abort(this.#cancelAll.signal.reason);
        this.#cancelAll.signal.addEventListener("abort", cancel, { once: true });
        const heartbeat = this.#heartbeat(ws);
        ws.once("close", () => {
          clearInterval(heartbeat);
          controller.abort(new Error("the stream closed"));
          this.#cancelAll.signal.removeEventListener("abort", cancel);
          release?.();
        });
        ws.on("error", () => {});
        const started = performance.now();
        route
          .stream({ req, ws, url, params, signal: controller.signal, core: this })
          .catch((error: unknown) => {
            const wire = errorToWire(error);
            this.metrics.errors.inc({ code: wire.code });
            if (ws.readyState === ws.OPEN) {
              ws.send(JSON.stringify({ type: "error", error: wire }));
              ws.close(1000, wire.code);
            }
          })
          .finally(() => {
            this.log("info", "stream", {
              path: url.pathname,
              route: route.path,
              durationMs: Math.round(performance.now() - started),
            });
            if (ws.readyState === ws.OPEN) ws.close(1000, "done");
          });
      });
    } catch (error) {
      release?.();
      const { status, body } = errorResponse(error);
      this.metrics.errors.inc({ code: body.error.code });
      const text = JSON.stringify(body);
      socket.end(
        `HTTP/1.1 ${status} ${status === 401 ? "Unauthorized" : "Error"}\r\n` +
          "content-type: application/json; charset=utf-8\r\n" +
          `content-length: ${Buffer.byteLength(text)}\r\n` +
          (status === 401 ? 'www-authenticate: Bearer realm="supermachine"\r\n' : "") +
          `connection: close\r\n\r\n${text}`,
      );
    }
  }

  /** Pings the client; one that has not answered the last ping by the next is gone. */
  #heartbeat(ws: WebSocket): NodeJS.Timeout {
    let alive = true;
    ws.on("pong", () => {
      alive = true;
    });
    const timer = setInterval(() => {
      if (!alive) {
        ws.terminate();
        return;
      }
      alive = false;
      ws.ping();
    }, HEARTBEAT_MS);
    timer.unref();
    return timer;
  }

  #checkIdle(): void {
    if (this.#inFlight === 0 && this.#streams === 0) for (const wake of this.#idleWaiters.splice(0)) wake();
  }

  #idle(): Promise<void> {
    if (this.#inFlight === 0 && this.#streams === 0) return Promise.resolve();
    return new Promise((resolve) => this.#idleWaiters.push(resolve));
  }

  /**
   * Drain: stop accepting (the listener closes, `/readyz` fails, new requests on open
   * connections get `SERVER_UNAVAILABLE`), let in-flight requests and streams finish for
   * `graceMs`, cancel what is left, then stop every VM and close every connection. Idempotent.
   */
  drain(options: { graceMs?: number } = {}): Promise<void> {
    this.#drained ??= this.#drain(options.graceMs ?? 25_000);
    return this.#drained;
  }

  async #drain(graceMs: number): Promise<void> {
    this.#draining = true;
    this.log("info", "draining", { inFlight: this.#inFlight, streams: this.#streams, graceMs });
    const listenerClosed = new Promise<void>((resolve) => this.#http.close(() => resolve()));
    this.#http.closeIdleConnections();
    let timer: NodeJS.Timeout | undefined;
    const finished = await Promise.race([
      this.#idle().then(() => true),
      new Promise<boolean>((resolve) => {
        timer = setTimeout(() => resolve(false), graceMs);
      }),
    ]);
    clearTimeout(timer);
    if (!finished) {
      this.log("warn", "grace period over: cancelling", { inFlight: this.#inFlight, streams: this.#streams });
      this.#cancelAll.abort(
        new RemoteError("SERVER_UNAVAILABLE", "the server shut down before this request finished", {
          httpStatus: 503,
        }),
      );
      for (const ws of this.#wss.clients) ws.close(1001, "the server is shutting down");
      await Promise.race([this.#idle(), new Promise((resolve) => setTimeout(resolve, WIND_DOWN_MS).unref())]);
    }
    await this.holdings.close();
    for (const ws of this.#wss.clients) ws.terminate();
    this.#wss.close();
    this.#http.closeAllConnections();
    await listenerClosed;
    this.metrics.close();
    this.log("info", "stopped", {});
  }

  /** Drain without a grace period. */
  close(): Promise<void> {
    return this.drain({ graceMs: 0 });
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

/** Starts `supermachine serve`'s server (see {@link ServeOptions}). */
export function startServer(options: ServeOptions = {}): Promise<SupermachineServer> {
  return SupermachineServer.start(options);
}

/** A random token of 32 bytes, hex: what `serve --token-file` expects in its file. */
export function newToken(): string {
  return randomBytes(32).toString("hex");
}
