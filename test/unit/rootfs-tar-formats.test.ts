/**
 * The archive classes of issue 13, table-driven: numeric fields read as GNU tar reads them, the
 * end of an archive, global headers, sparse maps, ACLs (text, Solaris `A` entries, names resolved
 * in the image), vendor xattr keys, `V` labels, and the limits that bound them.
 */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, it } from "node:test";
import { LayerError } from "../../src/errors.ts";
import { applyLayer, DEFAULT_ROOTFS_LIMITS, Spool } from "../../src/rootfs/apply-layer.ts";
import { type FileNode, FileTree } from "../../src/rootfs/file-tree.ts";
import { encodeAclXattr, parseAclText } from "../../src/rootfs/posix-acl.ts";
import { DEFAULT_TAR_LIMITS, parseNumericField, TarReader } from "../../src/rootfs/tar-reader.ts";
import {
  END,
  entryBytes,
  file,
  header,
  paxData,
  type RawEntry,
  tar,
} from "../fixtures/hostile-layers/tar-builder.ts";

const work = mkdtempSync(join(tmpdir(), "rootfs-formats-"));
after(() => rmSync(work, { recursive: true, force: true }));

async function* once(data: Buffer): AsyncGenerator<Buffer> {
  yield data;
}

async function read(data: Buffer, limits = {}) {
  const out = [];
  for await (const e of new TarReader(once(data), { layer: "L", limits }).entries()) {
    const parts: Buffer[] = [];
    for await (const c of e.body()) parts.push(Buffer.from(c));
    out.push({ ...e, data: Buffer.concat(parts).toString("latin1") });
  }
  return out;
}

async function refused(data: Buffer, pattern: RegExp, limits = {}): Promise<void> {
  await assert.rejects(read(data, limits), (err: unknown) => {
    assert.ok(err instanceof LayerError, String(err));
    assert.equal(err.code, "CORRUPT_LAYER");
    assert.match(err.message, pattern);
    assert.doesNotMatch(err.message, /\n/);
    return true;
  });
}

const meta = (type: string, body: Buffer, extra: Partial<RawEntry> = {}): Buffer =>
  Buffer.concat([
    header({ name: "m", type, data: body, ...extra }),
    body,
    Buffer.alloc((512 - (body.length % 512)) % 512),
  ]);

