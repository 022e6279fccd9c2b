/**
 * Typed errors. Every error the library throws is a {@link SupermachineError} with a `code` from the
 * closed {@link ErrorCode} union; structured fields carry the details (never parse messages).
 * The table of codes lives in docs/errors.md.
 */

export const ERROR_CODES = [
  // Caller mistakes
  "INVALID_ARGUMENT",
  "INVALID_REFERENCE",
  "ABORTED",
  // Host environment
  "QEMU_NOT_FOUND",
  "ASSET_MISSING",
  "HOST_UNSUPPORTED",
  // Registry and image store
  "REGISTRY_AUTH",
  "REGISTRY_UNREACHABLE",
  "REGISTRY_ERROR",
  "MANIFEST_UNKNOWN",
  "PLATFORM_NOT_FOUND",
  "DIGEST_MISMATCH",
  "UNSUPPORTED_MEDIA_TYPE",
  "IMAGE_NOT_FOUND",
  "STORE_ERROR",
  // Root filesystem
  "UNSAFE_LAYER",
  "CORRUPT_LAYER",
  "ROOTFS_BUILD",
  // VMM and guest
  "VMM_FAILED",
  "VM_BOOT_TIMEOUT",
  "VM_EXITED",
  "VM_STOPPED",
  "AGENT_PROTOCOL",
  "AGENT_VERSION",
  "AGENT_TIMEOUT",
  // Exec and files
  "EXEC_NOT_FOUND",
  "EXEC_START",
  "EXEC_FAILED",
  "EXEC_TIMEOUT",
  "OUTPUT_LIMIT",
  "GUEST_IO",
  // Snapshots and pools
  "SNAPSHOT_INCOMPATIBLE",
  "SNAPSHOT_CORRUPT",
  "POOL_TIMEOUT",
  "POOL_CLOSED",
  // A supermachine server (`supermachine serve`) and its client
  "UNAUTHORIZED",
  "NOT_FOUND",
  "LIMIT_EXCEEDED",
  "SERVER_UNAVAILABLE",
] as const;

/**
 * Linux errno values by name (x86-64 and arm64 share them), for guest system calls that failed:
 * a {@link GuestIoError} from a file-system operation or a TCP tunnel carries the name as its
 * `code`, like Node's own `fs` and `net` errors (`ENOENT`, `ECONNREFUSED`).
 */
export const GUEST_ERRNOS = {
  EPERM: 1,
  ENOENT: 2,
  ESRCH: 3,
  EINTR: 4,
  EIO: 5,
  ENXIO: 6,
  E2BIG: 7,
  ENOEXEC: 8,
  EBADF: 9,
  EAGAIN: 11,
  ENOMEM: 12,
  EACCES: 13,
  EFAULT: 14,
  EBUSY: 16,
  EEXIST: 17,
  EXDEV: 18,
  ENODEV: 19,
  ENOTDIR: 20,
  EISDIR: 21,
  EINVAL: 22,
  ENFILE: 23,
  EMFILE: 24,
  ETXTBSY: 26,
  EFBIG: 27,
  ENOSPC: 28,
  ESPIPE: 29,
  EROFS: 30,
  EMLINK: 31,
  EPIPE: 32,
  ERANGE: 34,
  ENAMETOOLONG: 36,
  ENOSYS: 38,
  ENOTEMPTY: 39,
  ELOOP: 40,
  EOVERFLOW: 75,
  EOPNOTSUPP: 95,
  EAFNOSUPPORT: 97,
  EADDRINUSE: 98,
  EADDRNOTAVAIL: 99,
  ENETDOWN: 100,
  ENETUNREACH: 101,
  ECONNABORTED: 103,
  ECONNRESET: 104,
  ENOTCONN: 107,
  ETIMEDOUT: 110,
  ECONNREFUSED: 111,
  EHOSTUNREACH: 113,
  EDQUOT: 122,
} as const;

export type GuestErrnoCode = keyof typeof GUEST_ERRNOS;

const ERRNO_NAMES = new Map<number, GuestErrnoCode>(
  (Object.entries(GUEST_ERRNOS) as [GuestErrnoCode, number][]).map(([name, n]) => [n, name]),
);

/** The name of a Linux errno value (`2` → `"ENOENT"`), or `undefined` for one not listed. */
export function guestErrnoCode(errno: number | undefined): GuestErrnoCode | undefined {
  return errno === undefined ? undefined : ERRNO_NAMES.get(errno);
}

