/**
 * `AgentClient.fs` (like `node:fs/promises`) and `AgentClient.watch` against the real guest agent
 * in host mode: the "guest" file system is this host's, under a temporary directory, so every
 * result is checked against `node:fs` itself.
 */
import assert from "node:assert/strict";
import { lstat, mkdir, mkdtemp, readdir, readFile, rm, stat, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import type { AgentClient } from "../../src/agent/agent-client.ts";
import type { GuestWatchEvent, GuestWatcher } from "../../src/agent/guest-watch.ts";
import { GuestIoError } from "../../src/errors.ts";
import { connectAgent, type HostAgent } from "../helpers/agent-binary.ts";
import { failOnUnhandledRejections, isCode } from "./fake-agent.ts";

failOnUnhandledRejections();

let agent: HostAgent;
let client: AgentClient;
let dir: string;

before(async () => {
  ({ agent, client } = await connectAgent());
  dir = await mkdtemp(join(tmpdir(), "sm-fs-"));
});

after(async () => {
  client?.close();
  await agent?.kill();
  if (dir) await rm(dir, { recursive: true, force: true });
});

/** Asserts a GuestIoError with Node's code, the syscall and the path. */
function guestError(code: string, syscall: string, path: string) {
  return (e: unknown) => {
    assert.ok(e instanceof GuestIoError, `not a GuestIoError: ${e}`);
    assert.equal(e.code, code);
    assert.equal(e.syscall, syscall);
    assert.equal(e.path, path);
    assert.equal(typeof e.errno, "number");
    return true;
  };
}

describe("fs", () => {
  test("stat and lstat match node:fs", async () => {
    const file = join(dir, "stat-me");
    await writeFile(file, "0123456789");
    const link = join(dir, "stat-link");
    await symlink("stat-me", link);
    const mine = await client.fs.stat(file);
    const node = await stat(file);
    assert.ok(mine.isFile() && !mine.isDirectory() && !mine.isSymbolicLink());
    for (const key of ["size", "mode", "uid", "gid", "ino", "nlink", "blocks", "blksize"] as const) {
      assert.equal(mine[key], node[key], key);
    }
    assert.equal(mine.mtimeMs, node.mtimeMs);
    assert.equal(mine.mtime.getTime(), node.mtime.getTime());
    assert.ok((await client.fs.stat(link)).isFile(), "stat follows a symlink");
    const l = await client.fs.lstat(link);
    assert.ok(l.isSymbolicLink());
    assert.equal(l.size, (await lstat(link)).size);
    assert.ok((await client.fs.stat(dir)).isDirectory());
  });

  test("readdir: names, Dirents, a large directory", async () => {
    const d = join(dir, "listing");
    await mkdir(d);
    await writeFile(join(d, "file"), "");
    await mkdir(join(d, "sub"));
    await symlink("file", join(d, "link"));
    assert.deepEqual((await client.fs.readdir(d)).sort(), ["file", "link", "sub"]);
    const entries = await client.fs.readdir(d, { withFileTypes: true });
    const byName = Object.fromEntries(entries.map((e) => [e.name, e]));
    assert.ok(byName.file!.isFile() && byName.sub!.isDirectory() && byName.link!.isSymbolicLink());
    assert.equal(byName.file!.parentPath, d);

    const big = join(dir, "big");
    await mkdir(big);
    // 300 names of 250 bytes: more than one DIRENTS frame (64 KiB at most each).
    const names = Array.from({ length: 300 }, (_, i) => `${i}-`.padEnd(250, "x"));
    await Promise.all(names.map((n) => writeFile(join(big, n), "")));
    const listed = await client.fs.readdir(big);
    assert.deepEqual(listed.sort(), (await readdir(big)).sort());
    await assert.rejects(client.fs.readdir(big, { maxBufferBytes: 10_000 }), isCode("OUTPUT_LIMIT"));
    assert.ok((await client.ping()) >= 0, "the listing was abandoned cleanly");
  });

  test("mkdir, recursive mkdir, rm with and without recursive and force", async () => {
    const top = join(dir, "made");
    const deep = join(top, "a", "b");
    assert.equal(await client.fs.mkdir(deep, { recursive: true }), top);
    assert.equal(await client.fs.mkdir(deep, { recursive: true }), undefined);
    assert.ok((await stat(deep)).isDirectory());
    await assert.rejects(client.fs.mkdir(deep), guestError("EEXIST", "mkdir", deep));
    await client.fs.mkdir(join(top, "mode"), { mode: 0o700 });
    assert.equal((await stat(join(top, "mode"))).mode & 0o777, 0o700);
    await assert.rejects(client.fs.rm(top), guestError("EISDIR", "rm", top));
    await client.fs.rm(top, { recursive: true });
    await assert.rejects(stat(top), { code: "ENOENT" });
    await assert.rejects(client.fs.rm(top), guestError("ENOENT", "rm", top));
    await client.fs.rm(top, { force: true });
    await assert.rejects(
      client.fs.mkdir(join(dir, "no", "parent")),
      guestError("ENOENT", "mkdir", join(dir, "no", "parent")),
    );
  });

  test("rm never follows a symlink out of the tree", async () => {
    const outside = join(dir, "precious");
    await mkdir(outside);
    await writeFile(join(outside, "keep"), "keep");
    const tree = join(dir, "tree");
    await mkdir(join(tree, "inner"), { recursive: true });
    await symlink(outside, join(tree, "inner", "escape"));
    await symlink(outside, join(dir, "top-link"));
    await client.fs.rm(tree, { recursive: true });
    await client.fs.rm(join(dir, "top-link"), { recursive: true });
    assert.equal(await readFile(join(outside, "keep"), "utf8"), "keep");
    await assert.rejects(lstat(join(dir, "top-link")), { code: "ENOENT" });
  });

  test("rename, chmod, chown, symlink, readlink, realpath, truncate, utimes", async () => {
    const a = join(dir, "ops-a");
    const b = join(dir, "ops-b");
    await writeFile(a, "hello world");
    await client.fs.rename(a, b);
    assert.equal(await readFile(b, "utf8"), "hello world");
    await assert.rejects(client.fs.rename(a, b), (e: unknown) => {
      assert.ok(e instanceof GuestIoError && e.code === "ENOENT" && e.dest === b);
      return true;
    });
    await client.fs.chmod(b, 0o640);
    assert.equal((await stat(b)).mode & 0o7777, 0o640);
    await client.fs.chmod(b, "755");
    assert.equal((await stat(b)).mode & 0o7777, 0o755);
    const uid = process.getuid?.() ?? 0;
    await client.fs.chown(b, uid, -1);
    await client.fs.truncate(b, 5);
    assert.equal(await readFile(b, "utf8"), "hello");
    await client.fs.truncate(b);
    assert.equal((await stat(b)).size, 0);
    const when = new Date("2020-02-02T02:02:02.5Z");
    await client.fs.utimes(b, when, 1_600_000_000);
    const s = await stat(b);
    assert.equal(s.atimeMs, when.getTime());
    assert.equal(s.mtimeMs, 1_600_000_000_000);
    const link = join(dir, "ops-link");
    await client.fs.symlink("ops-b", link);
    assert.equal(await client.fs.readlink(link), "ops-b");
    assert.equal(await client.fs.realpath(link), await (await import("node:fs/promises")).realpath(b));
    await client.fs.lutimes(link, 1, 2);
    assert.equal((await lstat(link)).mtimeMs, 2000);
    await client.fs.lchown(link, uid, -1);
    await assert.rejects(client.fs.readlink(b), guestError("EINVAL", "readlink", b));
  });

  test("access and exists", async () => {
    const f = join(dir, "exists");
    await writeFile(f, "");
    await client.fs.access(f);
    assert.equal(await client.fs.exists(f), true);
    assert.equal(await client.fs.exists(join(dir, "nope")), false);
    assert.equal(await client.fs.exists(join(f, "under-a-file")), false);
    await assert.rejects(
      client.fs.access(join(dir, "nope")),
      guestError("ENOENT", "access", join(dir, "nope")),
    );
  });

  test("bad arguments are refused before anything is sent", async () => {
    await assert.rejects(client.fs.stat("relative/path"), isCode("INVALID_ARGUMENT"));
    await assert.rejects(client.fs.chmod(join(dir, "x"), 0o17777), isCode("INVALID_ARGUMENT"));
    await assert.rejects(client.fs.stat(`${dir}/nul\0byte`), isCode("INVALID_ARGUMENT"));
    await assert.rejects(client.fs.utimes(join(dir, "x"), -1, 0), isCode("INVALID_ARGUMENT"));
    assert.equal(client.openStreams, 0);
  });

  test("abort and deadline", async () => {
    const controller = new AbortController();
    controller.abort();
    await assert.rejects(client.fs.stat(dir, { signal: controller.signal }), isCode("ABORTED"));
    await assert.rejects(client.fs.stat(dir, { timeoutMs: 0 }), isCode("INVALID_ARGUMENT"));
  });
});

/** Collects events until `done` says so (bounded by the watcher ending). */
async function eventsUntil(
  watcher: GuestWatcher,
  done: (events: GuestWatchEvent[]) => boolean,
): Promise<GuestWatchEvent[]> {
  const events: GuestWatchEvent[] = [];
  for await (const e of watcher) {
    events.push(e);
    if (done(events)) break;
  }
  return events;
}

const has = (events: GuestWatchEvent[], eventType: string, filename: string | null) =>
  events.some((e) => e.eventType === eventType && e.filename === filename);

describe("watch", () => {
  test("create, modify, rename, delete in a directory and, recursively, below it", async () => {
    const w = join(dir, "watched");
    await mkdir(w);
    const watcher = client.watch(w, { recursive: true });
    await watcher.ready;
    await writeFile(join(w, "a"), "1");
    let events = await eventsUntil(watcher, (ev) => has(ev, "modify", "a"));
    assert.ok(has(events, "create", "a"));
    await mkdir(join(w, "sub"));
    events = await eventsUntil(watcher, (ev) => has(ev, "create", "sub"));
    assert.equal(events.at(-1)!.isDirectory, true);
    await writeFile(join(w, "sub", "deep"), "2");
    await eventsUntil(watcher, (ev) => has(ev, "create", "sub/deep"));
    await (await import("node:fs/promises")).rename(join(w, "sub", "deep"), join(w, "sub", "moved"));
    events = await eventsUntil(watcher, (ev) => has(ev, "rename", "sub/moved"));
    assert.ok(has(events, "rename", "sub/deep"));
    await rm(join(w, "a"));
    await eventsUntil(watcher, (ev) => has(ev, "delete", "a"));
    watcher.close();
    assert.deepEqual(await eventsUntil(watcher, () => false), [], "nothing after close()");
    assert.equal(client.openStreams, 0);
  });

  test("deleting the watched directory ends the iteration", async () => {
    const w = join(dir, "doomed");
    await mkdir(w);
    const watcher = client.watch(w);
    await watcher.ready;
    await rm(w, { recursive: true });
    const events = await eventsUntil(watcher, () => false);
    assert.ok(has(events, "delete", "doomed"), JSON.stringify(events));
  });

  test("a consumer that does not read gets an overflow, not unbounded buffering", async () => {
    const w = join(dir, "busy");
    await mkdir(w);
    const watcher = client.watch(w, { windowBytes: 1024 });
    await watcher.ready;
    for (let i = 0; i < 100; i++) await writeFile(join(w, `f${i}`), "x");
    await client.ping(); // the agent saw the events meanwhile
    const events = await eventsUntil(watcher, (ev) => ev.some((e) => e.eventType === "overflow"));
    assert.ok(events.length < 50, `${events.length} events held for a consumer that did not read`);
    watcher.close();
  });

  test("a missing path rejects ready and the iteration with ENOENT; abort ends it", async () => {
    const missing = join(dir, "missing");
    const watcher = client.watch(missing);
    await assert.rejects(watcher.ready, guestError("ENOENT", "watch", missing));
    await assert.rejects(
      eventsUntil(watcher, () => false),
      guestError("ENOENT", "watch", missing),
    );
    const controller = new AbortController();
    const aborted = client.watch(dir, { signal: controller.signal });
    await aborted.ready;
    controller.abort();
    await assert.rejects(
      eventsUntil(aborted, () => false),
      isCode("ABORTED"),
    );
    assert.equal(client.openStreams, 0);
  });
});
