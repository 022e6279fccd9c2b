/**
 * The route table: method + path template → handler. Templates name their parameters
 * (`/v1/vms/{id}/exec`); `{rest*}` at the end takes the rest of the path. Parameters are checked
 * here (ids, ports), so a handler never sees `..`, `/` or a NUL where an id belongs. The
 * OpenAPI document (docs/openapi.json) lists the same table; a test keeps them equal.
 */

import type { IncomingMessage, ServerResponse } from "node:http";
import type { WebSocket } from "ws";
import { invalid } from "./http.ts";
import type { ServerCore } from "./server-core.ts";

export interface RequestContext {
  readonly req: IncomingMessage;
  readonly res: ServerResponse;
  readonly url: URL;
  readonly params: Readonly<Record<string, string>>;
  /** Aborted when the client goes away or the server stops waiting for in-flight work. */
  readonly signal: AbortSignal;
  readonly core: ServerCore;
  /** Adds fields to the request's log line (e.g. the VM). */
  note(fields: Record<string, unknown>): void;
}

export interface StreamContext {
  readonly req: IncomingMessage;
  readonly ws: WebSocket;
  readonly url: URL;
  readonly params: Readonly<Record<string, string>>;
  readonly signal: AbortSignal;
  readonly core: ServerCore;
}

export type Route =
  | {
      method: "GET" | "POST" | "PUT" | "DELETE" | "*";
      path: string;
      /** Reachable without the token (probes, metrics). */
      public?: boolean;
      handler(ctx: RequestContext): Promise<void>;
    }
  | { method: "WS"; path: string; public?: false; stream(ctx: StreamContext): Promise<void> };

const ID = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/;
const PORT = /^[1-9][0-9]{0,4}$/;

/**
 * The route for `method` (`WS` for a WebSocket upgrade) and `path`, with its parameters; the
 * methods the path has when it has others; `undefined` when no route has the path.
 */
export function matchRoute(
  routes: readonly Route[],
  method: string,
  path: string,
): { route: Route; params: Record<string, string> } | { allowed: string[] } | undefined {
  const segments = path.split("/");
  const allowed: string[] = [];
  for (const route of routes) {
    const params = matchPath(route.path, segments);
    if (params === undefined) continue;
    if (route.method === method || route.method === "*") return { route, params };
    allowed.push(route.method);
  }
  return allowed.length > 0 ? { allowed } : undefined;
}

function matchPath(template: string, segments: readonly string[]): Record<string, string> | undefined {
  const parts = template.split("/");
  const params: Record<string, string> = {};
  for (let i = 0; i < parts.length; i++) {
    const part = parts[i]!;
    if (part === "{rest*}") {
      params.rest = segments.slice(i).join("/");
      return params;
    }
    const segment = segments[i];
    if (segment === undefined) return undefined;
    if (part.startsWith("{") && part.endsWith("}")) {
      let value: string;
      try {
        value = decodeURIComponent(segment);
      } catch {
        return undefined;
      }
      params[part.slice(1, -1)] = value;
    } else if (part !== segment) {
      return undefined;
    }
  }
  return segments.length === parts.length ? params : undefined;
}

/** Checks the parameters a route matched: ids are names, ports are 1–65535. */
export function checkParams(params: Record<string, string>): void {
  for (const [name, value] of Object.entries(params)) {
    if (name === "rest") continue;
    if (name === "port") {
      if (!PORT.test(value) || Number(value) > 65535)
        throw invalid(`port must be 1–65535, got ${JSON.stringify(value)}`);
    } else if (!ID.test(value)) {
      throw invalid(`${name} ${JSON.stringify(value)} is not a valid id (letters, digits, "_", ".", "-")`);
    }
  }
}