export type ErrorCode = (typeof ERROR_CODES)[number] | GuestErrnoCode;

const BRAND = Symbol.for("supermachine.error");

/** Base class of every error supermachine throws. */
export class SupermachineError extends Error {
  readonly code: ErrorCode;

  constructor(code: ErrorCode, message: string, options?: ErrorOptions) {
    super(message, options);
    this.code = code;
    this.name = new.target.name;
  }

  /**
   * True for errors from any copy of this library (works across duplicated installs); with a
   * `code`, true only for that code, and the error is narrowed to its class
   * (`SupermachineError.is(e, "EXEC_TIMEOUT")` gives an `ExecTimeoutError`).
   */
  static is(value: unknown): value is SupermachineError;
  static is<C extends ErrorCode>(value: unknown, code: C): value is ErrorOfCode<C>;
  static is(value: unknown, code?: ErrorCode): boolean {
    if (typeof value !== "object" || value === null || (value as Record<symbol, unknown>)[BRAND] !== true) {
      return false;
    }
    return code === undefined || (value as SupermachineError).code === code;
  }

  get [BRAND](): true {
    return true;
  }
}

/** A registry answered with an error status or an unusable body. */
export class RegistryError extends SupermachineError {
  readonly httpStatus: number | undefined;
  readonly registry: string;

  constructor(
    code: "REGISTRY_AUTH" | "REGISTRY_UNREACHABLE" | "REGISTRY_ERROR" | "MANIFEST_UNKNOWN",
    message: string,
    fields: { registry: string; httpStatus?: number | undefined },
    options?: ErrorOptions,
  ) {
    super(code, message, options);
    this.registry = fields.registry;
    this.httpStatus = fields.httpStatus;
  }
}

/** Downloaded or stored content does not hash to the digest that names it. */
export class DigestMismatchError extends SupermachineError {
  readonly digest: string;
  readonly actualDigest: string;

  constructor(message: string, fields: { digest: string; actualDigest: string }, options?: ErrorOptions) {
    super("DIGEST_MISMATCH", message, options);
    this.digest = fields.digest;
    this.actualDigest = fields.actualDigest;
  }
}

/** An index has no manifest for the requested platform. */
export class PlatformNotFoundError extends SupermachineError {
  readonly platform: string;
  readonly available: readonly string[];

  constructor(message: string, fields: { platform: string; available: readonly string[] }) {
    super("PLATFORM_NOT_FOUND", message);
    this.platform = fields.platform;
    this.available = fields.available;
  }
}

/** A layer tried something unsafe (escape the root, absurd sizes) or is malformed. */
export class LayerError extends SupermachineError {
  readonly layer: string;
  readonly entry: string | undefined;

  constructor(
    code: "UNSAFE_LAYER" | "CORRUPT_LAYER",
    message: string,
    fields: { layer: string; entry?: string | undefined },
    options?: ErrorOptions,
  ) {
    super(code, message, options);
    this.layer = fields.layer;
    this.entry = fields.entry;
  }
}

/** QEMU failed to start, crashed, or the VM died. Carries the path of the VM's console log. */
export class VmError extends SupermachineError {
  readonly consoleLogPath: string | undefined;
  readonly qemuExitCode: number | undefined;

  constructor(
    code: "VMM_FAILED" | "VM_BOOT_TIMEOUT" | "VM_EXITED" | "VM_STOPPED" | "AGENT_PROTOCOL" | "AGENT_VERSION",
    message: string,
    fields: { consoleLogPath?: string | undefined; qemuExitCode?: number | undefined } = {},
    options?: ErrorOptions,
  ) {
    super(code, message, options);
    this.consoleLogPath = fields.consoleLogPath;
    this.qemuExitCode = fields.qemuExitCode;
  }
}

/**
 * The result of one exec, the same shape for success and failure (`ExecError` and
 * `ExecTimeoutError` carry it as `outcome`). Output is kept as bytes; `stdoutText`/`stderrText`
 * decode the whole of it as UTF-8 once (invalid sequences become U+FFFD).
 */
