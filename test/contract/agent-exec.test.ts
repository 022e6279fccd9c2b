/**
 * The exec API against the real guest agent (guest/build/sm-init) running as a host process on a
 * socketpair. Processes run on this host, so paths come from a temporary directory.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { subscribe, unsubscribe } from "node:diagnostics_channel";
import { mkdtemp, readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";
import type { AgentClient } from "../../src/agent/agent-client.ts";
import { FRAME_COST } from "../../src/agent/frame-codec.ts";
import { DEFAULT_WINDOW } from "../../src/agent/messages.ts";
import {
  AbortError,
  ExecError,
  ExecStartError,
  ExecTimeoutError,
  OutputLimitError,
  SupermachineError,
} from "../../src/errors.ts";
import { type ExecTarget, execBuilder } from "../../src/vm/index.ts";
import { connectAgent, type HostAgent } from "../helpers/agent-binary.ts";

let agent: HostAgent;
let client: AgentClient;
let dir: string;
let timeouts = 0;
const target: ExecTarget = {
  agent: () => client,
  defaults: () => ({ env: { FROM_IMAGE: "image", SHADOWED: "image" }, cwd: "", user: "" }),
  describe: () => "host-mode agent",
  onExecTimedOut: () => timeouts++,
};
const exec = (argv: string[]) => execBuilder(target).argv(argv);
const isCode = (code: string) => (e: unknown) => SupermachineError.is(e) && e.code === code;

before(async () => {
  const connected = await connectAgent();
  agent = connected.agent;
  client = connected.client;
  dir = await mkdtemp(join(tmpdir(), "sm-contract-"));
});

after(async () => {
  client?.close();
  await agent?.kill();
  if (dir) await rm(dir, { recursive: true, force: true });
});

/** Live (non-zombie) processes in process group `pgid`. */
async function groupMembers(pgid: number): Promise<number[]> {
  const members: number[] = [];
  for (const name of await readdir("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    const text = await readFile(`/proc/${name}/stat`, "utf8").catch(() => "");
    const fields = text.slice(text.lastIndexOf(")") + 2).split(" ");
    if (Number(fields[2]) === pgid && fields[0] !== "Z") members.push(Number(name));
  }
  return members;
}

/** Waits (bounded) for a killed process group to disappear; SIGKILL delivery is asynchronous. */
async function groupGone(pgid: number): Promise<void> {
  const deadline = Date.now() + 5000;
  while ((await groupMembers(pgid)).length > 0) {
    if (Date.now() > deadline) assert.fail(`process group ${pgid} still has ${await groupMembers(pgid)}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

describe("exit status", () => {
  test("reports output, exit code, duration and peak RSS", async () => {
    const out = await exec(["sh", "-c", "echo hi; echo oops >&2; exit 3"]).reject(false).output();
    assert.equal(out.exitCode, 3);
    assert.equal(out.signal, null);
    assert.equal(out.timedOut, false);
    assert.equal(out.stdoutText, "hi\n");
    assert.equal(out.stderrText, "oops\n");
    assert.equal(out.step, 0);
    assert.ok(out.durationMs > 0);
    assert.ok(out.peakRssKiB > 0, `peakRssKiB ${out.peakRssKiB}`);
    assert.deepEqual(out.argv, ["sh", "-c", "echo hi; echo oops >&2; exit 3"]);
  });

  test("every exit code from 0 to 255 (16 execs at a time)", async () => {
    for (let base = 0; base < 256; base += 16) {
      const codes = Array.from({ length: 16 }, (_, i) => base + i);
      const outs = await Promise.all(
        codes.map((code) =>
          exec(["sh", "-c", `exit ${code}`])
            .reject(false)
            .output(),
        ),
      );
      assert.deepEqual(
        outs.map((o) => o.exitCode),
        codes,
      );
    }
    assert.equal(client.openStreams, 0);
  });

  test("non-zero exit rejects output() with ExecError unless reject(false)", async () => {
    await assert.rejects(exec(["sh", "-c", "echo bad >&2; exit 7"]).output(), (e: unknown) => {
      assert.ok(e instanceof ExecError);
      assert.equal(e.exitCode, 7);
      assert.equal(e.outcome.exitCode, 7);
      assert.match(e.message, /exited with code 7 in host-mode agent; stderr: bad/);
      return true;
    });
  });

  test("death by signal", async () => {
    const out = await exec(["sh", "-c", "kill -9 $$"]).reject(false).output();
    assert.equal(out.exitCode, null);
    assert.equal(out.signal, "SIGKILL");
    await assert.rejects(exec(["sh", "-c", "kill -TERM $$"]).output(), (e: unknown) => {
      assert.ok(e instanceof ExecError);
      assert.equal(e.outcome.signal, "SIGTERM");
      return true;
    });
  });

  test("a missing program → EXEC_NOT_FOUND, a bad cwd → EXEC_START", async () => {
    for (const argv of [["/no/such/program"], ["no-such-program-anywhere"]]) {
      await assert.rejects(exec(argv).output(), (e: unknown) => {
        assert.ok(e instanceof ExecStartError);
        assert.equal(e.code, "EXEC_NOT_FOUND");
        assert.deepEqual(e.argv, argv);
        assert.match(e.message, /host-mode agent/);
        return true;
      });
    }
    await assert.rejects(exec(["true"]).cwd("/no/such/dir").output(), (e: unknown) => {
      assert.ok(e instanceof ExecStartError);
      assert.equal(e.code, "EXEC_START");
      assert.equal(e.errno, 2);
      return true;
    });
    await assert.rejects(exec(["true"]).cwd("/no/such/dir").spawn(), isCode("EXEC_START"));
    await assert.rejects(exec(["/no/such/program"]).spawn(), isCode("EXEC_NOT_FOUND"));
  });
});

describe("input and output", () => {
  test("10 MiB of stdout arrive intact", async () => {
    const size = 10 * 1024 * 1024;
    const out = await exec(["sh", "-c", `yes 0123456789abcdef | head -c ${size}`]).output();
    assert.equal(out.stdout.byteLength, size);
    assert.ok(Buffer.from(out.stdout).equals(Buffer.alloc(size, "0123456789abcdef\n")));
  });

  test("binary stdin round-trips (bytes, async iterable, Node stream)", async () => {
    const input = randomBytes(3 * 1024 * 1024 + 17);
    const fromBytes = await exec(["cat"]).stdin(input).output();
    assert.ok(Buffer.from(fromBytes.stdout).equals(input));
    async function* chunks() {
      for (let i = 0; i < input.length; i += 100_000) yield input.subarray(i, i + 100_000);
    }
    const fromIterable = await exec(["cat"]).stdin(chunks()).output();
    assert.ok(Buffer.from(fromIterable.stdout).equals(input));
    const fromStream = await exec(["sha256sum"]).stdin(Readable.from(chunks())).output();
    const { createHash } = await import("node:crypto");
    assert.equal(fromStream.stdoutText.split(" ")[0], createHash("sha256").update(input).digest("hex"));
    const text = await exec(["cat"]).stdin("héllo ✓\n").output();
    assert.equal(text.stdoutText, "héllo ✓\n");
  });

  test("text accessors decode characters split across chunks", async () => {
    const out = await exec(["sh", "-c", "printf '\\303'; sleep 0.2; printf '\\251\\n'"]).output();
    assert.deepEqual([...out.stdout], [0xc3, 0xa9, 0x0a]);
    assert.equal(out.stdoutText, "é\n");
  });

  test("without stdin() the command reads /dev/null", async () => {
    const out = await exec(["sh", "-c", "cat; echo done"]).output();
    assert.equal(out.stdoutText, "done\n");
  });

  test("a process that exits without reading its stdin is fine", async () => {
    const out = await exec(["true"])
      .stdin(new Uint8Array(5 * 1024 * 1024))
      .output();
    assert.equal(out.exitCode, 0);
  });

  test("maxBuffer bounds collected output and kills the command", async () => {
    await assert.rejects(
      exec(["sh", "-c", "head -c 100000 /dev/zero; sleep 100"]).maxBuffer(1000).output(),
      (e) => {
        assert.ok(e instanceof OutputLimitError);
        assert.equal(e.maxBufferBytes, 1000);
        return true;
      },
    );
    assert.equal(client.openStreams, 0);
  });

  test("env merges over the image's (with a default PATH); cwd applies", async () => {
    const out = await exec(["sh", "-c", 'echo "$FROM_IMAGE|$SHADOWED|$MINE|$(pwd)|$PATH"'])
      .env({ SHADOWED: "builder", MINE: "x y" })
      .cwd(dir)
      .output();
    assert.equal(
      out.stdoutText,
      `image|builder|x y|${dir}|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n`,
    );
  });

  test("user switching (name, uid:gid) and HOME from passwd", async (t) => {
    if (process.getuid?.() !== 0) return t.skip("needs root to switch users");
    const byName = await exec(["sh", "-c", 'echo "$(id -u):$(id -g) $HOME"']).user("nobody").output();
    assert.equal(byName.stdoutText, "65534:65534 /nonexistent\n");
    const numeric = await exec(["sh", "-c", "echo $(id -u):$(id -g)"]).user("1234:5678").output();
    assert.equal(numeric.stdoutText, "1234:5678\n");
    await assert.rejects(exec(["true"]).user("no-such-user").output(), isCode("EXEC_START"));
  });
});

describe("staging and chains", () => {
  test("staged files exist with their mode before the first step; chained steps run like &&", async () => {
    const script = join(dir, "stage", "deep", "hello.sh");
    const data = join(dir, "stage", "data.bin");
    const bytes = randomBytes(3 * 1024 * 1024);
    const out = await exec([script, "one"])
      .stageFile(script, "#!/bin/sh\necho staged $1\n", { mode: 0o750 })
      .stageFile(data, bytes)
      .stageFile(join(dir, "stage", "empty"), "")
      .chain(["sh", "-c", `stat -c %a ${script}; wc -c < ${data}; wc -c < ${join(dir, "stage", "empty")}`])
      .output();
    assert.equal(out.stdoutText, `staged one\n750\n${bytes.length}\n0\n`);
    assert.equal(out.step, 1);
    assert.ok((await readFile(data)).equals(bytes));
  });

  test("a failing step skips the rest; a missing chained program exits 127", async () => {
    const failed = await exec(["sh", "-c", "echo first; exit 4"])
      .chain(["sh", "-c", "echo never"])
      .reject(false)
      .output();
    assert.equal(failed.exitCode, 4);
    assert.equal(failed.step, 0);
    assert.equal(failed.stdoutText, "first\n");
    const missing = await exec(["true"])
      .chain(["/no/such/step"])
      .chain(["echo", "never"])
      .reject(false)
      .output();
    assert.equal(missing.exitCode, 127);
    assert.equal(missing.step, 1);
    assert.equal(missing.stdoutText, "");
    assert.notEqual(missing.stderrText, "");
  });
});

describe("timeouts, signals, abort", () => {
  test("a timeout kills the whole process tree and reports it", async () => {
    const pids: number[] = [];
    const onStart = (message: unknown) => pids.push((message as { pid: number }).pid);
    subscribe("supermachine:exec:start", onStart);
    const before = timeouts;
    const started = Date.now();
    try {
      await assert.rejects(
        exec(["sh", "-c", "sleep 100 & sleep 100"]).timeout(300).killGrace(200).output(),
        (e: unknown) => {
          assert.ok(e instanceof ExecTimeoutError);
          assert.equal(e.timeoutMs, 300);
          assert.equal(e.outcome.timedOut, true);
          assert.ok(
            e.outcome.signal === "SIGTERM" || e.outcome.signal === "SIGKILL",
            String(e.outcome.signal),
          );
          return true;
        },
      );
    } finally {
      unsubscribe("supermachine:exec:start", onStart);
    }
    assert.ok(Date.now() - started < 5000);
    assert.equal(timeouts, before + 1);
    assert.equal(pids.length, 1);
    await groupGone(pids[0]!);
  });

  test("SIGTERM ignored → SIGKILL after the grace period", async () => {
    const handle = await exec(["sh", "-c", "trap '' TERM; echo ready; sleep 100"])
      .timeout(200)
      .killGrace(100)
      .spawn();
    const outcome = await handle.wait();
    assert.equal(outcome.timedOut, true);
    assert.equal(outcome.signal, "SIGKILL");
    assert.equal(outcome.stdoutText, "ready\n");
    await groupGone(handle.pid);
  });

  test("abort kills the command and rejects with AbortError", async () => {
    const controller = new AbortController();
    const pids: number[] = [];
    const onStart = (message: unknown) => {
      pids.push((message as { pid: number }).pid);
      controller.abort();
    };
    subscribe("supermachine:exec:start", onStart);
    try {
      await assert.rejects(exec(["sleep", "100"]).signal(controller.signal).output(), AbortError);
    } finally {
      unsubscribe("supermachine:exec:start", onStart);
    }
    await groupGone(pids[0]!);
    await assert.rejects(exec(["true"]).signal(controller.signal).output(), AbortError);
  });

  test("kill() delivers a signal; diagnostics report start and exit", async () => {
    const events: unknown[] = [];
    const onExit = (message: unknown) => events.push(message);
    subscribe("supermachine:exec:exit", onExit);
    try {
      const handle = await exec(["sleep", "100"]).spawn();
      handle.kill("SIGTERM");
      const outcome = await handle.wait();
      assert.equal(outcome.signal, "SIGTERM");
      assert.equal(outcome.exitCode, null);
      assert.equal(events.length, 1);
      assert.deepEqual(
        { ...(events[0] as object), durationMs: 0, peakRssKiB: 0 },
        {
          argv: ["sleep", "100"],
          pid: handle.pid,
          exitCode: null,
          signal: "SIGTERM",
          timedOut: false,
          durationMs: 0,
          peakRssKiB: 0,
          target: "host-mode agent",
        },
      );
    } finally {
      unsubscribe("supermachine:exec:exit", onExit);
    }
    assert.throws(() => exec(["true"]).argv([]), isCode("INVALID_ARGUMENT"));
  });
});

describe("spawn()", () => {
  test("interactive stdin and stdout by iteration", async () => {
    const handle = await exec(["sh", "-c", "while read line; do echo got:$line; done; echo bye >&2"]).spawn();
    assert.ok(handle.pid > 1);
    await handle.stdin.write("one\n");
    const events: string[] = [];
    for await (const event of handle) {
      if (event.kind === "exit") events.push(`exit ${event.exitCode}`);
      else {
        events.push(`${event.kind} ${Buffer.from(event.data).toString()}`);
        if (event.kind === "stdout" && events.length === 1) {
          await handle.stdin.write(new TextEncoder().encode("two\n"));
          await handle.stdin.end();
        }
      }
    }
    assert.deepEqual(events, ["stdout got:one\n", "stdout got:two\n", "stderr bye\n", "exit 0"]);
    const outcome = await handle.wait();
    assert.equal(outcome.exitCode, 0);
    assert.equal(outcome.stdout.length, 0, "output consumed by iteration is not collected again");
    await assert.rejects(handle.stdin.write("late\n"), isCode("INVALID_ARGUMENT"), "stdin was ended");
    // Writing to a command that has exited is dropped, like writing into a pipe nobody reads.
    const gone = await exec(["true"]).spawn();
    await gone.wait();
    await gone.stdin.write("late\n");
    await gone.stdin.end();
  });

  test("stdout and stderr as Node streams; stdin as a Writable", async () => {
    const handle = await exec(["sh", "-c", "cat; echo err >&2"]).spawn();
    await pipeline(Readable.from([Buffer.from("a"), Buffer.from("b")]), handle.stdinStream());
    const [out, err] = await Promise.all([
      Readable.from(handle.stdout).toArray(),
      Readable.from(handle.stderr).toArray(),
    ]);
    assert.equal(Buffer.concat(out).toString(), "ab");
    assert.equal(Buffer.concat(err).toString(), "err\n");
    assert.equal((await handle.wait()).exitCode, 0);
    assert.throws(() => handle[Symbol.asyncIterator]().next(), isCode("INVALID_ARGUMENT"));
  });

  test("wait() alone collects the output", async () => {
    const handle = await exec(["sh", "-c", "echo hi; exit 5"]).spawn();
    const outcome = await handle.wait();
    assert.equal(outcome.exitCode, 5, "wait() does not reject on a non-zero exit");
    assert.equal(outcome.stdoutText, "hi\n");
    assert.equal(await handle.wait(), outcome);
  });

  test("a tty with a window size that follows resize", async () => {
    const out = await exec(["stty", "size"]).tty().winsize(40, 100).output();
    assert.equal(out.stdoutText.trim(), "40 100");
    const handle = await exec(["sh", "-c", "stty size; read x; stty size; echo err >&2"])
      .tty()
      .winsize(30, 90)
      .spawn();
    let text = "";
    for await (const event of handle) {
      assert.notEqual(event.kind, "stderr", "a tty merges stderr into stdout");
      if (event.kind !== "stdout") continue;
      text += Buffer.from(event.data).toString();
      if (text.includes("30 90") && !text.includes("go")) {
        handle.resize(50, 132);
        await handle.stdin.write("go\r");
      }
    }
    assert.match(text, /30 90[\s\S]*50 132[\s\S]*err/);
  });

  test("asyncDispose kills a running command and waits for it", async () => {
    const handle = await exec(["sh", "-c", "sleep 100 & sleep 100"]).spawn();
    await handle[Symbol.asyncDispose]();
    assert.equal(handle.exited, true);
    await groupGone(handle.pid);
    assert.equal(client.openStreams, 0);
  });

  test("stdin given to the builder is piped in, then closed", async () => {
    const handle = await exec(["wc", "-c"]).stdin(new Uint8Array(123_456)).spawn();
    assert.equal((await handle.wait()).stdoutText.trim(), "123456");
  });
});

describe("backpressure", () => {
  test("a slow consumer holds the guest process back; the host buffers at most the credit", async () => {
    const total = 32 * 1024 * 1024;
    const channel = client.exec({ argv: ["head", "-c", String(total), "/dev/zero"] });
    await channel.started;
    let received = (await channel.read())?.data.length ?? 0;
    // Let the agent fill the credit (each frame costs its bytes plus FRAME_COST), then stay slow:
    // nothing more may arrive.
    const filled = DEFAULT_WINDOW - 64 * FRAME_COST;
    while (channel.bufferedBytes < filled) await new Promise((resolve) => setTimeout(resolve, 10));
    await new Promise((resolve) => setTimeout(resolve, 300));
    assert.ok(
      channel.bufferedBytes >= filled && channel.bufferedBytes <= DEFAULT_WINDOW,
      `${channel.bufferedBytes} bytes buffered`,
    );
    const rss = Number(/VmRSS:\s+(\d+)/.exec(await readFile(`/proc/${agent.child.pid}/status`, "utf8"))?.[1]);
    assert.ok(rss < 16 * 1024, `agent RSS ${rss} KiB while the host is not reading`);
    let maxBuffered = 0;
    for (;;) {
      maxBuffered = Math.max(maxBuffered, channel.bufferedBytes);
      const chunk = await channel.read();
      if (!chunk) break;
      received += chunk.data.length;
    }
    assert.equal(received, total);
    assert.ok(maxBuffered <= DEFAULT_WINDOW, `buffered ${maxBuffered}`);
    assert.equal((await channel.exited).exitCode, 0);
  });

  test("output taken while the channel is full is sent once, and the exec ends though a background process keeps its pipe", async () => {
    // The host stops reading. One exec fills the channel (within its credit, under the agent's
    // queue limit); then another writes "abc" and exits, leaving a process that keeps its stdout
    // open. "abc" left the pipe when the agent took it: the exec must end once it is sent.
    const filled = join(dir, "channel-filled");
    const reaped = join(dir, "writer-pid");
    await promisify(execFile)("mkfifo", [filled, reaped]);
    agent.socket.pause();
    const filler = client.exec({
      argv: ["sh", "-c", `head -c ${512 * 1024} /dev/zero; echo > ${filled}`],
      windowBytes: 1024 * 1024, // its output and the cost of its frames, which are small on a terminal
      tty: true, // a terminal is read, not spliced: the writer's output is spliced
    });
    const writer = client.exec({
      argv: [
        "sh",
        "-c",
        `read x < ${filled}; sleep 1000 & printf abc; echo $$ > ${reaped}; read x < ${reaped}`,
      ],
    });
    const pid = Number((await readFile(reaped, "utf8")).trim());
    await writeFile(reaped, "exit\n");
    // the agent reaps it (and sees what its pipes hold then) before the host reads again
    while (
      await stat(`/proc/${pid}`).then(
        () => true,
        () => false,
      )
    )
      await new Promise((resolve) => setTimeout(resolve, 10));
    agent.socket.resume();
    const take = async (channel: typeof writer) => {
      const chunks: Uint8Array[] = [];
      for (let chunk = await channel.read(); chunk; chunk = await channel.read()) chunks.push(chunk.data);
      return Buffer.concat(chunks);
    };
    await take(filler);
    assert.equal((await take(writer)).toString(), "abc");
    assert.equal((await writer.exited).exitCode, 0);
  });
});

describe("the channel", () => {
  test("ping measures a round trip", async () => {
    const ms = await client.ping();
    assert.ok(ms > 0, `${ms} ms`);
  });

  test("execs on one channel run concurrently", async () => {
    // A barrier: each exec succeeds only if all eight are running at the same time.
    const barrier = await mkdtemp(join(dir, "barrier-"));
    const script =
      'touch "$1/started-$2"; i=0; while [ "$i" -lt 400 ]; do ' +
      '[ "$(ls "$1" | grep -c "^started-")" -ge 8 ] && { echo "$2"; exit 0; }; sleep 0.05; i=$((i+1)); done; exit 1';
    const outs = await Promise.all(
      Array.from({ length: 8 }, (_, i) => exec(["sh", "-c", script, "sh", barrier, String(i)]).output()),
    );
    assert.deepEqual(
      outs.map((o) => o.stdoutText),
      ["0\n", "1\n", "2\n", "3\n", "4\n", "5\n", "6\n", "7\n"],
    );
  });
});
