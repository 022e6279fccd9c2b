/**
 * Differential test of layer flattening against the reference extractors: archives written by
 * GNU tar (every format, sparse files in every sparse format, ACLs, xattrs, SELinux labels),
 * bsdtar and Python's tarfile (test/fixtures/tar-corpus/make-corpus.sh), plus hand-made edge
 * cases, are each flattened into an ext4 image and extracted by bsdtar (GNU tar where bsdtar
 * refuses a valid archive) as root into a directory. The two trees are compared entry by entry —
 * type, mode, owner, size, content hash, link target, hardlink groups, device numbers, mtime,
 * xattrs (ACLs included), and holes of sparse files — and every image passes `e2fsck -fn`.
 * Needs root (the reference extraction makes devices and sets owners), bsdtar, GNU tar, python3.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { fileURLToPath } from "node:url";
import { flattenLayers } from "../../src/rootfs/index.ts";
import { decodeAclXattr } from "../../src/rootfs/posix-acl.ts";
import { fsck, readImageTree, type TreeEntry } from "../fixtures/hostile-layers/inspect-image.ts";
import {
  dir,
  END,
  entryBytes,
  file,
  header,
  paxData,
  type RawEntry,
  symlink,
  tar,
} from "../fixtures/hostile-layers/tar-builder.ts";

const corpusDir = fileURLToPath(new URL("../fixtures/tar-corpus/", import.meta.url));
const work = mkdtempSync(join(tmpdir(), "rootfs-differential-"));
after(() => rmSync(work, { recursive: true, force: true }));
const PATH = `${process.env.PATH}:/usr/sbin:/sbin`;
let n = 0;

/** ACL xattr values with the ids of unnamed entries dropped (the kernel says -1, e2fsprogs 0). */
function normalValue(name: string, hex: string): string {
  if (!name.startsWith("system.posix_acl_")) return hex;
  const entries = decodeAclXattr(Buffer.from(hex, "hex"));
  if (entries === undefined) return `invalid:${hex}`;
  return entries.map((e) => `${e.tag}:${e.perm}:${e.id ?? ""}`).join(",");
}

interface Compared {
  entries: Record<string, string>;
  hardlinks: string[][];
  sparse: string[];
}

function normalise(tree: Map<string, TreeEntry>): Compared {
  const entries: Record<string, string> = {};
  const byIno = new Map<number, string[]>();
  const sparse: string[] = [];
  for (const [path, e] of [...tree].sort(([a], [b]) => (a < b ? -1 : 1))) {
    const xattrs = Object.entries(e.xattrs)
      .map(([k, v]) => `${k}=${normalValue(k, v)}`)
      .sort()
      .join(" ");
    entries[path] = [
      e.type,
      e.mode.toString(8),
      `${e.uid}:${e.gid}`,
      `m=${e.mtime}`,
      e.type === "dir" ? "" : `links=${e.nlink}`,
      e.size ?? "",
      e.sha256 ?? "",
      e.target === undefined ? "" : `-> ${JSON.stringify(e.target)}`,
      e.dev ?? "",
      xattrs,
    ].join(" ");
    if (e.type !== "dir") byIno.set(e.ino, [...(byIno.get(e.ino) ?? []), path]);
    if (e.type === "file" && e.size !== undefined && e.blocks * 512 < e.size) sparse.push(path);
  }
  const hardlinks = [...byIno.values()].filter((g) => g.length > 1).sort();
  return { entries, hardlinks, sparse };
}

function referenceTree(archive: string, tool: "bsdtar" | "gnutar"): Compared {
  const dest = join(work, `ref-${n++}`);
  mkdirSync(dest);
  if (tool === "bsdtar") {
    execFileSync("bsdtar", ["-x", "-p", "--numeric-owner", "--acls", "--xattrs", "-f", archive, "-C", dest]);
  } else {
    execFileSync("tar", [
      "-x",
      "-p",
      "--numeric-owner",
      "--acls",
      "--xattrs",
      "--xattrs-include=*",
      "-f",
      archive,
      "-C",
      dest,
    ]);
  }
  const json = execFileSync("python3", [join(corpusDir, "walk-tree.py"), dest], {
    encoding: "latin1",
    maxBuffer: 64 << 20,
  });
  const tree = new Map(Object.entries(JSON.parse(json) as Record<string, TreeEntry>));
  return normalise(tree);
}

