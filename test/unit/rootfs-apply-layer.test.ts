import assert from "node:assert/strict";
import { closeSync, mkdtempSync, openSync, readdirSync, readSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, it } from "node:test";
import { LayerError } from "../../src/errors.ts";
import { applyLayer, DEFAULT_ROOTFS_LIMITS, type RootfsLimits, Spool } from "../../src/rootfs/apply-layer.ts";
import { type DirNode, FileTree, walkTree } from "../../src/rootfs/file-tree.ts";
import { DEFAULT_TAR_LIMITS } from "../../src/rootfs/tar-reader.ts";
import {
  dir,
  file,
  hardlink,
  opaque,
  type RawEntry,
  symlink,
  tar,
  whiteout,
} from "../fixtures/hostile-layers/tar-builder.ts";

const scratch = mkdtempSync(join(tmpdir(), "rootfs-apply-"));
after(() => rmSync(scratch, { recursive: true, force: true }));
let run = 0;

async function* once(data: Buffer): AsyncGenerator<Buffer> {
  yield data;
}

interface Applied {
  tree: FileTree;
  spool: Spool;
  /** "path kind mode uid:gid detail" lines in byte order. */
  lines: string[];
  /** path → content of regular files. */
  content: Map<string, string>;
}

async function apply(layers: RawEntry[][], limits: Partial<RootfsLimits> = {}): Promise<Applied> {
  const tree = new FileTree();
  const spool = new Spool(mkdtempSync(join(scratch, `spool-${run++}-`)));
  tree.onRelease = (f) => {
    if (f.source) spool.release(f.source, f.size);
  };
  for (const [i, entries] of layers.entries()) {
    await applyLayer({
      tree,
      source: once(tar(entries)),
      layer: `layer${i}`,
      spool,
      limits: { ...DEFAULT_TAR_LIMITS, ...DEFAULT_ROOTFS_LIMITS, ...limits },
    });
  }
  return { tree, spool, lines: list(tree.root), content: contents(tree.root) };
}

function list(root: DirNode): string[] {
  const out: string[] = [];
  for (const { node, path } of walkTree(root)) {
    const p = `/${path.join("/")}`;
    const base = `${p} ${node.kind} ${node.mode.toString(8)} ${node.uid}:${node.gid}`;
    switch (node.kind) {
      case "symlink":
        out.push(`${base} -> ${node.target}`);
        break;
      case "file":
        out.push(`${base} size=${node.size} nlink=${node.nlink}`);
        break;
      case "char":
      case "block":
        out.push(`${base} ${node.major}:${node.minor}`);
        break;
      default:
        out.push(base);
    }
  }
  return out;
}

function contents(root: DirNode): Map<string, string> {
  const out = new Map<string, string>();
  for (const { node, path } of walkTree(root)) {
    if (node.kind === "file")
      out.set(
        `/${path.join("/")}`,
        node.source ? readRange(node.source.path, node.source.offset, node.size) : "",
      );
  }
  return out;
}

function readRange(path: string | Buffer, offset: number, size: number): string {
  const fd = openSync(path, "r");
  try {
    const buf = Buffer.alloc(size);
    readSync(fd, buf, 0, size, offset);
    return buf.toString("latin1");
  } finally {
    closeSync(fd);
  }
}

function paths(a: Applied): string[] {
  return a.lines.map((l) => l.split(" ")[0]!);
}

async function refused(
  layers: RawEntry[][],
  code: "UNSAFE_LAYER" | "CORRUPT_LAYER",
  entry: string,
  pattern?: RegExp,
) {
  await assert.rejects(apply(layers), (err: unknown) => {
    assert.ok(err instanceof LayerError, `expected a LayerError, got ${err}`);
    assert.equal(err.code, code, err.message);
    assert.equal(err.entry, entry);
    assert.match(err.layer, /^layer\d$/);
    if (pattern) assert.match(err.message, pattern);
    return true;
  });
}

