/**
 * The 9P server against real temp directories, driven by the test 9P client over an in-memory
 * stream pair: every operation, every symlink policy, the escape tricks a hostile guest can send
 * (including a host process racing symlink swaps), read-only mounts and the bounds.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import {
  chmod,
  lstat,
  mkdir,
  mkdtemp,
  readdir,
  readFile,
  readlink,
  rm,
  stat,
  symlink,
  writeFile,
} from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { duplexPair } from "node:stream";
import { describe, type TestContext, test } from "node:test";
import { SupermachineError, VmError } from "../../src/errors.ts";
import {
  encodeMessage,
  leavesRoot,
  type Message,
  type NinepServer,
  type NinepServerOptions,
  QidType,
  type SymlinkPolicy,
  serve9p,
} from "../../src/ninep/index.ts";
import { NinepClient, NinepErrno, O } from "../helpers/ninep-client.ts";

const ROOT = process.geteuid?.() === 0;
const OWNER = { uid: 4242, gid: 4243 };

interface Fixture {
  base: string;
  root: string;
  outside: string;
  secret: string;
  server: NinepServer;
  client: NinepClient;
}

/**
 * base/outside/secret: what must never be reached. base/root: the mount, with symlinks of every
 * kind (inside, relative out, absolute out, `..`).
 */
async function fixture(
  t: TestContext,
  opts: Partial<NinepServerOptions> = {},
  msize?: number,
): Promise<Fixture> {
  const base = await mkdtemp(join(tmpdir(), "sm-9p-"));
  t.after(() => rm(base, { recursive: true, force: true }));
  const root = join(base, "root");
  const outside = join(base, "outside");
  const secret = `SECRET-${randomBytes(16).toString("hex")}`;
  await mkdir(join(root, "sub"), { recursive: true });
  await mkdir(outside);
  await writeFile(join(outside, "secret"), secret);
  await writeFile(join(root, "hello"), "hello world");
  await writeFile(join(root, "sub", "inner"), "inner");
  await symlink("sub/inner", join(root, "rel-in"));
  await symlink("../hello", join(root, "sub", "sib"));
  await symlink("../outside/secret", join(root, "rel-out"));
  await symlink(join(outside, "secret"), join(root, "abs"));
  await symlink("..", join(root, "dotdot"));
  await symlink("../../outside", join(root, "sub", "up"));
  await symlink(outside, join(root, "outdir"));
  const [serverSide, clientSide] = duplexPair();
  const server = await serve9p(serverSide, { root, ...(ROOT ? { owner: OWNER } : {}), ...opts });
  t.after(() => server.close());
  const client = await NinepClient.connect(clientSide, msize === undefined ? {} : { msize });
  return { base, root, outside, secret, server, client };
}

/** Names, types, modes, owners and contents of everything under `dir`. */
async function snapshot(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const name of (await readdir(dir, { recursive: true })).sort()) {
    const path = join(dir, name);
    const s = await lstat(path);
    const content = s.isFile() ? await readFile(path, "hex") : s.isSymbolicLink() ? await readlink(path) : "";
    out.push(`${name} ${s.mode.toString(8)} ${s.uid}:${s.gid} ${s.nlink} ${content}`);
  }
  return out;
}

async function errnoOf(promise: Promise<unknown>): Promise<string> {
  try {
    await promise;
  } catch (error) {
    if (error instanceof NinepErrno) return error.code;
    throw error;
  }
  return "OK";
}

/** Reads the whole file a fid is on; the fid is clunked. */
async function readFid(c: NinepClient, fid: number): Promise<Buffer> {
  try {
    await c.lopen(fid, O.RDONLY);
    return await c.read(fid, 0n, 65536);
  } finally {
    await c.clunk(fid).catch(() => {});
  }
}

