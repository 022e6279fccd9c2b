/**
 * The runtime environment the guest gives an image, as docker gives a container (docs/agent.md,
 * "The guest's runtime environment"): hostname, /etc/hostname, /etc/hosts, /etc/resolv.conf,
 * /run as the image has it, /dev/shm, /dev/mqueue, the open-files limit. Checked on the Debian
 * fixture image, whose glibc resolves names the way server programs do.
 */
import assert from "node:assert/strict";
import { describe } from "node:test";
import { Image, type Vm } from "../../src/index.ts";
import { fixtureImages } from "../helpers/fixtures.ts";
import { scratchDir } from "../helpers/scratch.ts";
import { sharedVm, vmTest } from "../helpers/vm.ts";

async function debianImage(): Promise<Image> {
  return Image.pull(`oci:${(await fixtureImages()).debian}`, { dataDir: await scratchDir("sm-data-") });
}

/** The stdout of `script` run by `/bin/sh` in `vm` as `user`. */
async function shell(vm: Vm, script: string, user = "root"): Promise<string> {
  return (await vm.execBuilder().argv(["/bin/sh", "-c", script]).user(user).output()).stdoutText;
}

describe("the guest's runtime environment", { timeout: 600_000 }, () => {
  const shared = sharedVm(async () => (await debianImage()).start({ memoryMiB: 256 }));
  const sh = (script: string, user = "root") => shell(shared.current(), script, user);

  shared.it("has its id as hostname, in /etc/hostname and resolvable through /etc/hosts", async () => {
    const id = shared.current().id;
    assert.equal(await sh("hostname; cat /etc/hostname"), `${id}\n${id}\n`);
    assert.equal(await sh(`getent hosts ${id} | tr -s ' \t' ' '`), `127.0.1.1 ${id}\n`);
    assert.match(await sh("cat /etc/machine-id"), /^[0-9a-f]{32}\n$/);
    // getaddrinfo as servers and clients call it (AF_UNSPEC); both loopback addresses
    const localhost = await sh("getent ahosts localhost");
    assert.match(localhost, /^127\.0\.0\.1\s+STREAM/m);
    assert.match(localhost, /^::1\s+STREAM/m);
    assert.equal(await sh("stat -c '%a %u' /etc/hosts /etc/hostname"), "644 0\n644 0\n");
  });

  shared.it(
    "keeps /etc/hostname, /etc/hosts and /etc/machine-id in files of their own mounted over the image's, as docker does",
    async () => {
      assert.equal(
        await sh(
          'for f in hostname hosts machine-id; do stat -f -c %T /etc/$f; grep -c " /etc/$f " /proc/mounts; done',
        ),
        "tmpfs\n1\ntmpfs\n1\ntmpfs\n1\n",
      );
      // the tmpfs they came from is no longer mounted anywhere else
      assert.equal(await sh("grep -c sm-names /proc/mounts"), "3\n");
      // a rename over one fails, as in docker, and changes nothing
      assert.match(await sh("echo x > /tmp/h; mv /tmp/h /etc/hostname 2>&1; rm -f /tmp/h"), /busy/i);
      assert.equal(await sh("cat /etc/hostname"), `${shared.current().id}\n`);
    },
  );

  shared.it("has an /etc/resolv.conf when the image has none", async () => {
    assert.equal(await sh("grep -v '^#' /etc/resolv.conf"), "nameserver 127.0.0.1\n");
  });

  shared.it("keeps the image's /run (no tmpfs over it)", async () => {
    // the Debian base layer has /run/lock (1777) and /run/mount
    assert.equal(await sh("stat -c %a /run/lock; test -d /run/mount && echo mount"), "1777\nmount\n");
    assert.equal(await sh("stat -f -c %T /run"), "ext2/ext3\n");
  });

  shared.it("has docker's /dev: shm, mqueue, fd (bash's process substitution)", async () => {
    assert.equal(
      (await shared.current().execBuilder().argv(["bash", "-c", "cat <(echo through /dev/fd)"]).output())
        .stdoutText,
      "through /dev/fd\n",
    );
    assert.equal(await sh("stat -f -c %T /dev/shm; stat -c %a /dev/shm"), "tmpfs\n1777\n");
    assert.match(
      await sh("grep ' /dev/mqueue ' /proc/mounts"),
      /^mqueue \/dev\/mqueue mqueue rw,nosuid,nodev,noexec/,
    );
  });

  shared.it("has IPv6 on the loopback (nginx's entrypoint checks /proc/net/if_inet6)", async () => {
    assert.match(await sh("cat /proc/net/if_inet6"), /^0{31}1 01 80 10 80\s+lo$/m);
  });

  shared.it("gives every process docker's open-files limit", async () => {
    assert.equal(await sh("ulimit -n; ulimit -Hn", "app"), "1048576\n1048576\n");
  });
});

vmTest("the hostname is the one the host gives", async () => {
  await using vm = await (await debianImage()).start({ memoryMiB: 256, hostname: "web-1" });
  const out = await vm
    .execBuilder()
    .argv(["/bin/sh", "-c", "hostname; cat /etc/hostname; getent hosts web-1"])
    .user("root")
    .output();
  assert.match(out.stdoutText, /^web-1\nweb-1\n127\.0\.1\.1\s+web-1\n$/);
});

vmTest("vm.writeFile writes /etc/hosts in place (a mount point), with its mode", async () => {
  await using vm = await (await debianImage()).start({ memoryMiB: 256 });
  const sh = (script: string) => shell(vm, script);
  const hosts = Buffer.from(await vm.readFile("/etc/hosts")).toString();
  await vm.writeFile("/etc/hosts", `${hosts}10.9.8.7\tadded\n`, { mode: 0o640 });
  assert.equal(
    await sh("getent hosts added | tr -s ' \t' ' '; stat -c '%a %u' /etc/hosts"),
    "10.9.8.7 added\n640 0\n",
  );
  assert.equal(
    await sh("grep -c ' /etc/hosts ' /proc/mounts; ls -a /etc | grep -c '^\\.sm-' || true"),
    "1\n0\n",
  );
  // shorter than before: cut to its new length
  await vm.writeFile("/etc/hosts", "127.0.0.1\tlocalhost\n");
  assert.equal(await sh("cat /etc/hosts"), "127.0.0.1\tlocalhost\n");
});

vmTest("a hostname the guest could not take is refused before a VM starts", async () => {
  const image = await debianImage();
  for (const hostname of ["", "-web", "web_1", "a".repeat(65), "web 1"]) {
    await assert.rejects(image.start({ memoryMiB: 256, hostname }), (error: Error & { code?: string }) => {
      assert.equal(error.code, "INVALID_ARGUMENT");
      assert.match(error.message, /^VmConfig\.hostname must be 1–64 letters/);
      return true;
    });
  }
});
