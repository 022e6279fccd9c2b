/** Detached VMs end to end: run -d → ps → exec → logs → stop → rm, with no process left behind. */
import assert from "node:assert/strict";
import { readdir, readFile } from "node:fs/promises";
import { described, runCli } from "../helpers/cli.ts";
import { scratchDir } from "../helpers/scratch.ts";
import { busyboxRootfs, vmTest } from "../helpers/vm.ts";

interface PsEntry {
  name: string;
  vmId: string;
  status: string;
  exitCode?: number | null;
  supervisorPid: number;
  command: string[];
}

/** Pids of the processes whose command line mentions `text`. */
async function processesMentioning(text: string): Promise<number[]> {
  const pids: number[] = [];
  for (const entry of await readdir("/proc")) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    const cmdline = await readFile(`/proc/${entry}/cmdline`, "utf8").catch(() => "");
    if (cmdline.includes(text)) pids.push(Number(entry));
  }
  return pids;
}

vmTest(
  "run -d starts a VM that ps lists, exec reaches, logs reads, stop ends and rm removes",
  async () => {
    const rootfs = await busyboxRootfs();
    const dir = await scratchDir("sm-detached-");
    const env = {
      ...process.env,
      SUPERMACHINE_RUNTIME_DIR: `${dir}/run`,
      SUPERMACHINE_DATA_DIR: `${dir}/data`,
    };
    const cli = (...args: string[]) => runCli(args, { env });
    const ps = async (...args: string[]) =>
      JSON.parse((await cli("ps", "--json", ...args)).stdout) as PsEntry[];

    const started = await cli(
      ...["run", "-d", "--name", "svc", "-e", "GREETING=hello", "--rootfs", rootfs, "--"],
      ...["sh", "-c", 'echo "$GREETING from the workload"; echo to stderr >&2; exec sleep 1000'],
    );
    assert.equal(started.code, 0, described(started));
    assert.equal(started.stdout, "svc\n");

    const [entry, ...others] = await ps();
    assert.equal(others.length, 0);
    assert.equal(entry!.name, "svc");
    assert.equal(entry!.status, "running");
    assert.equal((await processesMentioning(entry!.vmId)).length, 1, "one QEMU runs the VM");

    const exec = await cli("exec", "svc", "sh", "-c", "echo $((6 * 7)); exit 3");
    assert.equal(exec.stdout, "42\n", described(exec));
    assert.equal(exec.code, 3);
    const piped = await runCli(["exec", "-i", "svc", "wc", "-c"], { env, input: "x".repeat(300_000) });
    assert.equal(piped.stdout.trim(), "300000", described(piped));
    const notFound = await cli("exec", "svc", "/no/such/program");
    assert.equal(notFound.code, 127, described(notFound));

    // The workload may not have written everything yet: what there is is a prefix.
    const logs = await cli("logs", "svc");
    assert.equal(logs.code, 0, described(logs));
    assert.ok("hello from the workload\nto stderr\n".startsWith(logs.stdout), `logs so far: ${logs.stdout}`);

    const taken = await cli("run", "-d", "--name", "svc", "--rootfs", rootfs, "--", "true");
    assert.equal(taken.code, 125);
    assert.match(taken.stderr, /name svc is in use/);
    const running = await cli("rm", "svc");
    assert.equal(running.code, 125);
    assert.match(running.stderr, /is running/);

    const stopped = await cli("stop", "svc");
    assert.equal(stopped.code, 0, described(stopped));
    assert.deepEqual(await ps(), [], "ps lists running VMs only");
    const [exited] = await ps("-a");
    assert.equal(exited!.status, "exited");
    assert.deepEqual(await processesMentioning(entry!.vmId), [], "QEMU is gone");
    assert.deepEqual(
      await processesMentioning(`__supervise`).then((pids) => pids.filter((p) => p === entry!.supervisorPid)),
      [],
    );
    const afterStop = await cli("logs", "svc");
    assert.equal(afterStop.stdout, "hello from the workload\nto stderr\n", "logs outlive the VM");

    assert.equal((await cli("rm", "svc")).code, 0);
    assert.deepEqual(await ps("-a"), []);
    assert.deepEqual(await readdir(`${dir}/run/detached`), []);
  },
  { timeout: 240_000 },
);

vmTest(
  "a detached VM ends when its command exits, keeping the exit code; rm -f stops a running one",
  async () => {
    const rootfs = await busyboxRootfs();
    const dir = await scratchDir("sm-detached-");
    const env = {
      ...process.env,
      SUPERMACHINE_RUNTIME_DIR: `${dir}/run`,
      SUPERMACHINE_DATA_DIR: `${dir}/data`,
    };
    const cli = (...args: string[]) => runCli(args, { env });

    const once = await cli(
      "run",
      "-d",
      "--name",
      "once",
      "--rootfs",
      rootfs,
      "--",
      "sh",
      "-c",
      "echo done; exit 5",
    );
    assert.equal(once.code, 0, described(once));
    // logs -f returns when the command has ended (and its supervisor with it).
    const followed = await cli("logs", "-f", "once");
    assert.equal(followed.stdout, "done\n", described(followed));

    const forever = await cli("run", "-d", "--rootfs", rootfs, "--", "sleep", "1000");
    const name = forever.stdout.trim();
    assert.match(name, /^vm-[0-9a-f]{6}$/);
    const all = JSON.parse((await cli("ps", "-a", "--json")).stdout) as PsEntry[];
    const vmId = all.find((e) => e.name === name)!.vmId;
    const ended = all.find((e) => e.name === "once")!;
    assert.equal(ended.status, "exited");
    assert.equal(ended.exitCode, 5);
    const removed = await cli("rm", "-f", name, "once");
    assert.equal(removed.code, 0, described(removed));
    assert.equal(removed.stdout, `${name}\nonce\n`);
    assert.deepEqual(await processesMentioning(vmId), []);
    assert.deepEqual(JSON.parse((await cli("ps", "-a", "--json")).stdout), []);
  },
  { timeout: 240_000 },
);
