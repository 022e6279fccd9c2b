/**
 * Payloads of the mounts channel (docs/protocol.md, "Mounts channel"): the `sm.mounts` port,
 * served in the guest by the mount relay. `HELLO`, `ERROR`, `WINDOW`, `OK` and `RESET` have the
 * agent channel's layouts (messages.ts); `MOUNT`, `MOUNTED`, `MOUNT_DATA` and `UNMOUNT` are its own.
 */

import { SupermachineError } from "../errors.ts";
import { FieldReader, FieldWriter } from "./fields.ts";
import { protocolError } from "./protocol-error.ts";

/** The version of the mounts protocol this host speaks (separate from the agent's). */
export const MOUNT_PROTOCOL_VERSION = 1;
/** Credit the relay gives the host for `MOUNT_DATA` of each new mount, before any `WINDOW`. */
export const MOUNT_WINDOW = 1_048_576;
/** Largest credit the relay accepts from the host for one mount. */
export const MAX_MOUNT_WINDOW = 64 * 1_048_576;
/** Longest guest path of a mount, in bytes (PATH_MAX minus its NUL). */
export const MAX_GUEST_PATH_BYTES = 4095;
/** The guest kernel's 9p cache modes the relay accepts. */
export const MOUNT_CACHE_MODES = ["none", "mmap", "loose"] as const;
export type MountCacheMode = (typeof MOUNT_CACHE_MODES)[number];

export interface MountMessage {
  /** Absolute guest path, created (`mkdir -p`) if missing. */
  path: string;
  /** 9P message size for the guest kernel to ask for (4 KiB–1 MiB). */
  msize?: number | undefined;
  /** Mount read-only in the guest too (the host server refuses writes regardless). */
  readOnly?: boolean | undefined;
  /** Initial credit for guest→host `MOUNT_DATA` bytes. */
  window?: number | undefined;
  /** The guest kernel's 9p `cache=` mode. */
  cache?: MountCacheMode | undefined;
}

function invalid(message: string): SupermachineError {
  return new SupermachineError("INVALID_ARGUMENT", message);
}

/** Throws `INVALID_ARGUMENT` unless `path` is an absolute guest path below `/` without `.` or `..`. */
export function checkGuestPath(path: string): void {
  const parts = path.split("/");
  if (
    !path.startsWith("/") ||
    path === "/" ||
    path.includes("\0") ||
    Buffer.byteLength(path) > MAX_GUEST_PATH_BYTES ||
    parts.some((p) => p === "." || p === "..")
  ) {
    throw invalid(`guest path ${JSON.stringify(path)} must be an absolute path below / without . or ..`);
  }
}

export function encodeMount(m: MountMessage): Uint8Array {
  checkGuestPath(m.path);
  return new FieldWriter()
    .string(1, m.path)
    .u32(2, m.msize)
    .bool(3, m.readOnly)
    .u32(4, m.window)
    .string(5, m.cache)
    .finish();
}

export function decodeMount(payload: Uint8Array): MountMessage {
  const r = FieldReader.decode(payload, "MOUNT");
  const cache = r.string(5, "cache", 16);
  if (cache !== undefined && !(MOUNT_CACHE_MODES as readonly string[]).includes(cache)) {
    throw protocolError(`MOUNT.cache: unknown mode ${JSON.stringify(cache)}`);
  }
  return {
    path: r.need(r.string(1, "path", MAX_GUEST_PATH_BYTES), "path"),
    msize: r.u32(2, "msize"),
    readOnly: r.bool(3, "readOnly"),
    window: r.u32(4, "window"),
    cache: cache as MountCacheMode | undefined,
  };
}

/** `MOUNTED` has no fields yet; unknown ones are skipped. */
export function decodeMounted(payload: Uint8Array): void {
  FieldReader.decode(payload, "MOUNTED");
}

export function encodeMounted(): Uint8Array {
  return new Uint8Array(0);
}