async function flattenedTree(archive: string): Promise<Compared> {
  const output = join(work, `image-${n++}.ext4`);
  const blob = readFileSync(archive);
  await flattenLayers({
    layers: [
      {
        path: archive,
        mediaType: "application/vnd.oci.image.layer.v1.tar",
        digest: `sha256:${createHash("sha256").update(blob).digest("hex")}`,
      },
    ],
    output,
    freeBytes: 8 << 20,
    durable: false,
  });
  const f = fsck(output);
  assert.equal(f.status, 0, f.output);
  const scratch = mkdtempSync(join(work, "dump-"));
  const tree = normalise(readImageTree(output, scratch));
  rmSync(output);
  rmSync(scratch, { recursive: true });
  return tree;
}

async function compare(archive: string, tool: "bsdtar" | "gnutar" = "bsdtar"): Promise<Compared> {
  const ours = await flattenedTree(archive);
  const reference = referenceTree(archive, tool);
  assert.deepEqual(ours.entries, reference.entries);
  assert.deepEqual(ours.hardlinks, reference.hardlinks);
  for (const path of reference.sparse) assert.ok(ours.sparse.includes(path), `${path}: holes became data`);
  return ours;
}

describe("flattening matches the reference extractors", () => {
  let names: string[] = [];

  before(() => {
    assert.equal(
      process.geteuid?.(),
      0,
      "the reference extraction runs as root (devices, owners, trusted.* xattrs)",
    );
    execFileSync("bash", [join(corpusDir, "make-corpus.sh"), join(work, "corpus")], {
      env: { ...process.env, PATH },
      stdio: ["ignore", "ignore", "inherit"],
    });
    names = readFileSync(join(work, "corpus", "list"), "utf8")
      .trim()
      .split("\n");
  });

  it("covers every writer and format of the corpus", () => {
    assert.deepEqual(names.sort(), [
      "bsdtar-gnutar",
      "bsdtar-pax",
      "bsdtar-pax-acls-xattrs",
      "bsdtar-pax-sparse",
      "bsdtar-ustar",
      "bsdtar-v7",
      "gnutar-gnu",
      "gnutar-gnu-sparse",
      "gnutar-posix",
      "gnutar-posix-acls-xattrs",
      "gnutar-posix-selinux",
      "gnutar-posix-sparse-0.0",
      "gnutar-posix-sparse-0.1",
      "gnutar-posix-sparse-1.0",
      "gnutar-ustar",
      "gnutar-v7",
      "python-gnu",
      "python-pax",
      "python-ustar",
    ]);
  });

  it("flattens every corpus archive as bsdtar extracts it", async () => {
    for (const name of names) {
      // bsdtar 3.6 cannot apply GNU tar's ACL text (names, one entry a line): GNU tar is its reference.
      const tool = name === "gnutar-posix-acls-xattrs" ? "gnutar" : "bsdtar";
      const tree = await compare(join(work, "corpus", `${name}.tar`), tool).catch((err: Error) => {
        throw new Error(`${name}: ${err.message}`, { cause: err });
      });
      assert.ok(
        Object.keys(tree.entries).length >= 3,
        `${name}: only ${Object.keys(tree.entries).length} entries`,
      );
      if (name.includes("sparse")) assert.ok(tree.sparse.includes("/holes"), `${name}: /holes is not sparse`);
      if (name.includes("acls")) {
        assert.match(tree.entries["/z-acl/named"]!, /system\.posix_acl_access=/, name);
        assert.match(tree.entries["/z-acl/default-dir"]!, /system\.posix_acl_default=/, name);
      }
    }
  });

  describe("hand-made edge cases", () => {
    const edge = (name: string, data: Buffer): string => {
      const path = join(work, `edge-${name}.tar`);
      writeFileSync(path, data);
      return path;
    };
    const withChecksum = (block: Buffer): Buffer => {
      block.fill(0x20, 148, 156);
      let sum = 0;
      for (const b of block) sum += b;
      block.write(`${sum.toString(8).padStart(6, "0")}\0 `, 148, "latin1");
      return block;
    };
    const meta = (type: string, body: Buffer, name = "meta"): Buffer =>
      Buffer.concat([
        header({ name, type, data: body }),
        body,
        Buffer.alloc((512 - (body.length % 512)) % 512),
      ]);

    it("no end-of-archive marker", async () => {
      await compare(edge("no-end", tar([dir("d/"), file("d/f", "x".repeat(700))], { end: false })));
    });

    it("a PAX global header and nothing else (git archive of an empty tree)", async () => {
      const tree = await compare(
        edge("global-only", Buffer.concat([meta("g", paxData({ comment: "0".repeat(40) })), END])),
      );
      assert.deepEqual(tree.entries, {});
    });

    it("a size field of NULs and octal digits reads 0 (as GNU tar, libarchive, Python)", async () => {
      const h = header(file("nul-size", ""));
      Buffer.from("\0\0\0\0\0\0\0\0\x30\x31\x36\0", "latin1").copy(h, 124);
      const tree = await compare(
        edge("nul-size", Buffer.concat([withChecksum(h), entryBytes(file("next", "n")), END])),
      );
      assert.match(tree.entries["/nul-size"]!, / 0 e3b0c442/);
    });

    it("numeric fields with spaces, base-256 ids and a negative base-256 mtime", async () => {
      const h = header(file("fields", "abc", { mode: 0o640 }));
      Buffer.from("  640 \0\0", "latin1").copy(h, 100); // mode with leading blanks
      const uid = Buffer.alloc(8);
      uid[0] = 0x80;
      uid.writeUInt32BE(3_000_000, 4);
      uid.copy(h, 108);
      const mtime = Buffer.alloc(12, 0xff);
      mtime.writeInt32BE(-86400, 8);
      mtime.copy(h, 136);
      await compare(
        edge("fields", Buffer.concat([withChecksum(h), Buffer.from("abc"), Buffer.alloc(509), END])),
      );
    });

    it("a symlink whose header says 0755 is lrwxrwxrwx", async () => {
      const tree = await compare(
        edge("symlink-mode", tar([file("t", "t"), symlink("s", "t", { mode: 0o755 })])),
      );
      assert.match(tree.entries["/s"]!, /^symlink 777 /);
    });

    it("a Solaris ACL entry (type A) applies to the next entry", async () => {
      const acl = Buffer.from("01000007\0user::rw-,user:4242:r--,group::r--,mask:r--,other:---\0", "latin1");
      const tree = await compare(
        edge("solaris-acl", Buffer.concat([meta("A", acl), entryBytes(file("acl", "a")), END])),
      );
      assert.match(tree.entries["/acl"]!, /system\.posix_acl_access=1:6:,2:4:4242/);
    });

    it("a GNU volume label (type V) is skipped", async () => {
      await compare(
        edge(
          "volume",
          Buffer.concat([
            header({ name: "my volume", type: "V", format: "gnu" }),
            entryBytes(file("f", "f")),
            END,
          ]),
        ),
      );
    });

    it("vendor xattr records: LIBARCHIVE.xattr.* (URL-encoded name, base64) and RHT.security.selinux", async () => {
      const tree = await compare(
        edge(
          "vendor-xattrs",
          tar([
            {
              ...file("f", "x"),
              pax: {
                "LIBARCHIVE.xattr.user.a%3Db": Buffer.from([0, 1, 2, 0xff]).toString("base64"),
                "RHT.security.selinux": "system_u:object_r:bin_t:s0",
              },
            },
          ]),
        ),
      );
      assert.match(tree.entries["/f"]!, /user\.a=b=000102ff/);
      assert.match(tree.entries["/f"]!, /security\.selinux=/);
    });

    it("a 2 MB PAX record (over libarchive 3.6's 1 MiB cap: GNU tar is the reference)", async () => {
      await compare(
        edge(
          "big-pax",
          Buffer.concat([
            meta("x", paxData({ comment: "c".repeat(2_000_000) })),
            entryBytes(file("f", "after")),
            END,
          ]),
        ),
        "gnutar",
      );
    });

    it("an old GNU sparse file with unaligned segments", async () => {
      const h = header({ name: "sparse", type: "S", format: "gnu", size: 10 });
      const put = (at: number, v: number) => Buffer.from(`${v.toString(8).padStart(11, "0")}\0`).copy(h, at);
      put(386, 100); // offset
      put(398, 4); // numbytes
      put(410, 9000);
      put(422, 6);
      put(483, 20000); // realsize
      const tree = await compare(
        edge(
          "old-sparse",
          Buffer.concat([withChecksum(h), Buffer.from("abcdEFGHIJ"), Buffer.alloc(502), END]),
        ),
      );
      assert.ok(tree.sparse.includes("/sparse"));
    });

    it("PAX overrides: size, uid, gid, mtime, a hardlink with a PAX path, a type 7 file", async () => {
      const entries: RawEntry[] = [
        { ...file("big-uid", "u"), pax: { uid: "4000000000", gid: "77", mtime: "1700000000.75" } },
        { ...file("contig", "c"), type: "7" },
        { name: "x", type: "1", linkname: "big-uid", pax: { path: "hard" } },
      ];
      await compare(edge("pax-overrides", tar(entries)));
    });
  });
});
