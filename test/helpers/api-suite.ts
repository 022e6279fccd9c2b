/**
 * One API-level suite, run against the embedded library (test/integration/api-embedded.test.ts)
 * and against `supermachine serve` on loopback through `supermachine/client`
 * (test/integration/api-remote.test.ts). It is written against the surface both share — the
 * types below are what the two must agree on, so a difference in a method's name or signature
 * fails the type check — and checks the same behaviour: outcomes, errors of the same classes with
 * the same fields, streams, files, ports, pools.
 */
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import type { Readable } from "node:stream";
import { after, before, describe, it } from "node:test";
import type {
  ConnectTcpOptions,
  ExecEvent,
  ExecInput,
  ExecOptions,
  ExecOutcome,
  ExecStdin,
  ExposedPort,
  ExposeTcpOptions,
  GuestFileSystem,
  PoolStats,
  WriteFileOptions,
  WriteFileSource,
} from "../../src/index.ts";
import { GuestIoError, SupermachineError } from "../../src/index.ts";
import { vmSkipReason } from "./vm.ts";

export interface ExecHandleLike extends AsyncIterable<ExecEvent>, AsyncDisposable {
  readonly pid: number;
  readonly stdin: ExecStdin;
  readonly stdout: Readable;
  readonly exited: boolean;
  wait(): Promise<ExecOutcome>;
  kill(signal?: string | number): void;
}

export interface ExecBuilderLike {
  argv(argv: string[]): ExecBuilderLike;
  chain(argv: string[]): ExecBuilderLike;
  stageFile(path: string, content: string | Uint8Array, opts?: { mode?: number }): ExecBuilderLike;
  env(vars: Record<string, string>): ExecBuilderLike;
  cwd(dir: string): ExecBuilderLike;
  stdin(input: ExecInput): ExecBuilderLike;
  timeout(ms: number): ExecBuilderLike;
  reject(on?: boolean): ExecBuilderLike;
  output(): Promise<ExecOutcome>;
  spawn(): Promise<ExecHandleLike>;
}

type FsLike = Pick<
  GuestFileSystem,
  | "readFile"
  | "writeFile"
  | "stat"
  | "lstat"
  | "readdir"
  | "mkdir"
  | "rm"
  | "rename"
  | "exists"
  | "symlink"
  | "readlink"
  | "chmod"
>;

export interface VmLike extends AsyncDisposable {
  readonly id: string;
  readonly fs: FsLike;
  exec(argv: readonly string[], options?: ExecOptions): Promise<ExecOutcome>;
  spawn(argv: readonly string[], options?: ExecOptions): Promise<ExecHandleLike>;
  execBuilder(): ExecBuilderLike;
  writeFile(path: string, data: WriteFileSource, options?: WriteFileOptions): Promise<void>;
  readFile(path: string, options?: { signal?: AbortSignal }): Promise<Uint8Array>;
  connect(port: number, options?: ConnectTcpOptions): Promise<import("node:stream").Duplex>;
  exposeTcp(hostPort: number, guestPort: number, options?: ExposeTcpOptions): Promise<ExposedPort>;
  stop(): Promise<void>;
}

export interface PooledVmLike extends AsyncDisposable {
  readonly id: string;
  readonly released: boolean;
  readonly vm: VmLike;
  exec(argv: readonly string[], options?: ExecOptions): Promise<ExecOutcome>;
  execBuilder(): ExecBuilderLike;
  release(): Promise<void>;
  discard(): Promise<void>;
}

export interface PoolLike extends AsyncDisposable {
  acquire(options?: { signal?: AbortSignal }): Promise<PooledVmLike>;
  stats(): PoolStats | Promise<PoolStats>;
  close(options?: { force?: boolean }): Promise<void>;
}

export interface PoolBuilderLike {
  min(count: number): PoolBuilderLike;
  max(count: number): PoolBuilderLike;
  restoreOnRelease(enabled: boolean): PoolBuilderLike;
  build(options?: { signal?: AbortSignal }): Promise<PoolLike>;
}

export interface ImageLike {
  readonly digest: string;
  start(): Promise<VmLike>;
  pool(): PoolBuilderLike;
}

export interface Opened {
  image: ImageLike;
  close(): Promise<void>;
}

