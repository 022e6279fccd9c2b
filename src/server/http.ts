/** Reading requests and writing responses, bounded: JSON bodies, errors, query parameters. */

import type { IncomingMessage, ServerResponse } from "node:http";
import { RemoteError, SupermachineError } from "../index.ts";
import { errorToWire, httpStatusOf, type WireError } from "../wire/index.ts";

export function invalid(message: string): SupermachineError {
  return new SupermachineError("INVALID_ARGUMENT", message);
}

/**
 * The request's JSON body (an empty body is `{}`), at most `maxBytes`: a larger body is refused
 * as it arrives (`LIMIT_EXCEEDED`, 413) without reading the rest; malformed JSON is
 * `INVALID_ARGUMENT`.
 */
export async function readJson(req: IncomingMessage, maxBytes: number): Promise<Record<string, unknown>> {
  const declared = Number(req.headers["content-length"] ?? Number.NaN);
  if (declared > maxBytes) throw tooLarge(maxBytes);
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > maxBytes) throw tooLarge(maxBytes);
    chunks.push(chunk);
  }
  if (size === 0) return {};
  let value: unknown;
  try {
    value = JSON.parse(Buffer.concat(chunks).toString("utf8"));
  } catch (error) {
    throw invalid(`the request body is not JSON: ${(error as Error).message}`);
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw invalid("the request body must be a JSON object");
  }
  return value as Record<string, unknown>;
}

function tooLarge(maxBytes: number): RemoteError {
  return new RemoteError(
    "LIMIT_EXCEEDED",
    `the request body is larger than this server's limit of ${maxBytes} bytes (--max-body-bytes); stream files through the files route`,
    { httpStatus: 413 },
  );
}

export function sendJson(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    "content-type": "application/json; charset=utf-8",
    "content-length": Buffer.byteLength(text),
    "cache-control": "no-store",
  });
  res.end(text);
}

/** The wire form and HTTP status of `error` (a `RemoteError` may carry its own status). */
export function errorResponse(error: unknown): { status: number; body: { error: WireError } } {
  const wire = errorToWire(error);
  let own: number | undefined;
  if (error instanceof RemoteError) {
    own = error.httpStatus;
    delete wire.endpoint;
    delete wire.httpStatus;
  }
  return { status: own ?? httpStatusOf(wire.code), body: { error: wire } };
}

/** Sends `error` as JSON, or ends the response if its head is already sent. */
export function sendError(res: ServerResponse, error: unknown): { status: number; code: string } {
  const { status, body } = errorResponse(error);
  if (res.headersSent) {
    res.destroy(error instanceof Error ? error : undefined);
  } else {
    sendJson(res, status, body);
  }
  return { status, code: body.error.code };
}

/** A string field of a JSON body. */
export function stringField(body: Record<string, unknown>, name: string, required: true): string;
export function stringField(
  body: Record<string, unknown>,
  name: string,
  required?: false,
): string | undefined;
export function stringField(
  body: Record<string, unknown>,
  name: string,
  required = false,
): string | undefined {
  const value = body[name];
  if (value === undefined && !required) return undefined;
  if (typeof value !== "string" || value === "") throw invalid(`${name} must be a non-empty string`);
  return value;
}

/** An optional whole-number field (≥ 0) of a JSON body. */
export function countField(body: Record<string, unknown>, name: string): number | undefined {
  const value = body[name];
  if (value === undefined) return undefined;
  if (typeof value !== "number" || !Number.isSafeInteger(value) || value < 0) {
    throw invalid(`${name} must be a whole number ≥ 0, got ${JSON.stringify(value)}`);
  }
  return value;
}

/** An optional boolean field of a JSON body. */
export function booleanField(body: Record<string, unknown>, name: string): boolean | undefined {
  const value = body[name];
  if (value === undefined) return undefined;
  if (typeof value !== "boolean") throw invalid(`${name} must be true or false`);
  return value;
}

/** A query parameter as a boolean (`1`/`true`/`0`/`false`), default false. */
export function queryFlag(url: URL, name: string): boolean {
  const value = url.searchParams.get(name);
  if (value === null) return false;
  if (value === "1" || value === "true") return true;
  if (value === "0" || value === "false") return false;
  throw invalid(`query parameter ${name} must be 1, true, 0 or false`);
}

/** A query parameter as a whole number ≥ 0, or undefined when absent. */
export function queryCount(url: URL, name: string): number | undefined {
  const value = url.searchParams.get(name);
  if (value === null) return undefined;
  if (!/^\d{1,15}$/.test(value))
    throw invalid(`query parameter ${name} must be a whole number, got ${JSON.stringify(value)}`);
  return Number(value);
}

/** A guest path from a request: absolute, no `..` segment, no NUL, at most 4096 bytes. */
export function guestPath(value: unknown, what = "path"): string {
  if (typeof value !== "string" || !value.startsWith("/")) {
    throw invalid(`${what} must be an absolute guest path, got ${JSON.stringify(value)}`);
  }
  if (value.includes("\0") || Buffer.byteLength(value) > 4096) {
    throw invalid(`${what} must be at most 4096 bytes without NUL characters`);
  }
  if (value.split("/").includes("..")) {
    throw invalid(`${what} ${JSON.stringify(value)} must not contain ".." segments`);
  }
  return value;
}
