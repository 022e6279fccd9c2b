import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { chmod, copyFile, cp, mkdir, mkdtemp, rm, utimes, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { SupermachineError } from "../../src/errors.ts";
import {
  cachedAssetPaths,
  GUEST_PACKAGE,
  locateGuestAssets,
  locateNetRelay,
  resolveAssetPaths,
} from "../../src/vmm/asset-paths.ts";

const run = promisify(execFile);
const repoDir = join(dirname(fileURLToPath(import.meta.url)), "..", "..");

let tmp: string;
let packageDir: string;
let cache: string;
let env: NodeJS.ProcessEnv;

async function touch(path: string, content = "x"): Promise<string> {
  await mkdir(dirname(path), { recursive: true });
  await writeFile(path, content);
  return path;
}

async function linuxSourceVersion(): Promise<string | null> {
  try {
    const { stdout } = await run("dpkg-query", ["-W", "--showformat=$" + "{Version}", "linux-source-6.1"]);
    return stdout.trim() || null;
  } catch {
    return null;
  }
}

function assertAssetMissing(error: unknown, ...fragments: string[]): true {
  assert.ok(SupermachineError.is(error), `not a SupermachineError: ${String(error)}`);
  assert.equal(error.code, "ASSET_MISSING");
  for (const fragment of fragments)
    assert.ok(error.message.includes(fragment), `${fragment} not in: ${error.message}`);
  return true;
}

before(async () => {
  tmp = await mkdtemp(join(tmpdir(), "sm-asset-paths-"));
  packageDir = join(tmp, "pkg");
  cache = join(tmp, "cache");
  env = { SUPERMACHINE_CACHE_DIR: cache };
  // A package dir with the real build scripts and a small fake guest source tree.
  for (const path of [
    "kernel/supermachine.config",
    "kernel/patches/lapic-timer-hz.patch",
    "scripts/build-kernel.sh",
    "scripts/asset-cache.sh",
    "scripts/build-initramfs.sh",
    "scripts/build-hosttools.sh",
    "scripts/build-assets.sh",
  ]) {
    await mkdir(dirname(join(packageDir, path)), { recursive: true });
    await copyFile(join(repoDir, path), join(packageDir, path));
  }
  await touch(join(packageDir, "guest/Makefile"), "all:\n");
  await touch(join(packageDir, "guest/src/main.c"), "int main(void) { return 0; }\n");
  await touch(join(packageDir, "guest/src/proto/frame.h"), "#pragma once\n");
  await touch(join(packageDir, "guest/src/Z-upper.c"), "\n");
  await touch(join(packageDir, "guest/test/ignored.c"), "\n");
  await touch(join(packageDir, "hosttools/Makefile"), "all:\n");
  await touch(join(packageDir, "hosttools/sm-net.c"), "int main(void) { return 0; }\n");
});

async function executable(path: string, content = "x"): Promise<string> {
  await touch(path, content);
  await chmod(path, 0o755);
  return path;
}

after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

describe("resolveAssetPaths", () => {
  test("explicit overrides win over env, the guest package and the cache", async () => {
    const kernel = await touch(join(tmp, "o/vmlinux"));
    const initramfs = await touch(join(tmp, "o/initramfs.cpio"));
    const envKernel = await touch(join(tmp, "e/vmlinux"));
    const got = await resolveAssetPaths(
      { kernel, initramfs },
      { packageDir, env: { ...env, SUPERMACHINE_KERNEL: envKernel }, linuxSourceVersion: "1" },
    );
    assert.deepEqual(got, { kernel, initramfs });
  });

  test("env variables are used when there are no overrides, each asset separately", async () => {
    const kernel = await touch(join(tmp, "e/vmlinux"));
    const initramfs = await touch(join(tmp, "e/initramfs.cpio"));
    const override = await touch(join(tmp, "o2/initramfs.cpio"));
    const got = await resolveAssetPaths(
      { initramfs: override },
      {
        packageDir,
        env: { ...env, SUPERMACHINE_KERNEL: kernel, SUPERMACHINE_INITRAMFS: initramfs },
        linuxSourceVersion: "1",
      },
    );
    assert.deepEqual(got, { kernel, initramfs: override });
  });

  test("an override or env path that does not exist is an error naming it", async () => {
    const gone = join(tmp, "nope/vmlinux");
    await assert.rejects(
      resolveAssetPaths({ kernel: gone }, { packageDir, env, linuxSourceVersion: "1" }),
      (error) => assertAssetMissing(error, gone, "given as kernel"),
    );
    await assert.rejects(
      resolveAssetPaths(
        {},
        { packageDir, env: { ...env, SUPERMACHINE_INITRAMFS: gone }, linuxSourceVersion: "1" },
      ),
      (error) => assertAssetMissing(error, gone, "SUPERMACHINE_INITRAMFS"),
    );
  });

  test("missing assets: the message names each missing file, the guest package and the build command", async () => {
    const cached = await cachedAssetPaths({ packageDir, env, linuxSourceVersion: "6.1.0-test" });
    assert.ok(cached.kernel !== undefined);
    await assert.rejects(
      resolveAssetPaths({}, { packageDir, env, linuxSourceVersion: "6.1.0-test" }),
      (error) =>
        assertAssetMissing(
          error,
          "guest kernel",
          "guest initramfs",
          cached.kernel!,
          cached.initramfs,
          `${GUEST_PACKAGE} (not installed)`,
          "npm run assets",
          "scripts/build-assets.sh",
        ),
    );
  });

  describe("the prebuilt guest package", () => {
    const kernelBytes = "kernel bytes";
    const initramfsBytes = "initramfs bytes";
    const sha = (text: string) => createHash("sha256").update(text).digest("hex");
    let guest: string;
    let packed: string;

    before(async () => {
      guest = join(tmp, "node_modules", GUEST_PACKAGE);
      await touch(join(guest, "package.json"), JSON.stringify({ name: GUEST_PACKAGE, version: "0.1.0" }));
      await touch(join(guest, "vmlinux"), kernelBytes);
      await touch(join(guest, "initramfs.cpio"), initramfsBytes);
      // A packed package: its sources, and the hashes recorded by scripts/build.ts --release.
      packed = join(tmp, "node_modules", "supermachine");
      await cp(packageDir, packed, { recursive: true });
      await touch(join(packed, "package.json"), JSON.stringify({ name: "supermachine" }));
      await touch(
        join(packed, "dist/guest-assets.json"),
        JSON.stringify({
          kernel: { file: "vmlinux", sha256: sha(kernelBytes) },
          initramfs: { file: "initramfs.cpio", sha256: sha(initramfsBytes) },
        }),
      );
    });

    test("is found next to the package and checked against the recorded hashes", async () => {
      const found = await locateGuestAssets(
        {},
        { packageDir: packed, env, linuxSourceVersion: "6.1.0-test" },
      );
      assert.deepEqual(found, {
        kernel: { path: join(guest, "vmlinux"), source: "package", sha256: `sha256:${sha(kernelBytes)}` },
        initramfs: {
          path: join(guest, "initramfs.cpio"),
          source: "package",
          sha256: `sha256:${sha(initramfsBytes)}`,
        },
      });
    });

    test("a file that does not match its recorded hash is DIGEST_MISMATCH", async () => {
      const other = join(tmp, "damaged");
      await cp(guest, other, { recursive: true });
      await writeFile(join(other, "initramfs.cpio"), "tampered");
      await assert.rejects(
        resolveAssetPaths(
          {},
          { packageDir: packed, guestPackageDir: other, env, linuxSourceVersion: "6.1.0-test" },
        ),
        (error) => {
          assert.ok(SupermachineError.is(error, "DIGEST_MISMATCH"));
          assert.equal(error.digest, `sha256:${sha(initramfsBytes)}`);
          assert.equal(error.actualDigest, `sha256:${sha("tampered")}`);
          assert.match(error.message, /reinstall/);
          return true;
        },
      );
    });

    test("is not used by a package that records no hashes (a checkout)", async () => {
      await assert.rejects(
        resolveAssetPaths({}, { packageDir, guestPackageDir: guest, env, linuxSourceVersion: "6.1.0-test" }),
        (error) => assertAssetMissing(error, "records no hashes"),
      );
    });

    test("comes after assets built from the package's own sources", async () => {
      const cached = await cachedAssetPaths({ packageDir: packed, env, linuxSourceVersion: "6.1.0-test" });
      await touch(cached.initramfs);
      try {
        const found = await locateGuestAssets(
          {},
          { packageDir: packed, env, linuxSourceVersion: "6.1.0-test" },
        );
        assert.equal(found.initramfs.path, cached.initramfs);
        assert.equal(found.initramfs.source, "cache");
        assert.equal(found.kernel.source, "package");
      } finally {
        await rm(join(cache, "initramfs"), { recursive: true, force: true });
      }
    });
  });

  test("cache paths are found under their keys", async () => {
    const cached = await cachedAssetPaths({ packageDir, env, linuxSourceVersion: "6.1.0-test" });
    await touch(cached.kernel!);
    await touch(cached.initramfs);
    try {
      assert.deepEqual(await resolveAssetPaths({}, { packageDir, env, linuxSourceVersion: "6.1.0-test" }), {
        kernel: cached.kernel,
        initramfs: cached.initramfs,
      });
      // Another source version is another key: that kernel is not built.
      await assert.rejects(
        resolveAssetPaths({}, { packageDir, env, linuxSourceVersion: "6.1.0-other" }),
        (error) => assertAssetMissing(error, "guest kernel"),
      );
    } finally {
      await rm(join(cache, "kernel"), { recursive: true, force: true });
      await rm(join(cache, "initramfs"), { recursive: true, force: true });
    }
  });

  test("without a linux-source version, the newest cached kernel is used", async () => {
    // Named so that neither name order nor creation order gives the answer: only mtimes do.
    const newest = await touch(join(cache, "kernel/aaaaaaaaaaaaaaaa/vmlinux"));
    const older = await touch(join(cache, "kernel/bbbbbbbbbbbbbbbb/vmlinux"));
    await utimes(newest, new Date(2_000_000_000_000), new Date(2_000_000_000_000));
    await utimes(older, new Date(1_000_000_000_000), new Date(1_000_000_000_000));
    const initramfs = await touch(join(tmp, "e/initramfs.cpio"));
    try {
      const got = await resolveAssetPaths({ initramfs }, { packageDir, env, linuxSourceVersion: null });
      assert.equal(got.kernel, newest);
    } finally {
      await rm(join(cache, "kernel"), { recursive: true, force: true });
    }
    await assert.rejects(
      resolveAssetPaths({ initramfs }, { packageDir, env, linuxSourceVersion: null }),
      (error) => assertAssetMissing(error, join(cache, "kernel", "*", "vmlinux")),
    );
  });
  test("a package without the kernel sources also falls back to the newest cached kernel", async () => {
    const bare = join(tmp, "bare");
    const kernel = await touch(join(cache, "kernel/cccccccccccccccc/vmlinux"));
    const initramfs = await touch(join(tmp, "e/initramfs.cpio"));
    try {
      const got = await resolveAssetPaths(
        { initramfs },
        { packageDir: bare, env, linuxSourceVersion: "6.1.0-test" },
      );
      assert.equal(got.kernel, kernel);
    } finally {
      await rm(join(cache, "kernel"), { recursive: true, force: true });
    }
  });

  test("a directory is not an asset", async () => {
    const dir = join(tmp, "adir");
    await mkdir(dir, { recursive: true });
    await assert.rejects(
      resolveAssetPaths({ kernel: dir }, { packageDir, env, linuxSourceVersion: "1" }),
      (error) => assertAssetMissing(error, dir),
    );
  });
});

describe("cache keys match the build scripts", () => {
  test("initramfs: same path as scripts/build-initramfs.sh --print-path", async () => {
    const { stdout } = await run("bash", [join(packageDir, "scripts/build-initramfs.sh"), "--print-path"], {
      env: { ...process.env, ...env },
    });
    const cached = await cachedAssetPaths({ packageDir, env, linuxSourceVersion: null });
    assert.equal(cached.initramfs, stdout.trim());
    assert.match(cached.initramfs, /\/initramfs\/[0-9a-f]{16}\/initramfs\.cpio$/);
  });

  test("initramfs key changes with any guest source file and ignores other guest dirs", async () => {
    const before = (await cachedAssetPaths({ packageDir, env, linuxSourceVersion: null })).initramfs;
    await touch(join(packageDir, "guest/test/other.c"), "int x;\n");
    assert.equal((await cachedAssetPaths({ packageDir, env, linuxSourceVersion: null })).initramfs, before);
    const header = join(packageDir, "guest/src/proto/frame.h");
    await writeFile(header, "#pragma once\n#define X 1\n");
    try {
      assert.notEqual(
        (await cachedAssetPaths({ packageDir, env, linuxSourceVersion: null })).initramfs,
        before,
      );
    } finally {
      await writeFile(header, "#pragma once\n");
    }
  });

  test("kernel: same path as scripts/build-kernel.sh --print-path", async (t) => {
    const version = await linuxSourceVersion();
    if (version === null) {
      t.skip("dpkg-query does not know linux-source-6.1 on this host");
      return;
    }
    const { stdout } = await run("bash", [join(packageDir, "scripts/build-kernel.sh"), "--print-path"], {
      env: { ...process.env, ...env },
    });
    const cached = await cachedAssetPaths({ packageDir, env });
    assert.equal(cached.kernel, stdout.trim());
    assert.match(stdout.trim(), /\/kernel\/[0-9a-f]{16}\/vmlinux$/);
  });

  test("kernel: every patch keys it, in the same order as scripts/build-kernel.sh", async (t) => {
    if ((await linuxSourceVersion()) === null) {
      t.skip("dpkg-query does not know linux-source-6.1 on this host");
      return;
    }
    const printPath = async () =>
      (
        await run("bash", [join(packageDir, "scripts/build-kernel.sh"), "--print-path"], {
          env: { ...process.env, ...env },
        })
      ).stdout.trim();
    const before = await printPath();
    // "B" sorts before "a" by bytes (the C locale), after it in most others: both sides sort by bytes.
    const added = [join(packageDir, "kernel/patches/B.patch"), join(packageDir, "kernel/patches/a.patch")];
    for (const [i, path] of added.entries()) await touch(path, `patch ${i}\n`);
    try {
      const after = await printPath();
      assert.notEqual(after, before);
      assert.equal((await cachedAssetPaths({ packageDir, env })).kernel, after);
    } finally {
      for (const path of added) await rm(path);
    }
    assert.equal((await cachedAssetPaths({ packageDir, env })).kernel, before);
  });

  test("build-assets.sh --print-paths prints both paths", async (t) => {
    const version = await linuxSourceVersion();
    if (version === null) {
      t.skip("dpkg-query does not know linux-source-6.1 on this host");
      return;
    }
    const { stdout } = await run("bash", [join(packageDir, "scripts/build-assets.sh"), "--print-paths"], {
      env: { ...process.env, ...env },
    });
    const cached = await cachedAssetPaths({ packageDir, env });
    assert.equal(
      stdout,
      `SUPERMACHINE_KERNEL=${cached.kernel}\nSUPERMACHINE_INITRAMFS=${cached.initramfs}\n` +
        `SUPERMACHINE_NET_RELAY=${cached.netRelay}\n`,
    );
  });

  test("network relay: same path as scripts/build-hosttools.sh --print-path; keyed by hosttools/ files", async () => {
    const { stdout } = await run("bash", [join(packageDir, "scripts/build-hosttools.sh"), "--print-path"], {
      env: { ...process.env, ...env },
    });
    const cached = await cachedAssetPaths({ packageDir, env, linuxSourceVersion: null });
    assert.equal(cached.netRelay, stdout.trim());
    assert.match(stdout.trim(), /\/sm-net\/[0-9a-f]{16}\/sm-net$/);
    // Build output below hosttools/ is not a source; a file directly in it is.
    await touch(join(packageDir, "hosttools/build/sm-net"), "binary");
    assert.equal(
      (await cachedAssetPaths({ packageDir, env, linuxSourceVersion: null })).netRelay,
      cached.netRelay,
    );
    const source = join(packageDir, "hosttools/sm-net.c");
    await writeFile(source, "int main(void) { return 1; }\n");
    try {
      assert.notEqual(
        (await cachedAssetPaths({ packageDir, env, linuxSourceVersion: null })).netRelay,
        cached.netRelay,
      );
    } finally {
      await writeFile(source, "int main(void) { return 0; }\n");
    }
  });
});

describe("the network relay sm-net", () => {
  test("comes from the override, SUPERMACHINE_NET_RELAY or the cache; missing is no error for the guest assets", async () => {
    const kernel = await touch(join(tmp, "r/vmlinux"));
    const initramfs = await touch(join(tmp, "r/initramfs.cpio"));
    const options = { packageDir, env, linuxSourceVersion: "1" };
    assert.deepEqual(await resolveAssetPaths({ kernel, initramfs }, options), { kernel, initramfs });
    await assert.rejects(locateNetRelay({}, options), (error) =>
      assertAssetMissing(
        error,
        "sm-net",
        "network allow-lists",
        "scripts/build-hosttools.sh",
        "SUPERMACHINE_NET_RELAY",
      ),
    );
    const cached = (await cachedAssetPaths(options)).netRelay!;
    await executable(cached);
    try {
      assert.deepEqual(await locateNetRelay({}, options), { path: cached, source: "cache" });
      assert.equal((await resolveAssetPaths({ kernel, initramfs }, options)).netRelay, cached);
      const fromEnv = await executable(join(tmp, "r/env-sm-net"));
      assert.deepEqual(
        await locateNetRelay({}, { ...options, env: { ...env, SUPERMACHINE_NET_RELAY: fromEnv } }),
        {
          path: fromEnv,
          source: "env",
        },
      );
      const given = await executable(join(tmp, "r/given-sm-net"));
      assert.deepEqual(await locateNetRelay({ netRelay: given }, options), { path: given, source: "option" });
      // Not executable: not a relay.
      const plain = await touch(join(tmp, "r/plain-sm-net"));
      await assert.rejects(locateNetRelay({ netRelay: plain }, options), (error) =>
        assertAssetMissing(error, `${plain} (given as netRelay)`),
      );
    } finally {
      await rm(join(cache, "sm-net"), { recursive: true, force: true });
    }
  });

  test("comes from the prebuilt guest package when its hash is recorded, and is checked", async () => {
    const sha = (text: string) => createHash("sha256").update(text).digest("hex");
    const guest = join(tmp, "relay-pkg", "guest");
    const packed = join(tmp, "relay-pkg", "supermachine");
    await touch(join(guest, "vmlinux"), "k");
    await touch(join(guest, "initramfs.cpio"), "i");
    await executable(join(guest, "sm-net"), "relay bytes");
    await cp(packageDir, packed, { recursive: true });
    await touch(join(packed, "package.json"), JSON.stringify({ name: "supermachine" }));
    const record = (relaySha: string) =>
      touch(
        join(packed, "dist/guest-assets.json"),
        JSON.stringify({
          kernel: { file: "vmlinux", sha256: sha("k") },
          initramfs: { file: "initramfs.cpio", sha256: sha("i") },
          netRelay: { file: "sm-net", sha256: relaySha },
        }),
      );
    const options = { packageDir: packed, guestPackageDir: guest, env, linuxSourceVersion: "1" };
    await record(sha("relay bytes"));
    assert.deepEqual(await locateNetRelay({}, options), {
      path: join(guest, "sm-net"),
      source: "package",
      sha256: `sha256:${sha("relay bytes")}`,
    });
    await record(sha("other bytes"));
    await assert.rejects(locateNetRelay({}, options), (error) =>
      SupermachineError.is(error, "DIGEST_MISMATCH"),
    );
  });
});