describe("9P server operations", () => {
  test("negotiates msize down to its limit and answers an unknown version with `unknown`", async (t) => {
    const { client } = await fixture(t, {}, 4 * 1024 * 1024);
    assert.equal(client.msize, 1024 * 1024);
    const r = (await client.rpc("Tversion", {
      msize: 8192,
      version: Buffer.from("9P2000.u"),
    })) as Message<"Rversion">;
    assert.equal(r.version.toString(), "unknown");
  });

  test("walks, stats and reads files", async (t) => {
    const { client } = await fixture(t);
    const fid = await client.walkPath("hello");
    const attr = await client.getattr(fid);
    assert.equal(attr.size, 11n);
    assert.equal(attr.qid.type, QidType.FILE);
    assert.equal(attr.mode & 0o170000, 0o100000);
    assert.equal((await readFid(client, fid)).toString(), "hello world");
    assert.equal((await client.readFile("sub/inner")).toString(), "inner");
    const dir = await client.walkPath("sub");
    assert.equal((await client.getattr(dir)).qid.type, QidType.DIR);
    await client.clunk(dir);
  });

  test("creates, writes, renames, links and removes", async (t) => {
    const { client, root } = await fixture(t);
    const data = randomBytes(300_000);
    await client.createFile("sub", "big", data);
    assert.deepEqual(await readFile(join(root, "sub", "big")), data);
    assert.deepEqual(await client.readFile("sub/big"), data);
    await client.rename("sub", "big", "", "moved");
    assert.deepEqual(await readFile(join(root, "moved")), data);
    await client.link("moved", "sub", "hard");
    assert.equal((await stat(join(root, "moved"))).nlink, 2);
    await client.unlink("", "moved");
    await client.unlink("sub", "hard");
    await client.mkdir("", "d1", 0o750);
    assert.equal((await stat(join(root, "d1"))).mode & 0o7777, 0o750);
    assert.equal(await errnoOf(client.unlink("", "d1")), "EISDIR");
    await client.unlink("", "d1", 0x200);
    assert.deepEqual((await readdir(root)).sort(), [
      "abs",
      "dotdot",
      "hello",
      "outdir",
      "rel-in",
      "rel-out",
      "sub",
    ]);
  });

  test("writes at offsets and appends", async (t) => {
    const { client, root } = await fixture(t);
    const fid = await client.walkPath("hello");
    await client.lopen(fid, O.WRONLY);
    assert.equal(await client.write(fid, 6n, Buffer.from("WORLD")), 5);
    await client.clunk(fid);
    assert.equal(await readFile(join(root, "hello"), "utf8"), "hello WORLD");
    const app = await client.walkPath("hello");
    await client.lopen(app, O.WRONLY | O.APPEND);
    await client.write(app, 0n, Buffer.from("!"));
    await client.clunk(app);
    assert.equal(await readFile(join(root, "hello"), "utf8"), "hello WORLD!");
  });

  test("files the guest creates get the mode asked without setuid/setgid, and the mount's owner", async (t) => {
    const { client, root } = await fixture(t);
    await client.createFile("", "tool", Buffer.from("#!/bin/sh\n"), 0o6755);
    const s = await stat(join(root, "tool"));
    assert.equal(s.mode & 0o7777, 0o755);
    await client.mkdir("", "shared", 0o3775);
    assert.equal((await stat(join(root, "shared"))).mode & 0o7777, 0o1775);
    await client.setattr("tool", { valid: 0x1, mode: 0o4777 });
    assert.equal((await stat(join(root, "tool"))).mode & 0o7777, 0o777);
    await client.symlink("", "lnk", "tool");
    if (ROOT) {
      for (const name of ["tool", "shared", "lnk"]) {
        const o = await lstat(join(root, name));
        assert.deepEqual([o.uid, o.gid], [OWNER.uid, OWNER.gid], name);
      }
      assert.equal(await errnoOf(client.setattr("tool", { valid: 0x2, uid: 0 })), "EPERM");
      assert.equal(await errnoOf(client.setattr("tool", { valid: 0x4, gid: 0 })), "EPERM");
      await client.setattr("tool", { valid: 0x6, uid: 1234, gid: 1235 });
      const o = await stat(join(root, "tool"));
      assert.deepEqual([o.uid, o.gid], [1234, 1235]);
    }
  });

  test("setattr truncates and sets times", async (t) => {
    const { client, root } = await fixture(t);
    await client.setattr("hello", { valid: 0x8, size: 5n });
    assert.equal(await readFile(join(root, "hello"), "utf8"), "hello");
    await client.setattr("hello", {
      valid: 0x10 | 0x20 | 0x80 | 0x100,
      atimeSec: 1000n,
      mtimeSec: 2000n,
      mtimeNsec: 500_000_000n,
    });
    const s = await stat(join(root, "hello"));
    assert.equal(s.atimeMs, 1_000_000);
    assert.equal(s.mtimeMs, 2_000_500);
    assert.equal(await errnoOf(client.setattr("sub", { valid: 0x8, size: 0n })), "EISDIR");
  });

  test("readdir lists every entry across small replies, from any offset and after a rewind", async (t) => {
    const { client, root } = await fixture(t);
    const names = Array.from(
      { length: 300 },
      (_, i) => `file-${String(i).padStart(3, "0")}-${"x".repeat(i % 40)}`,
    );
    await mkdir(join(root, "many"));
    await Promise.all(names.map((n) => writeFile(join(root, "many", n), n)));
    const listed = await client.readdir("many", 300);
    assert.deepEqual(listed.map((e) => e.name.toString()).sort(), [".", "..", ...names].sort());
    for (const e of listed) {
      if (e.name.toString().startsWith("file-")) assert.equal(e.type, 8);
    }
    // The same listing again through one fid: from 0, from the middle, from 0 again.
    const fid = await client.walkPath("many");
    await client.lopen(fid, O.RDONLY);
    const read = async (offset: bigint) =>
      (await client.rpc("Treaddir", { fid, offset, count: 4096 })) as Message<"Rreaddir">;
    const { decodeDirents } = await import("../../src/ninep/index.ts");
    const first = decodeDirents((await read(0n)).data);
    const middle = first[10]!;
    const fromMiddle = decodeDirents((await read(middle.offset)).data);
    assert.equal(Buffer.from(fromMiddle[0]!.name).toString(), Buffer.from(first[11]!.name).toString());
    const again = decodeDirents((await read(0n)).data);
    assert.deepEqual(
      again.map((e) => Buffer.from(e.name).toString()),
      first.map((e) => Buffer.from(e.name).toString()),
    );
    await client.clunk(fid);
  });

  test("statfs, fsync, locks and xattrs", async (t) => {
    const { client } = await fixture(t);
    const r = (await client.rpc("Tstatfs", { fid: 0 })) as Message<"Rstatfs">;
    assert.equal(r.namelen, 255);
    assert.ok(r.bsize > 0);
    const fid = await client.walkPath("hello");
    await client.lopen(fid, O.RDWR);
    await client.rpc("Tfsync", { fid, datasync: 0 });
    const lock = (await client.rpc("Tlock", {
      fid,
      lockType: 1,
      flags: 0,
      start: 0n,
      length: 0n,
      procId: 1,
      clientId: Buffer.from("guest"),
    })) as Message<"Rlock">;
    assert.equal(lock.status, 0);
    const get = (await client.rpc("Tgetlock", {
      fid,
      lockType: 1,
      start: 0n,
      length: 10n,
      procId: 1,
      clientId: Buffer.from("guest"),
    })) as Message<"Rgetlock">;
    assert.equal(get.lockType, 2);
    assert.equal(
      await errnoOf(client.rpc("Txattrwalk", { fid, newfid: 99, name: Buffer.from("user.x") })),
      "EOPNOTSUPP",
    );
    await client.clunk(fid);
  });

  test("mknod makes regular files only: never devices", async (t) => {
    const { client, root } = await fixture(t);
    const mknod = (name: string, mode: number) =>
      client.rpc("Tmknod", { dfid: 0, name: Buffer.from(name), mode, major: 8, minor: 0, gid: 0 });
    await mknod("plain", 0o100644);
    assert.ok((await stat(join(root, "plain"))).isFile());
    for (const [name, mode] of [
      ["fifo", 0o010644],
      ["chr", 0o020644],
      ["blk", 0o060644],
      ["sock", 0o140644],
    ] as const) {
      assert.equal(await errnoOf(mknod(name, mode)), "EPERM", name);
    }
    assert.deepEqual(
      (await readdir(root)).filter((n) => ["fifo", "chr", "blk", "sock"].includes(n)),
      [],
    );
  });

  test("refuses names that are not one path component", async (t) => {
    const { client } = await fixture(t);
    for (const name of ["a/b", "", ".", "..", "x\0y"]) {
      assert.equal(await errnoOf(client.createFile("", name)), "EINVAL", JSON.stringify(name));
    }
    assert.equal(await errnoOf(client.createFile("", "n".repeat(256))), "ENAMETOOLONG");
  });

  test("serves many requests at once and answers Tflush after the flushed request", async (t) => {
    const { client, root } = await fixture(t);
    await Promise.all(Array.from({ length: 50 }, (_, i) => writeFile(join(root, `p${i}`), `content ${i}`)));
    const all = await Promise.all(Array.from({ length: 50 }, (_, i) => client.readFile(`p${i}`)));
    for (const [i, b] of all.entries()) assert.equal(b.toString(), `content ${i}`);
    assert.ok((await client.rpc("Tflush", { oldtag: 77 })).op === "Rflush");
  });
});