describe("path resolution (chroot semantics)", () => {
  const table: { name: string; layers: RawEntry[][]; expect: Record<string, string> }[] = [
    {
      name: "merged /usr: lib/x lands in usr/lib/x",
      layers: [[dir("usr/"), dir("usr/lib/"), symlink("lib", "usr/lib")], [file("lib/x", "X")]],
      expect: { "/usr/lib/x": "X" },
    },
    {
      name: "absolute symlink on the way resolves from the image root",
      layers: [
        [dir("real/"), dir("real/etc/"), symlink("etc", "/real/etc"), file("etc/passwd", "root:x:0:0")],
      ],
      expect: { "/real/etc/passwd": "root:x:0:0" },
    },
    {
      name: "symlink to /etc then write link/passwd stays in the image's /etc",
      layers: [[dir("etc/"), symlink("link", "/etc"), file("link/passwd", "inside")]],
      expect: { "/etc/passwd": "inside" },
    },
    {
      name: "symlink to ../../.. is clamped at the root",
      layers: [[dir("a/"), dir("a/b/"), symlink("a/b/up", "../../../../.."), file("a/b/up/escaped", "E")]],
      expect: { "/escaped": "E" },
    },
    {
      name: "chain of symlinks, relative and absolute, with . and ..",
      layers: [
        [
          dir("x/"),
          dir("x/y/"),
          symlink("one", "./x/../x/y"),
          symlink("x/y/two", "/one/."),
          file("x/y/two/two/f", "F"),
        ],
      ],
      expect: { "/x/y/f": "F" },
    },
    {
      name: "missing parents are created (0755, root)",
      layers: [[file("deep/er/f", "D")]],
      expect: { "/deep/er/f": "D" },
    },
    {
      name: "dangling symlink on the way creates its target directories",
      layers: [[symlink("lib", "usr/lib"), file("lib/x", "X")]],
      expect: { "/usr/lib/x": "X" },
    },
    {
      name: "the last component is never followed: a file replaces a symlink",
      layers: [[dir("etc/"), file("etc/passwd", "old"), symlink("p", "etc/passwd")], [file("p", "new")]],
      expect: { "/etc/passwd": "old", "/p": "new" },
    },
    {
      name: "leading ./ and repeated slashes are ignored",
      layers: [[file(".//a//b", "AB"), file("./c", "C")]],
      expect: { "/a/b": "AB", "/c": "C" },
    },
  ];
  for (const t of table) {
    it(t.name, async () => {
      const a = await apply(t.layers);
      for (const [path, content] of Object.entries(t.expect))
        assert.equal(a.content.get(path), content, path);
    });
  }

  it("keeps lib a symlink after writing through it", async () => {
    const a = await apply([[dir("usr/"), dir("usr/lib/"), symlink("lib", "usr/lib")], [file("lib/x")]]);
    assert.ok(a.lines.includes("/lib symlink 777 0:0 -> usr/lib"));
    assert.ok(a.lines.includes("/usr/lib/x file 644 0:0 size=0 nlink=1"));
  });

  it("creates missing parents as 0755 root directories with mtime 0", async () => {
    const a = await apply([[file("p/q/f", "", { uid: 5, gid: 6 })]]);
    assert.deepEqual(a.lines, ["/p dir 755 0:0", "/p/q dir 755 0:0", "/p/q/f file 644 5:6 size=0 nlink=1"]);
    const p = a.tree.root.children.get("p")!;
    assert.equal(p.mtime, 0);
  });

  const refusals: {
    name: string;
    layers: RawEntry[][];
    code: "UNSAFE_LAYER" | "CORRUPT_LAYER";
    entry: string;
  }[] = [
    { name: "../ escape", layers: [[file("../evil", "x")]], code: "UNSAFE_LAYER", entry: "../evil" },
    {
      name: "inner .. escape",
      layers: [[file("a/../../evil")]],
      code: "UNSAFE_LAYER",
      entry: "a/../../evil",
    },
    { name: "harmless-looking inner ..", layers: [[file("a/../b")]], code: "UNSAFE_LAYER", entry: "a/../b" },
    { name: "absolute name", layers: [[file("/etc/passwd")]], code: "UNSAFE_LAYER", entry: "/etc/passwd" },
    {
      name: "symlink loop",
      layers: [[symlink("a", "b"), symlink("b", "a"), file("a/x")]],
      code: "UNSAFE_LAYER",
      entry: "a/x",
    },
    {
      name: "self loop",
      layers: [[symlink("s", "s/s"), file("s/x")]],
      code: "UNSAFE_LAYER",
      entry: "s/x",
    },
    {
      name: "a file on the way",
      layers: [[file("f", "x"), file("f/g")]],
      code: "CORRUPT_LAYER",
      entry: "f/g",
    },
    {
      name: "a name longer than 255 bytes",
      layers: [[{ ...file("d/short"), pax: { path: `d/${"n".repeat(256)}` } }]],
      code: "CORRUPT_LAYER",
      entry: `d/${"n".repeat(256)}`,
    },
    { name: "a file as the root", layers: [[file("./", "x")]], code: "CORRUPT_LAYER", entry: "./" },
    {
      name: "symlink target over 4095 bytes",
      layers: [[{ ...symlink("s", "t"), pax: { linkpath: "t".repeat(4096) } }]],
      code: "CORRUPT_LAYER",
      entry: "s",
    },
    {
      name: "device number out of range",
      layers: [[{ name: "dev/x", type: "3", devmajor: 5000, devminor: 1 }]],
      code: "CORRUPT_LAYER",
      entry: "dev/x",
    },
    {
      name: "uid over 32 bits (PAX)",
      layers: [[{ ...file("u"), pax: { uid: "4294967296" } }]],
      code: "CORRUPT_LAYER",
      entry: "u",
    },
  ];
  for (const r of refusals) {
    it(`refuses ${r.name}`, async () => refused(r.layers, r.code, r.entry));
  }
});

