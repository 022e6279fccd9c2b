/**
 * The server's front door, without VMs: a real server on loopback refuses unauthenticated
 * requests on every route but the probes and `/metrics`, answers bad input (malformed JSON,
 * oversized bodies, unknown ids, path traversal, bad parameters) with one-line JSON errors
 * carrying the library's codes, keeps its bounds, and drains. Also the `serve` command's parsers
 * and the mount root's containment.
 */
import assert from "node:assert/strict";
import { mkdir, symlink, writeFile } from "node:fs/promises";
import { request } from "node:http";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { isLoopback, parseDuration, parseListen, parsePool } from "../../src/cli/serve.ts";
import { SupermachineError } from "../../src/errors.ts";
import { Holdings } from "../../src/server/holdings.ts";
import { ROUTES, type SupermachineServer, startServer } from "../../src/server/index.ts";
import { scratchDir } from "../helpers/scratch.ts";

const TOKEN = "0123456789abcdef0123456789abcdef";
const auth = { authorization: `Bearer ${TOKEN}` };

interface Answer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: { error?: { code: string; message: string } } & Record<string, unknown>;
  text: string;
}

/** One request with node:http (fetch normalises paths; this sends them as written). */
function send(
  base: string,
  method: string,
  path: string,
  options: { headers?: Record<string, string>; body?: string | Buffer; chunked?: boolean } = {},
): Promise<Answer> {
  const url = new URL(base);
  return new Promise((resolve, reject) => {
    const req = request(
      { host: url.hostname, port: url.port, method, path, headers: options.headers ?? {}, agent: false },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (c: Buffer) => chunks.push(c));
        res.on("end", () => {
          const text = Buffer.concat(chunks).toString("utf8");
          let body = {};
          try {
            body = JSON.parse(text);
          } catch {}
          resolve({ status: res.statusCode ?? 0, headers: res.headers, body, text });
        });
      },
    );
    req.on("error", reject);
    if (options.chunked && options.body !== undefined) {
      const body = Buffer.from(options.body);
      for (let i = 0; i < body.length; i += 64 * 1024) req.write(body.subarray(i, i + 64 * 1024));
      req.end();
    } else req.end(options.body);
  });
}

/** A route template with its parameters filled in. */
function concrete(path: string): string {
  return path
    .replace("{id}", "abc")
    .replace("{name}", "snap")
    .replace("{port}", "80")
    .replace("{rest*}", "x");
}

