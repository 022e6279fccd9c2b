/**
 * Errors on the wire: the server sends every failure as `{ "error": { code, message, …fields } }`
 * with the library's error `code`; the client rebuilds the same class with the same fields, so
 * `SupermachineError.is(err, "EXEC_TIMEOUT")` and `err.outcome` work the same remote as embedded.
 */

import {
  AbortError,
  AgentTimeoutError,
  DigestMismatchError,
  ERROR_CODES,
  type ErrorCode,
  ExecError,
  type ExecOutcome,
  ExecStartError,
  ExecTimeoutError,
  GUEST_ERRNOS,
  type GuestErrnoCode,
  GuestIoError,
  LayerError,
  OutputLimitError,
  PlatformNotFoundError,
  PoolTimeoutError,
  RegistryError,
  RemoteError,
  SnapshotError,
  SupermachineError,
  VmError,
} from "../errors.ts";
import { outcomeFromWire, outcomeToWire, type WireOutcome } from "./outcome.ts";

/** An error as the server sends it. Fields other than `code` and `message` depend on the code. */
export interface WireError {
  code: string;
  message: string;
  [field: string]: unknown;
}

/** The body of every error response. */
export interface WireErrorBody {
  error: WireError;
}

const HTTP_STATUS: Partial<Record<ErrorCode, number>> = {
  INVALID_ARGUMENT: 400,
  INVALID_REFERENCE: 400,
  UNAUTHORIZED: 401,
  NOT_FOUND: 404,
  IMAGE_NOT_FOUND: 404,
  MANIFEST_UNKNOWN: 404,
  POOL_CLOSED: 409,
  VM_STOPPED: 409,
  VM_EXITED: 409,
  LIMIT_EXCEEDED: 429,
  ABORTED: 499,
  SERVER_UNAVAILABLE: 503,
  POOL_TIMEOUT: 503,
  QEMU_NOT_FOUND: 500,
  ASSET_MISSING: 500,
  HOST_UNSUPPORTED: 500,
  STORE_ERROR: 500,
  VMM_FAILED: 500,
};

/**
 * The HTTP status of an error code: 4xx for the caller's mistakes and refusals, 5xx for the
 * host's failures, 422 for what the guest or the command did (an exec that failed, a guest
 * `ENOENT`): the request was fine, its outcome was not.
 */
export function httpStatusOf(code: string): number {
  return HTTP_STATUS[code as ErrorCode] ?? 422;
}

/** `error` as it goes on the wire (a non-library error becomes `SERVER_UNAVAILABLE`, message kept). */
export function errorToWire(error: unknown): WireError {
  if (!SupermachineError.is(error)) {
    const message = error instanceof Error ? error.message : String(error);
    return { code: "SERVER_UNAVAILABLE", message: `internal server error: ${message}` };
  }
  const out: WireError = { code: error.code, message: error.message };
  for (const [key, value] of Object.entries(error)) {
    if (key === "code" || key === "message" || key === "name" || value === undefined) continue;
    if (key === "outcome") out.outcome = outcomeToWire(value as ExecOutcome);
    else if (isPlain(value)) out[key] = value;
  }
  return out;
}

function isPlain(value: unknown): boolean {
  if (value === null || ["string", "number", "boolean"].includes(typeof value)) return true;
  return Array.isArray(value) && value.every((v) => typeof v === "string" || typeof v === "number");
}

const str = (v: unknown): string | undefined => (typeof v === "string" ? v : undefined);
const num = (v: unknown): number | undefined => (typeof v === "number" ? v : undefined);
const strings = (v: unknown): string[] =>
  Array.isArray(v) ? v.filter((x): x is string => typeof x === "string") : [];

/**
 * The library error a wire error describes, of the class its code has. A code this client does
 * not know (a newer server) becomes `SERVER_UNAVAILABLE` naming it.
 */
export function errorFromWire(wire: WireError, where: { endpoint: string; httpStatus?: number }): Error {
  const code = wire.code;
  const message = typeof wire.message === "string" ? wire.message : `error ${code}`;
  const outcome = () => outcomeFromWire(wire.outcome as WireOutcome);
  switch (code) {
    case "ABORTED":
      return new AbortError(message);
    case "REGISTRY_AUTH":
    case "REGISTRY_UNREACHABLE":
    case "REGISTRY_ERROR":
    case "MANIFEST_UNKNOWN":
      return new RegistryError(code, message, {
        registry: str(wire.registry) ?? "",
        httpStatus: num(wire.httpStatus),
      });
    case "PLATFORM_NOT_FOUND":
      return new PlatformNotFoundError(message, {
        platform: str(wire.platform) ?? "",
        available: strings(wire.available),
      });
    case "DIGEST_MISMATCH":
      return new DigestMismatchError(message, {
        digest: str(wire.digest) ?? "",
        actualDigest: str(wire.actualDigest) ?? "",
      });
    case "UNSAFE_LAYER":
    case "CORRUPT_LAYER":
      return new LayerError(code, message, { layer: str(wire.layer) ?? "", entry: str(wire.entry) });
    case "VMM_FAILED":
    case "VM_BOOT_TIMEOUT":
    case "VM_EXITED":
    case "VM_STOPPED":
    case "AGENT_PROTOCOL":
    case "AGENT_VERSION":
      return new VmError(code, message, {
        consoleLogPath: str(wire.consoleLogPath),
        qemuExitCode: num(wire.qemuExitCode),
      });
    case "AGENT_TIMEOUT":
      return new AgentTimeoutError(message, {
        operation: str(wire.operation) ?? "",
        timeoutMs: num(wire.timeoutMs) ?? 0,
      });
    case "EXEC_NOT_FOUND":
    case "EXEC_START":
      return new ExecStartError(code, message, { argv: strings(wire.argv), errno: num(wire.errno) });
    case "EXEC_FAILED":
      return new ExecError(message, { outcome: outcome(), argv: strings(wire.argv) });
    case "EXEC_TIMEOUT":
      return new ExecTimeoutError(message, {
        outcome: outcome(),
        timeoutMs: num(wire.timeoutMs) ?? 0,
        argv: strings(wire.argv),
      });
    case "OUTPUT_LIMIT":
      return new OutputLimitError(message, { maxBufferBytes: num(wire.maxBufferBytes) ?? 0 });
    case "SNAPSHOT_INCOMPATIBLE":
    case "SNAPSHOT_CORRUPT":
      return new SnapshotError(code, message, { snapshotDir: str(wire.snapshotDir) ?? "" });
    case "POOL_TIMEOUT":
      return new PoolTimeoutError(message, { timeoutMs: num(wire.timeoutMs) ?? 0 });
    case "UNAUTHORIZED":
    case "NOT_FOUND":
    case "LIMIT_EXCEEDED":
    case "SERVER_UNAVAILABLE":
      return new RemoteError(code, message, where);
  }
  if (code === "GUEST_IO" || code in GUEST_ERRNOS) {
    return new GuestIoError(message, {
      path: str(wire.path) ?? "",
      errno: num(wire.errno),
      code: code as GuestErrnoCode | "GUEST_IO",
      syscall: str(wire.syscall),
      dest: str(wire.dest),
      address: str(wire.address),
      port: num(wire.port),
    });
  }
  if ((ERROR_CODES as readonly string[]).includes(code)) {
    return new SupermachineError(code as ErrorCode, message);
  }
  return new RemoteError(
    "SERVER_UNAVAILABLE",
    `${where.endpoint} answered with an error code this client does not know (${JSON.stringify(code)}: ${message}): update the client to the server's version`,
    where,
  );
}
