/**
 * redis (Debian's redis-server) as a server image shaped like the official one: its entrypoint
 * runs as root, hands /data to the redis user and starts redis-server as that user with protected
 * mode off. Baked with the workload running; reached from the host through `vm.exposeTcp` by
 * Debian's redis-cli and redis-benchmark in clones restored from the snapshot.
 */
import assert from "node:assert/strict";
import { describe } from "node:test";
import { processUsers, run, serviceSuite } from "../helpers/services.ts";

describe("redis as a service", { timeout: 600_000 }, () => {
  const service = serviceSuite("redis", { memoryMiB: 256, readyPort: 6379 });

  service.it("the image has the official image's config", async () => {
    const config = service.image().config;
    assert.deepEqual(config.entrypoint, ["docker-entrypoint.sh"]);
    assert.deepEqual(config.cmd, ["redis-server"]);
    assert.equal(config.workingDir, "/data");
    assert.deepEqual(config.exposedPorts, ["6379/tcp"]);
  });

  service.it("redis-server runs as the redis user with protected mode off", async (vm) => {
    assert.deepEqual(await processUsers(vm, "redis-server"), ["redis"]);
    await using port = await vm.exposeTcp(0, 6379);
    const { stdout } = await run("redis-cli", [
      "-p",
      String(port.hostPort),
      "CONFIG",
      "GET",
      "protected-mode",
    ]);
    assert.equal(stdout, "protected-mode\nno\n");
  });

  service.it("answers redis-cli PING", async (vm) => {
    await using port = await vm.exposeTcp(0, 6379);
    const { stdout } = await run("redis-cli", ["-p", String(port.hostPort), "PING"]);
    assert.equal(stdout, "PONG\n");
  });

  service.it("runs redis-benchmark -q -n 2000", async (vm) => {
    await using port = await vm.exposeTcp(0, 6379);
    const { stdout, stderr } = await run(
      "redis-benchmark",
      ["-p", String(port.hostPort), "-q", "-n", "2000"],
      {
        timeoutMs: 300_000,
      },
    );
    for (const test of ["PING_INLINE", "SET", "GET", "INCR", "LPUSH", "LRANGE_100"]) {
      assert.match(stdout, new RegExp(`^${test}( \\([^)]*\\))?: [\\d.]+ requests per second`, "m"), test);
    }
    assert.doesNotMatch(`${stdout}${stderr}`, /error/i, stderr);
  });
});
