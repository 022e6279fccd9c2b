/**
 * Builds real images (host only, no VM) and inspects them with debugfs / e2fsck / dumpe2fs:
 * ownership, modes, devices, hardlinks, symlinks, xattrs, times, whiteouts, opaque directories,
 * determinism, directory builds, and (when run as root) the same build as an unprivileged user.
 */
import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import {
  chmodSync,
  chownSync,
  copyFileSync,
  cpSync,
  linkSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { gzipSync, zstdCompressSync } from "node:zlib";
import {
  buildImageFromDirectory,
  flattenLayers,
  type LayerSource,
  ROOTFS_FORMAT_VERSION,
} from "../../src/rootfs/index.ts";
import {
  cat,
  debugfs,
  dumpe2fs,
  fingerprint,
  fsck,
  listImage,
  ls,
  q,
  stat,
} from "../fixtures/hostile-layers/inspect-image.ts";
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

const work = mkdtempSync(join(tmpdir(), "rootfs-it-"));
after(() => rmSync(work, { recursive: true, force: true }));
const isRoot = process.geteuid?.() === 0;
const LONG_TARGET = `../${"long-target-component/".repeat(5)}end`;
const CAP = Buffer.from("0100000200200000000000000000000000000000", "hex"); // cap_net_raw+ep
const T = 1_700_000_000;

const layer0: RawEntry[] = [
  dir("./", { mode: 0o755, mtime: T }),
  dir("usr/"),
  dir("usr/bin/"),
  dir("usr/lib/"),
  dir("usr/share/"),
  dir("usr/share/doc/"),
  file("usr/share/doc/README", "docs"),
  symlink("bin", "usr/bin"),
  symlink("lib", "usr/lib"),
  file("usr/bin/su", "su-binary", { mode: 0o4755 }),
  file("usr/bin/wall", "wall-binary", { mode: 0o2755, gid: 5 }),
  file("usr/bin/perl", "perl-binary", { mode: 0o755 }),
  hardlink("usr/bin/perl5.36.0", "usr/bin/perl"),
  file("usr/bin/gzip", "gzip-binary", { mode: 0o755 }),
  hardlink("usr/bin/gunzip", "usr/bin/gzip"),
  {
    ...file("usr/bin/ping", "ping-binary", { mode: 0o755 }),
    pax: { "SCHILY.xattr.security.capability": CAP },
  },
  dir("etc/"),
  file("etc/shadow", "root:*:19000::::::\n", { mode: 0o640, gid: 42 }),
  {
    ...file("etc/xa", "x"),
    pax: {
      "SCHILY.xattr.user.comment": "hello",
      "SCHILY.xattr.trusted.note": "t",
      "SCHILY.xattr.bogus.ns": "dropped",
    },
  },
  dir("etc/many/"),
  ...Array.from({ length: 300 }, (_, i) =>
    file(`etc/many/entry-with-a-rather-long-name-${String(i).padStart(4, "0")}`, `${i}`),
  ),
  dir("tmp/", { mode: 0o1777 }),
  dir("dev/"),
  { name: "dev/null", type: "3", devmajor: 1, devminor: 3, mode: 0o666 },
  { name: "dev/sda", type: "4", devmajor: 8, devminor: 0, mode: 0o660, gid: 6 },
  { name: "dev/bigminor", type: "3", devmajor: 10, devminor: 300, mode: 0o600 },
  { name: "dev/hugeminor", type: "3", devmajor: 240, devminor: 70000, mode: 0o600 },
  dir("run/"),
  { name: "run/initctl", type: "6", mode: 0o600 },
  dir("home/"),
  dir("home/user/", { mode: 0o700, uid: 1000, gid: 1000 }),
  file("home/user/.profile", "PS1=$\n", { uid: 1000, gid: 1000 }),
  { ...file("big-ids", "b"), pax: { uid: "100000", gid: "200000" } },
  { ...file("max-ids", "m"), pax: { uid: "4294967294", gid: "4294967293" } },
  { ...symlink("long-link", "x"), pax: { linkpath: LONG_TARGET } },
  file("t0", "", { mtime: 0 }),
  { ...file("t3e9", ""), pax: { mtime: "3000000000.5" } },
  { ...file("tneg", ""), pax: { mtime: "-1000" } },
  file("empty", ""),
  file("zeros", Buffer.alloc(1024 * 1024)),
  dir("opt/"),
  file("opt/old", "old"),
  dir("var/"),
  dir("var/cache/"),
  dir("var/cache/apt/"),
  file("var/cache/apt/pkgcache.bin", "cache"),
  file("var/cache/keep-me-not", "lower"),
];

const layer1: RawEntry[] = [
  file("lib/x.so", "via merged usr"),
  whiteout("opt/old"),
  dir("var/cache/", { mode: 0o755 }),
  opaque("var/cache"),
  file("var/cache/new", "upper"),
  whiteout("usr/share"),
  hardlink("usr/bin/uncompress", "usr/bin/gzip"),
  file("usr/bin/perl", "perl-upgraded", { mode: 0o755 }),
  hardlink("usr/bin/perl5.36.0", "usr/bin/perl"),
];

const layer2: RawEntry[] = [
  dir("tmp/", { mode: 0o1777, mtime: T + 5 }),
  file("etc/motd", "welcome\n", { mode: 0o644 }),
];

function layers(dirPath: string): LayerSource[] {
  mkdirSync(dirPath, { recursive: true });
  const blobs = [gzipSync(tar(layer0)), zstdCompressSync(tar(layer1)), tar(layer2)];
  const media = [
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.v1.tar",
  ];
  return blobs.map((blob, i) => {
    const path = join(dirPath, `layer${i}`);
    writeFileSync(path, blob);
    return {
      path,
      mediaType: media[i]!,
      digest: `sha256:${createHash("sha256").update(blob).digest("hex")}`,
    };
  });
}

const sha = (p: string): string => createHash("sha256").update(readFileSync(p)).digest("hex");

const PHASES = ["layer", "write", "done"] as const;

describe("flattenLayers: a three-layer image", () => {
  let image: string;
  let result: Awaited<ReturnType<typeof flattenLayers>>;
  const events: string[] = [];

  before(async () => {
    image = join(work, "out", "image.ext4");
    result = await flattenLayers({
      layers: layers(join(work, "layers")),
      output: image,
      freeBytes: 64 * 1024 * 1024,
      onProgress: (e) => events.push(e.phase),
    });
  });

  it("is a clean ext4 file system", () => {
    const f = fsck(image);
    assert.equal(f.status, 0, f.output);
  });

  it("reports the build", () => {
    assert.equal(result.imagePath, image);
    assert.equal(result.formatVersion, ROOTFS_FORMAT_VERSION);
    assert.equal(result.label, "supermachine");
    assert.match(result.uuid, /^[0-9a-f]{8}-[0-9a-f]{4}-8[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    assert.ok(result.freeBytes >= 64 * 1024 * 1024, `free ${result.freeBytes}`);
    assert.ok(result.freeInodes >= 16384);
    assert.deepEqual(result.skippedXattrs, [{ path: "/etc/xa", name: "bogus.ns" }]);
    assert.deepEqual([...new Set(events)], PHASES);
    const dump = dumpe2fs(image, true);
    assert.match(dump, new RegExp(`Filesystem UUID:\\s+${result.uuid}`));
    assert.match(dump, /Filesystem volume name:\s+supermachine/);
    assert.match(dump, /Filesystem features:.*has_journal.*extent.*metadata_csum/);
    assert.match(dump, /Journal start:\s+0/);
    assert.match(dump, /Filesystem state:\s+clean/);
    assert.match(dump, /Inode size:\s+256/);
  });

  it("keeps owners and every mode bit (setuid, setgid, sticky)", () => {
    const s = stat(image, [
      "/",
      "/usr/bin/su",
      "/usr/bin/wall",
      "/tmp",
      "/etc/shadow",
      "/home/user",
      "/home/user/.profile",
    ]);
    assert.equal(s.get("/")?.mode, 0o755);
    assert.deepEqual([s.get("/usr/bin/su")?.mode, s.get("/usr/bin/su")?.uid], [0o4755, 0]);
    assert.deepEqual([s.get("/usr/bin/wall")?.mode, s.get("/usr/bin/wall")?.gid], [0o2755, 5]);
    assert.deepEqual([s.get("/tmp")?.type, s.get("/tmp")?.mode], ["directory", 0o1777]);
    assert.deepEqual(
      [s.get("/etc/shadow")?.mode, s.get("/etc/shadow")?.uid, s.get("/etc/shadow")?.gid],
      [0o640, 0, 42],
    );
    assert.deepEqual(
      [s.get("/home/user")?.mode, s.get("/home/user")?.uid, s.get("/home/user")?.gid],
      [0o700, 1000, 1000],
    );
    assert.deepEqual([s.get("/home/user/.profile")?.uid, s.get("/home/user/.profile")?.gid], [1000, 1000]);
  });

  it("keeps 32-bit owners (high 16 bits included)", () => {
    const out = debugfs(image, ["stat /big-ids", "stat /max-ids", "ls -p /"]);
    assert.match(out[0]!, /User:\s+100000\s+Group:\s+200000/);
    // debugfs prints ids as signed ints; -2 / -3 are 4294967294 / 4294967293.
    assert.match(out[1]!, /User:\s+(4294967294|-2)\s+Group:\s+(4294967293|-3)/);
    assert.match(out[2]!, /\/max-ids\//);
  });

  it("makes device nodes and FIFOs", () => {
    const s = stat(image, ["/dev/null", "/dev/sda", "/dev/bigminor", "/dev/hugeminor", "/run/initctl"]);
    assert.deepEqual(
      [s.get("/dev/null")?.type, s.get("/dev/null")?.device, s.get("/dev/null")?.mode],
      ["character special", "1:3", 0o666],
    );
    assert.deepEqual(
      [s.get("/dev/sda")?.type, s.get("/dev/sda")?.device, s.get("/dev/sda")?.gid],
      ["block special", "8:0", 6],
    );
    assert.equal(s.get("/dev/bigminor")?.device, "10:300");
    assert.equal(s.get("/dev/hugeminor")?.device, "240:70000");
    assert.deepEqual([s.get("/run/initctl")?.type, s.get("/run/initctl")?.mode], ["FIFO", 0o600]);
  });

  it("keeps hardlinks as one inode", () => {
    const s = stat(image, [
      "/usr/bin/gzip",
      "/usr/bin/gunzip",
      "/usr/bin/uncompress",
      "/usr/bin/perl",
      "/usr/bin/perl5.36.0",
    ]);
    const gz = s.get("/usr/bin/gzip")!;
    assert.equal(s.get("/usr/bin/gunzip")?.inode, gz.inode);
    assert.equal(s.get("/usr/bin/uncompress")?.inode, gz.inode);
    assert.equal(gz.links, 3);
    assert.equal(s.get("/usr/bin/perl5.36.0")?.inode, s.get("/usr/bin/perl")?.inode);
    assert.equal(s.get("/usr/bin/perl")?.links, 2);
    assert.equal(cat(image, "/usr/bin/perl5.36.0").toString(), "perl-upgraded");
  });

  it("stores symlinks as symlinks, short and long", () => {
    const s = stat(image, ["/bin", "/lib", "/long-link"]);
    assert.deepEqual([s.get("/bin")?.type, s.get("/bin")?.fastLink], ["symlink", "usr/bin"]);
    assert.equal(s.get("/lib")?.fastLink, "usr/lib");
    assert.equal(s.get("/long-link")?.type, "symlink");
    assert.equal(s.get("/long-link")?.size, LONG_TARGET.length);
    assert.equal(cat(image, "/usr/lib/x.so").toString(), "via merged usr");
  });

  it("stores xattrs (security.capability, user.*, trusted.*)", () => {
    const s = stat(image, ["/usr/bin/ping", "/etc/xa"]);
    assert.ok(s.get("/usr/bin/ping")?.xattrs.has("security.capability"));
    assert.equal(s.get("/etc/xa")?.xattrs.get("user.comment"), '"hello"');
    assert.equal(s.get("/etc/xa")?.xattrs.get("trusted.note"), '"t"');
    assert.equal(s.get("/etc/xa")?.xattrs.has("bogus.ns"), false);
    const raw = debugfs(image, ["ea_get -x /usr/bin/ping security.capability"])[0]!;
    assert.match(raw.replace(/\s/g, ""), /0100000200200000/);
  });

  it("sets mtime, atime and ctime from the layer (before 1970 and after 2038 too)", () => {
    const s = stat(image, ["/t0", "/t3e9", "/tneg", "/etc/motd", "/tmp", "/usr/bin/su"]);
    for (const [p, t] of [
      ["/t0", 0],
      ["/t3e9", 3_000_000_000],
      ["/tneg", -1000],
      ["/usr/bin/su", 1_700_000_000],
      ["/tmp", T + 5],
    ] as const) {
      const st = s.get(p)!;
      assert.deepEqual([st.mtime, st.atime, st.ctime], [t, t, t], p);
    }
  });

  it("applies whiteouts and opaque directories", () => {
    assert.deepEqual(ls(image, "/opt"), []);
    assert.deepEqual(ls(image, "/var/cache"), ["new"]);
    assert.deepEqual(ls(image, "/usr").sort(), ["bin", "lib"]);
    assert.equal(cat(image, "/var/cache/new").toString(), "upper");
  });

  it("writes contents, large directories and empty / all-zero files", () => {
    assert.equal(ls(image, "/etc/many").length, 300);
    assert.equal(cat(image, "/etc/many/entry-with-a-rather-long-name-0299").toString(), "299");
    assert.equal(stat(image, ["/empty"]).get("/empty")?.size, 0);
    const zeros = cat(image, "/zeros");
    assert.equal(zeros.length, 1024 * 1024);
    assert.ok(zeros.every((b) => b === 0));
  });

  it("is byte-identical when built again (other output path, other scratch dir)", async () => {
    const other = join(work, "again", "second.ext4");
    const scratch = mkdtempSync(join(work, "scratch-"));
    const again = await flattenLayers({
      layers: layers(join(work, "layers-copy")),
      output: other,
      freeBytes: 64 * 1024 * 1024,
      tmpDir: scratch,
    });
    assert.equal(again.uuid, result.uuid);
    assert.equal(sha(other), sha(image));
  });

  it("writes atomically and replaces an existing output", async () => {
    writeFileSync(join(work, "out", "replace.ext4"), "old contents");
    const r = await flattenLayers({
      layers: layers(join(work, "layers")).slice(2),
      output: join(work, "out", "replace.ext4"),
      sizeBytes: 32 * 1024 * 1024,
    });
    assert.equal(r.sizeBytes, 32 * 1024 * 1024);
    assert.equal(fsck(r.imagePath).status, 0);
  });

  for (const phase of PHASES.slice(0, -1)) {
    it(`stops on abort during "${phase}" and leaves nothing behind`, async () => {
      const controller = new AbortController();
      const output = join(work, `aborted-${phase}`, "image.ext4");
      const pending = flattenLayers({
        layers: layers(join(work, "layers")),
        output,
        signal: controller.signal,
        onProgress: (e) => {
          if (e.phase === phase) controller.abort(new Error("stop"));
        },
      });
      await assert.rejects(pending, (err: unknown) => {
        assert.equal((err as { code?: string }).code, "ABORTED");
        assert.equal(((err as Error).cause as Error).message, "stop");
        return true;
      });
      assert.deepEqual(fingerprint(join(work, `aborted-${phase}`)).size, 0);
    });
  }
});

describe("errors", () => {
  it("reports a host I/O failure as ROOTFS_BUILD with its cause", async () => {
    await assert.rejects(
      flattenLayers({
        layers: [
          {
            path: join(work, "no-such-blob"),
            mediaType: "application/vnd.oci.image.layer.v1.tar",
            digest: "sha256:x",
          },
        ],
        output: join(work, "errors", "image.ext4"),
      }),
      (err: unknown) => {
        assert.equal((err as { code?: string }).code, "ROOTFS_BUILD");
        assert.equal(((err as Error).cause as { code?: string }).code, "ENOENT");
        return true;
      },
    );
    assert.deepEqual(fingerprint(join(work, "errors")).size, 0);
  });

  it("refuses bad options", async () => {
    const lay = { path: "x", mediaType: "", digest: "sha256:x" };
    const output = join(work, "errors", "o.ext4");
    for (const bad of [
      { sizeBytes: 1 },
      { sizeBytes: 1 << 30, freeBytes: 1 },
      { label: "x".repeat(17) },
      { uuid: "nope" },
    ]) {
      await assert.rejects(flattenLayers({ layers: [lay], output, ...bad }), { code: "INVALID_ARGUMENT" });
    }
  });
});

describe("buildImageFromDirectory", () => {
  const src = join(work, "src-dir");
  let before_: Map<string, string>;

  before(() => {
    mkdirSync(join(src, "etc"), { recursive: true });
    mkdirSync(join(src, "bin"));
    writeFileSync(join(src, "etc", "hostname"), "box\n");
    writeFileSync(join(src, "bin", "tool"), "#!/bin/sh\n");
    chmodSync(join(src, "bin", "tool"), 0o4755);
    linkSync(join(src, "bin", "tool"), join(src, "bin", "tool-link"));
    symlinkSync("/etc", join(src, "host-etc")); // must stay a symlink, never be followed
    symlinkSync("../etc/hostname", join(src, "bin", "rel"));
    execFileSync("mkfifo", [join(src, "fifo")]);
    if (isRoot) {
      execFileSync("mknod", [join(src, "null"), "c", "1", "3"]);
      writeFileSync(join(src, "etc", "mine"), "mapped");
      chownSync(join(src, "etc", "mine"), 1234, 1234);
      writeFileSync(join(src, "etc", "theirs"), "kept");
      chownSync(join(src, "etc", "theirs"), 5678, 5679);
    }
    before_ = fingerprint(src);
  });

  it("copies the tree: symlinks not followed, special files and hardlinks kept, owner mapped to root", async () => {
    const output = join(work, "dir-image.ext4");
    const r = await buildImageFromDirectory({
      dir: src,
      output,
      freeBytes: 32 * 1024 * 1024,
      ...(isRoot ? { mapOwner: { uid: 1234, gid: 1234 } } : {}),
    });
    assert.equal(fsck(output).status, 0);
    const s = stat(output, [
      "/host-etc",
      "/bin/tool",
      "/bin/tool-link",
      "/bin/rel",
      "/fifo",
      "/etc/hostname",
      "/null",
      "/etc/mine",
      "/etc/theirs",
    ]);
    assert.deepEqual([s.get("/host-etc")?.type, s.get("/host-etc")?.fastLink], ["symlink", "/etc"]);
    assert.equal(s.get("/bin/rel")?.fastLink, "../etc/hostname");
    assert.equal(s.get("/bin/tool")?.mode, 0o4755);
    assert.equal(s.get("/bin/tool-link")?.inode, s.get("/bin/tool")?.inode);
    assert.equal(s.get("/fifo")?.type, "FIFO");
    // Files of the invoking (non-root) user, or of the mapped owner, are root's in the image.
    assert.deepEqual([s.get("/etc/hostname")?.uid, s.get("/etc/hostname")?.gid], [0, 0]);
    if (isRoot) {
      assert.equal(s.get("/null")?.device, "1:3");
      assert.deepEqual([s.get("/etc/mine")?.uid, s.get("/etc/mine")?.gid], [0, 0]);
      assert.deepEqual([s.get("/etc/theirs")?.uid, s.get("/etc/theirs")?.gid], [5678, 5679]);
    }
    assert.equal(cat(output, "/etc/hostname").toString(), "box\n");
    assert.ok(r.inodeCount >= 8);
    assert.deepEqual(fingerprint(src), before_, "the source directory changed");
  });

  it("is byte-identical when built again", async () => {
    const a = await buildImageFromDirectory({
      dir: src,
      output: join(work, "dir-a.ext4"),
      freeBytes: 16 << 20,
    });
    const b = await buildImageFromDirectory({
      dir: src,
      output: join(work, "dir-b.ext4"),
      freeBytes: 16 << 20,
    });
    assert.equal(sha(a.imagePath), sha(b.imagePath));
  });

  it("writes the same files as mke2fs -d of the same directory (e2fsprogs as the reference writer)", async () => {
    const ours = join(work, "dir-ours.ext4");
    await buildImageFromDirectory({ dir: src, output: ours, freeBytes: 16 << 20, mapOwner: null });
    const reference = join(work, "dir-mke2fs.ext4");
    const r = spawnSync(
      "mke2fs",
      ["-q", "-F", "-t", "ext4", "-b", "4096", "-E", "no_copy_xattrs", "-d", src, reference, "32M"],
      { encoding: "utf8", env: { ...process.env, PATH: `${process.env.PATH}:/usr/sbin:/sbin` } },
    );
    assert.equal(r.status, 0, r.stderr);
    // mke2fs copies the host's atime and ctime (the time of the test run); we write the mtime.
    const withoutAc = (l: ReturnType<typeof listImage>) =>
      [...l.entries].map(([p, e]) => [p, e.replace(/ a=\S+ c=\S+/, "")]).sort();
    const a = listImage(ours);
    const b = listImage(reference);
    assert.ok(a.entries.size >= 6, `only ${a.entries.size} entries listed`);
    assert.deepEqual(withoutAc(a), withoutAc(b));
    assert.deepEqual(a.hardlinks, b.hardlinks);
    assert.equal(a.hardlinks.length, 1);
  });

  for (const swap of ["a file for a symlink", "a directory on its path for a symlink"] as const) {
    it(`refuses a tree whose ${swap.split(" ")[1]} is swapped between scan and write (${swap})`, async () => {
      const tree = mkdtempSync(join(work, "racy-"));
      const outside = mkdtempSync(join(work, "outside-"));
      mkdirSync(join(tree, "etc"));
      writeFileSync(join(tree, "etc", "hostname"), "box\n");
      writeFileSync(join(outside, "hostname"), "SECRET OF THE HOST\n");
      const output = join(tree, "..", `${tree.split("/").pop()}.ext4`);
      await assert.rejects(
        buildImageFromDirectory({
          dir: tree,
          output,
          freeBytes: 16 << 20,
          onProgress: (e) => {
            if (e.phase !== "write") return;
            // Scanned already; now the tree changes under the build.
            if (swap === "a file for a symlink") {
              rmSync(join(tree, "etc", "hostname"));
              symlinkSync(join(outside, "hostname"), join(tree, "etc", "hostname"));
            } else {
              cpSync(join(tree, "etc"), join(tree, "etc-old"), { recursive: true });
              rmSync(join(tree, "etc"), { recursive: true });
              symlinkSync(outside, join(tree, "etc"));
            }
          },
        }),
        { code: "ROOTFS_BUILD", message: /changed while the image was built/ },
      );
      assert.throws(() => readFileSync(output), { code: "ENOENT" });
    });
  }

  it("refuses a path that is not a directory", async () => {
    await assert.rejects(
      buildImageFromDirectory({ dir: join(src, "etc", "hostname"), output: join(work, "x.ext4") }),
      {
        code: "INVALID_ARGUMENT",
      },
    );
  });
});

describe("as an unprivileged user", {
  skip: !isRoot && "already unprivileged: every other test covers it",
}, () => {
  // Run the same layer build as uid/gid 65534 and compare with the root build byte for byte.
  it("builds the same image without root", async () => {
    const home = mkdtempSync(join(tmpdir(), "rootfs-nobody-"));
    try {
      chmodSync(home, 0o755);
      const node = join(home, "node");
      copyFileSync(process.execPath, node);
      chmodSync(node, 0o755);
      const lay = layers(join(home, "layers"));
      const outDir = join(home, "out");
      mkdirSync(outDir);
      chownSync(outDir, 65534, 65534);
      const script = join(home, "build.ts");
      // A copy of the sources the unprivileged user can read, wherever the checkout lives.
      cpSync(new URL("../../src", import.meta.url).pathname, join(home, "src"), { recursive: true });
      const index = join(home, "src", "rootfs", "index.ts");
      writeFileSync(
        script,
        `import { flattenLayers } from ${JSON.stringify(index)};
const layers = ${JSON.stringify(lay)};
const r = await flattenLayers({ layers, output: ${JSON.stringify(join(outDir, "image.ext4"))}, freeBytes: 64 * 1024 * 1024 });
console.log(JSON.stringify({ uid: process.getuid(), uuid: r.uuid }));
`,
      );
      const r = spawnSync("setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", node, script], {
        encoding: "utf8",
        env: { PATH: "/usr/bin:/bin", HOME: home },
        cwd: home,
      });
      assert.equal(r.status, 0, r.stderr);
      assert.equal(JSON.parse(r.stdout).uid, 65534);
      const unprivileged = join(outDir, "image.ext4");
      const privileged = join(home, "root.ext4");
      await flattenLayers({ layers: lay, output: privileged, freeBytes: 64 * 1024 * 1024 });
      assert.equal(sha(unprivileged), sha(privileged), "the image depends on who built it");
      const s = stat(unprivileged, ["/usr/bin/su", "/dev/null", "/etc/shadow"]);
      assert.deepEqual([s.get("/usr/bin/su")?.uid, s.get("/usr/bin/su")?.mode], [0, 0o4755]);
      assert.equal(s.get("/dev/null")?.device, "1:3");
      assert.equal(s.get("/etc/shadow")?.gid, 42);
      assert.equal(q("a"), '"a"');
    } finally {
      rmSync(home, { recursive: true, force: true });
    }
  });
});
