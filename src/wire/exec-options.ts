/**
 * `ExecOptions` on the wire: the same fields, bytes as base64 (staged files' content, `stdin`),
 * no `signal` (cancelling is closing the request). The server hands what it decodes to the
 * library, which validates every field as it does for embedded callers.
 */

import { SupermachineError } from "../errors.ts";
import type { ExecInput, ExecOptions } from "../index.ts";
import { fromBase64, toBase64 } from "./base64.ts";

export interface WireStageFile {
  path: string;
  /** base64 */
  content: string;
  mode?: number;
}

export interface WireExecOptions {
  env?: Record<string, string>;
  cwd?: string;
  user?: string;
  tty?: boolean;
  winsize?: { rows: number; cols: number };
  timeoutMs?: number;
  killGraceMs?: number;
  stageFiles?: WireStageFile[];
  chain?: string[][];
  /** base64; only for one-shot execs (a stream of input goes over the exec WebSocket). */
  stdin?: string;
  maxBufferBytes?: number;
  reject?: boolean;
}

/** A one-shot exec request: `POST /v1/vms/{id}/exec` and `POST /v1/pools/{id}/exec`. */
export interface WireExecRequest extends WireExecOptions {
  argv: string[];
}

/** True when `input` can travel in a JSON body (else it is streamed over a WebSocket). */
export function isBufferedInput(input: ExecInput | undefined): input is string | Uint8Array | undefined {
  return input === undefined || typeof input === "string" || input instanceof Uint8Array;
}

/** Client side: `options` as JSON. `stdin` must be buffered input (see {@link isBufferedInput}). */
export function execOptionsToWire(options: ExecOptions): WireExecOptions {
  const { signal: _signal, stdin, stageFiles, chain, ...rest } = options;
  const out: WireExecOptions = { ...rest };
  if (stageFiles !== undefined) {
    out.stageFiles = stageFiles.map((file) => ({
      path: file.path,
      content: toBase64(
        typeof file.content === "string" ? new TextEncoder().encode(file.content) : file.content,
      ),
      ...(file.mode === undefined ? {} : { mode: file.mode }),
    }));
  }
  if (chain !== undefined) out.chain = chain.map((argv) => [...argv]);
  if (stdin !== undefined) {
    if (!isBufferedInput(stdin)) {
      throw new SupermachineError("INVALID_ARGUMENT", "a streamed stdin cannot go in a one-shot request");
    }
    out.stdin = toBase64(typeof stdin === "string" ? new TextEncoder().encode(stdin) : stdin);
  }
  return out;
}

function invalid(message: string): SupermachineError {
  return new SupermachineError("INVALID_ARGUMENT", message);
}

/**
 * Server side: library `ExecOptions` from a request body's fields (bytes decoded; everything else
 * passed as is for the library to check). Throws `INVALID_ARGUMENT` for a body that is not an
 * object or whose byte fields are not base64 strings.
 */
export function execOptionsFromWire(body: unknown): ExecOptions {
  if (typeof body !== "object" || body === null || Array.isArray(body)) {
    throw invalid("exec options must be a JSON object");
  }
  const { stageFiles, stdin, argv: _argv, signal: _signal, ...rest } = body as Record<string, unknown>;
  for (const key of ["env", "winsize"] as const) {
    const value = rest[key];
    if (value !== undefined && (typeof value !== "object" || value === null || Array.isArray(value))) {
      throw invalid(`${key} must be a JSON object`);
    }
  }
  if (rest.chain !== undefined && !(Array.isArray(rest.chain) && rest.chain.every(Array.isArray))) {
    throw invalid("chain must be an array of argv arrays");
  }
  const out = { ...rest } as ExecOptions;
  if (stageFiles !== undefined) {
    if (!Array.isArray(stageFiles)) throw invalid("stageFiles must be an array");
    out.stageFiles = stageFiles.map((file: unknown, i) => {
      const f = file as Partial<WireStageFile> | null;
      if (typeof f !== "object" || f === null || typeof f.content !== "string") {
        throw invalid(`stageFiles[${i}] must be { path, content (base64), mode? }`);
      }
      return {
        path: f.path as string,
        content: fromBase64(f.content),
        ...(f.mode === undefined ? {} : { mode: f.mode }),
      };
    });
  }
  if (stdin !== undefined) {
    if (typeof stdin !== "string") throw invalid("stdin must be a base64 string");
    out.stdin = fromBase64(stdin);
  }
  return out;
}
