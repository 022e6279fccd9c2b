/**
 * Services from the command line, end to end: a busybox httpd baked as a snapshot (`pull --name`)
 * and restored by `run NAME`, its port published with -p, stopped by Ctrl-C, SIGTERM or `stop`
 * with the image's StopSignal (SIGQUIT, test/helpers/cli-service.ts); host directories mounted
 * with -v and --mount.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { chown, mkdir, readFile, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { described, runCli, startCli } from "../helpers/cli.ts";
import { SERVICE_PAGE, SERVICE_PORT, serviceImageLayout } from "../helpers/cli-service.ts";
import { scratchDir } from "../helpers/scratch.ts";
import { busyboxRootfs, vmTest } from "../helpers/vm.ts";

const curl = promisify(execFile);

let baking: Promise<NodeJS.ProcessEnv> | undefined;

/** The environment of a data dir holding the snapshot `web` of the service image (baked once). */
function bakedEnv(): Promise<NodeJS.ProcessEnv> {
  baking ??= (async () => {
    const dir = await scratchDir("sm-cli-service-");
    const env = {
      ...process.env,
      SUPERMACHINE_DATA_DIR: `${dir}/data`,
      SUPERMACHINE_RUNTIME_DIR: `${dir}/run`,
    };
    const layout = await serviceImageLayout();
    const baked = await runCli(["pull", "-q", "--name", "web", "--memory", "128", `oci:${layout}`], { env });
    assert.equal(baked.code, 0, described(baked));
    return env;
  })();
  return baking;
}

/** `curl` fetching `count` URLs (`parallel` at once, else one after the other); asserts every answer. */
async function fetchAll(url: string, count: number, parallel = false): Promise<void> {
  const args = ["-sS", "--fail", ...(parallel ? ["--parallel", "--parallel-max", String(count)] : [])];
  const { stdout } = await curl("curl", [...args, ...Array.from({ length: count }, () => url)], {
    maxBuffer: 16 * 1024 * 1024,
  });
  assert.equal(stdout, SERVICE_PAGE.repeat(count));
}

const PORT_LINE = new RegExp(`^${SERVICE_PORT}/tcp -> 127\\.0\\.0\\.1:(\\d+)$`, "m");

vmTest(
  "run -p 0:8080 of a baked httpd serves 1,000 sequential and 100 parallel requests; Ctrl-C stops it with its StopSignal",
  async () => {
    const env = await bakedEnv();
    const service = startCli(["run", "-p", `0:${SERVICE_PORT}`, "web"], { env });
    const [, port] = await service.waitFor("stderr", PORT_LINE);
    await service.waitFor("stdout", /^listening on 8080$/m);
    const url = `http://127.0.0.1:${port}/`;
    await fetchAll(url, 1000);
    await fetchAll(url, 100, true);

    service.child.kill("SIGINT");
    const result = await service.exit;
    assert.equal(result.code, 7, `the workload's exit code, after SIGQUIT: ${described(result)}`);
    assert.equal(result.stdout, "listening on 8080\nstopping on QUIT\n");
    assert.equal(result.stderr, `${SERVICE_PORT}/tcp -> 127.0.0.1:${port}\na line on stderr\n`);
  },
  { timeout: 600_000 },
);

vmTest(
  "SIGTERM to a foreground run NAME reaches its workload as the StopSignal",
  async () => {
    const env = await bakedEnv();
    const service = startCli(["run", "web"], { env });
    await service.waitFor("stdout", /^listening on 8080$/m);
    service.child.kill("SIGTERM");
    const result = await service.exit;
    assert.equal(result.code, 7, described(result));
    assert.match(result.stdout, /stopping on QUIT\n$/);
  },
  { timeout: 600_000 },
);

vmTest(
  "run -d -p publishes a port held by the supervisor: ps and port show it; stop forwards the StopSignal; logs outlive the VM",
  async () => {
    const env = await bakedEnv();
    const cli = (...args: string[]) => runCli(args, { env });
    const started = await cli("run", "-d", "--name", "svc", "-p", `127.0.0.1:0:${SERVICE_PORT}`, "web");
    assert.equal(started.code, 0, described(started));
    assert.equal(started.stdout, "svc\n");
    const [line, port] = started.stderr.match(PORT_LINE) ?? assert.fail(described(started));

    const listed = await cli("port", "svc");
    assert.equal(listed.stdout, `${line}\n`, described(listed));
    assert.equal((await cli("port", "svc", `${SERVICE_PORT}/tcp`)).stdout, `127.0.0.1:${port}\n`);
    const [entry] = JSON.parse((await cli("ps", "--json")).stdout) as Array<{ ports: unknown }>;
    assert.deepEqual(entry!.ports, [{ host: "127.0.0.1", hostPort: Number(port), guestPort: SERVICE_PORT }]);
    assert.match((await cli("ps")).stdout, new RegExp(`127\\.0\\.0\\.1:${port}->${SERVICE_PORT}/tcp`));

    const follow = startCli(["logs", "-f", "svc"], { env });
    await follow.waitFor("stdout", /^listening on 8080$/m);
    await fetchAll(`http://127.0.0.1:${port}/`, 10);

    const stopped = await cli("stop", "svc");
    assert.equal(stopped.code, 0, described(stopped));
    const followed = await follow.exit;
    assert.equal(followed.code, 0, described(followed));
    assert.match(followed.stdout, /stopping on QUIT\n$/, "logs -f ends with the workload");
    const [exited] = JSON.parse((await cli("ps", "-a", "--json")).stdout) as Array<{
      exitCode: number;
      error: string;
    }>;
    assert.equal(exited!.exitCode, 7, "the workload exited by its StopSignal trap");
    assert.equal(exited!.error, "stopped");
    // stdout and stderr are read from two pipes: lines written close together may swap.
    const logs = await cli("logs", "svc");
    assert.deepEqual(
      logs.stdout.split("\n").sort(),
      ["", "a line on stderr", "listening on 8080", "stopping on QUIT"],
      described(logs),
    );
    assert.match(logs.stdout, /stopping on QUIT\n$/);
    assert.equal((await cli("rm", "svc")).code, 0);
  },
  { timeout: 600_000 },
);