describe("whiteouts and opaque directories", () => {
  const base: RawEntry[] = [
    dir("etc/"),
    file("etc/keep", "k"),
    file("etc/gone", "g"),
    dir("var/"),
    dir("var/cache/"),
    file("var/cache/a", "a"),
    dir("var/cache/sub/"),
    file("var/cache/sub/b", "b"),
    dir("usr/"),
    dir("usr/lib/"),
    file("usr/lib/old", "o"),
    symlink("lib", "usr/lib"),
  ];
  const table: { name: string; upper: RawEntry[]; present: string[]; absent: string[] }[] = [
    { name: "file whiteout", upper: [whiteout("etc/gone")], present: ["/etc/keep"], absent: ["/etc/gone"] },
    {
      name: "directory whiteout removes the subtree",
      upper: [whiteout("var/cache")],
      present: ["/var"],
      absent: ["/var/cache", "/var/cache/a", "/var/cache/sub/b"],
    },
    {
      name: "whiteout of something that does not exist is a no-op",
      upper: [whiteout("etc/never"), whiteout("nowhere/x")],
      present: ["/etc/keep", "/etc/gone"],
      absent: ["/nowhere"],
    },
    {
      name: "whiteout through a symlinked parent",
      upper: [whiteout("lib/old")],
      present: ["/usr/lib", "/lib"],
      absent: ["/usr/lib/old"],
    },
    {
      name: "whiteout of a symlink removes the link, not its target",
      upper: [whiteout("lib")],
      present: ["/usr/lib/old"],
      absent: ["/lib"],
    },
    {
      name: "opaque directory hides lower children, keeps this layer's",
      upper: [dir("var/cache/"), opaque("var/cache"), file("var/cache/new", "n")],
      present: ["/var/cache", "/var/cache/new"],
      absent: ["/var/cache/a", "/var/cache/sub"],
    },
    {
      name: "opaque marker after this layer's entries (order does not matter)",
      upper: [
        dir("var/cache/"),
        file("var/cache/new", "n"),
        dir("var/cache/sub/"),
        file("var/cache/sub/c"),
        opaque("var/cache"),
      ],
      present: ["/var/cache/new", "/var/cache/sub", "/var/cache/sub/c"],
      absent: ["/var/cache/a", "/var/cache/sub/b"],
    },
    {
      name: "whiteout does not hide an entry of the same layer",
      upper: [file("etc/fresh", "f"), whiteout("etc/fresh")],
      present: ["/etc/fresh"],
      absent: [],
    },
    {
      name: "whiteout then re-create in the same layer",
      upper: [whiteout("etc/gone"), file("etc/gone", "again")],
      present: ["/etc/gone"],
      absent: [],
    },
    {
      name: "aufs metadata entries are ignored",
      upper: [file(".wh..wh.plnk/1.2"), file(".wh..wh.aufs"), file("etc/.wh..wh.x")],
      present: ["/etc/gone"],
      absent: ["/.wh..wh.aufs", "/.wh..wh.plnk", "/etc/.wh..wh.x"],
    },
  ];
  for (const t of table) {
    it(t.name, async () => {
      const a = await apply([base, t.upper]);
      const ps = paths(a);
      for (const p of t.present) assert.ok(ps.includes(p), `${p} missing in\n${a.lines.join("\n")}`);
      for (const p of t.absent) assert.ok(!ps.includes(p), `${p} present in\n${a.lines.join("\n")}`);
      assert.ok(!ps.some((p) => p.includes(".wh.")), "whiteout names never reach the tree");
    });
  }

  it("a whiteout in a later layer hides what an earlier upper layer added", async () => {
    const a = await apply([base, [file("etc/added", "1")], [whiteout("etc/added")]]);
    assert.ok(!paths(a).includes("/etc/added"));
  });

  it("a layer's spool file is deleted once nothing refers to its content", async () => {
    const a = await apply([
      [dir("etc/"), file("etc/a", "1"), file("etc/b", "2")],
      [file("etc/keep", "k")],
      [whiteout("etc/a"), file("etc/b", "new")],
    ]);
    // Layer 0's content is gone; layers 1 and 2 still hold live content.
    assert.deepEqual(readdirSync(a.spool.dir).sort(), ["1", "2"]);
  });

  it("refuses a whiteout of '..'", async () =>
    refused([base, [file("etc/.wh..."), file("x")]], "UNSAFE_LAYER", "etc/.wh..."));
});

