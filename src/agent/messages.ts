/**
 * Typed payloads of every message in docs/protocol.md. `encodeX` builds a payload (canonical
 * field order), `decodeX` parses and validates one (`AGENT_PROTOCOL` on malformed input). Both
 * directions are implemented so tests can play either side.
 */

import { SupermachineError } from "../errors.ts";
import { FieldReader, FieldWriter } from "./fields.ts";
import { MAX_PAYLOAD } from "./frame-codec.ts";
import { protocolError } from "./protocol-error.ts";

/** The protocol version this host speaks. */
export const PROTOCOL_VERSION = 2;
/** Default initial credit for exec output, read-file data and stdin (bytes). */
export const DEFAULT_WINDOW = 262_144;
/** Largest `PING`/`PONG` payload. */
export const MAX_PING_BYTES = 64;
/** Largest `ERROR` message text in bytes. */
export const MAX_ERROR_MESSAGE_BYTES = 4096;
/** Default delay between `SIGTERM` and `SIGKILL` on an exec timeout. */
export const DEFAULT_GRACE_MS = 2000;
/** Longest path the agent returns (`OK.path`, `WATCH_EVENT.name`): PATH_MAX - 1. */
export const MAX_GUEST_PATH_BYTES = 4095;
/** Longest directory entry name (NAME_MAX). */
export const MAX_NAME_BYTES = 255;
/** Bounds of `HELLO` entropy. */
export const MIN_ENTROPY_BYTES = 32;
export const MAX_ENTROPY_BYTES = 512;

/** `ERROR` codes. */
export const AgentErrorCode = {
  UNSUPPORTED: 1,
  BAD_REQUEST: 2,
  NOT_FOUND: 3,
  START_FAILED: 4,
  IO: 5,
  VERSION: 6,
  BAD_FRAME: 7,
} as const;

export type AgentErrorCodeName = keyof typeof AgentErrorCode;

const ERROR_CODE_NAMES = new Map<number, AgentErrorCodeName>(
  (Object.entries(AgentErrorCode) as [AgentErrorCodeName, number][]).map(([k, v]) => [v, k]),
);

/** `"NOT_FOUND"` for a known code, `"code 42"` otherwise. */
export function agentErrorCodeName(code: number): string {
  return ERROR_CODE_NAMES.get(code) ?? `code ${code}`;
}

function invalid(message: string): SupermachineError {
  return new SupermachineError("INVALID_ARGUMENT", message);
}

// ---------------------------------------------------------------------------------------------
// HELLO

export interface HostHello {
  version: number;
  epoch: bigint;
  timeNs?: bigint | undefined;
  entropy?: Uint8Array | undefined;
  /** The VM's `/etc/machine-id`: 32 lowercase hex digits. */
  machineId?: string | undefined;
  /** The VM's hostname (also in `/etc/hostname` and `/etc/hosts`). */
  hostname?: string | undefined;
}

/** A machine id as systemd writes it: 32 lowercase hex digits. */
export const MACHINE_ID_PATTERN = /^[0-9a-f]{32}$/;
/** A hostname the agent accepts: 1–64 letters, digits, `-` and `.`, not starting with `-` or `.`. */
export const HOSTNAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9.-]{0,63}$/;

export function encodeHostHello(m: HostHello): Uint8Array {
  if (m.entropy && (m.entropy.length < MIN_ENTROPY_BYTES || m.entropy.length > MAX_ENTROPY_BYTES)) {
    throw invalid(
      `HELLO entropy must be ${MIN_ENTROPY_BYTES}–${MAX_ENTROPY_BYTES} bytes, got ${m.entropy.length}`,
    );
  }
  if (m.machineId !== undefined && !MACHINE_ID_PATTERN.test(m.machineId)) {
    throw invalid(`HELLO machineId must be 32 lowercase hex digits, got ${JSON.stringify(m.machineId)}`);
  }
  if (m.hostname !== undefined && !HOSTNAME_PATTERN.test(m.hostname)) {
    throw invalid(
      `hostname must be 1–64 letters, digits, "-" and ".", not starting with "-" or ".", got ${JSON.stringify(m.hostname)}`,
    );
  }
  return new FieldWriter()
    .u32(1, m.version)
    .u64(2, m.epoch)
    .u64(3, m.timeNs)
    .bytes(4, m.entropy)
    .string(7, m.machineId)
    .string(8, m.hostname)
    .finish();
}

