/**
 * PostgreSQL (Debian's postgresql-15) as a server image shaped like the official one: user
 * postgres, an initialised PGDATA, `postgres` as the command, SIGINT to stop. Baked with the
 * server running and ready, reached from the host through `vm.exposeTcp` by Debian's psql and
 * pgbench (password authentication over TCP) in clones restored from the snapshot.
 */
import assert from "node:assert/strict";
import { describe } from "node:test";
import { processUsers, run, serviceSuite } from "../helpers/services.ts";

describe("postgres as a service", { timeout: 600_000 }, () => {
  const service = serviceSuite("postgres", {
    memoryMiB: 512,
    readyPort: 5432,
    // listening comes before accepting: wait until the server takes connections
    warmup: async (vm) => {
      await vm.exec(["/bin/sh", "-c", "until pg_isready -q -h 127.0.0.1; do sleep 0.05; done"], {
        timeoutMs: 120_000,
      });
    },
  });
  const connection = (hostPort: number) => {
    const { user, password, database } = service.images().postgres;
    return {
      PGHOST: "127.0.0.1",
      PGPORT: String(hostPort),
      PGUSER: user,
      PGPASSWORD: password,
      PGDATABASE: database,
    };
  };

  service.it("the image has the official image's config", async () => {
    const config = service.image().config;
    assert.deepEqual(config.cmd, ["postgres"]);
    assert.equal(config.user, "postgres");
    assert.ok(config.env.includes("PGDATA=/var/lib/postgresql/data"), config.env.join(" "));
    assert.deepEqual(config.exposedPorts, ["5432/tcp"]);
    assert.equal(config.stopSignal, "SIGINT");
  });

  service.it("accepts psql with a password, as the postgres user's server", async (vm) => {
    const users = await processUsers(vm, "postgres"); // the postmaster and its helpers
    assert.ok(users.length > 1, users.join(" "));
    assert.deepEqual(new Set(users), new Set(["postgres"]));
    await using port = await vm.exposeTcp(0, 5432);
    const { stdout } = await run("psql", ["-Atc", "select current_user, current_setting('data_directory')"], {
      env: connection(port.hostPort),
    });
    assert.equal(stdout, "postgres|/var/lib/postgresql/data\n");
    await assert.rejects(
      run("psql", ["-Atc", "select 1"], { env: { ...connection(port.hostPort), PGPASSWORD: "wrong" } }),
      /password authentication failed/,
    );
  });

  service.it("runs pgbench -i and a 5 s pgbench with no failed transactions", async (vm) => {
    await using port = await vm.exposeTcp(0, 5432);
    const env = connection(port.hostPort);
    await run("pgbench", ["-i", "-q"], { env, timeoutMs: 300_000 });
    const { stdout } = await run("pgbench", ["-c", "4", "-T", "5"], { env, timeoutMs: 300_000 });
    const processed = /number of transactions actually processed: (\d+)/.exec(stdout);
    assert.ok(processed && Number(processed[1]) > 0, stdout);
    assert.match(stdout, /number of failed transactions: 0 \(0\.000%\)/, stdout);
  });
});