vmTest(
  "-v and --mount give live mounts both ways, :ro refuses writes, a root-owned dir needs uid and gid",
  async () => {
    const env = await bakedEnv();
    const root = process.geteuid?.() === 0;
    const owner = root ? { uid: 1000, gid: 1000 } : { uid: process.geteuid!(), gid: process.getegid!() };
    const parent = await scratchDir("sm-cli-mounts-");
    const owned = join(parent, "owned");
    const plain = join(parent, "plain");
    await mkdir(owned);
    await mkdir(plain);
    if (root) await chown(owned, owner.uid, owner.gid);

    if (root) {
      const refused = await runCli(["run", "-v", `${plain}:/data`, "web", "true"], { env });
      assert.equal(refused.code, 125, described(refused));
      assert.match(refused.stderr, /^supermachine: -v .* belongs to root; .*uid=N,gid=N[^\n]*\n$/);
    }

    const script = [
      "echo waiting",
      "until [ -e /v/from-host ] && [ -e /m/from-host ]; do sleep 0.1; done",
      "cat /v/from-host /m/from-host",
      "echo guest-v > /v/from-guest; echo guest-m > /m/from-guest",
      "touch /ro/x",
    ].join("\n");
    const run = startCli(
      [
        "run",
        ...["-v", "./owned:/v", "-v", `${owned}:/ro:ro`],
        ...["--mount", `type=bind,src=${plain},dst=/m,uid=${owner.uid},gid=${owner.gid},symlinks=deny`],
        ...["web", "sh", "-c", script],
      ],
      { env, cwd: parent },
    );
    await run.waitFor("stdout", /^waiting$/m);
    await writeFile(join(owned, "from-host"), "host-v\n");
    await writeFile(join(plain, "from-host"), "host-m\n");
    const result = await run.exit;
    assert.equal(result.code, 1, `touch on the read-only mount fails: ${described(result)}`);
    assert.equal(result.stdout, "waiting\nhost-v\nhost-m\n");
    assert.match(result.stderr, /touch: \/ro\/x: Read-only file system/);
    assert.equal(await readFile(join(owned, "from-guest"), "utf8"), "guest-v\n");
    assert.equal(await readFile(join(plain, "from-guest"), "utf8"), "guest-m\n");
    for (const file of [join(owned, "from-guest"), join(plain, "from-guest")]) {
      const info = await stat(file);
      assert.deepEqual({ uid: info.uid, gid: info.gid }, owner, `${file} belongs to the mount's owner`);
    }
    await assert.rejects(stat(join(owned, "x")), { code: "ENOENT" });
  },
  { timeout: 600_000 },
);

vmTest(
  "run --rootfs -p publishes a booted VM's port; SIGTERM reaches the command (no image: SIGTERM)",
  async () => {
    const dir = await scratchDir("sm-cli-boot-");
    const env = { ...process.env, SUPERMACHINE_DATA_DIR: `${dir}/data` };
    const script = [
      'trap "echo stopping; exit 3" TERM',
      `mkdir /tmp/www && printf '${SERVICE_PAGE.trim()}\\n' > /tmp/www/index.html`,
      `httpd -p ${SERVICE_PORT} -h /tmp/www`,
      "echo listening",
      "while :; do sleep 1; done",
    ].join("\n");
    const run = startCli(
      [
        "run",
        "-m",
        "128",
        "-p",
        String(SERVICE_PORT),
        "--rootfs",
        await busyboxRootfs(),
        "--",
        "sh",
        "-c",
        script,
      ],
      { env },
    );
    const [, port] = await run.waitFor("stderr", PORT_LINE);
    await run.waitFor("stdout", /^listening$/m);
    await fetchAll(`http://127.0.0.1:${port}/`, 10);
    run.child.kill("SIGTERM");
    const result = await run.exit;
    assert.equal(result.code, 3, described(result));
    assert.equal(result.stdout, "listening\nstopping\n");
  },
  { timeout: 600_000 },
);