export function decodeHostHello(payload: Uint8Array): HostHello {
  const r = FieldReader.decode(payload, "HELLO");
  const entropy = r.bytes(4, "entropy");
  if (entropy && (entropy.length < MIN_ENTROPY_BYTES || entropy.length > MAX_ENTROPY_BYTES)) {
    throw protocolError(
      `HELLO.entropy: ${entropy.length} bytes, expected ${MIN_ENTROPY_BYTES}–${MAX_ENTROPY_BYTES}`,
    );
  }
  const machineId = r.string(7, "machineId", 32);
  if (machineId !== undefined && !MACHINE_ID_PATTERN.test(machineId)) {
    throw protocolError("HELLO.machineId: expected 32 lowercase hex digits");
  }
  const hostname = r.string(8, "hostname", 64);
  if (hostname !== undefined && !HOSTNAME_PATTERN.test(hostname)) {
    throw protocolError(`HELLO.hostname: ${JSON.stringify(hostname)} is not a hostname`);
  }
  return {
    version: r.need(r.u32(1, "version"), "version"),
    epoch: r.need(r.u64(2, "epoch"), "epoch"),
    timeNs: r.u64(3, "timeNs"),
    entropy,
    machineId,
    hostname,
  };
}

export interface GuestHello {
  version: number;
  epoch: bigint;
  agent: string;
  bootNs: bigint;
}

export function encodeGuestHello(m: GuestHello): Uint8Array {
  return new FieldWriter().u32(1, m.version).u64(2, m.epoch).string(5, m.agent).u64(6, m.bootNs).finish();
}

export function decodeGuestHello(payload: Uint8Array): GuestHello {
  const r = FieldReader.decode(payload, "HELLO");
  return {
    version: r.need(r.u32(1, "version"), "version"),
    epoch: r.need(r.u64(2, "epoch"), "epoch"),
    agent: r.string(5, "agent", 256) ?? "",
    bootNs: r.u64(6, "bootNs") ?? 0n,
  };
}

// ---------------------------------------------------------------------------------------------
// PING / PONG (raw)

export function checkPingPayload(payload: Uint8Array, name: "PING" | "PONG"): Uint8Array {
  if (payload.length > MAX_PING_BYTES) {
    throw protocolError(`${name} payload of ${payload.length} bytes exceeds ${MAX_PING_BYTES}`);
  }
  return payload;
}

// ---------------------------------------------------------------------------------------------
// ERROR

export interface AgentErrorMessage {
  code: number;
  errno?: number | undefined;
  message?: string | undefined;
}

export function encodeError(m: AgentErrorMessage): Uint8Array {
  if (m.message !== undefined && Buffer.byteLength(m.message) > MAX_ERROR_MESSAGE_BYTES) {
    throw invalid(`ERROR message longer than ${MAX_ERROR_MESSAGE_BYTES} bytes`);
  }
  return new FieldWriter().u32(1, m.code).u32(2, m.errno).string(3, m.message).finish();
}

export function decodeError(payload: Uint8Array): AgentErrorMessage {
  const r = FieldReader.decode(payload, "ERROR");
  return {
    code: r.need(r.u32(1, "code"), "code"),
    errno: r.u32(2, "errno"),
    message: r.string(3, "message", MAX_ERROR_MESSAGE_BYTES),
  };
}

// ---------------------------------------------------------------------------------------------
// EXEC

export interface StageSpec {
  path: string;
  /** Permission bits, default 0644. */
  mode?: number | undefined;
  size: number;
}

export interface ExecMessage {
  argv: readonly string[];
  env: readonly string[];
  cwd?: string | undefined;
  user?: string | undefined;
  tty?: boolean | undefined;
  rows?: number | undefined;
  cols?: number | undefined;
  timeoutMs?: number | undefined;
  graceMs?: number | undefined;
  chain?: readonly (readonly string[])[] | undefined;
  stdin?: boolean | undefined;
  window?: number | undefined;
  stage?: readonly StageSpec[] | undefined;
}

