/**
 * `supermachine serve` as a process on loopback, with a pool of 4 warm clones declared on its
 * command line: refuses requests without the token; a one-shot exec on a baked snapshot returns
 * the outcome; 32 concurrent clients send 1,000 one-shot execs through the pool; 50 streaming
 * sessions; a client killed mid-stream leaves nothing running (its exec is killed, its lease is
 * reaped); `/metrics` shows the pool and the latency series; SIGTERM with requests in flight
 * lets them finish (or cancels what outlives the grace period), stops every VM and exits 0.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { after, before, describe, it } from "node:test";
import { connect, type Remote, SupermachineError } from "../../src/client/index.ts";
import { Image } from "../../src/index.ts";
import { busyboxOci } from "../helpers/busybox-oci.ts";
import { scratchDir } from "../helpers/scratch.ts";
import {
  metricValue,
  qemuDescendants,
  type ServeProcess,
  startServe,
  stillRunning,
  until,
  vmDirsLeft,
} from "../helpers/serve.ts";
import { vmSkipReason } from "../helpers/vm.ts";

const root = new URL("../../", import.meta.url).pathname;
const SNAPSHOT = "serve-test";

describe("supermachine serve on loopback", { timeout: 900_000 }, () => {
  let skip: string | undefined;
  let server: ServeProcess;
  let remote: Remote;

  before(async () => {
    skip = await vmSkipReason();
    if (skip !== undefined) return;
    const dataDir = await scratchDir("sm-serve-");
    await Image.builder(`oci:${await busyboxOci(join(dataDir, "oci"))}`)
      .name(SNAPSHOT)
      .memoryMiB(256)
      .pullOptions({ dataDir })
      .build();
    server = await startServe({
      dataDir,
      args: [
        "--pool",
        `${SNAPSHOT}:min=4,max=4,restore-on-release=false`,
        "--max-vms",
        "8",
        "--idle-timeout",
        "4s",
        "--grace-period",
        "5s",
      ],
    });
    remote = connect(server.url, { token: server.token });
  });

  after(async () => {
    await remote?.close();
    if (server !== undefined && server.child.exitCode === null) {
      server.child.kill("SIGKILL");
      await server.exited;
    }
  });

  const test = (name: string, fn: () => Promise<void>) =>
    it(name, async (t) => {
      if (skip !== undefined) return t.skip(skip);
      await fn();
    });

  test("a request without the token gets 401; with it, a one-shot exec on the baked snapshot returns the outcome", async () => {
    const refused = await fetch(`${server.url}/v1/pools/${SNAPSHOT}/exec`, {
      method: "POST",
      body: JSON.stringify({ argv: ["true"] }),
    });
    assert.equal(refused.status, 401);
    assert.equal(((await refused.json()) as { error: { code: string } }).error.code, "UNAUTHORIZED");
    const answer = await fetch(`${server.url}/v1/pools/${SNAPSHOT}/exec`, {
      method: "POST",
      headers: { authorization: `Bearer ${server.token}`, "content-type": "application/json" },
      body: JSON.stringify({
        argv: ["sh", "/tmp/main.sh"],
        stageFiles: [{ path: "/tmp/main.sh", content: Buffer.from("echo $((6 * 7))").toString("base64") }],
      }),
    });
    assert.equal(answer.status, 200);
    const { outcome } = (await answer.json()) as { outcome: { exitCode: number; stdout: string } };
    assert.equal(outcome.exitCode, 0);
    assert.equal(Buffer.from(outcome.stdout, "base64").toString(), "42\n");
    const pool = await remote.pool(SNAPSHOT);
    const viaClient = await pool.exec(["sh", "-c", "exit 5"], { reject: false });
    assert.equal(viaClient.exitCode, 5);
    await assert.rejects(pool.exec(["sh", "-c", "exit 5"]), (e) => SupermachineError.is(e, "EXEC_FAILED"));
  });

  test("32 concurrent clients send 1,000 one-shot execs through the pool", async () => {
    const clients = Array.from({ length: 32 }, () => connect(server.url, { token: server.token }));
    const pools = await Promise.all(clients.map((c) => c.pool(SNAPSHOT)));
    let next = 0;
    const outputs = new Set<string>();
    const started = performance.now();
    await Promise.all(
      pools.map(async (pool) => {
        for (let i = next++; i < 1000; i = next++) {
          const outcome = await pool.exec(["echo", `request ${i}`]);
          outputs.add(outcome.stdoutText);
        }
      }),
    );
    const seconds = (performance.now() - started) / 1000;
    assert.equal(outputs.size, 1000, "every request got its own answer");
    for (const c of clients) await c.close();
    const stats = await (await remote.pool(SNAPSHOT)).stats();
    assert.equal(stats.busy, 0);
    assert.ok(stats.totalAcquired >= 1000);
    console.log(
      `# 1,000 one-shot execs from 32 clients: ${seconds.toFixed(1)} s, ${(1000 / seconds).toFixed(0)} requests/s`,
    );
  });

  test("50 streaming sessions, each a command's stdin and stdout over a WebSocket", async () => {
    const pool = await remote.pool(SNAPSHOT);
    const leases = await Promise.all([pool.acquire(), pool.acquire()]);
    try {
      let next = 0;
      await Promise.all(
        Array.from({ length: 10 }, async (_, worker) => {
          for (let i = next++; i < 50; i = next++) {
            const lease = leases[worker % leases.length]!;
            await using handle = await lease.spawn(["sh", "-c", "cat; echo done >&2"]);
            const payload = `session ${i} `.repeat(2000);
            const reading = (async () => {
              let out = "";
              let err = "";
              for await (const event of handle) {
                if (event.kind === "stdout") out += new TextDecoder().decode(event.data);
                else if (event.kind === "stderr") err += new TextDecoder().decode(event.data);
                else assert.equal(event.exitCode, 0);
              }
              return { out, err };
            })();
            await handle.stdin.write(payload);
            await handle.stdin.end();
            const { out, err } = await reading;
            assert.equal(out, payload);
            assert.equal(err, "done\n");
          }
        }),
      );
    } finally {
      await Promise.all(leases.map((l) => l.release()));
    }
    await until(
      "no stream open",
      async () => metricValue(await server.metrics(), "supermachine_streams") === 0,
    );
  });

  test("a client killed mid-stream leaves nothing running: its exec is killed, its lease reaped", async () => {
    const child = spawn(
      process.execPath,
      [join(root, "test/fixtures/serve/stream-client.ts"), server.url, server.token, SNAPSHOT],
      {
        stdio: ["ignore", "pipe", "inherit"],
      },
    );
    const line = await new Promise<string>((resolve, reject) => {
      createInterface({ input: child.stdout! }).once("line", resolve);
      child.once("exit", (code) => reject(new Error(`the client exited (${code}) before its stream ran`)));
    });
    const [, vmId, pid] = line.split(" ");
    assert.equal(metricValue(await server.metrics(), "supermachine_streams"), 1);
    child.kill("SIGKILL");
    await until(
      "the stream to close",
      async () => metricValue(await server.metrics(), "supermachine_streams") === 0,
    );
    // The guest command went with the stream (asked before the lease is reaped).
    const check = await fetch(`${server.url}/v1/vms/${vmId}/exec`, {
      method: "POST",
      headers: { authorization: `Bearer ${server.token}` },
      body: JSON.stringify({ argv: ["sh", "-c", `kill -0 ${pid} 2>/dev/null && echo alive || echo gone`] }),
    });
    const { outcome } = (await check.json()) as { outcome: { stdout: string } };
    assert.equal(Buffer.from(outcome.stdout, "base64").toString(), "gone\n");
    // The lease its client never released goes back after --idle-timeout.
    await until(
      "the lease to be reaped",
      async () => metricValue(await server.metrics(), 'supermachine_vms{state="leased"}') === 0,
    );
    assert.ok(server.logs.some((l) => l.msg === "vm reaped" && l.vm === vmId && l.reason === "idle"));
  });

  test("/metrics shows the pool, the latency series, errors by code and the accelerator", async () => {
    const text = await server.metrics();
    const labels = `pool="${SNAPSHOT}",snapshot="${SNAPSHOT}"`;
    assert.equal(metricValue(text, `supermachine_pool_vms{${labels},state="busy"}`), 0);
    assert.equal(metricValue(text, `supermachine_pool_max{${labels}}`), 4);
    const idle = metricValue(text, `supermachine_pool_vms{${labels},state="idle"}`) ?? 0;
    assert.ok(idle >= 1 && idle <= 4, `idle ${idle}`);
    assert.ok(
      (metricValue(text, `supermachine_acquire_duration_seconds_count{pool="${SNAPSHOT}"}`) ?? 0) >= 1000,
    );
    assert.ok((metricValue(text, 'supermachine_exec_duration_seconds_count{mode="pool"}') ?? 0) >= 1000);
    assert.ok((metricValue(text, 'supermachine_exec_duration_seconds_count{mode="stream"}') ?? 0) >= 50);
    assert.ok((metricValue(text, 'supermachine_vm_start_duration_seconds_count{kind="restore"}') ?? 0) >= 4);
    assert.ok((metricValue(text, 'supermachine_errors_total{code="UNAUTHORIZED"}') ?? 0) >= 1);
    assert.equal(metricValue(text, "supermachine_vm_memory_committed_bytes"), idle * 256 * 1024 * 1024);
    assert.match(text, /^supermachine_accelerator_info\{accelerator="(kvm|tcg)"\} 1$/m);
    assert.match(text, /^supermachine_utilization_ratio 0$/m);
    // Structured logs: one JSON object per request.
    assert.ok(
      server.logs.some((l) => l.msg === "request" && l.route === "/v1/pools/{id}/exec" && l.status === 200),
    );
  });

  test("SIGTERM with requests in flight: they finish (or are cancelled past the grace period), every VM stops, exit 0", async () => {
    const qemus = qemuDescendants(server.child.pid!);
    assert.ok(qemus.size >= 4, `QEMUs of the server: ${qemus.size}`);
    const pool = await remote.pool(SNAPSHOT);
    const quick = pool.exec(["sh", "-c", "sleep 1; echo finished"]);
    const slow = pool.exec(["sleep", "60"]).then(
      () => "resolved",
      (error: unknown) => (SupermachineError.is(error) ? error.code : String(error)),
    );
    const lease = await pool.acquire();
    const stream = await lease.spawn(["sleep", "60"]);
    const streamEnd = stream.wait().then(
      () => "resolved",
      (error: unknown) => (SupermachineError.is(error) ? error.code : String(error)),
    );
    // Both execs run before the signal.
    await until("two execs in flight", async () => {
      const text = await server.metrics();
      return (
        metricValue(text, `supermachine_pool_vms{pool="${SNAPSHOT}",snapshot="${SNAPSHOT}",state="busy"}`) ===
        3
      );
    });
    server.child.kill("SIGTERM");
    assert.equal((await quick).stdoutText, "finished\n");
    assert.equal(await server.exited, 0);
    assert.equal(await slow, "SERVER_UNAVAILABLE");
    assert.equal(await streamEnd, "SERVER_UNAVAILABLE");
    assert.deepEqual(stillRunning(qemus), [], "no QEMU left");
    assert.deepEqual(vmDirsLeft(server.runtimeDir), [], "no VM runtime dir left");
    const messages = server.logs.map((l) => l.msg);
    assert.ok(messages.includes("draining") && messages.at(-1) === "stopped", messages.slice(-5).join(", "));
  });
});
