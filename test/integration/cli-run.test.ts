/** `supermachine run` end to end: the real launcher, a real VM, real pipes. */
import assert from "node:assert/strict";
import { runCli } from "../helpers/cli.ts";
import { busyboxRootfs, vmTest } from "../helpers/vm.ts";

vmTest("run prints the command's output and exits with its code", async () => {
  const rootfs = await busyboxRootfs();
  const result = await runCli(["run", "--rootfs", rootfs, "--", "sh", "-c", "echo hi; exit 3"]);
  assert.equal(result.stdout, "hi\n", result.stderr);
  assert.equal(result.code, 3);
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

vmTest("run exits 128+N when the command dies of signal N, 125 on its own errors", async () => {
  const rootfs = await busyboxRootfs();
  const killed = await runCli(["run", "--rootfs", rootfs, "--", "sh", "-c", "kill -9 $$"]);
  assert.equal(killed.code, 137);
  const missing = await runCli(["run", "--rootfs", rootfs, "--", "/no/such/program"]);
  assert.equal(missing.code, 125);
  assert.match(missing.stderr, /supermachine: .*no\/such\/program/);
  const usage = await runCli(["run"]);
  assert.equal(usage.code, 125);
  assert.match(usage.stderr, /an IMAGE or --rootfs PATH/);
});