describe("9P server symlink policies", () => {
  test("which symlink targets leave the root (lexically, from the link's directory)", () => {
    const cases: [string, number, boolean][] = [
      ["/etc/passwd", 3, true],
      ["x", 0, false],
      ["../x", 0, true],
      ["../x", 1, false],
      ["a/../../x", 0, true],
      ["a/b/../../../x", 1, false],
      ["./../..", 1, true],
      ["a//b/./c/../..", 0, false],
      ["..", 1, false],
    ];
    for (const [target, depth, leaves] of cases) {
      assert.equal(leavesRoot(Buffer.from(target), depth), leaves, `${target} at depth ${depth}`);
    }
  });

  test("opaque: guest symlinks are stored verbatim; the host never follows one out of the root", async (t) => {
    const { client, root } = await fixture(t, { symlinks: "opaque" });
    await client.symlink("", "escape", "/etc/passwd");
    assert.equal(await readlink(join(root, "escape")), "/etc/passwd");
    // A lookup of it is a symlink (lstat semantics); its target is not given out...
    const fid = await client.walkPath("escape");
    assert.equal((await client.getattr(fid)).qid.type, QidType.SYMLINK);
    assert.equal(await errnoOf(client.lopen(fid, O.RDONLY)), "EACCES");
    await client.clunk(fid);
    for (const name of ["escape", "rel-out", "abs", "dotdot", "outdir", "sub/up"]) {
      assert.equal(await errnoOf(client.readlink(name)), "EACCES", name);
    }
    // ...while symlinks that stay inside the root read as they are.
    assert.equal(await client.readlink("rel-in"), "sub/inner");
    assert.equal(await client.readlink("sub/sib"), "../hello");
    await client.symlink("sub", "rel", "../sub/inner/../inner");
    assert.equal(await client.readlink("sub/rel"), "../sub/inner/../inner");
    // It can still be renamed and removed.
    await client.rename("", "escape", "sub", "escape2");
    await client.unlink("sub", "escape2");
  });

  test("deny: the guest cannot create symlinks", async (t) => {
    const { client, root } = await fixture(t, { symlinks: "deny" });
    assert.equal(await errnoOf(client.symlink("", "escape", "/etc/passwd")), "EPERM");
    await assert.rejects(lstat(join(root, "escape")), { code: "ENOENT" });
    assert.equal(await errnoOf(client.readlink("abs")), "EACCES");
    assert.equal(await client.readlink("rel-in"), "sub/inner");
  });

  test("follow: host symlinks are followed wherever they point", async (t) => {
    const { client, secret } = await fixture(t, { symlinks: "follow" });
    assert.equal((await client.readFile("abs")).toString(), secret);
    assert.equal((await client.readFile("rel-out")).toString(), secret);
    assert.equal((await client.readFile("outdir/secret")).toString(), secret);
    await client.symlink("", "dangling", "does/not/exist");
    const fid = await client.walkPath("dangling");
    assert.equal((await client.getattr(fid)).qid.type, QidType.SYMLINK);
    await client.clunk(fid);
    assert.equal(await client.readlink("dangling"), "does/not/exist");
  });
});

