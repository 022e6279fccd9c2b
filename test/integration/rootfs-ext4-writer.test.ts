/**
 * The builtin ext4 writer on its own: many small block groups (fragmented files, extent trees,
 * superblock backups, a multi-extent journal), xattr blocks and ACLs, hardlinked special files,
 * big and deep directories, size limits — checked with e2fsck and debugfs, and (as root, where
 * loop devices work) mounted by the kernel, written to, and checked again.
 */
import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { applyLayer, DEFAULT_ROOTFS_LIMITS, Spool } from "../../src/rootfs/apply-layer.ts";
import { writeExt4Image } from "../../src/rootfs/ext4-writer.ts";
import { FileTree } from "../../src/rootfs/file-tree.ts";
import { DEFAULT_TAR_LIMITS } from "../../src/rootfs/tar-reader.ts";
import {
  cat,
  debugfs,
  dumpe2fs,
  fsck,
  listImage,
  ls,
  stat,
} from "../fixtures/hostile-layers/inspect-image.ts";
import { dir, file, hardlink, type RawEntry, symlink, tar } from "../fixtures/hostile-layers/tar-builder.ts";

const work = mkdtempSync(join(tmpdir(), "rootfs-ext4-"));
after(() => rmSync(work, { recursive: true, force: true }));
let n = 0;

async function treeOf(entries: RawEntry[]): Promise<FileTree> {
  const tree = new FileTree();
  const spool = new Spool(mkdtempSync(join(work, "spool-")));
  await applyLayer({
    tree,
    source: (async function* () {
      yield tar(entries);
    })(),
    layer: "test",
    spool,
    limits: { ...DEFAULT_TAR_LIMITS, ...DEFAULT_ROOTFS_LIMITS },
  });
  return tree;
}

async function write(tree: FileTree, extra: Partial<Parameters<typeof writeExt4Image>[0]> = {}) {
  const imagePath = join(work, `image-${n++}.ext4`);
  const r = await writeExt4Image({
    tree,
    imagePath,
    uuid: "01234567-89ab-8cde-8f01-23456789abcd",
    hashSeed: "fedcba98-7654-8321-8fed-cba987654321",
    label: "test",
    freeBytes: 4 * 1024 * 1024,
    durable: false,
    ...extra,
  });
  return { imagePath, r };
}

/** Deterministic pseudo-random bytes (no zero blocks, so nothing is left sparse). */
function noise(size: number, seed: number): Buffer {
  const out = Buffer.alloc(size);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < size; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = (x >>> 0) & 0xff || 1;
  }
  return out;
}

const sha = (b: Buffer): string => createHash("sha256").update(b).digest("hex");
const ACL = Buffer.from(
  // version 2; USER_OBJ rw-, USER 1000 r--, GROUP_OBJ r--, MASK r--, OTHER ---
  "02000000" +
    "01000600ffffffff" +
    "02000400e8030000" +
    "04000400ffffffff" +
    "10000400ffffffff" +
    "20000000ffffffff",
  "hex",
);

