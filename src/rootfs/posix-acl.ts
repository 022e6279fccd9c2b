/**
 * POSIX.1e ACLs as tar archives carry them and as Linux stores them.
 *
 * - Text (`SCHILY.acl.access` / `SCHILY.acl.default` PAX records of star, GNU tar `--acls` and
 *   libarchive; the body of a Solaris `A` entry): entries `tag:qualifier:perms[:id]` separated by
 *   `,` or newlines. GNU tar writes names (`user:root:r--`), star and libarchive add the numeric
 *   id as a fourth field (`user:root:r--:0`).
 * - The VFS xattr value (`system.posix_acl_access` / `system.posix_acl_default`, version 2: a
 *   4-byte header, then 8-byte entries `u16 tag, u16 perm, u32 id`), what `getfattr` shows and
 *   what GNU tar `--xattrs` stores as `SCHILY.xattr.system.posix_acl_*`. The ext4 writer turns it
 *   into ext4's own compact on-disk format.
 *
 * Setting an access ACL also sets the file's permission bits (owner = `user::`, group = `mask::`
 * or `group::`, other = `other::`), and an access ACL of only those three entries is not stored
 * at all (it is the mode): {@link applyAccessAcl} does what the kernel does.
 */

export const ACL_USER_OBJ = 0x01;
export const ACL_USER = 0x02;
export const ACL_GROUP_OBJ = 0x04;
export const ACL_GROUP = 0x08;
export const ACL_MASK = 0x10;
export const ACL_OTHER = 0x20;
const UNDEFINED_ID = 0xffffffff;

export interface AclEntry {
  tag: number;
  /** r = 4, w = 2, x = 1. */
  perm: number;
  /** Numeric id of a named user / group entry, when the archive gives one. */
  id?: number | undefined;
  /** Name of a named entry without an id (GNU tar writes names only): resolved in the image. */
  name?: string | undefined;
}

export const ACCESS_XATTR = "system.posix_acl_access";
export const DEFAULT_XATTR = "system.posix_acl_default";

const TAGS: Record<string, number> = {
  user: ACL_USER_OBJ,
  u: ACL_USER_OBJ,
  group: ACL_GROUP_OBJ,
  g: ACL_GROUP_OBJ,
  mask: ACL_MASK,
  m: ACL_MASK,
  other: ACL_OTHER,
  o: ACL_OTHER,
};

/**
 * Parses ACL text. Returns undefined when it is malformed (unknown tag, bad permissions, a bad id).
 * Comments (`#…`, as `getfacl` prints) and empty entries are ignored.
 */