for (const policy of ["deny", "opaque"] as const satisfies SymlinkPolicy[]) {
  describe(`9P escape suite (${policy})`, () => {
    test("no trick reads or writes outside the root", async (t) => {
      const { client, outside, secret, root } = await fixture(t, { symlinks: policy });
      const before = await snapshot(outside);
      const got: Buffer[] = [];
      const attempt = async (what: string, fn: () => Promise<Buffer | unknown>) => {
        try {
          const r = await fn();
          if (Buffer.isBuffer(r)) got.push(r);
        } catch (error) {
          if (!(error instanceof NinepErrno)) throw new Error(`${what}: ${error}`, { cause: error });
        }
      };
      // `..` at and below the root
      const up = await client.walk(0, [".."]);
      assert.deepEqual((await client.getattr(up.fid)).qid, (await client.getattr(0)).qid);
      await client.clunk(up.fid);
      await attempt("../outside/secret", () => client.readFile("../outside/secret"));
      await attempt("sub/../../outside/secret", () => client.readFile("sub/../../outside/secret"));
      await attempt("deep ..", () => client.walk(0, ["sub", "..", "..", "..", "outside", "secret"]));
      // symlinks: absolute, relative, to `..`, to directories, as intermediate components
      for (const path of ["abs", "rel-out", "dotdot/outside/secret", "outdir/secret", "sub/up/secret"]) {
        await attempt(path, () => client.readFile(path));
      }
      await attempt("walk through outdir", async () =>
        readFid(client, (await client.walk(0, ["outdir", "secret"])).fid),
      );
      // names that are paths
      await attempt("create ../x", () => client.createFile("", "../planted"));
      await attempt("create outdir/x", () => client.createFile("outdir", "planted"));
      await attempt("mkdir ../x", () => client.mkdir("", "../planted"));
      await attempt("rename into ..", () => client.rename("", "hello", "", "../outside/planted"));
      await attempt("rename via outdir", () => client.rename("", "hello", "outdir", "planted"));
      // hardlinks: the guest can only name files inside; linking a symlink links the symlink
      await attempt("link abs", () => client.link("abs", "", "hard-abs"));
      await attempt("link via outdir", () => client.link("outdir/secret", "", "hard-secret"));
      const linked = await lstat(join(root, "hard-abs")).catch(() => undefined);
      if (linked) assert.ok(linked.isSymbolicLink(), "a link of a symlink is a symlink");
      // device nodes, setuid
      await attempt("mknod", () =>
        client.rpc("Tmknod", {
          dfid: 0,
          name: Buffer.from("disk"),
          mode: 0o060666,
          major: 8,
          minor: 0,
          gid: 0,
        }),
      );
      await client.createFile("", "suid", Buffer.from("x"), 0o4755);
      await attempt("chmod u+s", () => client.setattr("suid", { valid: 0x1, mode: 0o6755 }));
      assert.equal((await stat(join(root, "suid"))).mode & 0o6000, 0);
      // guest symlinks (opaque) are never followed by the host afterwards
      if (policy === "opaque") {
        await client.symlink("", "escape", join(outside, "secret"));
        await client.symlink("", "escdir", outside);
        await attempt("read escape", () => client.readFile("escape"));
        await attempt("read escdir/secret", () => client.readFile("escdir/secret"));
        await attempt("create in escdir", () => client.createFile("escdir", "planted"));
        await attempt("truncate escape", () => client.setattr("escape", { valid: 0x8, size: 0n }));
      }
      for (const b of got) assert.ok(!b.toString().includes(secret), "the secret was read");
      assert.deepEqual(await snapshot(outside), before);
      assert.equal(await readFile(join(outside, "secret"), "utf8"), secret);
    });

    test("a host process racing symlink swaps never leads the server outside", {
      timeout: 120_000,
    }, async (t) => {
      const { client, outside, secret, root } = await fixture(t, { symlinks: policy });
      await mkdir(join(root, "race"));
      await writeFile(join(root, "race", "secret"), "inside");
      const before = await snapshot(outside);
      // Swap root/race between the real directory and a symlink to ../outside, as fast as it goes
      // (each step an atomic rename).
      await symlink("../outside", join(root, "race.link"));
      const swapper = spawn(
        process.execPath,
        [
          "-e",
          `const fs = require("fs"); const r = process.argv[1]; const m = (a, b) => fs.renameSync(r + a, r + b);
           process.stdout.write("go\\n");
           for (;;) { m("/race", "/race.real"); m("/race.link", "/race"); m("/race", "/race.link"); m("/race.real", "/race"); }`,
          root,
        ],
        { stdio: ["ignore", "pipe", "inherit"] },
      );
      const exited = new Promise((resolve) => swapper.once("exit", resolve));
      const outcomes = new Map<string, number>();
      const note = (k: string) => outcomes.set(k, (outcomes.get(k) ?? 0) + 1);
      try {
        await new Promise((resolve) => swapper.stdout.once("data", resolve));
        for (let i = 0; i < 400; i++) {
          try {
            const data = await client.readFile("race/secret");
            assert.ok(!data.toString().includes(secret), "read the secret through a swapped symlink");
            note(`read:${data.toString()}`);
          } catch (error) {
            if (!(error instanceof NinepErrno)) throw error;
            note(error.code);
          }
          try {
            const dir = await client.walkPath("race");
            try {
              await client.rpc("Tlcreate", {
                fid: dir,
                name: Buffer.from(`planted-${i}`),
                flags: O.RDWR,
                mode: 0o644,
                gid: 0,
              });
            } finally {
              await client.clunk(dir).catch(() => {});
            }
            note("created");
          } catch (error) {
            if (!(error instanceof NinepErrno)) throw error;
            note(`create:${error.code}`);
          }
        }
        assert.equal(swapper.exitCode, null, "the swapper ran for the whole test");
      } finally {
        swapper.kill("SIGKILL");
        await exited;
      }
      t.diagnostic(`outcomes: ${JSON.stringify(Object.fromEntries(outcomes))}`);
      assert.deepEqual(await snapshot(outside), before);
    });
  });
}