describe("builtin ext4 writer: small block groups", () => {
  const big = noise(22 * 1024 * 1024 + 123, 7); // spans more than 4 groups of 4 MiB
  let image: string;
  let result: Awaited<ReturnType<typeof writeExt4Image>>;

  before(async () => {
    const entries: RawEntry[] = [
      dir("data/"),
      file("data/big.bin", big),
      file("data/small", "s"),
      dir("many/"),
      ...Array.from({ length: 700 }, (_, i) => file(`many/${"x".repeat(40)}-${i}`, String(i))),
      ...Array.from({ length: 120 }, (_, i) => dir(`${Array.from({ length: i + 1 }, () => "d").join("/")}/`)),
      {
        ...file("xa/big-xattr", "x"),
        pax: { "SCHILY.xattr.user.blob": "v".repeat(1500), "SCHILY.xattr.user.two": "2" },
      },
      { ...file("xa/acl", "a"), pax: { "SCHILY.xattr.system.posix_acl_access": ACL } },
      { name: "dev/null", type: "3", devmajor: 1, devminor: 3, mode: 0o666 },
      hardlink("dev/null-again", "dev/null"),
      symlink("s1", "data/small"),
      hardlink("s2", "s1"),
      dir("lost+found/", { mode: 0o700 }),
      file("lost+found/kept", "from the layer"),
      { ...file("n"), pax: { path: `long/${"n".repeat(255)}` } },
    ];
    ({ imagePath: image, r: result } = await write(await treeOf(entries), {
      blocksPerGroup: 1024,
      freeBytes: 128 * 1024 * 1024, // a journal of 4096 blocks: more than 4 groups
    }));
  });

  it("passes e2fsck", () => {
    const f = fsck(image);
    assert.equal(f.status, 0, f.output);
  });

  it("uses many groups with superblock backups and a fragmented journal", () => {
    const dump = dumpe2fs(image);
    assert.match(dump, /Blocks per group:\s+1024/);
    const groups = dump.match(/^Group \d+:/gm)?.length ?? 0;
    assert.ok(groups > 9, `${groups} groups`);
    for (const g of [1, 3, 5, 7, 9])
      assert.match(dump, new RegExp(`Group ${g}: .*\\n\\s+Backup superblock`), `group ${g}`);
    const journal = debugfs(image, ["stat <8>"])[0]!;
    assert.match(journal, /EXTENTS:\n\(ETB0\):/, "the journal needs an extent tree block");
    assert.equal(result.freeBytes, Number(/Free blocks:\s+(\d+)/.exec(dump)![1]) * 4096);
    assert.equal(result.freeInodes, Number(/Free inodes:\s+(\d+)/.exec(dump)![1]));
  });

  it("stores a fragmented file with an extent tree", () => {
    const s = debugfs(image, ["stat /data/big.bin"])[0]!;
    assert.match(s, /\(ETB0\):/, "expected an extent index block");
    assert.equal(sha(cat(image, "/data/big.bin")), sha(big));
  });

  it("stores large directories and deep paths", () => {
    assert.equal(ls(image, "/many").length, 700);
    assert.equal(cat(image, `/many/${"x".repeat(40)}-699`).toString(), "699");
    const deep = `/${Array.from({ length: 120 }, () => "d").join("/")}`;
    assert.equal(stat(image, [deep]).get(deep)?.type, "directory");
    assert.equal(stat(image, [`/long/${"n".repeat(255)}`]).get(`/long/${"n".repeat(255)}`)?.type, "regular");
  });

  it("puts large xattrs in a block and converts POSIX ACLs", () => {
    const s = stat(image, ["/xa/big-xattr", "/xa/acl"]);
    assert.equal(s.get("/xa/big-xattr")?.xattrs.get("user.two"), '"2"');
    assert.ok(s.get("/xa/big-xattr")?.xattrs.has("user.blob"));
    assert.match(debugfs(image, ["stat /xa/big-xattr"])[0]!, /File ACL: [1-9]\d*/);
    // On disk: ext4's ACL format (version 1; 4-byte entries, 8 bytes with an id)…
    const raw = debugfs(image, ["ea_get -r /xa/acl system.posix_acl_access"])[0]!.replace(/\s+/g, "");
    assert.match(raw, /\(28\)=010000000100060002000400e8030000040004001000040020000000$/);
    // …which debugfs (like the kernel) turns back into the VFS format (version 2) it came from.
    const vfs = debugfs(image, ["ea_get /xa/acl system.posix_acl_access"])[0]!.replace(/\s+/g, "");
    assert.match(vfs, /\(44\)=02000000010006000000000002000400e8030000/);
  });

  it("shares one inode between hardlinked devices and symlinks", () => {
    const s = stat(image, ["/dev/null", "/dev/null-again", "/s1", "/s2"]);
    assert.equal(s.get("/dev/null")?.inode, s.get("/dev/null-again")?.inode);
    assert.equal(s.get("/dev/null")?.links, 2);
    assert.equal(s.get("/s1")?.inode, s.get("/s2")?.inode);
    assert.equal(s.get("/s2")?.fastLink, "data/small");
  });

  it("keeps a lost+found that comes with the image, as inode 11", () => {
    const s = stat(image, ["/lost+found"]).get("/lost+found")!;
    assert.equal(s.inode, 11);
    assert.equal(cat(image, "/lost+found/kept").toString(), "from the layer");
  });
});

