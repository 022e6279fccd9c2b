/** `supermachine run` end to end: the real launcher, a real VM, real pipes. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { described, runCli } from "../helpers/cli.ts";
import { fixtureImages } from "../helpers/fixtures.ts";
import { scratchDir } from "../helpers/scratch.ts";
import { busyboxRootfs, vmTest } from "../helpers/vm.ts";

// Every CLI process of this file keeps its VMs, images and caches in dirs of its own.
process.env.SUPERMACHINE_DATA_DIR = await scratchDir("sm-cli-data-");
process.env.SUPERMACHINE_RUNTIME_DIR = await scratchDir("sm-cli-run-");

vmTest("run prints the command's output and exits with its code", async () => {
  const rootfs = await busyboxRootfs();
  const result = await runCli(["run", "--rootfs", rootfs, "--", "sh", "-c", "echo hi; exit 3"]);
  assert.equal(result.stdout, "hi\n", result.stderr);
  assert.equal(result.code, 3);
});

vmTest("run --hostname names the guest; --network outbound gives it a route out", async () => {
  const rootfs = await busyboxRootfs();
  const script = "hostname; ip route | grep -c '^default via 10.0.2.2'";
  const result = await runCli([
    "run",
    "--rootfs",
    rootfs,
    "--hostname",
    "web-1",
    "--network",
    "outbound",
    "--",
    "sh",
    "-c",
    script,
  ]);
  assert.equal(result.stdout, "web-1\n1\n", result.stderr);
  const sealed = await runCli(["run", "--rootfs", rootfs, "--", "sh", "-c", "ip route | grep -c default"]);
  assert.equal(sealed.stdout, "0\n", `no route without --network: ${sealed.stderr}`);
  const bad = await runCli(["run", "--rootfs", rootfs, "--network", "bridge", "--", "true"]);
  assert.equal(bad.code, 125);
  assert.match(bad.stderr, /--network must be none, outbound or allow:/);
});

vmTest("run forwards piped stdin", async () => {
  const rootfs = await busyboxRootfs();
  const result = await runCli(["run", "--rootfs", rootfs, "--", "wc", "-c"], { input: "x".repeat(100_000) });
  assert.equal(result.stdout.trim(), "100000", result.stderr);
  assert.equal(result.code, 0);
});

vmTest("run passes -e, -w and -u and separates stderr", async () => {
  const rootfs = await busyboxRootfs();
  const result = await runCli([
    "run",
    "--rootfs",
    rootfs,
    "-e",
    "A=1",
    "-w",
    "/tmp",
    "-u",
    "app",
    "--",
    "sh",
    "-c",
    'echo "$A $(pwd) $(id -un)"; echo err >&2',
  ]);
  assert.equal(result.stdout, "1 /tmp app\n", `exit ${result.code}, stderr: ${result.stderr}`);
  assert.equal(result.stderr, "err\n");
  assert.equal(result.code, 0);
});

vmTest(
  "run exits 128+N when the command dies of signal N, 127/126 when it is not found / cannot run",
  async () => {
    const rootfs = await busyboxRootfs();
    const killed = await runCli(["run", "--rootfs", rootfs, "--", "sh", "-c", "kill -9 $$"]);
    assert.equal(killed.code, 137, described(killed));
    const missing = await runCli(["run", "--rootfs", rootfs, "--", "/no/such/program"]);
    assert.equal(missing.code, 127, described(missing));
    assert.match(missing.stderr, /^supermachine: .*no\/such\/program.*\n$/);
    const notExecutable = await runCli(["run", "--rootfs", rootfs, "--", "/etc/passwd"]);
    assert.equal(notExecutable.code, 126, described(notExecutable));
  },
);

vmTest("run IMAGE: '--' after the IMAGE is consumed, the exit code is the command's", async () => {
  const fx = await fixtureImages();
  const env = { ...process.env, SUPERMACHINE_DATA_DIR: await scratchDir("sm-data-") };
  const image = `oci:${fx.busybox}`;
  const echoed = await runCli(["run", "--rm", "-q", image, "--", "echo", "--", "ok"], { env });
  assert.equal(echoed.stdout, "-- ok\n", described(echoed));
  assert.equal(echoed.code, 0);
  const failed = await runCli(["run", "--rm", "-q", image, "--", "false"], { env });
  assert.equal(failed.code, 1, described(failed));
});

test("supermachine's own errors exit 125 with one line", async () => {
  const env = { ...process.env, SUPERMACHINE_DATA_DIR: await scratchDir("sm-data-") };
  for (const args of [
    ["run"],
    ["run", "Not//A:Reference"],
    ["run", "--pull", "sometimes", "alpine"],
    ["exec", "nobody", "true"],
  ]) {
    const result = await runCli(args, { env });
    assert.equal(result.code, 125, `${args.join(" ")}: ${described(result)}`);
    assert.match(result.stderr, /^supermachine: [^\n]+\n$/, `${args.join(" ")}: one line`);
    assert.equal(result.stdout, "");
  }
});