export interface ExecOutcome {
  /** The argv of the first step. */
  readonly argv: readonly string[];
  /** Exit status of the last step run; `null` if it was killed by a signal. */
  readonly exitCode: number | null;
  /** Name of the signal that killed it (e.g. `"SIGKILL"`), or `null`. */
  readonly signal: string | null;
  /** True if the timeout expired and the process group was killed. */
  readonly timedOut: boolean;
  /** Guest-measured time from the first step's start to the last step's end, in ms. */
  readonly durationMs: number;
  /** Largest resident set size over the steps run, in KiB. */
  readonly peakRssKiB: number;
  /** Collected stdout (empty when the output was consumed through a stream or iterator). */
  readonly stdout: Uint8Array;
  /** Collected stderr (empty on a tty, where it is merged into stdout). */
  readonly stderr: Uint8Array;
  /** Index of the last step run: 0 = `argv`, 1 = the first `chain` step, … */
  readonly step: number;
  /** True when the last step exited 0 without timing out. */
  readonly ok: boolean;
  /** stdout decoded as UTF-8. */
  readonly stdoutText: string;
  /** stderr decoded as UTF-8. */
  readonly stderrText: string;
  /** A short description: `exited with code 3`, `was killed by SIGKILL`, `timed out …`. */
  describe(): string;
}

/** An exec could not start: the binary is missing, the cwd or user does not exist, … */
export class ExecStartError extends SupermachineError {
  readonly argv: readonly string[];
  readonly errno: number | undefined;

  constructor(
    code: "EXEC_NOT_FOUND" | "EXEC_START",
    message: string,
    fields: { argv: readonly string[]; errno?: number | undefined },
  ) {
    super(code, message);
    this.argv = fields.argv;
    this.errno = fields.errno;
  }
}

/** `output()` saw a non-zero exit or a signal. `outcome` is the full result. */
export class ExecError extends SupermachineError {
  readonly outcome: ExecOutcome;
  readonly exitCode: number | null;
  readonly argv: readonly string[];

  constructor(message: string, fields: { outcome: ExecOutcome; argv: readonly string[] }) {
    super("EXEC_FAILED", message);
    this.outcome = fields.outcome;
    this.exitCode = fields.outcome.exitCode;
    this.argv = fields.argv;
  }
}

/** An exec ran past its timeout and was killed (SIGTERM to its process group, then SIGKILL). */
export class ExecTimeoutError extends SupermachineError {
  readonly outcome: ExecOutcome;
  readonly timeoutMs: number;
  readonly argv: readonly string[];

  constructor(message: string, fields: { outcome: ExecOutcome; timeoutMs: number; argv: readonly string[] }) {
    super("EXEC_TIMEOUT", message);
    this.outcome = fields.outcome;
    this.timeoutMs = fields.timeoutMs;
    this.argv = fields.argv;
  }
}

/** Output exceeded `maxBufferBytes`. The process was killed. */
export class OutputLimitError extends SupermachineError {
  readonly maxBufferBytes: number;

  constructor(message: string, fields: { maxBufferBytes: number }) {
    super("OUTPUT_LIMIT", message);
    this.maxBufferBytes = fields.maxBufferBytes;
  }
}

/**
 * An operation in the guest failed. `code` is `GUEST_IO` for file transfers (`writeFile`,
 * `readFile`, staged files); file-system operations, watches and TCP tunnels use the errno's name
 * instead (`ENOENT`, `EEXIST`, `ECONNREFUSED`, …, or `GUEST_IO` when the guest gave none we know),
 * with `syscall` and the paths or address involved, like Node's `fs` and `net` errors. `errno` is
 * the guest's positive Linux errno value.
 */
export class GuestIoError extends SupermachineError {
  readonly path: string;
  readonly errno: number | undefined;
  /** The operation that failed, Node-style: `stat`, `mkdir`, `rm`, `scandir`, `connect`, `read`, ... */
  readonly syscall: string | undefined;
  /** The second path of `rename` (the new name) and `symlink` (the target). */
  readonly dest: string | undefined;
  /** The guest address and port of a TCP tunnel. */
  readonly address: string | undefined;
  readonly port: number | undefined;

  constructor(
    message: string,
    fields: {
      path: string;
      errno?: number | undefined;
      /** An errno name; default `GUEST_IO`. */
      code?: GuestErrnoCode | "GUEST_IO" | undefined;
      syscall?: string | undefined;
      dest?: string | undefined;
      address?: string | undefined;
      port?: number | undefined;
    },
  ) {
    super(fields.code ?? "GUEST_IO", message);
    this.path = fields.path;
    this.errno = fields.errno;
    this.syscall = fields.syscall;
    this.dest = fields.dest;
    this.address = fields.address;
    this.port = fields.port;
  }
}

