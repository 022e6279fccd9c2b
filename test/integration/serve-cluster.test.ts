/**
 * Three servers behind one client with three endpoints (the way a Kubernetes headless Service
 * lists each pod): a pool on each, acquires spread over them, each VM kept on its server. One
 * server is killed: its VMs fail with a typed error (`SERVER_UNAVAILABLE`), new acquires go to the
 * two others, and the killed server's QEMUs go with it.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { connect, type Remote, type RemotePooledVm, SupermachineError } from "../../src/client/index.ts";
import { Image } from "../../src/index.ts";
import { busyboxOci } from "../helpers/busybox-oci.ts";
import { scratchDir } from "../helpers/scratch.ts";
import { qemuDescendants, type ServeProcess, startServe, stillRunning } from "../helpers/serve.ts";
import { vmSkipReason } from "../helpers/vm.ts";

const SNAPSHOT = "cluster-test";

describe("three servers, one client", { timeout: 600_000 }, () => {
  let skip: string | undefined;
  const servers: ServeProcess[] = [];
  let remote: Remote;

  before(async () => {
    skip = await vmSkipReason();
    if (skip !== undefined) return;
    const dataDir = await scratchDir("sm-cluster-");
    await Image.builder(`oci:${await busyboxOci(join(dataDir, "oci"))}`)
      .name(SNAPSHOT)
      .memoryMiB(256)
      .pullOptions({ dataDir })
      .build();
    const token = "cluster-token-0123456789abcdef";
    // The three share the snapshot store, as pods would share an image with it baked in.
    for (let i = 0; i < 3; i++)
      servers.push(await startServe({ dataDir, token, args: ["--server-id", `server-${i}`] }));
    remote = connect(
      servers.map((s) => s.url),
      { token },
    );
  });

  after(async () => {
    await remote?.close();
    for (const server of servers) {
      if (server.child.exitCode === null) server.child.kill("SIGTERM");
      await server.exited;
    }
  });

  it("spreads acquires, keeps each VM on its server, and survives losing one server", async (t) => {
    if (skip !== undefined) return t.skip(skip);
    const image = await remote.Image.fromSnapshot(SNAPSHOT);
    assert.deepEqual(image.endpoints, remote.endpoints);
    const ids = (await remote.info()).map((info) => info.serverId).sort();
    assert.deepEqual(ids, ["server-0", "server-1", "server-2"]);
    const pool = await image.pool().min(1).max(2).restoreOnRelease(false).build();
    assert.deepEqual(pool.endpoints, remote.endpoints);

    const leases: RemotePooledVm[] = [];
    for (let i = 0; i < 3; i++) leases.push(await pool.acquire());
    const byServer = new Map(leases.map((lease) => [lease.vm.endpoint, lease]));
    assert.equal(byServer.size, 3, "one VM on each server");
    for (const lease of leases) {
      const out = await lease.exec(["sh", "-c", "echo $((2 + 3))"]);
      assert.equal(out.stdoutText, "5\n");
    }

    // Lose the second server, hard.
    const lost = servers[1]!;
    const lostQemus = qemuDescendants(lost.child.pid!);
    assert.ok(lostQemus.size >= 1);
    lost.child.kill("SIGKILL");
    await lost.exited;
    const orphan = byServer.get(lost.url)!;
    const failure = await orphan.exec(["true"]).then(
      () => assert.fail("an exec on a VM of the lost server resolved"),
      (error: unknown) => error,
    );
    assert.ok(SupermachineError.is(failure, "SERVER_UNAVAILABLE"), String(failure));
    assert.equal(failure.endpoint, lost.url);
    await assert.rejects(orphan.vm.fs.stat("/"), (e) => SupermachineError.is(e, "SERVER_UNAVAILABLE"));

    // New work goes to the two others.
    for (let i = 0; i < 6; i++) {
      await using lease = await pool.acquire();
      assert.notEqual(lease.vm.endpoint, lost.url);
      assert.equal((await lease.exec(["echo", "ok"])).stdoutText, "ok\n");
    }
    const vm = await image.start();
    assert.notEqual(vm.endpoint, lost.url);
    await vm.stop();
    // The stats of the servers that answer: the two first acquires there and the six since.
    const stats = await pool.stats();
    assert.equal(stats.totalAcquired, 8, JSON.stringify(stats));

    // Its QEMUs died with it (they never outlive their parent).
    const deadline = Date.now() + 10_000;
    while (stillRunning(lostQemus).length > 0 && Date.now() < deadline)
      await new Promise((r) => setTimeout(r, 50));
    assert.deepEqual(stillRunning(lostQemus), []);
    for (const lease of leases) if (lease !== orphan) await lease.release();
    await orphan.release().catch(() => {});
    await pool.close();
  });
});
