/**
 * Live host-directory mounts in a real VM (QEMU; TCG here): the guest kernel's 9p client, the
 * guest's mount relay on the sm.mounts port, the host's MountChannel and serve9p. One VM serves
 * the file; each case mounts its own host temp dir at its own guest path and leaves none behind.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import {
  chown,
  lstat,
  mkdir,
  mkdtemp,
  readdir,
  readFile,
  readlink,
  rm,
  stat,
  symlink,
  unlink,
  writeFile,
} from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it, type TestContext } from "node:test";
import { type MountSpec, Vm } from "../../src/index.ts";
import type { SymlinkPolicy } from "../../src/ninep/index.ts";
import { busyboxRootfs, vmSkipReason } from "../helpers/vm.ts";

const ROOT = process.geteuid?.() === 0;
/** Owner of what the guest creates: not root (the host runs the tests as root). */
const OWNER = { uid: 4242, gid: 4243 };

let vm: Vm;
let skip: string | undefined;
const temps: string[] = [];

before(async () => {
  skip = await vmSkipReason();
  if (skip !== undefined) return;
  vm = await Vm.start({ rootfs: await busyboxRootfs(), memoryMiB: 256 });
});

after(async () => {
  await vm?.kill();
  await Promise.all(temps.map((d) => rm(d, { recursive: true, force: true })));
});

function vmIt(name: string, fn: (t: TestContext) => Promise<void>) {
  it(name, async (t) => {
    if (skip !== undefined) return t.skip(skip);
    try {
      await fn(t);
    } catch (error) {
      t.diagnostic(`console log: ${vm?.consoleLogPath}`);
      throw error;
    }
  });
}

async function tempDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), "sm-mount-"));
  temps.push(dir);
  return dir;
}

/** A host dir to mount, owned by OWNER (so files the guest makes there are not root's). */
async function hostRoot(base: string): Promise<string> {
  const root = join(base, "root");
  await mkdir(root);
  if (ROOT) await chown(root, OWNER.uid, OWNER.gid);
  return root;
}

/** Mounts through the public API; the handle unmounts it. */
async function mount(m: MountSpec) {
  const mounted = await vm.mount({ ...(ROOT ? { owner: OWNER } : {}), ...m });
  return { ...mounted, unmount: () => vm.unmount(mounted.guestPath) };
}

/** Runs a shell script in the guest as root; resolves with its stdout (stderr folded in). */
async function sh(script: string, ...args: string[]): Promise<string> {
  const out = await vm.exec(["sh", "-c", `exec 2>&1; ${script}`, "sh", ...args], { timeoutMs: 120_000 });
  return out.stdoutText;
}

/** Names, types, modes, owners, link targets and content hashes of everything under `dir`. */
async function snapshot(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const name of (await readdir(dir, { recursive: true })).sort()) {
    const path = join(dir, name);
    const s = await lstat(path);
    const what = s.isSymbolicLink()
      ? `-> ${await readlink(path)}`
      : s.isFile()
        ? createHash("sha256")
            .update(await readFile(path))
            .digest("hex")
        : "";
    out.push(`${name} ${s.mode.toString(8)} ${s.uid}:${s.gid} ${s.nlink} ${what}`);
  }
  return out;
}

