/**
 * Apache httpd (Debian's apache2) as a server image: pushed to a registry on loopback, baked with
 * its workload (`httpd-foreground`: apache2 -DFOREGROUND) running, and reached from the host
 * through `vm.exposeTcp` by real clients (curl, wrk) in clones restored from the snapshot.
 */
import assert from "node:assert/strict";
import { describe } from "node:test";
import { assertWrkClean, run, serviceSuite } from "../helpers/services.ts";

describe("Apache httpd as a service", { timeout: 600_000 }, () => {
  const service = serviceSuite("httpd", { memoryMiB: 256, readyPort: 80 });

  service.it("the image has the official image's config", async () => {
    const config = service.image().config;
    assert.deepEqual(config.cmd, ["httpd-foreground"]);
    assert.deepEqual(config.exposedPorts, ["80/tcp"]);
    assert.equal(config.stopSignal, "SIGWINCH");
    assert.equal(config.workingDir, "/etc/apache2");
  });

  service.it("serves its page to curl", async (vm) => {
    await using port = await vm.exposeTcp(0, 80);
    const { stdout } = await run("curl", ["-fsS", `http://127.0.0.1:${port.hostPort}/`]);
    assert.match(stdout, /<title>Apache2 Debian Default Page: It works<\/title>/);
  });

  service.it("serves wrk for 3 seconds without errors", async (vm) => {
    await using port = await vm.exposeTcp(0, 80);
    await assertWrkClean(port.hostPort);
  });
});