export function encodeExec(m: ExecMessage): Uint8Array {
  if (m.argv.length === 0) throw invalid("argv must have at least one entry");
  for (const step of m.chain ?? []) {
    if (step.length === 0) throw invalid("every chained step needs at least one argv entry");
  }
  const w = new FieldWriter()
    .strings(1, m.argv)
    .strings(2, m.env)
    .string(3, m.cwd)
    .string(4, m.user)
    .bool(5, m.tty)
    .u16(6, m.rows)
    .u16(7, m.cols)
    .u32(8, m.timeoutMs)
    .u32(9, m.graceMs);
  for (const step of m.chain ?? []) w.nested(10, new FieldWriter().strings(1, step));
  w.bool(11, m.stdin).u32(12, m.window);
  for (const s of m.stage ?? []) {
    w.nested(13, new FieldWriter().string(1, s.path).u32(2, s.mode).u64(3, s.size));
  }
  return w.finish();
}

export function decodeExec(payload: Uint8Array): ExecMessage {
  const r = FieldReader.decode(payload, "EXEC");
  const argv = r.strings(1, "argv");
  if (argv.length === 0) throw protocolError("EXEC: required field argv is missing");
  const chain = r.nestedList(10, "chain").map((c) => {
    const step = c.strings(1, "argv");
    if (step.length === 0) throw protocolError("EXEC.chain: required field argv is missing");
    return step;
  });
  const stage = r.nestedList(13, "stage").map((s) => ({
    path: s.need(s.string(1, "path"), "path"),
    mode: s.u32(2, "mode"),
    size: s.need(s.u64Number(3, "size"), "size"),
  }));
  return {
    argv,
    env: r.strings(2, "env"),
    cwd: r.string(3, "cwd"),
    user: r.string(4, "user"),
    tty: r.bool(5, "tty"),
    rows: r.u16(6, "rows"),
    cols: r.u16(7, "cols"),
    timeoutMs: r.u32(8, "timeoutMs"),
    graceMs: r.u32(9, "graceMs"),
    chain,
    stdin: r.bool(11, "stdin"),
    window: r.u32(12, "window"),
    stage,
  };
}

// ---------------------------------------------------------------------------------------------
// WINDOW (raw u32)

export function encodeWindow(increment: number): Uint8Array {
  if (!Number.isInteger(increment) || increment < 0 || increment > 0xffff_ffff) {
    throw invalid(`WINDOW increment ${increment} is not a u32`);
  }
  const out = new Uint8Array(4);
  new DataView(out.buffer).setUint32(0, increment);
  return out;
}

export function decodeWindow(payload: Uint8Array): number {
  if (payload.length !== 4) throw protocolError(`WINDOW payload must be 4 bytes, got ${payload.length}`);
  return new DataView(payload.buffer, payload.byteOffset, 4).getUint32(0);
}

// ---------------------------------------------------------------------------------------------
// RESIZE / SIGNAL

export interface ResizeMessage {
  rows: number;
  cols: number;
}

export function encodeResize(m: ResizeMessage): Uint8Array {
  return new FieldWriter().u16(1, m.rows).u16(2, m.cols).finish();
}

export function decodeResize(payload: Uint8Array): ResizeMessage {
  const r = FieldReader.decode(payload, "RESIZE");
  return { rows: r.need(r.u16(1, "rows"), "rows"), cols: r.need(r.u16(2, "cols"), "cols") };
}

export function encodeSignal(signo: number): Uint8Array {
  return new FieldWriter().u32(1, signo).finish();
}

export function decodeSignal(payload: Uint8Array): number {
  const r = FieldReader.decode(payload, "SIGNAL");
  return r.need(r.u32(1, "signo"), "signo");
}

// ---------------------------------------------------------------------------------------------
// STARTED / EXIT

export function encodeStarted(pid: number): Uint8Array {
  return new FieldWriter().u32(1, pid).finish();
}

export function decodeStarted(payload: Uint8Array): { pid: number } {
  const r = FieldReader.decode(payload, "STARTED");
  return { pid: r.need(r.u32(1, "pid"), "pid") };
}

export interface ExitMessage {
  /** Exit status of the last step run; `undefined` if it was killed by a signal. */
  exitCode?: number | undefined;
  /** Terminating signal number; `undefined` if it exited. */
  signal?: number | undefined;
  timedOut: boolean;
  durationUs: number;
  peakRssKiB: number;
  step: number;
}

export function encodeExit(m: ExitMessage): Uint8Array {
  return new FieldWriter()
    .i32(1, m.exitCode)
    .u32(2, m.signal)
    .bool(3, m.timedOut ? true : undefined)
    .u64(4, m.durationUs)
    .u64(5, m.peakRssKiB)
    .u32(6, m.step)
    .finish();
}

