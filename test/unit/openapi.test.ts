/**
 * docs/openapi.json is the server's API as it is: a well-formed OpenAPI 3.1 document (every
 * `$ref` resolves, every path parameter declared), whose paths and methods are exactly the
 * server's route table (`ROUTES`), each routed by the server's own matcher to the route it
 * documents; the public routes are the ones without security; the error codes are the library's.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, it } from "node:test";
import { ERROR_CODES, GUEST_ERRNOS } from "../../src/errors.ts";
import { matchRoute, type Route } from "../../src/server/router.ts";
import { ROUTES } from "../../src/server/routes.ts";

type Json = Record<string, unknown>;

const doc = JSON.parse(readFileSync(new URL("../../docs/openapi.json", import.meta.url), "utf8")) as Json;
const paths = doc.paths as Record<string, Json>;
const HTTP_METHODS = ["get", "put", "post", "delete", "options", "head", "patch", "trace"] as const;
/** What the server's `*` route is documented with: every method a client may send. */
const ANY_METHOD = ["get", "put", "post", "delete", "options", "head", "patch"];

interface Operation {
  path: string;
  method: string;
  op: Json;
  /** Path-item and operation parameters, the operation's winning. */
  parameters: Json[];
}

function resolve(pointer: string): unknown {
  assert.ok(pointer.startsWith("#/"), `${pointer}: only local references are used`);
  let node: unknown = doc;
  for (const raw of pointer.slice(2).split("/")) {
    const key = raw.replaceAll("~1", "/").replaceAll("~0", "~");
    if (typeof node !== "object" || node === null || !(key in node)) return undefined;
    node = (node as Json)[key];
  }
  return node;
}

const deref = (value: Json): Json => (typeof value.$ref === "string" ? (resolve(value.$ref) as Json) : value);

function operations(): Operation[] {
  const out: Operation[] = [];
  for (const [path, item] of Object.entries(paths)) {
    for (const method of HTTP_METHODS) {
      const op = item[method] as Json | undefined;
      if (op === undefined) continue;
      const byKey = new Map<string, Json>();
      for (const p of [...((item.parameters as Json[]) ?? []), ...((op.parameters as Json[]) ?? [])]) {
        const param = deref(p);
        byKey.set(`${param.in}:${param.name}`, param);
      }
      out.push({ path, method, op, parameters: [...byKey.values()] });
    }
  }
  return out;
}

/** The documented (path, method) pairs a route stands for. */
function documentedAs(route: Route): { path: string; methods: string[] } {
  const path = route.path.replace("{rest*}", "{rest}");
  if (route.method === "WS") return { path, methods: ["get"] };
  if (route.method === "*") return { path, methods: ANY_METHOD };
  return { path, methods: [route.method.toLowerCase()] };
}

/** A concrete request path for a template, with plausible parameter values. */
function sample(path: string): string {
  return path
    .replace("{port}", "8080")
    .replace("{rest}", "a/b")
    .replace(/\{[a-z]+\}/g, "x1");
}

describe("docs/openapi.json", () => {
  it("is an OpenAPI 3.1 document with info, paths, components and bearer security", () => {
    assert.match(String(doc.openapi), /^3\.1\.\d+$/);
    const info = doc.info as Json;
    assert.equal(typeof info.title, "string");
    assert.equal(typeof info.version, "string");
    assert.ok(Object.keys(paths).length > 0);
    for (const path of Object.keys(paths)) assert.match(path, /^\//, `${path} starts with /`);
    const schemes = (doc.components as Json).securitySchemes as Record<string, Json>;
    assert.deepEqual(schemes.bearer, { ...schemes.bearer, type: "http", scheme: "bearer" });
    assert.deepEqual(doc.security, [{ bearer: [] }]);
  });

  it("resolves every $ref", () => {
    const broken: string[] = [];
    const walk = (node: unknown, at: string): void => {
      if (Array.isArray(node)) {
        for (const [i, v] of node.entries()) walk(v, `${at}/${i}`);
      } else if (typeof node === "object" && node !== null) {
        for (const [key, value] of Object.entries(node)) {
          if (key === "$ref" && (typeof value !== "string" || resolve(value) === undefined)) {
            broken.push(`${at}: ${String(value)}`);
          } else walk(value, `${at}/${key}`);
        }
      }
    };
    walk(doc, "#");
    assert.deepEqual(broken, []);
  });

  it("gives every operation a unique operationId, responses, and each path parameter", () => {
    const ids = new Set<string>();
    for (const { path, method, op, parameters } of operations()) {
      const where = `${method.toUpperCase()} ${path}`;
      assert.equal(typeof op.operationId, "string", `${where}: operationId`);
      assert.ok(!ids.has(op.operationId as string), `${where}: operationId ${op.operationId} is used twice`);
      ids.add(op.operationId as string);
      assert.ok(Object.keys((op.responses as Json) ?? {}).length > 0, `${where}: responses`);
      const inPath = [...path.matchAll(/\{([^}]+)\}/g)].map((m) => m[1]).sort();
      const declared = parameters
        .filter((p) => p.in === "path")
        .map((p) => {
          assert.equal(p.required, true, `${where}: path parameter ${p.name} is required`);
          return p.name;
        })
        .sort();
      assert.deepEqual(declared, inPath, `${where}: path parameters`);
    }
  });

  it("documents every route the server has, and nothing else", () => {
    const fromServer = ROUTES.flatMap((route) => {
      const { path, methods } = documentedAs(route);
      return methods.map((method) => `${method.toUpperCase()} ${path}`);
    }).sort();
    const fromDoc = operations()
      .map(({ path, method }) => `${method.toUpperCase()} ${path}`)
      .sort();
    assert.deepEqual(fromDoc, fromServer);
  });

  it("routes each documented operation, through the server's matcher, to the route it documents", () => {
    for (const { path, method, op } of operations()) {
      const where = `${method.toUpperCase()} ${path}`;
      const asked = op["x-websocket"] === true ? "WS" : method.toUpperCase();
      const match = matchRoute(ROUTES, asked, sample(path));
      assert.ok(match !== undefined && "route" in match, `${where}: the server has no such route`);
      assert.equal(match.route.path.replace("{rest*}", "{rest}"), path, where);
      assert.equal(match.route.method === "WS", asked === "WS", `${where}: WebSocket or not`);
    }
  });

  it("marks the WebSocket routes, each a GET answered with 101", () => {
    const ws = new Set(ROUTES.filter((r) => r.method === "WS").map((r) => r.path));
    for (const { path, method, op } of operations()) {
      const isWs = op["x-websocket"] === true;
      assert.equal(isWs, method === "get" && ws.has(path), `${method.toUpperCase()} ${path}: x-websocket`);
      if (isWs) assert.ok("101" in (op.responses as Json), `GET ${path}: 101 Switching Protocols`);
    }
  });

  it("needs the token everywhere but the public routes", () => {
    const open = new Set(ROUTES.filter((r) => r.public === true).map((r) => r.path));
    for (const { path, method, op } of operations()) {
      const isOpen = Array.isArray(op.security) && op.security.length === 0;
      assert.equal(isOpen, open.has(path), `${method.toUpperCase()} ${path}: security`);
    }
  });

  it("lists the library's error codes and the guest errno names", () => {
    const code = ((doc.components as Json).schemas as Record<string, Json>).ErrorCode!;
    const [codes, errnos] = (code.anyOf as Json[]).map((s) => [...(s.enum as string[])].sort());
    assert.deepEqual(codes, [...ERROR_CODES].sort());
    assert.deepEqual(errnos, Object.keys(GUEST_ERRNOS).sort());
  });
});