describe("server: the front door", () => {
  let server: SupermachineServer;
  let base: string;

  before(async () => {
    const dataDir = await scratchDir("sm-serve-unit-");
    server = await startServer({ port: 0, token: TOKEN, dataDir, maxBodyBytes: 4096, maxVms: 4 });
    base = server.url;
  });

  after(async () => {
    await server.close();
  });

  it("refuses every API route without the right token (401, WWW-Authenticate, code UNAUTHORIZED)", async () => {
    const api = ROUTES.filter((r) => r.public !== true && r.method !== "WS");
    assert.ok(api.length > 20);
    for (const route of api) {
      const method = route.method === "*" ? "GET" : route.method;
      const variants: Record<string, string>[] = [
        {},
        { authorization: "Bearer wrong" },
        { authorization: TOKEN },
        { authorization: `Basic ${TOKEN}` },
      ];
      for (const headers of variants) {
        const answer = await send(base, method, concrete(route.path), { headers });
        assert.equal(answer.status, 401, `${method} ${route.path} ${JSON.stringify(headers)}`);
        assert.equal(answer.body.error?.code, "UNAUTHORIZED");
        assert.match(String(answer.headers["www-authenticate"]), /^Bearer/);
      }
    }
    // An unknown path says nothing about what exists without the token either.
    assert.equal((await send(base, "GET", "/v1/secret")).status, 401);
  });

  it("refuses a WebSocket upgrade without the token", async () => {
    const url = `${base.replace("http", "ws")}/v1/vms/abc/exec`;
    const refused = await new Promise<string>((resolve) => {
      const ws = new WebSocket(url);
      ws.onerror = () => resolve("error");
      ws.onopen = () => resolve("open");
    });
    assert.equal(refused, "error");
    const answer = await send(base, "GET", "/v1/vms/abc/exec", {
      headers: {
        connection: "Upgrade",
        upgrade: "websocket",
        "sec-websocket-version": "13",
        "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
      },
    });
    assert.equal(answer.status, 401);
    assert.equal(answer.body.error?.code, "UNAUTHORIZED");
  });

  it("serves the probes and /metrics without the token", async () => {
    assert.deepEqual((await send(base, "GET", "/healthz")).body, { ok: true });
    const ready = await send(base, "GET", "/readyz");
    assert.ok(ready.status === 200 || ready.status === 503);
    assert.ok(["kvm", "tcg"].includes(String(ready.body.accelerator)));
    const metrics = await send(base, "GET", "/metrics");
    assert.equal(metrics.status, 200);
    assert.match(metrics.text, /^supermachine_accelerator_info\{accelerator="(kvm|tcg)"\} 1$/m);
    assert.match(metrics.text, /^supermachine_max_vms 4$/m);
    assert.match(metrics.text, /^supermachine_errors_total\{code="UNAUTHORIZED"\} \d+$/m);
  });

  it("answers bad input with one-line JSON errors and the library's codes", async () => {
    const json = { ...auth, "content-type": "application/json" };
    const cases: [string, string, string | undefined, number, string][] = [
      ["POST", "/v1/vms", "{not json", 400, "INVALID_ARGUMENT"],
      ["POST", "/v1/vms", "[1,2]", 400, "INVALID_ARGUMENT"],
      ["POST", "/v1/vms", "{}", 400, "INVALID_ARGUMENT"],
      ["POST", "/v1/vms", '{"snapshot":"../../etc"}', 400, "INVALID_ARGUMENT"],
      ["POST", "/v1/vms", '{"snapshot":"missing"}', 404, "NOT_FOUND"],
      ["POST", "/v1/pools", '{"snapshot":5}', 400, "INVALID_ARGUMENT"],
      ["POST", "/v1/pools", '{"snapshot":"s","max":-1}', 400, "INVALID_ARGUMENT"],
      ["GET", "/v1/vms/nope", undefined, 404, "NOT_FOUND"],
      ["DELETE", "/v1/vms/nope", undefined, 404, "NOT_FOUND"],
      ["POST", "/v1/vms/nope/exec", '{"argv":["true"]}', 404, "NOT_FOUND"],
      ["GET", "/v1/pools/nope", undefined, 404, "NOT_FOUND"],
      ["POST", "/v1/pools/nope/acquire", undefined, 404, "NOT_FOUND"],
      ["GET", "/v1/snapshots/nope", undefined, 404, "NOT_FOUND"],
      ["GET", "/v1/nothing-here", undefined, 404, "NOT_FOUND"],
      ["PATCH", "/v1/vms", undefined, 405, "NOT_FOUND"],
      ["GET", "/v1/vms/abc/fs/watch", undefined, 426, "NOT_FOUND"],
      ["POST", "/v1/vms/abc/fs", '{"op":"format","path":"/"}', 400, "INVALID_ARGUMENT"],
      ["GET", "/v1/vms/abc/ports/0/http/x", undefined, 400, "INVALID_ARGUMENT"],
      ["GET", "/v1/vms/abc/ports/70000/http/", undefined, 400, "INVALID_ARGUMENT"],
      ["GET", "/v1/vms/a%2Fb", undefined, 400, "INVALID_ARGUMENT"],
      ["GET", "/v1/vms/%2e%2e", undefined, 404, "NOT_FOUND"],
      ["GET", "/v1/vms/%ZZ", undefined, 404, "NOT_FOUND"],
    ];
    for (const [method, path, body, status, code] of cases) {
      const answer = await send(base, method, path, {
        headers: json,
        ...(body === undefined ? {} : { body }),
      });
      assert.equal(answer.status, status, `${method} ${path}: ${answer.text}`);
      assert.equal(answer.body.error?.code, code, `${method} ${path}`);
      assert.equal(answer.body.error?.message.includes("\n"), false);
      assert.match(String(answer.headers["content-type"]), /^application\/json/);
    }
  });

  it("refuses path traversal and relative paths in the file routes before touching a VM", async () => {
    for (const path of ["../etc/passwd", "etc/passwd", "/tmp/../../etc/passwd", "/a/..", "", "/a\0b"]) {
      const q = encodeURIComponent(path);
      for (const [method, route] of [
        ["GET", `/v1/vms/nope/files?path=${q}`],
        ["PUT", `/v1/vms/nope/files?path=${q}`],
      ] as const) {
        const answer = await send(base, method, route, {
          headers: auth,
          ...(method === "PUT" ? { body: "x" } : {}),
        });
        assert.equal(answer.status, 400, `${method} ${JSON.stringify(path)}`);
        assert.equal(answer.body.error?.code, "INVALID_ARGUMENT");
      }
      const fs = await send(base, "POST", "/v1/vms/nope/fs", {
        headers: auth,
        body: JSON.stringify({ op: "stat", path }),
      });
      assert.equal(fs.status, 400, `fs ${JSON.stringify(path)}`);
    }
    const rename = await send(base, "POST", "/v1/vms/nope/fs", {
      headers: auth,
      body: JSON.stringify({ op: "rename", path: "/a", newPath: "/b/../../c" }),
    });
    // The VM is unknown: the path check (of the first path) passed, the lookup failed.
    assert.equal(rename.body.error?.code, "NOT_FOUND");
  });

  it("refuses oversized bodies as they arrive (413 LIMIT_EXCEEDED), declared or chunked", async () => {
    const big = JSON.stringify({ argv: ["true"], pad: "x".repeat(10_000) });
    for (const chunked of [false, true]) {
      const answer = await send(base, "POST", "/v1/vms/nope/exec", { headers: auth, body: big, chunked });
      assert.equal(answer.status, 413, `chunked ${chunked}`);
      assert.equal(answer.body.error?.code, "LIMIT_EXCEEDED");
    }
  });

  it("counts every pool's max against --max-vms (LIMIT_EXCEEDED before any VM starts)", async () => {
    const answer = await send(base, "POST", "/v1/pools", {
      headers: auth,
      body: JSON.stringify({ snapshot: "missing", max: 5 }),
    });
    assert.equal(answer.status, 429);
    assert.equal(answer.body.error?.code, "LIMIT_EXCEEDED");
    assert.match(answer.body.error?.message ?? "", /--max-vms/);
  });

  it("describes itself at /v1/info", async () => {
    const info = await send(base, "GET", "/v1/info", { headers: auth });
    assert.equal(info.status, 200);
    assert.equal((info.body.limits as { maxVms: number }).maxVms, 4);
    assert.equal(info.body.draining, false);
  });
});