export function decodeExit(payload: Uint8Array): ExitMessage {
  const r = FieldReader.decode(payload, "EXIT");
  const exitCode = r.i32(1, "exitCode");
  const signal = r.u32(2, "signal");
  if ((exitCode === undefined) === (signal === undefined)) {
    throw protocolError("EXIT: exactly one of exitCode and signal must be present");
  }
  return {
    exitCode,
    signal,
    timedOut: r.bool(3, "timedOut") ?? false,
    durationUs: r.u64Number(4, "durationUs") ?? 0,
    peakRssKiB: r.u64Number(5, "peakRssKiB") ?? 0,
    step: r.u32(6, "step") ?? 0,
  };
}

// ---------------------------------------------------------------------------------------------
// Files

export interface WriteFileMessage {
  path: string;
  mode?: number | undefined;
  uid?: number | undefined;
  gid?: number | undefined;
  size: number;
  mkdirs?: boolean | undefined;
}

export function encodeWriteFile(m: WriteFileMessage): Uint8Array {
  return new FieldWriter()
    .string(1, m.path)
    .u32(2, m.mode)
    .u32(3, m.uid)
    .u32(4, m.gid)
    .u64(5, m.size)
    .bool(6, m.mkdirs)
    .finish();
}

export function decodeWriteFile(payload: Uint8Array): WriteFileMessage {
  const r = FieldReader.decode(payload, "WRITE_FILE");
  return {
    path: r.need(r.string(1, "path"), "path"),
    mode: r.u32(2, "mode"),
    uid: r.u32(3, "uid"),
    gid: r.u32(4, "gid"),
    size: r.need(r.u64Number(5, "size"), "size"),
    mkdirs: r.bool(6, "mkdirs"),
  };
}

export interface ReadFileMessage {
  path: string;
  window?: number | undefined;
}

export function encodeReadFile(m: ReadFileMessage): Uint8Array {
  return new FieldWriter().string(1, m.path).u32(2, m.window).finish();
}

export function decodeReadFile(payload: Uint8Array): ReadFileMessage {
  const r = FieldReader.decode(payload, "READ_FILE");
  return { path: r.need(r.string(1, "path"), "path"), window: r.u32(2, "window") };
}

export interface FileInfoMessage {
  size: number;
  /** The full `st_mode` (type and permission bits). */
  mode: number;
  uid: number;
  gid: number;
}

export function encodeFileInfo(m: FileInfoMessage): Uint8Array {
  return new FieldWriter().u64(1, m.size).u32(2, m.mode).u32(3, m.uid).u32(4, m.gid).finish();
}

export function decodeFileInfo(payload: Uint8Array): FileInfoMessage {
  const r = FieldReader.decode(payload, "FILE_INFO");
  return {
    size: r.need(r.u64Number(1, "size"), "size"),
    mode: r.u32(2, "mode") ?? 0,
    uid: r.u32(3, "uid") ?? 0,
    gid: r.u32(4, "gid") ?? 0,
  };
}

// ---------------------------------------------------------------------------------------------
// OK

export interface OkMessage {
  /** Bytes written, for `WRITE_FILE`. */
  size?: number | undefined;
  /** A path: `FS` readlink, realpath, and the first directory a recursive mkdir created. */
  path?: Uint8Array | undefined;
}

export function encodeOk(m: OkMessage = {}): Uint8Array {
  return new FieldWriter().u64(1, m.size).bytes(2, m.path).finish();
}

export function decodeOk(payload: Uint8Array): OkMessage {
  const r = FieldReader.decode(payload, "OK");
  return {
    size: r.u64Number(1, "size"),
    path: guestPath(r.bytes(2, "path"), "OK.path", MAX_GUEST_PATH_BYTES),
  };
}

/** A path or name from the guest: raw bytes (Linux names need not be UTF-8), bounded, no NUL. */
function guestPath(raw: Uint8Array | undefined, what: string, maxBytes: number): Uint8Array | undefined {
  if (raw === undefined) return undefined;
  if (raw.length > maxBytes) throw protocolError(`${what}: ${raw.length} bytes, limit ${maxBytes}`);
  if (raw.includes(0)) throw protocolError(`${what}: contains a NUL byte`);
  return raw;
}

