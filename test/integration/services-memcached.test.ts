/**
 * memcached (Debian's package) as a server image running as the memcache user, baked with its
 * workload running and reached from the host through `vm.exposeTcp` by Debian's libmemcached
 * clients (memccp, memccat, memcstat) in clones restored from the snapshot.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { describe } from "node:test";
import { scratchDir } from "../helpers/scratch.ts";
import { processUsers, run, serviceSuite } from "../helpers/services.ts";

describe("memcached as a service", { timeout: 600_000 }, () => {
  const service = serviceSuite("memcached", { memoryMiB: 256, readyPort: 11211 });

  service.it("the image has the official image's config", async () => {
    const config = service.image().config;
    assert.deepEqual(config.cmd, ["memcached"]);
    assert.equal(config.user, "memcache");
    assert.deepEqual(config.exposedPorts, ["11211/tcp"]);
  });

  service.it("stores and returns a value (memccp, memccat)", async (vm) => {
    await using port = await vm.exposeTcp(0, 11211);
    const servers = `--servers=127.0.0.1:${port.hostPort}`;
    const dir = await scratchDir("sm-memcached-");
    const value = randomBytes(3000).toString("base64");
    await writeFile(join(dir, "greeting"), value);
    await run("memccp", [servers, join(dir, "greeting")]);
    const { stdout } = await run("memccat", [servers, "greeting"]);
    assert.equal(stdout, `${value}\n`); // memccat ends what it prints with a newline
    const stats = await run("memcstat", [servers]);
    assert.match(stats.stdout, /^\s*cmd_set: 1$/m);
    assert.match(stats.stdout, /^\s*get_hits: 1$/m);
  });

  service.it("a clone starts from the baked state, not from another clone's", async (vm) => {
    await using port = await vm.exposeTcp(0, 11211);
    const stats = await run("memcstat", [`--servers=127.0.0.1:${port.hostPort}`]);
    assert.match(stats.stdout, /^\s*curr_items: 0$/m);
    assert.deepEqual(await processUsers(vm, "memcached"), ["memcache"]);
  });
});
