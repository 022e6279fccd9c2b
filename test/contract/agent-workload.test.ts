/**
 * The workload (`startWorkload`, `workloadStatus`, `signalWorkload`, `workloadLogs`,
 * `onWorkloadExit`) against the real guest agent in host mode. Each test owns its agent: the
 * workload belongs to the agent, not to a session.
 */
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import type { Readable } from "node:stream";
import { describe, test } from "node:test";
import { AgentClient } from "../../src/agent/agent-client.ts";
import type { WorkloadStatus } from "../../src/agent/workload.ts";
import { ExecStartError, GuestIoError } from "../../src/errors.ts";
import { connectAgent, spawnAgent } from "../helpers/agent-binary.ts";
import { failOnUnhandledRejections, isCode } from "./fake-agent.ts";

failOnUnhandledRejections();

const ENV = ["PATH=/usr/local/bin:/usr/bin:/bin"];

async function text(stream: Readable): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString();
}

/** The next exit report. */
function nextExit(client: AgentClient): Promise<WorkloadStatus> {
  return new Promise((resolve) => {
    const off = client.onWorkloadExit((status) => {
      off();
      resolve(status);
    });
  });
}

/** Waits (bounded) until `pid` is gone or a zombie. */
async function processGone(pid: number): Promise<void> {
  const deadline = Date.now() + 5000;
  for (;;) {
    const stat = await readFile(`/proc/${pid}/stat`, "utf8").catch(() => "");
    if (stat === "" || stat.slice(stat.lastIndexOf(")") + 2).startsWith("Z")) return;
    if (Date.now() > deadline) assert.fail(`process ${pid} is still running`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

describe("workload", () => {
  test("runs, reports its status and exit, keeps its output for logs", async () => {
    await using own = await connectAgent();
    const { client } = own;
    assert.deepEqual(await client.workloadStatus(), {
      state: "none",
      pid: null,
      exitCode: null,
      signal: null,
      signalNumber: null,
    });
    assert.equal(await text(client.workloadLogs()), "");
    const exited = nextExit(client);
    const started = await client.startWorkload({
      argv: [
        "sh",
        "-c",
        'echo "out in $PWD as $GREETING"; echo err >&2; read line; echo "stdin: [$line]"; exit 7',
      ],
      env: [...ENV, "GREETING=hi"],
      cwd: "/tmp",
    });
    assert.equal(started.state, "running");
    assert.ok(started.pid! > 0);
    const exit = await exited;
    assert.deepEqual(exit, {
      state: "exited",
      pid: started.pid,
      exitCode: 7,
      signal: null,
      signalNumber: null,
    });
    assert.deepEqual(await client.workloadStatus(), exit);
    const all = await text(client.workloadLogs());
    assert.match(all, /^out in \/tmp as hi\n/);
    assert.match(all, /err\n/);
    assert.match(all, /stdin: \[\]\n/, "stdin is /dev/null");
    assert.equal(await text(client.workloadLogs({ streams: "stderr" })), "err\n");
    assert.equal(
      await text(client.workloadLogs({ streams: "stdout", follow: true })),
      all.replace("err\n", ""),
    );
  });

  test("follow streams output until the workload exits; a second start is refused", async () => {
    await using own = await connectAgent();
    const { client } = own;
    await client.startWorkload({
      argv: ["sh", "-c", "for i in 1 2 3; do echo tick $i; sleep 0.05; done"],
      env: ENV,
    });
    await assert.rejects(client.startWorkload({ argv: ["true"], env: ENV }), (e: unknown) => {
      assert.ok(e instanceof ExecStartError);
      assert.equal(e.code, "EXEC_START");
      assert.match(e.message, /already running/);
      return true;
    });
    assert.equal(await text(client.workloadLogs({ follow: true })), "tick 1\ntick 2\ntick 3\n");
    assert.equal((await client.workloadStatus()).exitCode, 0);
    // After it exited, a new one may start.
    const again = await client.startWorkload({ argv: ["true"], env: ENV });
    assert.equal(again.state, "running");
  });

  test("start failures: a missing program, a bad working directory", async () => {
    await using own = await connectAgent();
    const { client } = own;
    await assert.rejects(client.startWorkload({ argv: ["/no/such/binary"] }), isCode("EXEC_NOT_FOUND"));
    await assert.rejects(
      client.startWorkload({ argv: ["true"], env: ENV, cwd: "/no/such/dir" }),
      isCode("EXEC_START"),
    );
    assert.equal((await client.workloadStatus()).state, "none");
    await assert.rejects(client.signalWorkload("SIGTERM"), (e: unknown) => {
      assert.ok(e instanceof GuestIoError);
      assert.equal(e.code, "ESRCH");
      return true;
    });
    await assert.rejects(client.signalWorkload("SIGNOPE"), isCode("INVALID_ARGUMENT"));
    await assert.rejects(client.startWorkload({ argv: [] }), isCode("INVALID_ARGUMENT"));
  });

  test("FREEZE and its thaw are answered (without cgroups, as here, there is nothing to freeze)", async () => {
    await using own = await connectAgent();
    const { client } = own;
    await client.freeze(true);
    await client.freeze(false);
    assert.equal((await client.exec({ argv: ["echo", "runs"], env: ENV }).exited).exitCode, 0);
  });

  test("a new session leaves it running; signals reach it; SHUTDOWN ends it", async () => {
    const own = await spawnAgent();
    try {
      const first = await AgentClient.connect(own.socket, { epoch: 1n });
      const { pid } = await first.startWorkload({ argv: ["sleep", "100"], env: ENV });
      await first.rehello({ timeoutMs: 5000 });
      assert.deepEqual(await first.workloadStatus(), {
        state: "running",
        pid,
        exitCode: null,
        signal: null,
        signalNumber: null,
      });
      const exited = nextExit(first);
      await first.signalWorkload("SIGTERM");
      assert.equal((await exited).signal, "SIGTERM");
      const second = await first.startWorkload({ argv: ["sleep", "100"], env: ENV });
      await first.shutdown();
      assert.deepEqual(await own.exited, { code: 0, signal: null });
      await processGone(second.pid!);
    } finally {
      await own.kill();
    }
  });

  test("output nobody reads never blocks it; logs keep the last MiB", async () => {
    await using own = await connectAgent();
    const { client } = own;
    const exited = nextExit(client);
    await client.startWorkload({
      argv: ["sh", "-c", "head -c 4000000 /dev/zero | tr '\\0' a; echo END"],
      env: ENV,
    });
    assert.equal((await exited).exitCode, 0);
    const logs = await text(client.workloadLogs());
    assert.ok(logs.length > 900_000 && logs.length <= 1024 * 1024, `${logs.length} bytes kept`);
    assert.ok(logs.endsWith("aEND\n"));
  });
});