// ---------------------------------------------------------------------------------------------
// The workload

/** `WORKLOAD_STATUS.state`. */
export const WorkloadState = { NONE: 0, RUNNING: 1, EXITED: 2 } as const;

export interface WorkloadStartMessage {
  argv: readonly string[];
  env: readonly string[];
  cwd?: string | undefined;
  user?: string | undefined;
}

export function encodeWorkloadStart(m: WorkloadStartMessage): Uint8Array {
  if (m.argv.length === 0) throw invalid("the workload's argv must have at least one entry");
  return new FieldWriter().strings(1, m.argv).strings(2, m.env).string(3, m.cwd).string(4, m.user).finish();
}

export function decodeWorkloadStart(payload: Uint8Array): WorkloadStartMessage {
  const r = FieldReader.decode(payload, "WORKLOAD_START");
  const argv = r.strings(1, "argv");
  if (argv.length === 0) throw protocolError("WORKLOAD_START: required field argv is missing");
  return { argv, env: r.strings(2, "env"), cwd: r.string(3, "cwd"), user: r.string(4, "user") };
}

/** `WORKLOAD_QUERY` has no fields. */
export function encodeWorkloadQuery(): Uint8Array {
  return new Uint8Array(0);
}

export function decodeWorkloadQuery(payload: Uint8Array): Record<string, never> {
  FieldReader.decode(payload, "WORKLOAD_QUERY");
  return {};
}

export function encodeWorkloadSignal(signo: number): Uint8Array {
  return new FieldWriter().u32(1, signo).finish();
}

export function decodeWorkloadSignal(payload: Uint8Array): number {
  const r = FieldReader.decode(payload, "WORKLOAD_SIGNAL");
  return r.need(r.u32(1, "signo"), "signo");
}

// ---------------------------------------------------------------------------------------------
// FREEZE

export function encodeFreeze(frozen: boolean): Uint8Array {
  return new FieldWriter().u8(1, frozen ? 1 : 0).finish();
}

export function decodeFreeze(payload: Uint8Array): boolean {
  const r = FieldReader.decode(payload, "FREEZE");
  const frozen = r.need(r.u8(1, "frozen"), "frozen");
  if (frozen > 1) throw protocolError(`FREEZE: frozen must be 0 or 1, got ${frozen}`);
  return frozen === 1;
}

export interface WorkloadLogsMessage {
  /** After what the ring holds, send new output until the workload has exited. */
  follow?: boolean | undefined;
  /** Initial credit for the `STDOUT`/`STDERR` frames. */
  window?: number | undefined;
  /** 1 stdout, 2 stderr, 3 (default) both. */
  streams?: number | undefined;
}

export function encodeWorkloadLogs(m: WorkloadLogsMessage): Uint8Array {
  return new FieldWriter().bool(1, m.follow).u32(2, m.window).u8(3, m.streams).finish();
}

export function decodeWorkloadLogs(payload: Uint8Array): WorkloadLogsMessage {
  const r = FieldReader.decode(payload, "WORKLOAD_LOGS");
  return { follow: r.bool(1, "follow"), window: r.u32(2, "window"), streams: r.u8(3, "streams") };
}

export interface WorkloadStatusMessage {
  state: (typeof WorkloadState)[keyof typeof WorkloadState];
  pid?: number | undefined;
  exitCode?: number | undefined;
  signal?: number | undefined;
}

export function encodeWorkloadStatus(m: WorkloadStatusMessage): Uint8Array {
  return new FieldWriter().u8(1, m.state).u32(2, m.pid).i32(3, m.exitCode).u32(4, m.signal).finish();
}

export function decodeWorkloadStatus(payload: Uint8Array): WorkloadStatusMessage {
  const r = FieldReader.decode(payload, "WORKLOAD_STATUS");
  const state = r.need(r.u8(1, "state"), "state");
  const pid = r.u32(2, "pid");
  const exitCode = r.i32(3, "exitCode");
  const signal = r.u32(4, "signal");
  if (state > WorkloadState.EXITED) throw protocolError(`WORKLOAD_STATUS: unknown state ${state}`);
  if ((state === WorkloadState.NONE) !== (pid === undefined)) {
    throw protocolError("WORKLOAD_STATUS: pid must be present exactly when there is a workload");
  }
  const exited = state === WorkloadState.EXITED;
  if (
    exited
      ? (exitCode === undefined) === (signal === undefined)
      : exitCode !== undefined || signal !== undefined
  ) {
    throw protocolError("WORKLOAD_STATUS: exactly one of exitCode and signal, and only once exited");
  }
  return { state: state as WorkloadStatusMessage["state"], pid, exitCode, signal };
}