describe("mounts in a VM", { timeout: 600_000 }, () => {
  vmIt("host writes are visible in the guest and guest writes on the host, live", async () => {
    const root = await hostRoot(await tempDir());
    const m = await mount({ hostPath: root, guestPath: "/mnt/live" });
    try {
      await writeFile(join(root, "a.txt"), "first\n");
      assert.equal(await sh("cat /mnt/live/a.txt"), "first\n");
      // A rewrite of another length: nothing stale in the guest.
      await writeFile(join(root, "a.txt"), "second, longer\n");
      assert.equal(await sh("cat /mnt/live/a.txt"), "second, longer\n");
      await mkdir(join(root, "made", "on", "host"), { recursive: true });
      await writeFile(join(root, "made", "on", "host", "f"), "deep");
      assert.equal(
        await sh("find /mnt/live/made -type f; cat /mnt/live/made/on/host/f"),
        "/mnt/live/made/on/host/f\ndeep",
      );
      await unlink(join(root, "a.txt"));
      assert.match(await sh("ls /mnt/live/a.txt; true"), /No such file/);
      // Guest → host, including a file larger than a few 9P messages and an mkdir -p.
      const size = 1024 * 1024 + 7;
      const hash = (
        await sh(
          `mkdir -p /mnt/live/g/h/i && head -c ${size} /dev/urandom | tee /mnt/live/g/h/i/blob | sha256sum`,
        )
      ).split(" ")[0];
      const blob = await readFile(join(root, "g", "h", "i", "blob"));
      assert.equal(blob.length, size);
      assert.equal(createHash("sha256").update(blob).digest("hex"), hash);
      // ...and host → guest of a large file.
      const big = randomBytes(2 * 1024 * 1024 + 3);
      await writeFile(join(root, "big"), big);
      assert.equal(
        (await sh("sha256sum /mnt/live/big")).split(" ")[0],
        createHash("sha256").update(big).digest("hex"),
      );
      // What the guest creates belongs to the mount's owner on the host, with the mode it asked for.
      await sh("umask 022; echo x > /mnt/live/owned; mkdir /mnt/live/owned-dir; chmod 640 /mnt/live/owned");
      const owned = await stat(join(root, "owned"));
      assert.equal(owned.mode & 0o7777, 0o640);
      assert.equal((await stat(join(root, "owned-dir"))).mode & 0o7777, 0o755);
      if (ROOT) assert.deepEqual([owned.uid, owned.gid], [OWNER.uid, OWNER.gid]);
      // The guest sees host ids as they are.
      assert.equal(
        await sh("stat -c %u:%g /mnt/live/owned"),
        ROOT ? `${OWNER.uid}:${OWNER.gid}\n` : `${process.getuid?.()}:${process.getgid?.()}\n`,
      );
    } finally {
      await m.unmount();
    }
  });

  for (const policy of ["deny", "opaque"] as const satisfies SymlinkPolicy[]) {
    vmIt(`escape suite (${policy}): a root guest reads and writes nothing outside the root`, async () => {
      const base = await tempDir();
      const root = await hostRoot(base);
      const outside = join(base, "outside");
      await mkdir(outside);
      const secret = `SECRET-${randomBytes(12).toString("hex")}`;
      await writeFile(join(outside, "secret"), secret);
      await writeFile(join(root, "hello"), "hello\n");
      await mkdir(join(root, "sub"));
      await symlink(join(outside, "secret"), join(root, "abs"));
      await symlink("../outside/secret", join(root, "rel-out"));
      await symlink(outside, join(root, "outdir"));
      await symlink("..", join(root, "dotdot"));
      await symlink("../../outside", join(root, "sub", "up"));
      await symlink("/etc/shadow", join(root, "shadow"));
      await symlink("hello", join(root, "inside"));
      await mkdir(join(root, "race"));
      await writeFile(join(root, "race", "secret"), "inside\n");
      await symlink("../outside", join(root, "race.link"));
      const shadowBefore = await readFile("/etc/shadow");
      const passwdBefore = await readFile("/etc/passwd");
      const outsideBefore = await snapshot(outside);
      const guest = `/mnt/esc-${policy}`;
      const m = await mount({ hostPath: root, guestPath: guest, symlinks: policy });
      // The host swaps root/race between the directory and a symlink out, as fast as it can.
      const swapper = spawn(
        process.execPath,
        [
          "-e",
          `const fs = require("fs"); const r = process.argv[1]; const m = (a, b) => fs.renameSync(r + a, r + b);
           for (;;) { m("/race", "/race.real"); m("/race.link", "/race"); m("/race", "/race.link"); m("/race.real", "/race"); }`,
          root,
        ],
        { stdio: "ignore" },
      );
      const swapperExited = new Promise((resolve) => swapper.once("exit", resolve));
      let out: string;
      try {
        out = await sh(
          `M=$1; HOSTBASE=$2
          try() { "$@"; echo "rc=$?"; }
          for p in abs rel-out outdir/secret dotdot/outside/secret sub/up/secret shadow "../outside/secret"; do
            echo "== cat $p"; try cat "$M/$p"; done
          echo "== ls outdir"; try ls "$M/outdir/"
          echo "== write through symlinks"
          try sh -c "echo pwned > $M/outdir/planted"; try sh -c "echo pwned >> $M/abs"; try sh -c "echo pwned > $M/shadow"
          echo "== guest symlinks"
          try ln -s /etc/passwd "$M/escape"; try cat "$M/escape"; try sh -c "echo pwned >> $M/escape"
          try ln -s "$HOSTBASE/outside/secret" "$M/g-abs"; try cat "$M/g-abs"
          try ln -s ../outside "$M/g-rel"; try cat "$M/g-rel/secret"; try sh -c "echo pwned > $M/g-rel/planted"
          try ln -s .. "$M/sub/g-up"; try cat "$M/sub/g-up/../outside/secret"
          echo "== hardlinks"
          try ln "$M/abs" "$M/hard-abs"; try cat "$M/hard-abs"; try ln "$M/shadow" "$M/hard-shadow"; try cat "$M/hard-shadow"
          echo "== devices"
          try mknod "$M/sda" b 8 0; try mknod "$M/mem" c 1 1; try mkfifo "$M/fifo"
          echo "== setuid"
          try cp /bin/busybox "$M/suid"; try chmod 6755 "$M/suid"; try chown 0:0 "$M/suid"
          echo "== rename out"
          try mv "$M/hello" "$M/outdir/hello"; try mv "$M/sub" "$M/dotdot/escaped"
          echo "== inside symlink"; try cat "$M/inside"
          echo "== race"
          i=0; while [ $i -lt 100 ]; do cat "$M/race/secret" 2>/dev/null; echo x > "$M/race/planted-$i" 2>/dev/null; i=$((i+1)); done
          echo "race done"`,
          guest,
          base,
        );
        assert.equal(swapper.exitCode, null, "the host swapper ran throughout");
      } finally {
        swapper.kill("SIGKILL");
        await swapperExited;
        await m.unmount();
      }
      // Nothing outside was read...
      assert.ok(!out.includes(secret), `the secret leaked:\n${out}`);
      for (const line of shadowBefore.toString().split("\n").filter(Boolean)) {
        assert.ok(!out.includes(line), `host /etc/shadow leaked: ${line}`);
      }
      assert.ok(out.includes("race done"), out);
      assert.match(out, /== inside symlink\nhello\nrc=0/);
      // ...nor written.
      assert.deepEqual(await snapshot(outside), outsideBefore);
      assert.deepEqual(await readFile("/etc/shadow"), shadowBefore);
      assert.deepEqual(await readFile("/etc/passwd"), passwdBefore);
      await assert.rejects(lstat(join(root, "sda")), { code: "ENOENT" });
      await assert.rejects(lstat(join(root, "mem")), { code: "ENOENT" });
      const suid = await stat(join(root, "suid"));
      assert.equal(suid.mode & 0o6000, 0, "setuid/setgid bits never reach the host");
      if (ROOT) assert.notEqual(suid.uid, 0, "the guest cannot give a host file to root");
      const hardAbs = await lstat(join(root, "hard-abs")).catch(() => undefined);
      if (hardAbs)
        assert.ok(hardAbs.isSymbolicLink(), "a hardlink of a symlink is that symlink, never its target");
      if (policy === "opaque") {
        // Stored verbatim, never followed by the host.
        assert.equal(await readlink(join(root, "escape")), "/etc/passwd");
        assert.equal(await readlink(join(root, "g-abs")), join(base, "outside", "secret"));
        assert.match(out, /== guest symlinks\nrc=0\ncat: can't open '[^']*escape': Permission denied/);
      } else {
        // (The append after the refused ln made a plain file of that name.)
        assert.ok(!(await lstat(join(root, "escape"))).isSymbolicLink());
        assert.match(out, /== guest symlinks\nln: [^\n]*escape[^\n]*: Operation not permitted/);
      }
    });
  }

  vmIt("follow: the host follows symlinks wherever they point (trusted guests only)", async () => {
    const base = await tempDir();
    const root = await hostRoot(base);
    await mkdir(join(base, "shared"));
    await writeFile(join(base, "shared", "data"), "outside, on purpose\n");
    await symlink(join(base, "shared"), join(root, "shared"));
    await symlink("../shared/data", join(root, "data"));
    const m = await mount({ hostPath: root, guestPath: "/mnt/follow", symlinks: "follow" });
    try {
      assert.equal(
        await sh(
          "cat /mnt/follow/data /mnt/follow/shared/data; stat -c %F /mnt/follow/shared /mnt/follow/data",
        ),
        "outside, on purpose\noutside, on purpose\ndirectory\nregular file\n",
      );
    } finally {
      await m.unmount();
    }
  });

  vmIt("read-only refuses every kind of write with EROFS, even after a remount rw in the guest", async () => {
    const root = await hostRoot(await tempDir());
    await writeFile(join(root, "hello"), "hello\n");
    await mkdir(join(root, "sub"));
    await writeFile(join(root, "sub", "f"), "f\n");
    const before = await snapshot(root);
    const m = await mount({ hostPath: root, guestPath: "/mnt/ro", readOnly: true });
    try {
      assert.match(await sh("grep ' /mnt/ro ' /proc/mounts"), /\bro\b/);
      assert.equal(await sh("cat /mnt/ro/hello"), "hello\n");
      // A root guest can drop the guest-side read-only flag; the host still refuses.
      assert.equal(await sh("mount -o remount,rw /mnt/ro && echo remounted"), "remounted\n");
      const attempts = [
        "touch /mnt/ro/new",
        "sh -c 'echo x > /mnt/ro/hello'",
        "sh -c 'echo x >> /mnt/ro/hello'",
        "mkdir /mnt/ro/d",
        "rm /mnt/ro/hello",
        "rm /mnt/ro/sub/f",
        "rmdir /mnt/ro/sub",
        "mv /mnt/ro/hello /mnt/ro/h2",
        "ln -s hello /mnt/ro/l",
        "ln /mnt/ro/hello /mnt/ro/h3",
        "chmod 777 /mnt/ro/hello",
        "chown 1:1 /mnt/ro/hello",
        "truncate -s 0 /mnt/ro/hello",
        "touch -d '2001-01-01 00:00:00' /mnt/ro/hello",
        "mkfifo /mnt/ro/p",
      ];
      for (const cmd of attempts) {
        const out = await sh(`${cmd}; echo "rc=$?"`);
        assert.match(out, /Read-only file system/, `${cmd}: ${out}`);
        assert.doesNotMatch(out, /rc=0/, `${cmd} succeeded`);
      }
    } finally {
      await m.unmount();
    }
    assert.deepEqual(await snapshot(root), before);
  });

  vmIt(
    "an npm-install-like workload leaves the same tree on the mount as on the guest's own disk",
    async (t) => {
      const root = await hostRoot(await tempDir());
      const m = await mount({ hostPath: root, guestPath: "/mnt/npm" });
      const workload = `set -e; umask 022; D=$1; mkdir -p "$D"; cd "$D"
      i=0
      while [ $i -lt 20 ]; do
        s=node_modules/.staging/pkg$i
        mkdir -p $s/lib/deep/er $s/bin node_modules/.bin
        echo "{\\"name\\":\\"pkg$i\\",\\"version\\":\\"1.0.$i\\"}" > $s/package.json
        echo "module.exports = $i;" > $s/index.js
        head -c $((i * 37)) /dev/zero | tr '\\0' 'x' > $s/lib/deep/er/data.txt
        printf '#!/bin/sh\\necho pkg%s\\n' $i > $s/bin/cli; chmod 755 $s/bin/cli
        echo tmp > $s/tmp.log; rm $s/tmp.log
        mv $s node_modules/pkg$i
        ln -s ../pkg$i/bin/cli node_modules/.bin/pkg$i
        i=$((i+1))
      done
      rm -rf node_modules/.staging
      i=0
      while [ $i -lt 20 ]; do
        if [ $((i % 10)) -eq 0 ]; then
          mkdir -p node_modules/.tmp-pkg$i; echo v2 > node_modules/.tmp-pkg$i/index.js
          rm -rf node_modules/pkg$i; mv node_modules/.tmp-pkg$i node_modules/pkg$i
        fi
        i=$((i+1))
      done
      rm node_modules/.bin/pkg3
      ln node_modules/pkg5/index.js node_modules/pkg5/index-hard.js
      node_modules/.bin/pkg7`;
      // One line per entry (type, name, mode, links, link target), then every file's md5.
      const manifest = `cd "$1" && find . -exec stat -c '%F %n %a %h %N' {} + | sort && find . -type f -exec md5sum {} + | sort`;
      try {
        const t0 = performance.now();
        assert.equal(await sh(workload, "/mnt/npm/app"), "pkg7\n");
        const t1 = performance.now();
        assert.equal(await sh(workload, "/root/npm-app"), "pkg7\n");
        t.diagnostic(
          `workload: ${(t1 - t0).toFixed(0)} ms on the mount, ${(performance.now() - t1).toFixed(0)} ms on the guest's disk`,
        );
        const onMount = await sh(manifest, "/mnt/npm/app");
        const onDisk = await sh(manifest, "/root/npm-app");
        assert.ok(onMount.split("\n").length > 200, `${onMount.split("\n").length} lines`);
        assert.equal(onMount, onDisk);
        // And the host has exactly that tree.
        const app = join(root, "app");
        const entries: string[] = [];
        const sums: string[] = [];
        for (const name of [".", ...(await readdir(app, { recursive: true }))]) {
          const path = join(app, name);
          const rel = name === "." ? "." : `./${name}`;
          const st = await lstat(path);
          const type = st.isSymbolicLink()
            ? "symbolic link"
            : st.isDirectory()
              ? "directory"
              : st.size === 0
                ? "regular empty file"
                : "regular file";
          // busybox stat %N: links quoted with their target, other names bare.
          const shown = st.isSymbolicLink() ? `'${rel}' -> '${await readlink(path)}'` : rel;
          entries.push(`${type} ${rel} ${(st.mode & 0o7777).toString(8)} ${st.nlink} ${shown}`);
          if (st.isFile())
            sums.push(
              `${createHash("md5")
                .update(await readFile(path))
                .digest("hex")}  ${rel}`,
            );
        }
        const sorted = (lines: string[]) => lines.sort((x, y) => (x < y ? -1 : x > y ? 1 : 0));
        const hostManifest = `${[...sorted(entries), ...sorted(sums)].join("\n")}\n`;
        assert.equal(hostManifest, onMount);
      } finally {
        await sh("rm -rf /root/npm-app");
        await m.unmount();
      }
    },
  );

  vmIt("unmount detaches even with a file held open, and the path can be mounted again", async () => {
    const root = await hostRoot(await tempDir());
    await writeFile(join(root, "f"), "held\n");
    const m = await mount({ hostPath: root, guestPath: "/mnt/again" });
    const holder = await vm
      .execBuilder()
      .argv(["sh", "-c", 'exec 3< /mnt/again/f; echo open; read -r x <&3; echo "$x"; sleep 1000'])
      .spawn();
    let seen = "";
    for await (const event of holder) {
      if (event.kind === "stdout") seen += Buffer.from(event.data).toString();
      if (seen.includes("held\n") || event.kind === "exit") break;
    }
    assert.equal(seen, "open\nheld\n");
    await m.unmount();
    assert.deepEqual(vm.mounts, []);
    assert.equal(await sh("grep -c ' /mnt/again ' /proc/mounts; true"), "0\n");
    holder.kill("SIGKILL");
    await holder.wait().catch(() => undefined);
    const again = await mount({ hostPath: root, guestPath: "/mnt/again" });
    assert.equal(await sh("cat /mnt/again/f"), "held\n");
    await again.unmount();
    assert.deepEqual(vm.mounts, []);
  });
});