describe("hardlinks", () => {
  it("links to an entry of the same layer and of a lower layer (one inode)", async () => {
    const a = await apply([
      [dir("bin/"), file("bin/perl", "PERL", { mode: 0o755 })],
      [hardlink("bin/perl5", "bin/perl"), file("bin/gzip", "GZ"), hardlink("bin/gunzip", "bin/gzip")],
    ]);
    const bin = a.tree.root.children.get("bin") as DirNode;
    assert.equal(bin.children.get("perl"), bin.children.get("perl5"));
    assert.equal(bin.children.get("gzip"), bin.children.get("gunzip"));
    assert.ok(a.lines.includes("/bin/perl5 file 755 0:0 size=4 nlink=2"));
    assert.equal(a.content.get("/bin/gunzip"), "GZ");
  });

  it("resolves the target through symlinks inside the root", async () => {
    const a = await apply([
      [
        dir("usr/"),
        dir("usr/bin/"),
        file("usr/bin/x", "X"),
        symlink("bin", "usr/bin"),
        hardlink("y", "bin/x"),
      ],
    ]);
    const usrBin = (a.tree.root.children.get("usr") as DirNode).children.get("bin") as DirNode;
    assert.equal(a.tree.root.children.get("y"), usrBin.children.get("x"));
  });

  it("links to a symlink itself, not to its target", async () => {
    const a = await apply([[file("t", "T"), symlink("s", "t"), hardlink("h", "s")]]);
    assert.equal(a.tree.root.children.get("h")?.kind, "symlink");
  });

  it("replacing one name leaves the other with the old content", async () => {
    const a = await apply([[file("a", "old"), hardlink("b", "a")], [file("a", "new")]]);
    assert.equal(a.content.get("/a"), "new");
    assert.equal(a.content.get("/b"), "old");
    assert.ok(a.lines.includes("/b file 644 0:0 size=3 nlink=1"));
  });

  it("whiting out one name keeps the other", async () => {
    const a = await apply([[file("a", "shared"), hardlink("b", "a")], [whiteout("a")]]);
    assert.equal(a.content.get("/b"), "shared");
    assert.deepEqual(readdirSync(a.spool.dir), ["0"]);
  });

  it("a link to itself is harmless", async () => {
    const a = await apply([[file("a", "x"), hardlink("a", "a")]]);
    assert.ok(a.lines.includes("/a file 644 0:0 size=1 nlink=1"));
  });

  const refusals: {
    name: string;
    layers: RawEntry[][];
    code: "UNSAFE_LAYER" | "CORRUPT_LAYER";
    entry: string;
  }[] = [
    { name: "absolute target", layers: [[hardlink("h", "/etc/passwd")]], code: "UNSAFE_LAYER", entry: "h" },
    {
      name: "target outside",
      layers: [[hardlink("h", "../../etc/passwd")]],
      code: "UNSAFE_LAYER",
      entry: "h",
    },
    { name: "missing target", layers: [[hardlink("h", "nope")]], code: "CORRUPT_LAYER", entry: "h" },
    { name: "directory target", layers: [[dir("d/"), hardlink("h", "d")]], code: "UNSAFE_LAYER", entry: "h" },
    {
      name: "target behind a symlink to a host path (looked up inside the root)",
      layers: [[symlink("l", "/etc"), hardlink("h", "l/passwd")]],
      code: "CORRUPT_LAYER",
      entry: "h",
    },
  ];
  for (const r of refusals) {
    it(`refuses a hardlink with ${r.name}`, async () => refused(r.layers, r.code, r.entry));
  }
});