// ---------------------------------------------------------------------------------------------
// File-system operations

/** `FS.op`. */
export const FsOp = {
  STAT: 1,
  READDIR: 2,
  MKDIR: 3,
  RM: 4,
  RENAME: 5,
  CHMOD: 6,
  CHOWN: 7,
  SYMLINK: 8,
  READLINK: 9,
  REALPATH: 10,
  TRUNCATE: 11,
  UTIMES: 12,
  ACCESS: 13,
} as const;

/** `FS.flags` bits. */
export const FsFlag = { RECURSIVE: 1, FORCE: 2, NO_FOLLOW: 4 } as const;

export interface FsMessage {
  op: number;
  path: string;
  path2?: string | undefined;
  mode?: number | undefined;
  flags?: number | undefined;
  uid?: number | undefined;
  gid?: number | undefined;
  size?: number | undefined;
  atimeNs?: bigint | undefined;
  mtimeNs?: bigint | undefined;
  window?: number | undefined;
}

export function encodeFs(m: FsMessage): Uint8Array {
  return new FieldWriter()
    .u8(1, m.op)
    .string(2, m.path)
    .string(3, m.path2)
    .u32(4, m.mode)
    .u32(5, m.flags)
    .u32(6, m.uid)
    .u32(7, m.gid)
    .u64(8, m.size)
    .u64(9, m.atimeNs)
    .u64(10, m.mtimeNs)
    .u32(11, m.window)
    .finish();
}

export function decodeFs(payload: Uint8Array): FsMessage {
  const r = FieldReader.decode(payload, "FS");
  return {
    op: r.need(r.u8(1, "op"), "op"),
    path: r.need(r.string(2, "path"), "path"),
    path2: r.string(3, "path2"),
    mode: r.u32(4, "mode"),
    flags: r.u32(5, "flags"),
    uid: r.u32(6, "uid"),
    gid: r.u32(7, "gid"),
    size: r.u64Number(8, "size"),
    atimeNs: r.u64(9, "atimeNs"),
    mtimeNs: r.u64(10, "mtimeNs"),
    window: r.u32(11, "window"),
  };
}

export interface StatMessage {
  /** The full `st_mode` (type and permission bits). */
  mode: number;
  uid: number;
  gid: number;
  size: number;
  atimeNs: bigint;
  mtimeNs: bigint;
  ctimeNs: bigint;
  ino: bigint;
  dev: bigint;
  nlink: number;
  rdev: bigint;
  blocks: number;
  blksize: number;
}

export function encodeStat(m: StatMessage): Uint8Array {
  return new FieldWriter()
    .u32(1, m.mode)
    .u32(2, m.uid)
    .u32(3, m.gid)
    .u64(4, m.size)
    .u64(5, m.atimeNs)
    .u64(6, m.mtimeNs)
    .u64(7, m.ctimeNs)
    .u64(8, m.ino)
    .u64(9, m.dev)
    .u64(10, m.nlink)
    .u64(11, m.rdev)
    .u64(12, m.blocks)
    .u32(13, m.blksize)
    .finish();
}

export function decodeStat(payload: Uint8Array): StatMessage {
  const r = FieldReader.decode(payload, "STAT");
  return {
    mode: r.need(r.u32(1, "mode"), "mode"),
    uid: r.u32(2, "uid") ?? 0,
    gid: r.u32(3, "gid") ?? 0,
    size: r.u64Number(4, "size") ?? 0,
    atimeNs: r.u64(5, "atimeNs") ?? 0n,
    mtimeNs: r.u64(6, "mtimeNs") ?? 0n,
    ctimeNs: r.u64(7, "ctimeNs") ?? 0n,
    ino: r.u64(8, "ino") ?? 0n,
    dev: r.u64(9, "dev") ?? 0n,
    nlink: r.u64Number(10, "nlink") ?? 0,
    rdev: r.u64(11, "rdev") ?? 0n,
    blocks: r.u64Number(12, "blocks") ?? 0,
    blksize: r.u32(13, "blksize") ?? 0,
  };
}

