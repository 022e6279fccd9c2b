import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, it } from "node:test";
import { gzipSync, zstdCompressSync } from "node:zlib";
import { LayerError } from "../../src/errors.ts";
import { openLayer } from "../../src/rootfs/open-layer.ts";
import { type TarEntry, type TarLimits, TarReader } from "../../src/rootfs/tar-reader.ts";
import {
  END,
  entryBytes,
  file,
  header,
  paxData,
  type RawEntry,
  symlink,
  tar,
} from "../fixtures/hostile-layers/tar-builder.ts";

interface Read extends Omit<TarEntry, "body" | "xattrs"> {
  body: string;
  xattrs: Record<string, string>;
}

async function* chunked(data: Buffer, size: number): AsyncGenerator<Buffer> {
  for (let i = 0; i < data.length; i += size) yield data.subarray(i, i + size);
}

async function readAll(
  data: Buffer,
  options: { chunk?: number; limits?: Partial<TarLimits>; skipBodies?: boolean } = {},
) {
  const reader = new TarReader(chunked(data, options.chunk ?? 65536), {
    layer: "sha256:test",
    limits: options.limits,
  });
  const out: Read[] = [];
  for await (const e of reader.entries()) {
    const parts: Buffer[] = [];
    if (!options.skipBodies) for await (const c of e.body()) parts.push(Buffer.from(c));
    const { body: _b, xattrs, ...rest } = e;
    out.push({
      ...rest,
      body: Buffer.concat(parts).toString("latin1"),
      xattrs: Object.fromEntries([...xattrs].map(([k, v]) => [k, v.toString("latin1")])),
    });
  }
  return out;
}

async function rejects(
  data: Buffer,
  code: "CORRUPT_LAYER" | "UNSAFE_LAYER",
  pattern: RegExp,
  limits?: Partial<TarLimits>,
) {
  await assert.rejects(readAll(data, { limits }), (err: unknown) => {
    assert.ok(err instanceof LayerError, `expected LayerError, got ${err}`);
    assert.equal(err.code, code);
    assert.equal(err.layer, "sha256:test");
    assert.match(err.message, pattern);
    return true;
  });
}