describe("9P server read-only mounts", () => {
  test("refuse every kind of write with EROFS and still read", async (t) => {
    const { client, root } = await fixture(t, { readOnly: true });
    const before = await snapshot(root);
    assert.equal((await client.readFile("hello")).toString(), "hello world");
    const fid = await client.walkPath("hello");
    const attempts: [string, () => Promise<unknown>][] = [
      ["open for writing", () => client.lopen(fid, O.WRONLY)],
      ["open read-write", () => client.walkPath("hello").then((f) => client.lopen(f, O.RDWR))],
      ["open with truncate", () => client.walkPath("hello").then((f) => client.lopen(f, O.RDONLY | O.TRUNC))],
      ["create", () => client.createFile("", "new")],
      ["mkdir", () => client.mkdir("", "d")],
      ["symlink", () => client.symlink("", "l", "hello")],
      [
        "mknod",
        () =>
          client.rpc("Tmknod", {
            dfid: 0,
            name: Buffer.from("n"),
            mode: 0o100644,
            major: 0,
            minor: 0,
            gid: 0,
          }),
      ],
      ["link", () => client.link("hello", "", "h2")],
      ["rename", () => client.rename("", "hello", "", "h3")],
      ["unlink", () => client.unlink("", "hello")],
      ["rmdir", () => client.unlink("", "sub", 0x200)],
      ["chmod", () => client.setattr("hello", { valid: 0x1, mode: 0o777 })],
      ["chown", () => client.setattr("hello", { valid: 0x2, uid: 1 })],
      ["truncate", () => client.setattr("hello", { valid: 0x8, size: 0n })],
      ["utimes", () => client.setattr("hello", { valid: 0x30 })],
      [
        "xattr set",
        () => client.rpc("Txattrcreate", { fid, name: Buffer.from("user.a"), attrSize: 1n, flags: 0 }),
      ],
      ["remove", () => client.walkPath("sub/inner").then((f) => client.rpc("Tremove", { fid: f }))],
    ];
    for (const [what, attempt] of attempts) assert.equal(await errnoOf(attempt()), "EROFS", what);
    const rfid = await client.walkPath("hello");
    await client.lopen(rfid, O.RDONLY);
    assert.equal(await errnoOf(client.write(rfid, 0n, Buffer.from("x"))), "EROFS");
    assert.deepEqual(await snapshot(root), before);
  });
});