/** An operation waited on the guest agent longer than its deadline (`timeoutMs`). */
export class AgentTimeoutError extends SupermachineError {
  /** What was waited for, e.g. `ping`, `readFile /etc/hosts`, `connectTcp 127.0.0.1:8080`. */
  readonly operation: string;
  readonly timeoutMs: number;

  constructor(message: string, fields: { operation: string; timeoutMs: number }) {
    super("AGENT_TIMEOUT", message);
    this.operation = fields.operation;
    this.timeoutMs = fields.timeoutMs;
  }
}

/** A snapshot cannot be used on this host, or is damaged. */
export class SnapshotError extends SupermachineError {
  readonly snapshotDir: string;

  constructor(
    code: "SNAPSHOT_INCOMPATIBLE" | "SNAPSHOT_CORRUPT",
    message: string,
    fields: { snapshotDir: string },
    options?: ErrorOptions,
  ) {
    super(code, message, options);
    this.snapshotDir = fields.snapshotDir;
  }
}

/** `pool.acquire()` waited longer than `acquireTimeoutMs`. */
export class PoolTimeoutError extends SupermachineError {
  readonly timeoutMs: number;

  constructor(message: string, fields: { timeoutMs: number }) {
    super("POOL_TIMEOUT", message);
    this.timeoutMs = fields.timeoutMs;
  }
}

/**
 * A supermachine server refused a request or could not be reached: `UNAUTHORIZED` (no or a wrong
 * token), `NOT_FOUND` (an unknown route, VM, pool or snapshot), `LIMIT_EXCEEDED` (a bound of the
 * server: VMs, streams, body size), `SERVER_UNAVAILABLE` (unreachable, draining, or the
 * connection broke mid-call). `endpoint` is the server's URL as the client knows it.
 */
export class RemoteError extends SupermachineError {
  readonly endpoint: string | undefined;
  readonly httpStatus: number | undefined;

  constructor(
    code: "UNAUTHORIZED" | "NOT_FOUND" | "LIMIT_EXCEEDED" | "SERVER_UNAVAILABLE",
    message: string,
    fields: { endpoint?: string | undefined; httpStatus?: number | undefined } = {},
    options?: ErrorOptions,
  ) {
    super(code, message, options);
    this.endpoint = fields.endpoint;
    this.httpStatus = fields.httpStatus;
  }
}

/** The operation was cancelled through its `AbortSignal`. */
export class AbortError extends SupermachineError {
  constructor(message = "operation aborted", options?: ErrorOptions) {
    super("ABORTED", message, options);
  }
}

/** The class of the errors with code `C` (what {@link SupermachineError.is} narrows to). */
export type ErrorOfCode<C extends ErrorCode> = C extends keyof ErrorClasses
  ? ErrorClasses[C]
  : SupermachineError;

/** Codes whose errors have a class of their own (the rest are plain {@link SupermachineError}s). */
export interface ErrorClasses {
  ABORTED: AbortError;
  REGISTRY_AUTH: RegistryError;
  REGISTRY_UNREACHABLE: RegistryError;
  REGISTRY_ERROR: RegistryError;
  MANIFEST_UNKNOWN: RegistryError;
  PLATFORM_NOT_FOUND: PlatformNotFoundError;
  DIGEST_MISMATCH: DigestMismatchError;
  UNSAFE_LAYER: LayerError;
  CORRUPT_LAYER: LayerError;
  VMM_FAILED: VmError;
  VM_BOOT_TIMEOUT: VmError;
  VM_EXITED: VmError;
  VM_STOPPED: VmError;
  AGENT_PROTOCOL: VmError;
  AGENT_VERSION: VmError;
  AGENT_TIMEOUT: AgentTimeoutError;
  EXEC_NOT_FOUND: ExecStartError;
  EXEC_START: ExecStartError;
  EXEC_FAILED: ExecError;
  EXEC_TIMEOUT: ExecTimeoutError;
  OUTPUT_LIMIT: OutputLimitError;
  GUEST_IO: GuestIoError;
  SNAPSHOT_INCOMPATIBLE: SnapshotError;
  SNAPSHOT_CORRUPT: SnapshotError;
  POOL_TIMEOUT: PoolTimeoutError;
  UNAUTHORIZED: RemoteError;
  NOT_FOUND: RemoteError;
  LIMIT_EXCEEDED: RemoteError;
  SERVER_UNAVAILABLE: RemoteError;
}