describe("tar reader: entry types and fields", () => {
  it("reads every entry type of a ustar archive", async () => {
    const entries = await readAll(
      tar([
        { name: "d/", type: "5", mode: 0o1777, uid: 1, gid: 2, mtime: 12345 },
        file("d/f", "hello", { mode: 0o4755, uid: 1000, gid: 1001 }),
        { name: "d/h", type: "1", linkname: "d/f" },
        symlink("d/s", "../target"),
        { name: "dev/c", type: "3", devmajor: 1, devminor: 3, mode: 0o666 },
        { name: "dev/b", type: "4", devmajor: 8, devminor: 300, mode: 0o660 },
        { name: "p", type: "6", mode: 0o600 },
        { name: "old", type: "7", data: "contig" },
      ]),
    );
    assert.deepEqual(
      entries.map((e) => [
        e.name,
        e.type,
        e.mode.toString(8),
        e.size,
        e.body,
        e.linkname,
        e.devMajor,
        e.devMinor,
      ]),
      [
        ["d/", "dir", "1777", 0, "", "", 0, 0],
        ["d/f", "file", "4755", 5, "hello", "", 0, 0],
        ["d/h", "hardlink", "644", 0, "", "d/f", 0, 0],
        ["d/s", "symlink", "777", 0, "", "../target", 0, 0],
        ["dev/c", "char", "666", 0, "", "", 1, 3],
        ["dev/b", "block", "660", 0, "", "", 8, 300],
        ["p", "fifo", "600", 0, "", "", 0, 0],
        ["old", "file", "644", 6, "contig", "", 0, 0],
      ],
    );
    assert.deepEqual([entries[0]!.uid, entries[0]!.gid, entries[0]!.mtime], [1, 2, 12345]);
    assert.deepEqual([entries[1]!.uid, entries[1]!.gid], [1000, 1001]);
    assert.deepEqual(
      entries.map((e) => e.index),
      [0, 1, 2, 3, 4, 5, 6, 7],
    );
  });

  it("joins the ustar prefix field, and ignores it in GNU archives", async () => {
    const entries = await readAll(
      tar([
        file("name.txt", "x", { prefix: "a/very/long/prefix" }),
        file("gnu.txt", "y", { prefix: "not-a-prefix", format: "gnu" }),
      ]),
    );
    assert.deepEqual(
      entries.map((e) => e.name),
      ["a/very/long/prefix/name.txt", "gnu.txt"],
    );
  });

  it("reads GNU long names and long link targets", async () => {
    const long = `${"dir/".repeat(40)}file`;
    const target = `${"../".repeat(50)}t`;
    const entries = await readAll(
      tar([
        { ...file(long.slice(0, 99), "abc"), longName: long },
        { ...symlink("s", target.slice(0, 99)), longName: `${long}.lnk`, longLink: target },
        file("after", "z"),
      ]),
    );
    assert.deepEqual(
      entries.map((e) => [e.name, e.linkname, e.body]),
      [
        [long, "", "abc"],
        [`${long}.lnk`, target, ""],
        ["after", "", "z"],
      ],
    );
  });

  it("applies PAX records: path, linkpath, size, uid, gid, mtime, xattrs", async () => {
    const big = "p/".repeat(1500);
    const entries = await readAll(
      tar([
        {
          ...file("short", "data!"),
          pax: {
            path: `${big}f`,
            uid: "4294967295",
            gid: "100000",
            mtime: "1700000000.987654321",
            "SCHILY.xattr.user.comment": "hi there",
            "SCHILY.xattr.security.capability": Buffer.from([
              1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ]),
            "LIBARCHIVE.xattr.user.%41%20b": Buffer.from("bin\x00ary").toString("base64"),
            comment: "ignored",
            atime: "1.5",
          },
        },
        { ...symlink("l", "x"), pax: { linkpath: `/${big}target` } },
        { ...file("neg", "n"), pax: { mtime: "-1.5" } },
        // PAX size overrides the header (the header says 0).
        { ...file("sized", "12345678", { size: 0 }), pax: { size: "8" } },
        // An empty value cancels the keyword: the header name is used.
        { ...file("header-name", "h"), pax: { path: "" } },
      ]),
    );
    assert.equal(entries[0]!.name, `${big}f`);
    assert.equal(entries[0]!.uid, 4294967295);
    assert.equal(entries[0]!.gid, 100000);
    assert.equal(entries[0]!.mtime, 1700000000);
    assert.equal(entries[0]!.xattrs["user.comment"], "hi there");
    assert.equal(entries[0]!.xattrs["security.capability"]!.length, 20);
    assert.equal(entries[0]!.xattrs["user.A b"], "bin\x00ary");
    assert.equal(entries[1]!.linkname, `/${big}target`);
    assert.equal(entries[2]!.mtime, -2);
    assert.equal(entries[3]!.size, 8);
    assert.equal(entries[3]!.body, "12345678");
    assert.equal(entries[4]!.name, "header-name");
  });

  it("does not carry PAX records or GNU long names over to the next entry", async () => {
    const entries = await readAll(
      tar([
        { ...file("a", "1"), pax: { path: "renamed", "SCHILY.xattr.user.x": "1" } },
        { ...file("b", "2"), longName: "long-b" },
        file("c", "3"),
      ]),
    );
    assert.deepEqual(
      entries.map((e) => [e.name, Object.keys(e.xattrs).length]),
      [
        ["renamed", 1],
        ["long-b", 0],
        ["c", 0],
      ],
    );
  });

  it("ignores PAX global headers (as Docker and containerd do)", async () => {
    const g = paxData({ path: "global-path", comment: "git archive" });
    const data = Buffer.concat([
      header({ name: "pax_global_header", type: "g", data: g }),
      g,
      Buffer.alloc(512 - g.length),
      entryBytes(file("real", "r")),
      END,
    ]);
    const entries = await readAll(data);
    assert.deepEqual(
      entries.map((e) => e.name),
      ["real"],
    );
  });

  it("reads base-256 numbers (GNU) for size, uid and gid", async () => {
    const sizeField = Buffer.alloc(12);
    sizeField[0] = 0x80;
    sizeField.writeUInt32BE(3, 8);
    const e = header({ name: "b256", type: "0", sizeField, uid: 0 });
    const uidField = Buffer.alloc(8);
    uidField[0] = 0x80;
    uidField.writeUInt32BE(5_000_000, 4);
    uidField.copy(e, 108);
    // Recompute the checksum after patching.
    e.fill(0x20, 148, 156);
    let sum = 0;
    for (const b of e) sum += b;
    e.write(`${sum.toString(8).padStart(6, "0")}\0 `, 148, "latin1");
    const entries = await readAll(Buffer.concat([e, Buffer.from("abc"), Buffer.alloc(509), END]));
    assert.equal(entries[0]!.size, 3);
    assert.equal(entries[0]!.uid, 5_000_000);
    assert.equal(entries[0]!.body, "abc");
  });

  it("treats a '\\0' typeflag with a trailing slash as a directory, and V7 headers as ustar", async () => {
    const entries = await readAll(
      tar([
        { name: "olddir/", type: "\0", format: "v7" },
        { name: "oldfile", type: "\0", format: "v7", data: "v7" },
      ]),
    );
    assert.deepEqual(
      entries.map((e) => [e.name, e.type, e.body]),
      [
        ["olddir/", "dir", ""],
        ["oldfile", "file", "v7"],
      ],
    );
  });

  it("ignores the size field of header-only types (as Go's archive/tar)", async () => {
    const entries = await readAll(
      tar([
        { name: "d/", type: "5", size: 1024 },
        { name: "s", type: "2", linkname: "t", size: 4096 },
        file("f", "after"),
      ]),
    );
    assert.deepEqual(
      entries.map((e) => [e.name, e.size]),
      [
        ["d/", 0],
        ["s", 0],
        ["f", 5],
      ],
    );
    assert.equal(entries[2]!.body, "after");
  });

  it("gives the same result whatever the chunking, and skips unread bodies", async () => {
    const data = tar([
      file("a", "x".repeat(1000)),
      { ...file("b", "y".repeat(513)), pax: { path: "pax-b", "SCHILY.xattr.user.k": "v" } },
      { ...file("c", "z"), longName: "long-c" },
      file("empty", ""),
    ]);
    const reference = await readAll(data);
    for (const chunk of [1, 7, 511, 512, 513, 4096]) {
      assert.deepEqual(await readAll(data, { chunk }), reference, `chunk ${chunk}`);
    }
    const skipped = await readAll(data, { skipBodies: true, chunk: 100 });
    assert.deepEqual(
      skipped.map((e) => e.name),
      reference.map((e) => e.name),
    );
  });

  it("accepts a single zero block at the end (a lone zero block, as GNU tar does)", async () => {
    const data = Buffer.concat([entryBytes(file("a", "1")), Buffer.alloc(512)]);
    assert.equal((await readAll(data)).length, 1);
  });

  it("ignores padding after the end-of-archive marker", async () => {
    const data = Buffer.concat([tar([file("a", "1")]), Buffer.alloc(10240)]);
    assert.equal((await readAll(data)).length, 1);
  });
});