describe("9P server bounds", () => {
  test("fids are limited per connection", async (t) => {
    const { client } = await fixture(t, { maxFids: 8 });
    const fids: number[] = [];
    for (let i = 0; i < 7; i++) fids.push((await client.walk(0, ["sub"])).fid);
    assert.equal(await errnoOf(client.walk(0, ["sub"])), "EMFILE");
    await client.clunk(fids.pop()!);
    fids.push((await client.walk(0, ["sub"])).fid);
  });

  test("a message larger than msize ends the connection with AGENT_PROTOCOL", async (t) => {
    const { client, server } = await fixture(t, {}, 8192);
    const big = Buffer.alloc(9000);
    big.writeUInt32LE(9000, 0);
    big[4] = 118;
    client.raw(big);
    const error = await server.closed;
    assert.ok(error instanceof VmError && error.code === "AGENT_PROTOCOL", String(error));
  });

  test("a malformed message ends the connection with AGENT_PROTOCOL", async (t) => {
    const { client, server } = await fixture(t);
    client.raw(Buffer.from("0f0000006e01000000000001000000", "hex").subarray(0, 15)); // Twalk without nwname
    const error = await server.closed;
    assert.ok(error instanceof VmError && error.code === "AGENT_PROTOCOL", String(error));
  });

  test("a tag used twice while in flight ends the connection", async (t) => {
    const { client, server } = await fixture(t);
    const fid = await client.walkPath("hello");
    await client.lopen(fid, O.RDONLY);
    const read = encodeMessage("Tread", 500, { fid, offset: 0n, count: 10 });
    client.raw(Buffer.concat([read, read]));
    const error = await server.closed;
    assert.ok(error instanceof VmError && error.code === "AGENT_PROTOCOL", String(error));
  });

  test("unknown messages get EOPNOTSUPP; requests before Tversion get EPROTO", async (t) => {
    const { client } = await fixture(t);
    assert.equal(await errnoOf(client.rpc("Rclunk", {})), "EOPNOTSUPP");
    const [a, b] = duplexPair();
    const base = await mkdtemp(join(tmpdir(), "sm-9p-"));
    t.after(() => rm(base, { recursive: true, force: true }));
    await chmod(base, 0o755);
    const server = await serve9p(a, { root: base, ...(ROOT ? { owner: OWNER } : {}) });
    t.after(() => server.close());
    const raw = new NinepClient(b);
    assert.equal(
      await errnoOf(
        raw.rpc("Tattach", {
          fid: 0,
          afid: 0xffff_ffff,
          uname: Buffer.alloc(0),
          aname: Buffer.alloc(0),
          nUname: 0,
        }),
      ),
      "EPROTO",
    );
  });

  test("bad mount sources and owners are typed errors", async (t) => {
    const base = await mkdtemp(join(tmpdir(), "sm-9p-"));
    t.after(() => rm(base, { recursive: true, force: true }));
    await writeFile(join(base, "file"), "x");
    const invalid = (e: unknown) => e instanceof SupermachineError && e.code === "INVALID_ARGUMENT";
    await assert.rejects(serve9p(duplexPair()[0], { root: join(base, "file"), owner: OWNER }), invalid);
    await assert.rejects(serve9p(duplexPair()[0], { root: join(base, "missing"), owner: OWNER }), invalid);
    await assert.rejects(serve9p(duplexPair()[0], { root: base, owner: OWNER, maxMsize: 100 }), invalid);
    await assert.rejects(
      serve9p(duplexPair()[0], { root: base, owner: OWNER, symlinks: "sometimes" as SymlinkPolicy }),
      invalid,
    );
    if (ROOT) {
      // A root-owned source needs an explicit owner for writable mounts; read-only is fine.
      await assert.rejects(serve9p(duplexPair()[0], { root: base }), invalid);
      (await serve9p(duplexPair()[0], { root: base, readOnly: true })).close();
      (await serve9p(duplexPair()[0], { root: base, owner: { uid: 0, gid: 0 } })).close();
    } else {
      await assert.rejects(serve9p(duplexPair()[0], { root: base, owner: { uid: 0, gid: 0 } }), invalid);
    }
  });
});
