/**
 * The package as npm users get it: both tarballs packed (the main one builds dist/ in prepack,
 * the guest one is filled from the built assets), installed into an empty project with npm's
 * --offline (nothing but the two tarballs), then used there — the library imported and a VM
 * booted, and `npx supermachine run` — with an empty asset cache, so that the guest comes from
 * the prebuilt package, and no src/ or TypeScript anywhere in the project.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { access, readdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { scratchDir } from "../helpers/scratch.ts";
import { busyboxRootfs, vmTest } from "../helpers/vm.ts";

const run = promisify(execFile);
const root = new URL("../../", import.meta.url).pathname;

vmTest(
  "npm install of the packed tarballs runs the library and npx supermachine without building anything",
  async () => {
    const rootfs = await busyboxRootfs();
    const work = await scratchDir("sm-package-");
    const packs = join(work, "packs");
    const app = join(work, "app");
    // Packing uses the machine's asset cache (the guest package is filled from it: nothing is
    // built when the assets are cached); the installed project gets an empty one.
    const env = {
      ...process.env,
      SUPERMACHINE_CACHE_DIR: join(work, "cache"),
      SUPERMACHINE_DATA_DIR: join(work, "data"),
      npm_config_cache: join(work, "npm-cache"),
      npm_config_update_notifier: "false",
    };
    const guest = await run("bash", [join(root, "scripts/build-guest-package.sh"), "--pack", packs], {
      maxBuffer: 16 * 1024 * 1024,
    });
    const guestTarball = guest.stdout.trim().split("\n").at(-1)!;
    const main = await run("npm", ["pack", "--silent", "--pack-destination", packs], {
      cwd: root,
      maxBuffer: 16 * 1024 * 1024,
    });
    const mainTarball = join(packs, main.stdout.trim().split("\n").at(-1)!);

    await run("mkdir", ["-p", app]);
    await writeFile(
      join(app, "package.json"),
      JSON.stringify({ name: "app", private: true, type: "module" }),
    );
    await run("npm", ["install", "--offline", "--no-audit", "--no-fund", mainTarball, guestTarball], {
      cwd: app,
      env,
    });
    const installed = join(app, "node_modules", "supermachine");
    await assert.rejects(access(join(installed, "src")), "no sources in the package");
    await assert.rejects(access(join(installed, "guest", "build")), "no guest build artefacts");
    assert.ok(!(await readdir(join(app, "node_modules"))).includes("typescript"));

    await writeFile(
      join(app, "boot.js"),
      [
        'import { Vm } from "supermachine";',
        "const vm = await Vm.start({ rootfs: process.argv[2], memoryMiB: 256 });",
        'try { process.stdout.write((await vm.exec(["echo", "ok"])).stdoutText); } finally { await vm.stop(); }',
      ].join("\n"),
    );
    const library = await run(process.execPath, ["boot.js", rootfs], { cwd: app, env });
    assert.equal(library.stdout, "ok\n");

    const cli = await run("npx", ["supermachine", "run", "--rootfs", rootfs, "--", "echo", "ok"], {
      cwd: app,
      env,
    });
    assert.equal(cli.stdout, "ok\n");
    const doctor = JSON.parse(
      (await run("npx", ["supermachine", "doctor", "--json"], { cwd: app, env })).stdout,
    );
    assert.equal(doctor.assets.assets.kernel.source, "package", "the kernel came from the prebuilt package");
    assert.equal(doctor.assets.assets.initramfs.source, "package");
    assert.equal(doctor.assets.assets.netRelay.source, "package", "the network relay came from it too");
  },
  { timeout: 400_000 },
);