describe("tar reader: archives written by GNU tar", () => {
  const formats = ["gnu", "posix", "ustar", "v7"] as const;
  for (const format of formats) {
    it(`reads a --format=${format} archive`, async () => {
      const dir = mkdtempSync(join(tmpdir(), "rootfs-tar-"));
      try {
        const src = join(dir, "src");
        const long = format === "v7" ? "short-name" : `${"long-directory-name-".repeat(4)}/${"f".repeat(90)}`;
        mkdirSync(join(src, long, ".."), { recursive: true });
        writeFileSync(join(src, long), "long content");
        writeFileSync(join(src, "plain"), "p".repeat(70000));
        symlinkSync("plain", join(src, "link"));
        let xattrs = false;
        if (format === "posix") {
          try {
            // Node has no xattr API; python3 sets one when it is there (user.* needs ext4/xfs/tmpfs).
            execFileSync(
              "python3",
              ["-c", "import os,sys; os.setxattr(sys.argv[1], 'user.test', b'value')", join(src, "plain")],
              {
                stdio: "ignore",
              },
            );
            xattrs = true;
          } catch {}
        }
        const archive = join(dir, "a.tar");
        execFileSync("tar", [
          `--format=${format}`,
          ...(xattrs ? ["--xattrs", "--xattrs-include=user.*"] : []),
          "--sort=name",
          "-C",
          src,
          "-cf",
          archive,
          ".",
        ]);
        const entries = await readAll(readFileSync(archive));
        const byName = new Map(entries.map((e) => [e.name.replace(/^\.\//, "").replace(/\/$/, ""), e]));
        assert.equal(byName.get(long)?.body, "long content");
        assert.equal(byName.get("plain")?.size, 70000);
        assert.equal(byName.get("link")?.type, "symlink");
        assert.equal(byName.get("link")?.linkname, "plain");
        if (xattrs) assert.equal(byName.get("plain")?.xattrs["user.test"], "value");
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });
  }
});

describe("tar reader: malformed and hostile archives", () => {
  const cases: { name: string; data: () => Buffer; pattern: RegExp; limits?: Partial<TarLimits> }[] = [
    {
      name: "bad header checksum",
      data: () => tar([file("a", "1", { badChecksum: true })]),
      pattern: /checksum/,
    },
    {
      name: "truncated inside a header",
      data: () =>
        Buffer.concat([entryBytes(file("a", "1")), entryBytes(file("b", "2"))]).subarray(0, 1024 + 100),
      pattern: /truncated inside a header/,
    },
    {
      name: "truncated inside file data",
      data: () => entryBytes(file("a", "x".repeat(2000))).subarray(0, 512 + 1000),
      pattern: /truncated inside entry data/,
    },
    {
      name: "truncated inside padding",
      data: () => entryBytes(file("a", "x".repeat(100))).subarray(0, 512 + 200),
      pattern: /truncated/,
    },
    {
      name: "a stream that ends after an extended header",
      data: () => {
        const p = paxData({ path: "x" });
        return Buffer.concat([header({ name: "x", type: "x", data: p }), p, Buffer.alloc(512 - p.length)]);
      },
      pattern: /ends after an extended header/,
    },
    {
      name: "a zero block followed by data",
      data: () => Buffer.concat([Buffer.alloc(512), entryBytes(file("a", "1")), END]),
      pattern: /after a zero block/,
    },
    {
      name: "an extended header with no entry after it",
      data: () => {
        const p = paxData({ path: "x" });
        return Buffer.concat([
          header({ name: "x", type: "x", data: p }),
          p,
          Buffer.alloc(512 - p.length),
          END,
        ]);
      },
      pattern: /extended header not followed/,
    },
    {
      name: "extended header over 16 MiB (not read into memory)",
      data: () => Buffer.concat([header({ name: "x", type: "x", size: 32 * 1024 * 1024 }), END]),
      pattern: /extended header of 33554432 bytes exceeds 16777216/,
    },
    {
      name: "PAX record with a bad length",
      data: () => {
        const p = Buffer.from("99 path=x\n");
        return Buffer.concat([
          header({ name: "x", type: "x", data: p }),
          p,
          Buffer.alloc(502),
          entryBytes(file("a")),
          END,
        ]);
      },
      pattern: /malformed PAX record/,
    },
    {
      name: "PAX record with a non-numeric length",
      data: () => {
        const p = Buffer.from("1x path=x\n");
        return Buffer.concat([
          header({ name: "x", type: "x", data: p }),
          p,
          Buffer.alloc(502),
          entryBytes(file("a")),
          END,
        ]);
      },
      pattern: /malformed PAX record length/,
    },
    {
      name: "PAX uid that is not a number",
      data: () => tar([{ ...file("a"), pax: { uid: "-5" } }]),
      pattern: /invalid PAX uid/,
    },
    {
      name: "path longer than 4096 bytes",
      data: () => tar([{ ...file("a"), pax: { path: "a".repeat(4097) } }]),
      pattern: /path is 4097 bytes/,
    },
    {
      name: "NUL byte in a PAX path",
      data: () => tar([{ ...file("a"), pax: { path: "a\0b" } }]),
      pattern: /NUL/,
    },
    {
      name: "GNU long name over the limit",
      data: () =>
        Buffer.concat([header({ name: "././@LongLink", type: "L", size: 100000, format: "gnu" }), END]),
      pattern: /GNU long name of 100000 bytes/,
    },
    {
      name: "entry size over the limit",
      data: () => tar([{ name: "big", type: "0", size: 2 ** 33 }]),
      pattern: /entry size 8589934592 exceeds/,
      limits: { maxEntrySizeBytes: 2 ** 32 },
    },
    {
      name: "absurd base-256 size",
      data: () => {
        const sizeField = Buffer.alloc(12, 0xff);
        sizeField[0] = 0x80;
        return tar([{ name: "big", type: "0", sizeField }]);
      },
      pattern: /size field .* is too large/,
    },
    {
      name: "negative base-256 size",
      data: () => tar([{ name: "neg", type: "0", sizeField: Buffer.alloc(12, 0xff) }]),
      pattern: /negative size/,
    },
    {
      name: "invalid octal digits",
      data: () => tar([{ name: "x", type: "0", sizeField: Buffer.from("0000000009\0\0") }]),
      pattern: /size field .* is not an octal number/,
    },
    {
      name: "GNU sparse entry in a ustar header",
      data: () => tar([{ name: "s", type: "S" }]),
      pattern: /sparse/,
    },
    {
      name: "PAX sparse file without its size",
      data: () => tar([{ ...file("s"), pax: { "GNU.sparse.major": "1", "GNU.sparse.minor": "0" } }]),
      pattern: /sparse/,
    },
    {
      name: "unknown entry type",
      data: () => tar([{ name: "v", type: "Z" }]),
      pattern: /unsupported entry type "Z"/,
    },
    {
      name: "hardlink without a target",
      data: () => tar([{ name: "h", type: "1" }]),
      pattern: /without a target/,
    },
    { name: "empty name", data: () => tar([file("")]), pattern: /empty name/ },
    {
      name: "unknown header magic",
      data: () => {
        const h = header(file("a"));
        h.write("xxxxx\0", 257, "latin1");
        h.fill(0x20, 148, 156);
        let sum = 0;
        for (const b of h) sum += b;
        h.write(`${sum.toString(8).padStart(6, "0")}\0 `, 148, "latin1");
        return Buffer.concat([h, END]);
      },
      pattern: /unknown header magic/,
    },
    {
      name: "endless chain of extended headers",
      data: () => {
        const p = paxData({ comment: "x" });
        const one = Buffer.concat([
          header({ name: "x", type: "x", data: p }),
          p,
          Buffer.alloc(512 - p.length),
        ]);
        return Buffer.concat([...Array.from({ length: 100 }, () => one), END]);
      },
      pattern: /too many extended headers/,
    },
  ];
  for (const c of cases) {
    it(`refuses: ${c.name}`, async () => rejects(c.data(), "CORRUPT_LAYER", c.pattern, c.limits));
  }

  it("names the entry in the error", async () => {
    await assert.rejects(
      readAll(tar([file("ok"), file("etc/broken", "1", { badChecksum: true })])),
      (err) => {
        assert.ok(err instanceof LayerError);
        assert.equal(err.entry, "etc/broken");
        return true;
      },
    );
    await assert.rejects(
      readAll(entryBytes(file("usr/bin/cut", "x".repeat(3000))).subarray(0, 1500)),
      (err) => {
        assert.ok(err instanceof LayerError);
        assert.equal(err.entry, "usr/bin/cut");
        return true;
      },
    );
  });
});

describe("layer decompression", () => {
  const entries: RawEntry[] = [file("a", "alpha"), file("b", "b".repeat(100000))];
  const raw = tar(entries);

  async function viaFile(data: Buffer, mediaType: string) {
    const dir = mkdtempSync(join(tmpdir(), "rootfs-layer-"));
    try {
      const path = join(dir, "blob");
      writeFileSync(path, data);
      const opened = await openLayer(path, mediaType);
      const reader = new TarReader(opened.stream, { layer: "L" });
      const names: string[] = [];
      for await (const e of reader.entries()) names.push(`${e.name}:${e.size}`);
      return { names, compression: opened.compression };
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }

  const table = [
    { media: "application/vnd.oci.image.layer.v1.tar", data: raw, compression: "none" },
    { media: "application/vnd.oci.image.layer.v1.tar+gzip", data: gzipSync(raw), compression: "gzip" },
    {
      media: "application/vnd.oci.image.layer.v1.tar+zstd",
      data: zstdCompressSync(raw),
      compression: "zstd",
    },
    { media: "application/vnd.docker.image.rootfs.diff.tar.gzip", data: gzipSync(raw), compression: "gzip" },
    // Docker labels uncompressed layers tar.gzip at times: the magic bytes decide.
    { media: "application/vnd.docker.image.rootfs.diff.tar.gzip", data: raw, compression: "none" },
    { media: "application/vnd.oci.image.layer.v1.tar", data: zstdCompressSync(raw), compression: "zstd" },
    // Multi-member gzip (pigz, concatenated streams).
    {
      media: "application/vnd.oci.image.layer.v1.tar+gzip",
      data: Buffer.concat([gzipSync(raw.subarray(0, 1000)), gzipSync(raw.subarray(1000))]),
      compression: "gzip",
    },
  ] as const;
  for (const t of table) {
    it(`reads ${t.compression} labelled ${t.media}`, async () => {
      const r = await viaFile(t.data, t.media);
      assert.equal(r.compression, t.compression);
      assert.deepEqual(r.names, ["a:5", "b:100000"]);
    });
  }

  it("refuses bzip2/xz blobs and non-layer media types", async () => {
    await assert.rejects(viaFile(Buffer.from("BZh91AY&SY"), "application/vnd.oci.image.layer.v1.tar"), {
      code: "UNSUPPORTED_MEDIA_TYPE",
    });
    await assert.rejects(viaFile(raw, "application/vnd.oci.image.config.v1+json"), {
      code: "UNSUPPORTED_MEDIA_TYPE",
    });
  });

  it("turns a damaged gzip stream into CORRUPT_LAYER", async () => {
    const gz = gzipSync(raw);
    gz[gz.length - 6]! ^= 0xff; // CRC / size trailer
    const cut = gz.subarray(0, gz.length >> 1);
    for (const data of [gz, cut]) {
      await assert.rejects(viaFile(data, "application/vnd.oci.image.layer.v1.tar+gzip"), (err) => {
        assert.ok(err instanceof LayerError, String(err));
        assert.equal(err.code, "CORRUPT_LAYER");
        return true;
      });
    }
  });
});
