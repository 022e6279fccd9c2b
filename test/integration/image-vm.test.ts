/**
 * OCI images end to end: pulled (from a local layout and from a real registry on loopback),
 * flattened, booted; the guest sees exactly what the layers say, and the image config applies.
 */
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { Image } from "../../src/index.ts";
import { runCli } from "../helpers/cli.ts";
import { type FixtureImages, fixtureImages } from "../helpers/fixtures.ts";
import { startRegistry } from "../helpers/registry.ts";
import { scratchDir } from "../helpers/scratch.ts";
import { sharedVm, vmSkipReason } from "../helpers/vm.ts";

describe("the Debian fixture image in a VM", { timeout: 900_000 }, () => {
  let fx: FixtureImages;
  let image: Image;
  const shared = sharedVm(async () => {
    process.env.SUPERMACHINE_DATA_DIR = await scratchDir("sm-data-");
    fx = await fixtureImages();
    image = await Image.pull(`oci:${fx.debian}`);
    return image.start({ memoryMiB: 512 });
  });
  const vmIt = shared.it;

  /** Runs a shell snippet as root in /, whatever the image's defaults. */
  const sh = async (script: string) =>
    (await shared.current().execBuilder().argv(["/bin/sh", "-c", script]).user("root").cwd("/").output())
      .stdoutText;

  vmIt("whited-out paths are absent", async () => {
    for (const w of fx.expect.whiteouts) {
      assert.equal(
        await sh(`test -e '${w.path}' || test -L '${w.path}' && echo present || echo absent`),
        "absent\n",
        w.path,
      );
    }
  });

  vmIt("opaque directories hold only the top layer's files", async () => {
    for (const dir of fx.expect.opaqueDirs) {
      const listing = await sh(`cd '${dir.path}' && find . -mindepth 1 | sed 's|^\\./||' | LC_ALL=C sort`);
      assert.deepEqual(listing.split("\n").filter(Boolean), [...dir.contents].sort(), dir.path);
    }
  });

  vmIt("hardlinked files share an inode", async () => {
    for (const group of fx.expect.hardlinkGroups) {
      const inodes = await sh(group.map((p) => `stat -c %i '${p}'`).join("; "));
      assert.equal(new Set(inodes.trim().split("\n")).size, 1, group.join(" = "));
    }
  });

  vmIt("modes, owners and special files survive", async () => {
    assert.equal(await sh("stat -c '%a %U' /usr/bin/passwd"), "4755 root\n");
    assert.equal(await sh("stat -c '%a %U %G' /etc/shadow"), "640 root shadow\n");
    assert.equal(await sh("test -c /dev/null && echo char"), "char\n");
    for (const file of fx.expect.setuidFiles) {
      assert.match(await sh(`stat -c %a '${file}'`), /^[4-7][0-7]{3}\n$/, file);
    }
    assert.equal(await sh(`test -p '${fx.expect.fifo}' && echo fifo`), "fifo\n");
    for (const [link, target] of Object.entries(fx.expect.symlinks)) {
      assert.equal(await sh(`readlink '${link}'`), `${target}\n`, link);
    }
  });

  vmIt("the image's User, WorkingDir and Env apply to exec", async (vm) => {
    const { config, user } = fx.expect;
    const out = await vm.execBuilder().argv(["/bin/sh", "-c", 'echo "$(id -un) $(pwd)"; env']).output();
    const [first, ...env] = out.stdoutText.split("\n");
    assert.equal(first, `${user.name} ${config.WorkingDir}`);
    for (const pair of config.Env) assert.ok(env.includes(pair), `${pair} in ${env.join(" ")}`);
  });

  vmIt("runs the image's Entrypoint + Cmd", async (vm) => {
    const out = await vm.execBuilder().argv(image.command()).output();
    assert.equal(out.stdoutText, fx.expect.defaultCommandOutput);
  });
});

describe("images from a registry", { timeout: 900_000 }, () => {
  it("pulls from a registry on loopback and runs the image with docker's rules", async (t) => {
    const skipReason = await vmSkipReason();
    if (skipReason !== undefined) return t.skip(skipReason);
    const fx = await fixtureImages();
    await using registry = await startRegistry({ auth: "basic" });
    await registry.push(fx.busybox, "tools/busybox:1");
    const dataDir = await scratchDir("sm-data-");
    const reference = `${registry.host}/tools/busybox:1`;

    const image = await Image.pull(reference, {
      dataDir,
      credentials: { username: registry.username, password: registry.password },
    });
    assert.equal(image.reference, reference);
    await using vm = await image.start({ memoryMiB: 128 });
    const out = await vm.exec(["sh", "-c", "echo from-registry"]);
    assert.equal(out.stdoutText, "from-registry\n");

    // The CLI: `run IMAGE ARGS` replaces Cmd; `--entrypoint` replaces Entrypoint. The image is in
    // the store now, so no credentials are needed (pull policy "missing").
    const env = { ...process.env, SUPERMACHINE_DATA_DIR: dataDir };
    const run = async (args: string[]) => {
      const { code, stdout } = await runCli(args, { env });
      return { code, stdout };
    };
    const echoed = await run(["run", "--rm", reference, "echo", "replaced", "cmd"]);
    assert.deepEqual(echoed, { code: 0, stdout: "replaced cmd\n" });
    const entry = await run(["run", "--entrypoint", "/bin/echo", reference, "via", "entrypoint"]);
    assert.deepEqual(entry, { code: 0, stdout: "via entrypoint\n" });
    const listed = await run(["images", "--json"]);
    assert.equal(listed.code, 0);
    assert.ok(
      (JSON.parse(listed.stdout) as Array<{ reference: string }>).some((r) => r.reference === reference),
    );
  });
});