/** The busybox httpd this suite serves files with (busybox has no other TCP server). */
const HTTPD = ["httpd", "-f", "-p", "8080", "-h", "/tmp/www"];

const text = (bytes: Uint8Array) => new TextDecoder().decode(bytes);

async function readAll(stream: Readable): Promise<string> {
  let out = "";
  for await (const chunk of stream) out += typeof chunk === "string" ? chunk : text(chunk as Uint8Array);
  return out;
}

export function apiSuite(label: string, open: () => Promise<Opened>): void {
  describe(`the API (${label})`, { timeout: 600_000 }, () => {
    let skip: string | undefined;
    let opened: Opened | undefined;
    let vm: VmLike;

    before(async () => {
      skip = await vmSkipReason();
      if (skip !== undefined) return;
      opened = await open();
      vm = await opened.image.start();
    });

    after(async () => {
      await vm?.stop();
      await opened?.close();
    });

    const test = (name: string, fn: () => Promise<void>) =>
      it(name, async (t) => {
        if (skip !== undefined) return t.skip(skip);
        await fn();
      });

    test("exec: the outcome; a failure rejects with ExecError carrying it, unless reject is false", async () => {
      const ok = await vm.exec(["sh", "-c", "echo out; echo err >&2"]);
      assert.equal(ok.stdoutText, "out\n");
      assert.equal(ok.stderrText, "err\n");
      assert.equal(ok.exitCode, 0);
      assert.equal(ok.ok, true);
      assert.deepEqual(ok.argv, ["sh", "-c", "echo out; echo err >&2"]);
      const failed = await vm.exec(["sh", "-c", "echo why >&2; exit 3"]).then(
        () => assert.fail("resolved"),
        (error: unknown) => error,
      );
      assert.ok(SupermachineError.is(failed, "EXEC_FAILED"), String(failed));
      assert.equal(failed.exitCode, 3);
      assert.equal(failed.outcome.stderrText, "why\n");
      assert.match(failed.message, /exited with code 3.*stderr: why/);
      const outcome = await vm.exec(["sh", "-c", "exit 4"], { reject: false });
      assert.equal(outcome.exitCode, 4);
      assert.equal(outcome.describe(), "exited with code 4");
      const killed = await vm.exec(["sh", "-c", "kill -9 $$"], { reject: false });
      assert.equal(killed.signal, "SIGKILL");
      assert.equal(killed.exitCode, null);
    });

    test("exec: a timeout kills the command (ExecTimeoutError with the outcome); a missing program is EXEC_NOT_FOUND", async () => {
      const slow = await vm
        .exec(["sh", "-c", "echo started; sleep 30"], { timeoutMs: 300, killGraceMs: 100 })
        .then(
          () => assert.fail("resolved"),
          (error: unknown) => error,
        );
      assert.ok(SupermachineError.is(slow, "EXEC_TIMEOUT"), String(slow));
      assert.equal(slow.timeoutMs, 300);
      assert.equal(slow.outcome.timedOut, true);
      assert.equal(slow.outcome.stdoutText, "started\n");
      const missing = await vm.exec(["no-such-program"]).then(
        () => assert.fail("resolved"),
        (error: unknown) => error,
      );
      assert.ok(SupermachineError.is(missing, "EXEC_NOT_FOUND"), String(missing));
      assert.deepEqual(missing.argv, ["no-such-program"]);
      await assert.rejects(vm.exec([]), (e) => SupermachineError.is(e, "INVALID_ARGUMENT"));
    });

    test("execBuilder: staged files, a chain that stops at the first failure, env, cwd, stdin", async () => {
      const run = (candidate: string) =>
        vm
          .execBuilder()
          .stageFile("/tmp/candidate.sh", candidate, { mode: 0o700 })
          .argv(["sh", "-n", "/tmp/candidate.sh"])
          .chain(["sh", "/tmp/candidate.sh"])
          .env({ GREETING: "hi" })
          .cwd("/tmp")
          .reject(false)
          .output();
      const good = await run('echo "$GREETING from $(pwd)"; cat');
      assert.equal(good.stdoutText, "hi from /tmp\n");
      assert.equal(good.step, 1);
      const bad = await run("if then fi");
      assert.notEqual(bad.exitCode, 0);
      assert.equal(bad.step, 0, "the chain stopped at the syntax check");
      const piped = await vm.execBuilder().argv(["tr", "a-z", "A-Z"]).stdin("shout\n").output();
      assert.equal(piped.stdoutText, "SHOUT\n");
      const streamed = await vm
        .execBuilder()
        .argv(["wc", "-c"])
        .stdin(
          (async function* () {
            for (let i = 0; i < 4; i++) yield new Uint8Array(1000);
          })(),
        )
        .output();
      assert.equal(streamed.stdoutText.trim(), "4000");
    });

    test("spawn: streamed output as events, stdin written and ended, the exit last", async () => {
      await using handle = await vm.spawn([
        "sh",
        "-c",
        'while read line; do echo "got $line"; done; echo bye >&2',
      ]);
      assert.ok(handle.pid > 0);
      await handle.stdin.write("one\n");
      await handle.stdin.write(new TextEncoder().encode("two\n"));
      await handle.stdin.end();
      const events: string[] = [];
      for await (const event of handle) {
        events.push(event.kind === "exit" ? `exit ${event.exitCode}` : `${event.kind} ${text(event.data)}`);
      }
      assert.equal(events.at(-1), "exit 0");
      assert.equal(
        events
          .filter((e) => e.startsWith("stdout"))
          .join("")
          .replaceAll("stdout ", ""),
        "got one\ngot two\n",
      );
      assert.ok(events.includes("stderr bye\n"));
      assert.equal(handle.exited, true);
    });

    test("spawn: stdout as a Node stream, a signal, wait() for the outcome", async () => {
      const handle = await vm.spawn(["sh", "-c", "echo ready; exec sleep 30"]);
      const stdout = handle.stdout;
      const first = await new Promise<string>((resolve) =>
        stdout.once("data", (c: Uint8Array) => resolve(text(c))),
      );
      assert.equal(first, "ready\n");
      handle.kill("SIGTERM");
      const rest = readAll(stdout);
      const outcome = await handle.wait();
      assert.equal(outcome.signal, "SIGTERM");
      assert.equal(await rest, "");
    });

    test("spawn: a big output under backpressure arrives whole", async () => {
      const handle = await vm.spawn(["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x"]);
      let size = 0;
      for await (const event of handle) {
        if (event.kind === "stdout") {
          size += event.data.length;
          if (size < 100_000) await new Promise((r) => setTimeout(r, 1));
        }
      }
      assert.equal(size, 3_000_000);
    });

    test("files: vm.fs like node:fs/promises, contents streamed byte for byte, errors with errno names", async () => {
      const data = randomBytes(1024 * 1024 + 7);
      await vm.fs.mkdir("/tmp/files/a/b", { recursive: true });
      await vm.writeFile("/tmp/files/a/b/blob", data, { mode: 0o640 });
      const back = await vm.readFile("/tmp/files/a/b/blob");
      assert.equal(
        createHash("sha256").update(back).digest("hex"),
        createHash("sha256").update(data).digest("hex"),
      );
      const stats = await vm.fs.stat("/tmp/files/a/b/blob");
      assert.equal(stats.size, data.length);
      assert.equal(stats.isFile(), true);
      assert.equal(stats.mode & 0o777, 0o640);
      assert.ok(stats.mtime instanceof Date);
      await vm.fs.writeFile("/tmp/files/note.txt", "héllo");
      assert.equal(await vm.fs.readFile("/tmp/files/note.txt", { encoding: "utf8" }), "héllo");
      const entries = await vm.fs.readdir("/tmp/files", { withFileTypes: true });
      assert.deepEqual(
        entries.map((e) => `${e.name}:${e.isDirectory() ? "d" : e.isFile() ? "f" : "?"}`).sort(),
        ["a:d", "note.txt:f"],
      );
      assert.deepEqual((await vm.fs.readdir("/tmp/files")).sort(), ["a", "note.txt"]);
      await vm.fs.rename("/tmp/files/note.txt", "/tmp/files/moved.txt");
      await vm.fs.symlink("moved.txt", "/tmp/files/link");
      assert.equal(await vm.fs.readlink("/tmp/files/link"), "moved.txt");
      assert.equal((await vm.fs.lstat("/tmp/files/link")).isSymbolicLink(), true);
      await vm.fs.chmod("/tmp/files/moved.txt", 0o600);
      assert.equal((await vm.fs.stat("/tmp/files/moved.txt")).mode & 0o777, 0o600);
      assert.equal(await vm.fs.exists("/tmp/files/note.txt"), false);
      const missing = await vm.fs.stat("/tmp/files/none").then(
        () => assert.fail("resolved"),
        (error: unknown) => error,
      );
      assert.ok(SupermachineError.is(missing, "ENOENT") && missing instanceof GuestIoError, String(missing));
      assert.equal(missing.syscall, "stat");
      assert.equal(missing.path, "/tmp/files/none");
      const notEmpty = await vm.fs.rm("/tmp/files").then(
        () => assert.fail("resolved"),
        (error: unknown) => error,
      );
      assert.ok(SupermachineError.is(notEmpty) && notEmpty.code !== "GUEST_IO", String(notEmpty));
      await vm.fs.rm("/tmp/files", { recursive: true });
      assert.equal(await vm.fs.exists("/tmp/files"), false);
    });

    test("ports: connect() to a guest server, exposeTcp() on this host", async () => {
      await vm.fs.mkdir("/tmp/www", { recursive: true });
      await vm.writeFile("/tmp/www/index.html", "served from the guest\n");
      await using httpd = await vm.spawn(HTTPD);
      // httpd listens once it has run a moment: retry the connection, not a sleep.
      let socket: import("node:stream").Duplex | undefined;
      for (let attempt = 0; socket === undefined; attempt++) {
        socket = await vm.connect(8080).catch((error: unknown) => {
          if (!SupermachineError.is(error, "ECONNREFUSED") || attempt > 200) throw error;
          return undefined;
        });
      }
      socket.end("GET /index.html HTTP/1.0\r\n\r\n");
      const answer = await readAll(socket as Readable);
      assert.match(answer, /^HTTP\/1\.[01] 200/);
      assert.match(answer, /served from the guest/);
      await using exposed = await vm.exposeTcp(0, 8080);
      assert.ok(exposed.hostPort > 0);
      const responses = await Promise.all(
        Array.from({ length: 4 }, () =>
          fetch(`http://127.0.0.1:${exposed.hostPort}/index.html`).then((r) => r.text()),
        ),
      );
      assert.deepEqual(responses, Array(4).fill("served from the guest\n"));
      const refused = await vm.connect(8081).then(
        () => assert.fail("connected"),
        (error: unknown) => error,
      );
      assert.ok(SupermachineError.is(refused, "ECONNREFUSED"), String(refused));
      assert.equal(httpd.exited, false);
    });

    test("pool: every acquire a fresh clone; release; stats count them", async () => {
      await using pool = await opened!.image.pool().min(1).max(2).restoreOnRelease(true).build();
      {
        await using lease = await pool.acquire();
        await lease.exec(["sh", "-c", "echo dirty > /tmp/mark"]);
      }
      {
        await using lease = await pool.acquire();
        const seen = await lease
          .execBuilder()
          .argv(["sh", "-c", "cat /tmp/mark 2>/dev/null || echo clean"])
          .output();
        assert.equal(seen.stdoutText, "clean\n");
        await lease.release();
        assert.equal(lease.released, true);
        assert.throws(
          () => lease.vm,
          (e) => SupermachineError.is(e, "VM_STOPPED"),
        );
      }
      const stats = await pool.stats();
      assert.ok(stats.totalAcquired >= 2, JSON.stringify(stats));
      assert.equal(stats.busy, 0);
    });

    test("a stopped VM refuses work with VM_STOPPED", async () => {
      const other = await opened!.image.start();
      await other.stop();
      await other.stop();
      await assert.rejects(other.exec(["true"]), (e) => SupermachineError.is(e, "VM_STOPPED"));
      // (The embedded vm.fs throws this synchronously: its methods are not async.)
      await assert.rejects(
        async () => other.fs.stat("/"),
        (e) => SupermachineError.is(e, "VM_STOPPED"),
      );
    });
  });
}