describe("builtin ext4 writer: sizes", () => {
  it("honours an exact size and refuses one too small", async () => {
    const tree = await treeOf([file("f", noise(3 * 1024 * 1024, 3))]);
    const { imagePath, r } = await write(tree, { sizeBytes: 20 * 1024 * 1024, freeBytes: undefined });
    assert.equal(r.sizeBytes, 20 * 1024 * 1024);
    assert.equal(fsck(imagePath).status, 0);
    await assert.rejects(write(tree, { sizeBytes: 4 * 1024 * 1024, freeBytes: undefined }), {
      code: "ROOTFS_BUILD",
    });
  });

  it("leaves at least the free space and inodes asked for", async () => {
    const tree = await treeOf([file("f", "x")]);
    const { r } = await write(tree, { freeBytes: 300 * 1024 * 1024 });
    assert.ok(r.freeBytes >= 300 * 1024 * 1024);
    assert.ok(r.freeInodes >= 16384);
  });

  it("refuses xattrs that do not fit in one block (when the layer is read, and in the writer)", async () => {
    await assert.rejects(treeOf([{ ...file("f"), pax: { "SCHILY.xattr.user.huge": "h".repeat(5000) } }]), {
      code: "UNSAFE_LAYER",
    });
    const tree = await treeOf([file("f")]);
    tree.root.children.get("f")!.xattrs = new Map([["user.huge", Buffer.alloc(5000, 0x68)]]);
    await assert.rejects(write(tree), { code: "ROOTFS_BUILD" });
  });

  it("gives the same bytes for the same tree", async () => {
    const entries = [dir("a/"), file("a/b", noise(100000, 9)), symlink("c", "a/b")];
    const one = await write(await treeOf(entries));
    const two = await write(await treeOf(entries));
    const digest = (p: string): string => execFileSync("sha256sum", [p], { encoding: "utf8" }).split(" ")[0]!;
    assert.equal(digest(one.imagePath), digest(two.imagePath));
    assert.deepEqual(listImage(one.imagePath), listImage(two.imagePath));
  });
});

/** Root, and a free loop device (containers often have none). */
const canMount = process.geteuid?.() === 0 && spawnSync("losetup", ["-f"]).status === 0;

describe("the kernel", { skip: !canMount && "needs root and loop devices" }, () => {
  it("mounts a builtin image, reads it, writes to it, and e2fsck is still happy", async () => {
    const tree = await treeOf([
      dir("etc/"),
      file("etc/hostname", "box\n"),
      file("data", noise(2 * 1024 * 1024, 5)),
      { ...file("xa"), pax: { "SCHILY.xattr.user.k": "v" } },
      {
        ...file("acl", "a", { mode: 0o640 }),
        pax: { "SCHILY.acl.access": "user::rw-,user:4242:r--,group::r--,mask::r--,other::---" },
      },
      {
        ...dir("sparse-dir/"),
        pax: { "SCHILY.acl.default": "user::rwx,user:7:r-x,group::r-x,mask::r-x,other::---" },
      },
      {
        ...file("sparse-dir/holes", "abc"),
        pax: { "GNU.sparse.map": "1000000,3", "GNU.sparse.size": "3000000", "GNU.sparse.numblocks": "1" },
      },
    ]);
    const { imagePath } = await write(tree, { freeBytes: 64 * 1024 * 1024 });
    const copy = join(work, "mounted.ext4");
    copyFileSync(imagePath, copy);
    const mnt = join(work, "mnt");
    mkdirSync(mnt);
    execFileSync("mount", ["-o", "loop", copy, mnt]);
    try {
      assert.equal(execFileSync("cat", [join(mnt, "etc/hostname")], { encoding: "utf8" }), "box\n");
      // The kernel reads our ext4 ACLs as the ACLs the layer gave, and the sparse file's holes.
      const acl = execFileSync("getfacl", ["-n", "-c", join(mnt, "acl")], { encoding: "utf8" });
      assert.match(acl, /^user::rw-\nuser:4242:r--\ngroup::r--\nmask::r--\nother::---\n/);
      const defaults = execFileSync("getfacl", ["-n", "-c", "-d", join(mnt, "sparse-dir")], {
        encoding: "utf8",
      });
      assert.match(defaults, /^user::rwx\nuser:7:r-x\ngroup::r-x\nmask::r-x\nother::---\n/);
      const holes = readFileSync(join(mnt, "sparse-dir/holes"));
      assert.equal(holes.length, 3_000_000);
      assert.equal(holes.subarray(1_000_000, 1_000_003).toString(), "abc");
      assert.ok(statSync(join(mnt, "sparse-dir/holes")).blocks <= 8, "the holes are allocated");
      mkdirSync(join(mnt, "new"));
      for (let i = 0; i < 2000; i++) writeFileSync(join(mnt, "new", String(i)), `${i}\n`);
      writeFileSync(join(mnt, "big"), noise(20 * 1024 * 1024, 11));
      rmSync(join(mnt, "data"));
    } finally {
      execFileSync("umount", [mnt]);
    }
    const f = fsck(copy);
    assert.equal(f.status, 0, f.output);
  });
});