describe("server: drain", () => {
  it("after drain() the listener is closed and nothing is held", async () => {
    const server = await startServer({ port: 0, dataDir: await scratchDir("sm-serve-unit-") });
    const base = server.url;
    assert.equal((await send(base, "GET", "/healthz")).status, 200);
    await server.drain({ graceMs: 1_000 });
    assert.equal(server.draining, true);
    await assert.rejects(send(base, "GET", "/healthz"), /ECONNREFUSED/);
    assert.equal(server.holdings.vmCount, 0);
  });
});

describe("serve: command-line values", () => {
  it("parses --listen, and knows loopback", () => {
    assert.deepEqual(parseListen("127.0.0.1:7070"), { host: "127.0.0.1", port: 7070 });
    assert.deepEqual(parseListen("[::1]:80"), { host: "::1", port: 80 });
    assert.deepEqual(parseListen(":7070"), { host: "0.0.0.0", port: 7070 });
    for (const bad of ["7070", "host:", "h:70000", "[::1]"])
      assert.throws(() => parseListen(bad), /--listen/);
    assert.equal(isLoopback("127.0.0.2"), true);
    assert.equal(isLoopback("::1"), true);
    assert.equal(isLoopback("localhost"), true);
    assert.equal(isLoopback("0.0.0.0"), false);
    assert.equal(isLoopback("10.0.0.1"), false);
  });

  it("parses durations and pools", () => {
    assert.equal(parseDuration("500ms", "--x"), 500);
    assert.equal(parseDuration("30s", "--x"), 30_000);
    assert.equal(parseDuration("10m", "--x"), 600_000);
    assert.equal(parseDuration("1.5h", "--x"), 5_400_000);
    assert.equal(parseDuration("250", "--x"), 250);
    assert.equal(parseDuration("0", "--x"), 0);
    assert.throws(() => parseDuration("soon", "--idle-timeout"), /--idle-timeout/);
    assert.deepEqual(parsePool("verifier"), { snapshot: "verifier" });
    assert.deepEqual(parsePool("v1.2:min=2,max=8,prestarted=1,restore-on-release=false"), {
      snapshot: "v1.2",
      min: 2,
      max: 8,
      prestarted: 1,
      restoreOnRelease: false,
    });
    for (const bad of ["../x", "v:min=-1", "v:speed=3", "v:restore-on-release=maybe"]) {
      assert.throws(() => parsePool(bad), /--pool/, bad);
    }
  });
});

describe("server: the mount root", () => {
  it("resolves client mounts under the root and refuses every way out", async () => {
    const root = await scratchDir("sm-mount-root-");
    const outside = await scratchDir("sm-outside-");
    await mkdir(join(root, "data/sub"), { recursive: true });
    await writeFile(join(outside, "secret"), "s");
    await symlink(outside, join(root, "escape"));
    const holdings = new Holdings({
      maxVms: 1,
      idleTimeoutMs: 0,
      maxLifetimeMs: 0,
      mountRoot: root,
      dataDir: root,
    });
    const signal = new AbortController().signal;
    const config = await holdings.startConfig(
      { mounts: [{ hostPath: "data/sub", guestPath: "/mnt" }] },
      signal,
    );
    assert.equal(config.mounts?.[0]?.hostPath, join(root, "data/sub"));
    for (const hostPath of ["../x", "/etc", "data/../../x", "escape", "escape/secret", "missing"]) {
      await assert.rejects(
        holdings.startConfig({ mounts: [{ hostPath, guestPath: "/mnt" }] }, signal),
        (e) => SupermachineError.is(e, "INVALID_ARGUMENT") || SupermachineError.is(e, "NOT_FOUND"),
        hostPath,
      );
    }
    const none = new Holdings({
      maxVms: 1,
      idleTimeoutMs: 0,
      maxLifetimeMs: 0,
      mountRoot: undefined,
      dataDir: root,
    });
    await assert.rejects(
      none.startConfig({ mounts: [{ hostPath: "data", guestPath: "/mnt" }] }, signal),
      /allows no mounts/,
    );
    await holdings.close();
    await none.close();
  });
});
