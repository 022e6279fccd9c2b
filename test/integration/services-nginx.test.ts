/**
 * nginx from Debian's package, as a server image: pushed to a registry on loopback, baked with its
 * workload (`nginx -g 'daemon off;'`) running, and reached from the host through `vm.exposeTcp`
 * by real clients (curl, wrk) in clones restored from the snapshot.
 */
import assert from "node:assert/strict";
import { describe } from "node:test";
import { assertWrkClean, run, serviceSuite } from "../helpers/services.ts";

describe("nginx as a service", { timeout: 600_000 }, () => {
  const service = serviceSuite("nginx", { memoryMiB: 256, readyPort: 80 });

  service.it("the image has the official image's config", async () => {
    const config = service.image().config;
    assert.deepEqual(config.cmd, ["nginx", "-g", "daemon off;"]);
    assert.deepEqual(config.exposedPorts, ["80/tcp"]);
    assert.equal(config.stopSignal, "SIGQUIT");
  });

  service.it("serves its page to curl", async (vm) => {
    await using port = await vm.exposeTcp(0, 80);
    const { stdout } = await run("curl", ["-fsS", `http://127.0.0.1:${port.hostPort}/`]);
    assert.match(stdout, /<title>Welcome to nginx!<\/title>/);
  });

  service.it("serves wrk for 3 seconds without errors", async (vm) => {
    await using port = await vm.exposeTcp(0, 80);
    await assertWrkClean(port.hostPort);
  });
});