export function parseAclText(text: string): AclEntry[] | undefined {
  const out: AclEntry[] = [];
  for (const raw of text.split(/[,\n]/)) {
    const item = raw.replace(/#.*$/, "").trim();
    if (item === "") continue;
    const f = item.split(":");
    let tag = TAGS[f[0]!];
    if (tag === undefined) return undefined;
    let qualifier = "";
    let perms: string;
    let idText: string | undefined;
    if ((tag === ACL_MASK || tag === ACL_OTHER) && f.length === 2) {
      perms = f[1]!; // Solaris style: "mask:rwx"
    } else {
      if (f.length < 3 || f.length > 4) return undefined;
      qualifier = f[1]!;
      perms = f[2]!;
      idText = f[3];
    }
    if (!/^[rwx-]{1,3}$/.test(perms)) return undefined;
    const perm =
      (perms.includes("r") ? 4 : 0) | (perms.includes("w") ? 2 : 0) | (perms.includes("x") ? 1 : 0);
    const entry: AclEntry = { tag, perm };
    if (qualifier !== "" || idText !== undefined) {
      if (tag === ACL_USER_OBJ) tag = ACL_USER;
      else if (tag === ACL_GROUP_OBJ) tag = ACL_GROUP;
      else return undefined; // mask and other take no qualifier
      entry.tag = tag;
      if (idText !== undefined && idText !== "") {
        if (!/^[0-9]{1,10}$/.test(idText) || Number(idText) >= UNDEFINED_ID) return undefined;
        entry.id = Number(idText);
      } else if (/^[0-9]{1,10}$/.test(qualifier) && Number(qualifier) < UNDEFINED_ID) {
        entry.id = Number(qualifier);
      } else if (qualifier !== "") {
        entry.name = qualifier;
      } else {
        return undefined;
      }
    }
    out.push(entry);
  }
  return out;
}

/** Decodes a VFS ACL xattr value. Undefined when malformed. */
export function decodeAclXattr(value: Buffer): AclEntry[] | undefined {
  if (value.length < 4 || (value.length - 4) % 8 !== 0 || value.readUInt32LE(0) !== 2) return undefined;
  const out: AclEntry[] = [];
  for (let off = 4; off < value.length; off += 8) {
    const tag = value.readUInt16LE(off);
    const perm = value.readUInt16LE(off + 2);
    const id = value.readUInt32LE(off + 4);
    if (![ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER].includes(tag) || perm > 7)
      return undefined;
    out.push(tag === ACL_USER || tag === ACL_GROUP ? { tag, perm, id } : { tag, perm });
  }
  return out;
}

/**
 * Sorts and checks entries as the kernel's `posix_acl_valid` does (one owner, group and other
 * entry; named entries unique; a mask when there are named entries) and encodes the VFS xattr
 * value. Undefined when not a valid ACL or a name is unresolved.
 */
export function encodeAclXattr(entries: readonly AclEntry[]): Buffer | undefined {
  const sorted = [...entries].sort((a, b) => a.tag - b.tag || (a.id ?? 0) - (b.id ?? 0));
  const count = (tag: number): number => sorted.filter((e) => e.tag === tag).length;
  if (count(ACL_USER_OBJ) !== 1 || count(ACL_GROUP_OBJ) !== 1 || count(ACL_OTHER) !== 1) return undefined;
  const named = count(ACL_USER) + count(ACL_GROUP);
  if (count(ACL_MASK) > 1 || (named > 0 && count(ACL_MASK) !== 1)) return undefined;
  const buf = Buffer.alloc(4 + 8 * sorted.length);
  buf.writeUInt32LE(2, 0);
  for (const [k, e] of sorted.entries()) {
    const prev = sorted[k - 1];
    if (e.tag === ACL_USER || e.tag === ACL_GROUP) {
      if (e.id === undefined) return undefined;
      if (prev?.tag === e.tag && prev.id === e.id) return undefined;
    }
    buf.writeUInt16LE(e.tag, 4 + 8 * k);
    buf.writeUInt16LE(e.perm, 6 + 8 * k);
    buf.writeUInt32LE(e.tag === ACL_USER || e.tag === ACL_GROUP ? e.id! : UNDEFINED_ID, 8 + 8 * k);
  }
  return buf;
}

/**
 * What setting the access ACL `value` on a file of mode `mode` leaves, as the kernel does it:
 * the new permission bits, and the xattr to store (undefined: the ACL equals the mode and is not
 * stored). Undefined result: the value is not a valid ACL.
 */
export function applyAccessAcl(
  value: Buffer,
  mode: number,
): { mode: number; xattr: Buffer | undefined } | undefined {
  const entries = decodeAclXattr(value);
  if (entries === undefined || encodeAclXattr(entries) === undefined) return undefined;
  let owner = 0;
  let group = 0;
  let other = 0;
  let mask: number | undefined;
  for (const e of entries) {
    if (e.tag === ACL_USER_OBJ) owner = e.perm;
    else if (e.tag === ACL_GROUP_OBJ) group = e.perm;
    else if (e.tag === ACL_OTHER) other = e.perm;
    else if (e.tag === ACL_MASK) mask = e.perm;
  }
  const minimal = entries.length === 3;
  const newMode = (mode & ~0o777) | (owner << 6) | ((mask ?? group) << 3) | other;
  return { mode: newMode, xattr: minimal ? undefined : value };
}