describe("replacement, metadata and special files", () => {
  it("later duplicates win", async () => {
    const a = await apply([[file("f", "first"), file("f", "second", { mode: 0o600 })]]);
    assert.equal(a.content.get("/f"), "second");
    assert.ok(a.lines.includes("/f file 600 0:0 size=6 nlink=1"));
    assert.deepEqual(readdirSync(a.spool.dir), ["0"]);
  });

  it("a directory over a directory keeps the children and takes the metadata", async () => {
    const a = await apply([
      [dir("d/", { mode: 0o755 }), file("d/f", "x")],
      [dir("d/", { mode: 0o1777, uid: 7, gid: 8 })],
    ]);
    assert.deepEqual(a.lines, ["/d dir 1777 7:8", "/d/f file 644 0:0 size=1 nlink=1"]);
  });

  it("a file over a directory removes the subtree", async () => {
    const a = await apply([[dir("d/"), file("d/f", "x")], [file("d", "now a file")]]);
    assert.deepEqual(a.lines, ["/d file 644 0:0 size=10 nlink=1"]);
  });

  it("a directory replaced by a symlink mid-layer: later entries go through the symlink", async () => {
    const a = await apply([
      [dir("d/"), file("d/f", "x"), dir("target/"), symlink("d", "target"), file("d/g", "G")],
    ]);
    assert.deepEqual(a.lines, [
      "/d symlink 777 0:0 -> target",
      "/target dir 755 0:0",
      "/target/g file 644 0:0 size=1 nlink=1",
    ]);
  });

  it("keeps setuid/setgid/sticky bits, large ids, devices, FIFOs, xattrs and the root's metadata", async () => {
    const a = await apply([
      [
        dir("./", { mode: 0o700, uid: 1, gid: 2, mtime: 99 }),
        file("su", "", { mode: 0o4755 }),
        { ...file("sg", "", { mode: 0o2711 }), pax: { uid: "100000", gid: "4294967295" } },
        dir("tmp/", { mode: 0o1777 }),
        { name: "null", type: "3", devmajor: 1, devminor: 3, mode: 0o666 },
        { name: "sda", type: "4", devmajor: 8, devminor: 0, mode: 0o660, gid: 6 },
        { name: "big", type: "3", devmajor: 4095, devminor: 1048575 },
        { name: "fifo", type: "6", mode: 0o600 },
        {
          ...file("cap", "c"),
          pax: { "SCHILY.xattr.security.capability": "\x01\x00\x00\x02", "SCHILY.xattr.user.a": "1" },
        },
      ],
    ]);
    assert.deepEqual(a.lines, [
      "/big char 644 0:0 4095:1048575",
      "/cap file 644 0:0 size=1 nlink=1",
      "/fifo fifo 600 0:0",
      "/null char 666 0:0 1:3",
      "/sda block 660 0:6 8:0",
      "/sg file 2711 100000:4294967295 size=0 nlink=1",
      "/su file 4755 0:0 size=0 nlink=1",
      "/tmp dir 1777 0:0",
    ]);
    const root = a.tree.root;
    assert.deepEqual([root.mode, root.uid, root.gid, root.mtime], [0o700, 1, 2, 99]);
    const cap = root.children.get("cap")!;
    assert.deepEqual([...(cap.xattrs?.keys() ?? [])], ["security.capability", "user.a"]);
  });

  it("bounds the number of nodes, including directories created on the way", async () => {
    await assert.rejects(apply([[symlink("s", "a/b/c/d/e/f/g/h/i/j"), file("s/x")]], { maxNodes: 5 }), {
      code: "UNSAFE_LAYER",
    });
  });

  it("bounds the total decompressed size before reading an entry's data", async () => {
    await assert.rejects(
      apply([[file("a", "x".repeat(600)), file("b", "y".repeat(600))]], { maxTotalBytes: 2500 }),
      {
        code: "UNSAFE_LAYER",
        entry: "b",
      },
    );
  });
});
