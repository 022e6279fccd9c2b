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
] as const;

export type ErrorCode = (typeof ERROR_CODES)[number];

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

/** A file operation in the guest failed (`writeFile`, `readFile`, staged files). */
export class GuestIoError extends SupermachineError {
  readonly path: string;
  readonly errno: number | undefined;

  constructor(message: string, fields: { path: string; errno?: number | undefined }) {
    super("GUEST_IO", message);
    this.path = fields.path;
    this.errno = fields.errno;
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
  EXEC_NOT_FOUND: ExecStartError;
  EXEC_START: ExecStartError;
  EXEC_FAILED: ExecError;
  EXEC_TIMEOUT: ExecTimeoutError;
  OUTPUT_LIMIT: OutputLimitError;
  GUEST_IO: GuestIoError;
  SNAPSHOT_INCOMPATIBLE: SnapshotError;
  SNAPSHOT_CORRUPT: SnapshotError;
  POOL_TIMEOUT: PoolTimeoutError;
}