/** One directory entry: its name (raw bytes) and type (`d_type`: the `S_IFMT` bits >> 12, 0 unknown). */
export interface DirentMessage {
  name: Uint8Array;
  type: number;
}

export function encodeDirents(entries: readonly DirentMessage[]): Uint8Array {
  const w = new FieldWriter();
  for (const e of entries) w.nested(1, new FieldWriter().bytes(1, e.name).u8(2, e.type));
  return w.finish();
}

export function decodeDirents(payload: Uint8Array): DirentMessage[] {
  const r = FieldReader.decode(payload, "DIRENTS");
  return r.nestedList(1, "entry").map((e) => {
    const name = e.need(guestPath(e.bytes(1, "name"), "DIRENTS.entry.name", MAX_NAME_BYTES), "name");
    if (name.length === 0 || name.includes(0x2f)) {
      throw protocolError("DIRENTS.entry.name: empty or contains a slash");
    }
    return { name, type: e.u8(2, "type") ?? 0 };
  });
}

export interface WatchMessage {
  path: string;
  recursive?: boolean | undefined;
  window?: number | undefined;
}

export function encodeWatch(m: WatchMessage): Uint8Array {
  return new FieldWriter().string(1, m.path).bool(2, m.recursive).u32(3, m.window).finish();
}

export function decodeWatch(payload: Uint8Array): WatchMessage {
  const r = FieldReader.decode(payload, "WATCH");
  return {
    path: r.need(r.string(1, "path"), "path"),
    recursive: r.bool(2, "recursive"),
    window: r.u32(3, "window"),
  };
}

/** `WATCH_EVENT.event`. */
export const WatchEventKind = { READY: 0, CREATE: 1, MODIFY: 2, DELETE: 3, RENAME: 4, OVERFLOW: 5 } as const;

export interface WatchEventMessage {
  event: number;
  /** Path relative to the watched path; empty for the watched path itself. */
  name?: Uint8Array | undefined;
  dir?: boolean | undefined;
}

export function encodeWatchEvent(m: WatchEventMessage): Uint8Array {
  return new FieldWriter().u8(1, m.event).bytes(2, m.name).bool(3, m.dir).finish();
}

export function decodeWatchEvent(payload: Uint8Array): WatchEventMessage {
  const r = FieldReader.decode(payload, "WATCH_EVENT");
  const event = r.need(r.u8(1, "event"), "event");
  if (event > WatchEventKind.OVERFLOW) throw protocolError(`WATCH_EVENT: unknown event ${event}`);
  return {
    event,
    name: guestPath(r.bytes(2, "name"), "WATCH_EVENT.name", MAX_GUEST_PATH_BYTES),
    dir: r.bool(3, "dir"),
  };
}

// ---------------------------------------------------------------------------------------------
// TCP tunnels

export interface TcpConnectMessage {
  port: number;
  /** An IPv4 or IPv6 literal in the guest; default 127.0.0.1. */
  address?: string | undefined;
  /** Initial guest→host credit. */
  window?: number | undefined;
}

export function encodeTcpConnect(m: TcpConnectMessage): Uint8Array {
  if (!Number.isInteger(m.port) || m.port < 1 || m.port > 65535)
    throw invalid(`port ${m.port} is not 1–65535`);
  return new FieldWriter().u16(1, m.port).string(2, m.address).u32(3, m.window).finish();
}

export function decodeTcpConnect(payload: Uint8Array): TcpConnectMessage {
  const r = FieldReader.decode(payload, "TCP_CONNECT");
  return {
    port: r.need(r.u16(1, "port"), "port"),
    address: r.string(2, "address"),
    window: r.u32(3, "window"),
  };
}

/** `TCP_CONNECTED` has no fields. */
export function encodeTcpConnected(): Uint8Array {
  return new Uint8Array(0);
}

export function decodeTcpConnected(payload: Uint8Array): Record<string, never> {
  FieldReader.decode(payload, "TCP_CONNECTED");
  return {};
}

/** Splits `data` into views of at most `MAX_PAYLOAD` bytes (an empty input gives no chunks). */
export function* chunkPayload(data: Uint8Array, max = MAX_PAYLOAD): Generator<Uint8Array> {
  for (let offset = 0; offset < data.length; offset += max) {
    yield data.subarray(offset, Math.min(offset + max, data.length));
  }
}
