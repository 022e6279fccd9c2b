/** The snapshot commands of the CLI end to end: bake, list, restore-run, remove. */
import assert from "node:assert/strict";
import { runCli as run } from "../helpers/cli.ts";
import { fixtureImages } from "../helpers/fixtures.ts";
import { scratchDir } from "../helpers/scratch.ts";
import { vmTest } from "../helpers/vm.ts";

const runCli = (env: NodeJS.ProcessEnv, args: string[]) => run(args, { env });

vmTest(
  "pull --name bakes a snapshot that run NAME restores, snapshots lists and snapshot rm removes",
  async () => {
    const fx = await fixtureImages();
    const env = { ...process.env, SUPERMACHINE_DATA_DIR: await scratchDir("sm-data-") };

    const baked = await runCli(env, [
      "pull",
      "--name",
      "bb",
      "--memory",
      "128",
      "--json",
      `oci:${fx.busybox}`,
    ]);
    assert.equal(baked.code, 0, baked.stderr);
    assert.equal((JSON.parse(baked.stdout) as { snapshot: string }).snapshot, "bb");

    const listed = await runCli(env, ["snapshots", "--json"]);
    const snapshots = JSON.parse(listed.stdout) as Array<{ name: string; manifest: { memoryMiB: number } }>;
    assert.deepEqual(
      snapshots.map((s) => [s.name, s.manifest.memoryMiB]),
      [["bb", 128]],
    );

    const first = await runCli(env, [
      "run",
      "bb",
      "sh",
      "-c",
      "head -c 16 /dev/urandom | od -An -tx1; exit 5",
    ]);
    const second = await runCli(env, [
      "run",
      "bb",
      "sh",
      "-c",
      "head -c 16 /dev/urandom | od -An -tx1; date +%s",
    ]);
    assert.equal(first.code, 5, first.stderr);
    assert.equal(second.code, 0, second.stderr);
    const [random2, time2] = second.stdout.trim().split("\n");
    assert.notEqual(first.stdout.trim(), random2!.trim(), "two restores never share random bytes");
    assert.ok(Math.abs(Number(time2) - Date.now() / 1000) < 30, `guest time ${time2} follows the host's`);

    const refused = await runCli(env, ["run", "--memory", "512", "bb", "true"]);
    assert.equal(refused.code, 125);
    assert.match(refused.stderr, /fixed when it was baked/);

    assert.equal((await runCli(env, ["snapshot", "rm", "bb"])).code, 0);
    assert.equal((await runCli(env, ["snapshot", "ls", "--json"])).stdout.trim(), "[]");
    const gone = await runCli(env, ["snapshot", "rm", "bb"]);
    assert.equal(gone.code, 125);
  },
  { timeout: 300_000 },
);