describe("numeric header fields (GNU tar's from_header)", () => {
  const cases: [string, string | number[], number | RegExp][] = [
    ["plain octal, NUL-terminated", "0000000644\0\0", 0o644],
    ["octal, space-terminated", "644 \0", 0o644],
    ["leading spaces", "    644\0", 0o644],
    ["one leading NUL then digits", "\x00644\0", 0o644],
    ["NULs then digits: the first NUL ends the number", "\0\0\0\0\0\0\0\x016\0", 0],
    ["all NULs", "\0\0\0\0\0\0\0\0\0\0\0\0", 0],
    ["all blanks", "            ", 0],
    ["garbage after a terminator is not read", "12 xyz\0", 0o12],
    ["a non-octal digit", "0000000009\0", /not an octal number/],
    ["letters", "abc\0", /not a number/],
    ["base-256, positive", [0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], 256],
    ["base-256, negative", [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe], -2],
    ["base-256 with another first byte", [0x81, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], /not a number/],
    [
      "base-256 beyond 2^53",
      [0x80, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
      /too large/,
    ],
  ];
  for (const [name, field, want] of cases) {
    it(name, () => {
      const block = Buffer.alloc(12);
      (typeof field === "string" ? Buffer.from(field, "latin1") : Buffer.from(field)).copy(block);
      const got = parseNumericField(block, 0, 12);
      if (want instanceof RegExp) assert.match(String(got), want);
      else assert.equal(got, want);
    });
  }

  it("a size field of NULs and digits gives an empty file, and the next header is read", async () => {
    const h = header(file("f", ""));
    Buffer.from("\0\0\0\0\0\0\0\0\x30\x31\x36\0", "latin1").copy(h, 124);
    h.fill(0x20, 148, 156);
    let sum = 0;
    for (const b of h) sum += b;
    h.write(`${sum.toString(8).padStart(6, "0")}\0 `, 148, "latin1");
    const got = await read(Buffer.concat([h, entryBytes(file("next", "n")), END]));
    assert.deepEqual(
      got.map((e) => [e.name, e.size, e.data]),
      [
        ["f", 0, ""],
        ["next", 1, "n"],
      ],
    );
  });
});

describe("end of archive and global headers", () => {
  it("accepts an archive without the end-of-archive marker, and an empty stream", async () => {
    assert.equal((await read(tar([file("a", "1")], { end: false }))).length, 1);
    assert.equal((await read(Buffer.alloc(0))).length, 0);
  });

  it("accepts a global header with nothing after it, and does not apply it to entries", async () => {
    assert.equal((await read(Buffer.concat([meta("g", paxData({ comment: "x" })), END]))).length, 0);
    assert.equal((await read(meta("g", paxData({ comment: "x" })))).length, 0);
    const [e] = await read(
      Buffer.concat([meta("g", paxData({ uid: "5", path: "g" })), entryBytes(file("a"))]),
    );
    assert.deepEqual([e!.name, e!.uid], ["a", 0]);
  });

  it("still refuses a truncated entry and a dangling extended header", async () => {
    await refused(entryBytes(file("a", "x".repeat(600))).subarray(0, 1024), /truncated inside entry data/);
    await refused(meta("x", paxData({ path: "p" })), /ends after an extended header/);
  });
});

describe("sparse files", () => {
  const pax01 = (map: string, size: string, data: string) =>
    tar([
      {
        ...file("s", data),
        pax: { "GNU.sparse.map": map, "GNU.sparse.size": size, "GNU.sparse.numblocks": "1" },
      },
    ]);

  it("reads a PAX 0.1 map and merges adjacent segments", async () => {
    const [e] = await read(pax01("100,2,102,3,5000,1", "8192", "abcdef"));
    assert.deepEqual(e!.sparse, [
      { offset: 100, length: 5 },
      { offset: 5000, length: 1 },
    ]);
    assert.deepEqual([e!.size, e!.dataSize, e!.data], [8192, 6, "abcdef"]);
  });

  it("refuses maps that overlap, run past the end, or disagree with the data", async () => {
    await refused(pax01("0,4,2,2", "100", "abcdef"), /overlapping/);
    await refused(pax01("90,20", "100", "x".repeat(20)), /out-of-range/);
    await refused(pax01("0,4", "100", "abcdef"), /describes 4 bytes of data, the entry holds 6/);
    await refused(pax01("0,4,10", "100", "abcd"), /odd number/);
    await refused(
      tar([
        {
          ...file("s", "x"),
          pax: { "GNU.sparse.major": "2", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "1" },
        },
      ]),
      /unknown GNU sparse format 2.0/,
    );
    await refused(pax01("0,1,2,1,4,1", "100", "abc"), /more than 2 sparse segments/, {
      maxSparseSegments: 2,
    });
  });

  it("reads a PAX 1.0 map from the start of the data", async () => {
    const text = Buffer.from("2\n10\n3\n4096\n2\n");
    const map = Buffer.concat([text, Buffer.alloc(512 - text.length)]);
    const [e] = await read(
      tar([
        {
          ...file("GNUSparseFile.0/s", Buffer.concat([map, Buffer.from("abcde")])),
          pax: {
            "GNU.sparse.major": "1",
            "GNU.sparse.minor": "0",
            "GNU.sparse.name": "s",
            "GNU.sparse.realsize": "5000",
          },
        },
      ]),
    );
    assert.deepEqual([e!.name, e!.size, e!.dataSize, e!.data], ["s", 5000, 5, "abcde"]);
    assert.deepEqual(e!.sparse, [
      { offset: 10, length: 3 },
      { offset: 4096, length: 2 },
    ]);
  });
});

describe("ACLs, vendor xattr keys, A and V entries", () => {
  it("parses ACL text of GNU tar, star/libarchive and Solaris", () => {
    assert.deepEqual(parseAclText("user::rw-\nuser:root:r--\ngroup::r--\nmask::r--\nother::---\n"), [
      { tag: 1, perm: 6 },
      { tag: 2, perm: 4, name: "root" },
      { tag: 4, perm: 4 },
      { tag: 16, perm: 4 },
      { tag: 32, perm: 0 },
    ]);
    assert.deepEqual(parseAclText("user:joe:r-x:1000,group:7:--x,mask:rwx,other:r--")?.slice(0, 2), [
      { tag: 2, perm: 5, id: 1000 },
      { tag: 8, perm: 1, id: 7 },
    ]);
    assert.equal(parseAclText("bogus::rwx"), undefined);
    assert.equal(parseAclText("user::rwz"), undefined);
    assert.equal(
      encodeAclXattr(parseAclText("user::rw-,user:5:r--,group::r--,other::r--")!),
      undefined,
      "no mask",
    );
  });

  it("maps vendor xattr keys and refuses oversized xattrs", async () => {
    const [e] = await read(
      tar([
        {
          ...file("f"),
          pax: {
            "LIBARCHIVE.xattr.user.a%3Db%zz": Buffer.from("v1").toString("base64").replace(/=+$/, ""),
            "RHT.security.selinux": "ctx",
          },
        },
      ]),
    );
    assert.deepEqual(
      [...e!.xattrs].map(([k, v]) => [k, v.toString()]),
      [
        ["user.a=b%zz", "v1"],
        ["security.selinux", "ctx"],
      ],
    );
    await refused(
      tar([{ ...file("f"), pax: { "SCHILY.xattr.user.big": "x".repeat(70000) } }]),
      /exceeds 65536/,
    );
    await refused(
      tar([
        {
          ...file("f"),
          pax: Object.fromEntries(Array.from({ length: 5 }, (_, i) => [`SCHILY.xattr.user.${i}`, "v"])),
        },
      ]),
      /more than 4 xattrs/,
      { maxXattrsPerEntry: 4 },
    );
  });

  it("applies a Solaris POSIX ACL entry to the next entry, skips an NFSv4 one, skips V labels", async () => {
    const posix = meta("A", Buffer.from("01000004\0user::rw-,user:9:r--,group::r--,mask:r--,other:r--\0"));
    const nfs4 = meta("A", Buffer.from("03000001\0owner@:rwx:allow\0"));
    const got = await read(
      Buffer.concat([
        header({ name: "vol", type: "V", format: "gnu" }),
        posix,
        entryBytes(file("a")),
        nfs4,
        entryBytes(file("b")),
        END,
      ]),
    );
    assert.deepEqual(
      got.map((e) => [e.name, e.aclAccess?.length]),
      [
        ["a", 5],
        ["b", undefined],
      ],
    );
    await refused(
      Buffer.concat([header({ name: "vol", type: "V", size: 5, format: "gnu" }), END]),
      /volume label with data/,
    );
  });

  it("resolves ACL names in the image's /etc/passwd and /etc/group, and sets the mode as the kernel does", async () => {
    const tree = new FileTree();
    const spool = new Spool(mkdtempSync(join(work, "spool-")));
    const apply = (entries: RawEntry[]) =>
      applyLayer({
        tree,
        source: once(tar(entries)),
        layer: "L",
        spool,
        limits: { ...DEFAULT_TAR_LIMITS, ...DEFAULT_ROOTFS_LIMITS },
      });
    await apply([
      file("etc/passwd", "root:x:0:0::/:/bin/sh\nalice:x:1001:1001::/:/bin/sh\n"),
      file("etc/group", "staff:x:50:\n"),
    ]);
    await apply([
      {
        ...file("named", "n", { mode: 0o600 }),
        pax: {
          "SCHILY.acl.access":
            "user::rw-\nuser:alice:r--\ngroup::r--\ngroup:staff:rw-\nmask::r-x\nother::---\n",
        },
      },
      {
        ...file("minimal", "m", { mode: 0o777 }),
        pax: { "SCHILY.acl.access": "user::r--,group::---,other::---" },
      },
    ]);
    const named = tree.root.children.get("named") as FileNode;
    assert.equal(named.mode, 0o650, "group bits are the mask");
    const acl = named.xattrs?.get("system.posix_acl_access");
    assert.ok(acl);
    assert.deepEqual([acl.readUInt16LE(12), acl.readUInt32LE(16)], [0x02, 1001]);
    assert.deepEqual([acl.readUInt16LE(28), acl.readUInt32LE(32)], [0x08, 50]);
    const minimal = tree.root.children.get("minimal") as FileNode;
    assert.deepEqual([minimal.mode, minimal.xattrs], [0o400, undefined]);
    await assert.rejects(
      apply([
        {
          ...file("x"),
          pax: { "SCHILY.acl.access": "user::rw-,user:mallory:r--,group::r--,mask::r--,other::---" },
        },
      ]),
      {
        code: "CORRUPT_LAYER",
        message: /naming a user or group the image does not define/,
      },
    );
    spool.endLayer();
  });

  it("refuses xattrs beyond the image's budget (UNSAFE_LAYER)", async () => {
    const tree = new FileTree();
    const spool = new Spool(mkdtempSync(join(work, "spool-")));
    const entries = Array.from({ length: 40 }, (_, i) => ({
      ...file(`f${i}`),
      pax: { "SCHILY.xattr.user.v": "v".repeat(1000) },
    }));
    await assert.rejects(
      applyLayer({
        tree,
        source: once(tar(entries)),
        layer: "L",
        spool,
        limits: { ...DEFAULT_TAR_LIMITS, ...DEFAULT_ROOTFS_LIMITS, maxXattrBytes: 20_000 },
      }),
      { code: "UNSAFE_LAYER", message: /xattrs exceed 20000 bytes/ },
    );
  });
});
