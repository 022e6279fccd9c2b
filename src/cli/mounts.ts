/**
 * Host directories in the VM (`run -v` and `run --mount`), docker's syntax, as the library's
 * `MountSpec`s (docs/mounts.md):
 *
 * - `-v HOST:GUEST[:ro|rw]`
 * - `--mount type=bind,src=HOST,dst=GUEST[,readonly][,symlinks=opaque|deny|follow][,uid=N,gid=N]`
 *   (also `source`, `destination`/`target`, `ro`, `readonly=true|false`)
 *
 * HOST is absolute, or relative to the working directory when it starts with `.` (`./data`,
 * `../x`, `.`), as docker's `-v` takes it; a bare name would be a docker named volume, which
 * supermachine does not have. It must be an existing directory (docker's `-v` would create it).
 */
import { stat } from "node:fs/promises";
import { isAbsolute, resolve } from "node:path";
import type { MountSpec, SymlinkPolicy } from "../index.ts";
import { UsageError } from "./cli.ts";

/** A mount as asked on the command line: the spec, and how it was given (for messages). */
export interface MountFlag {
  readonly spec: MountSpec;
  /** `-v …` or `--mount …`, as typed. */
  readonly given: string;
}

const POLICIES: readonly SymlinkPolicy[] = ["opaque", "deny", "follow"];

/** Parses `-v HOST:GUEST[:OPTIONS]`. */
export function parseVolume(value: string, cwd = process.cwd()): MountFlag {
  const given = `-v ${value}`;
  const fail = (why: string) => new UsageError(`${given}: ${why}; expected -v HOST_DIR:GUEST_DIR[:ro]`);
  const parts = value.split(":");
  if (parts.length < 2 || parts.length > 3) throw fail("give a host and a guest directory");
  const [host, guest, options = ""] = parts as [string, string, string?];
  let readOnly = false;
  for (const option of options === "" ? [] : options.split(",")) {
    if (option === "ro" || option === "readonly") readOnly = true;
    else if (option === "rw") readOnly = false;
    else throw fail(`unsupported option ${JSON.stringify(option)} (ro or rw)`);
  }
  return {
    spec: { hostPath: hostDir(host, given, cwd), guestPath: guestDir(guest, given), readOnly },
    given,
  };
}

/** Parses `--mount type=bind,src=…,dst=…[,readonly][,symlinks=…][,uid=N,gid=N]`. */
export function parseMount(value: string, cwd = process.cwd()): MountFlag {
  const given = `--mount ${value}`;
  const fail = (why: string) =>
    new UsageError(`${given}: ${why}; expected --mount type=bind,src=HOST_DIR,dst=GUEST_DIR[,readonly]`);
  let host: string | undefined;
  let guest: string | undefined;
  let readOnly = false;
  let symlinks: SymlinkPolicy | undefined;
  let uid: number | undefined;
  let gid: number | undefined;
  for (const field of value.split(",")) {
    const eq = field.indexOf("=");
    const key = eq === -1 ? field : field.slice(0, eq);
    const val = eq === -1 ? undefined : field.slice(eq + 1);
    const needValue = () => {
      if (val === undefined || val === "") throw fail(`${key} needs a value`);
      return val;
    };
    switch (key) {
      case "type":
        if (needValue() !== "bind") throw fail(`only type=bind is supported, not ${JSON.stringify(val)}`);
        break;
      case "src":
      case "source":
        host = needValue();
        break;
      case "dst":
      case "destination":
      case "target":
        guest = needValue();
        break;
      case "ro":
      case "readonly":
        if (val === undefined || val === "true" || val === "1") readOnly = true;
        else if (val === "false" || val === "0") readOnly = false;
        else throw fail(`${key}=${val}: use true or false`);
        break;
      case "symlinks":
        if (!(POLICIES as readonly string[]).includes(needValue()))
          throw fail(`symlinks=${val}: use ${POLICIES.join(", ")}`);
        symlinks = val as SymlinkPolicy;
        break;
      case "uid":
        uid = id(needValue(), key, fail);
        break;
      case "gid":
        gid = id(needValue(), key, fail);
        break;
      default:
        throw fail(`unknown field ${JSON.stringify(key)}`);
    }
  }
  if (host === undefined) throw fail("src is missing");
  if (guest === undefined) throw fail("dst is missing");
  if ((uid === undefined) !== (gid === undefined)) throw fail("give uid and gid together");
  return {
    spec: {
      hostPath: hostDir(host, given, cwd),
      guestPath: guestDir(guest, given),
      readOnly,
      ...(symlinks === undefined ? {} : { symlinks }),
      ...(uid === undefined || gid === undefined ? {} : { owner: { uid, gid } }),
    },
    given,
  };
}

function id(text: string, key: string, fail: (why: string) => UsageError): number {
  const n = Number(text);
  if (!/^\d{1,10}$/.test(text) || n >= 0xffff_ffff) throw fail(`${key}=${text} is not a numeric id`);
  return n;
}

function hostDir(path: string, given: string, cwd: string): string {
  if (path === "") throw new UsageError(`${given}: the host directory is empty`);
  if (isAbsolute(path)) return path;
  if (path === "." || path === ".." || path.startsWith("./") || path.startsWith("../"))
    return resolve(cwd, path);
  throw new UsageError(
    `${given}: ${JSON.stringify(path)} would be a named volume, which supermachine does not have: give an absolute host directory, or ./${path}`,
  );
}

function guestDir(path: string, given: string): string {
  if (!path.startsWith("/") || path === "/")
    throw new UsageError(
      `${given}: the guest directory must be an absolute path below /, not ${JSON.stringify(path)}`,
    );
  return path;
}

/**
 * Checks what can be checked before a VM starts: each host directory exists, and, when this
 * process is root, a writable mount of a directory owned by root (uid or gid 0) says who owns
 * what the guest creates there (the library refuses it otherwise; docs/mounts.md).
 */
export async function checkMounts(mounts: readonly MountFlag[]): Promise<void> {
  const root = process.geteuid?.() === 0;
  for (const { spec, given } of mounts) {
    const info = await stat(spec.hostPath).catch(() => undefined);
    if (!info?.isDirectory())
      throw new UsageError(`${given}: ${spec.hostPath} is not a directory (create it first)`);
    if (root && !spec.readOnly && spec.owner === undefined && (info.uid === 0 || info.gid === 0))
      throw new UsageError(
        `${given}: ${spec.hostPath} belongs to root; say who owns what the guest creates in it: --mount type=bind,src=${spec.hostPath},dst=${spec.guestPath},uid=N,gid=N (uid=0,gid=0 for root), or mount it read-only`,
      );
  }
}

/** The specs in docker's order: a parent directory before what is mounted inside it. */
export function mountOrder(mounts: readonly MountFlag[]): MountSpec[] {
  const depth = (path: string) => path.split("/").filter(Boolean).length;
  return mounts.map((m) => m.spec).sort((a, b) => depth(a.guestPath) - depth(b.guestPath));
}
