import assert from "node:assert/strict";
import { chmod, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { SupermachineError } from "../../src/errors.ts";
import {
  detectAccelerator,
  findQemu,
  hostTscKHz,
  kvmOpenFailure,
  parseQemuVersion,
  tscKHzFrom,
} from "../../src/vmm/accelerator.ts";
import { hostReport } from "../../src/vmm/host-report.ts";

let dir: string;
before(async () => {
  dir = await mkdtemp(path.join(tmpdir(), "sm-accel-"));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe("detectAccelerator", () => {
  it("falls back to TCG with instructions when the device is missing", async () => {
    const choice = await detectAccelerator({ devicePath: path.join(dir, "no-kvm"), env: {} });
    assert.equal(choice.accel, "tcg");
    assert.match(choice.reason!, /does not exist/);
    assert.match(choice.reason!, /NOT hardware isolation/);
  });

  it("uses KVM when the device opens read-write", async () => {
    const device = path.join(dir, "kvm");
    await writeFile(device, "");
    const probe = async () => undefined;
    assert.deepEqual(await detectAccelerator({ devicePath: device, env: {}, probe }), { accel: "kvm" });
  });

  it("falls back to TCG, saying why, when the device opens but QEMU cannot use it", async () => {
    const device = path.join(dir, "kvm-broken");
    await writeFile(device, "");
    const probe = async () => "error: failed to set MSR 0x10a to 0x69";
    const choice = await detectAccelerator({ devicePath: device, env: {}, probe });
    assert.equal(choice.accel, "tcg");
    assert.match(choice.reason!, /opens, but QEMU cannot run a VM with it \(error: failed to set MSR/);
    assert.match(choice.reason!, /SUPERMACHINE_ACCEL=tcg/);
  });

  it("explains the kvm group when permission is denied", () => {
    assert.match(kvmOpenFailure("EACCES"), /no permission to open \/dev\/kvm: .*usermod -aG kvm \$USER/);
    assert.match(kvmOpenFailure("EPERM", "/x/kvm"), /no permission to open \/x\/kvm/);
    assert.match(kvmOpenFailure("EIO"), /cannot open \/dev\/kvm \(EIO\)/);
  });

  it("SUPERMACHINE_ACCEL=tcg forces TCG", async () => {
    const device = path.join(dir, "kvm2");
    await writeFile(device, "");
    const choice = await detectAccelerator({ devicePath: device, env: { SUPERMACHINE_ACCEL: "tcg" } });
    assert.equal(choice.accel, "tcg");
  });
});

describe("tscKHzFrom", () => {
  const table: { name: string; sources: Parameters<typeof tscKHzFrom>[0]; expected: number | undefined }[] = [
    {
      name: "sysfs wins",
      sources: { sysfsTscKHz: "2496000\n", cpuinfo: "cpu MHz\t\t: 1200.000\n" },
      expected: 2496000,
    },
    {
      name: "Intel nominal frequency with invariant TSC",
      sources: {
        cpuinfo:
          "model name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\ncpu MHz\t\t: 1000.123\nflags\t\t: fpu tsc constant_tsc nonstop_tsc\n",
      },
      expected: 2200000,
    },
    {
      name: "cpu MHz without a nominal frequency",
      sources: {
        cpuinfo: "model name\t: AMD EPYC\ncpu MHz\t\t: 2096.021\nflags\t\t: fpu tsc constant_tsc\n",
      },
      expected: 2096021,
    },
    {
      name: "Intel without constant_tsc uses cpu MHz",
      sources: {
        cpuinfo: "model name\t: Intel(R) Core CPU @ 2.00GHz\ncpu MHz\t\t: 1800.5\nflags\t\t: fpu tsc\n",
      },
      expected: 1800500,
    },
    { name: "nothing known", sources: { cpuinfo: "processor\t: 0\n" }, expected: undefined },
  ];
  for (const { name, sources, expected } of table) {
    it(name, () => assert.equal(tscKHzFrom(sources), expected));
  }

  it("hostTscKHz reads this host and caches", () => {
    const first = hostTscKHz();
    assert.ok(first === undefined || (Number.isSafeInteger(first) && first > 100_000));
    assert.equal(hostTscKHz(), first);
  });
});

describe("parseQemuVersion", () => {
  it("parses Debian's banner", () => {
    assert.deepEqual(
      parseQemuVersion(
        "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright (c) 2003-2022",
      ),
      { major: 7, minor: 2, micro: 22, package: "Debian 1:7.2+dfsg-7+deb12u18+b3", text: "7.2.22" },
    );
  });
  it("parses an upstream banner", () => {
    assert.equal(parseQemuVersion("QEMU emulator version 9.0.0\n")?.text, "9.0.0");
  });
  it("rejects other output", () => {
    assert.equal(parseQemuVersion("bash: qemu: not found"), undefined);
  });
});

describe("findQemu", () => {
  it("honours SUPERMACHINE_QEMU", async () => {
    const fake = path.join(dir, "my-qemu");
    await writeFile(fake, "#!/bin/sh\n");
    await chmod(fake, 0o755);
    assert.equal(await findQemu({ SUPERMACHINE_QEMU: fake, PATH: "" }), fake);
  });

  it("searches PATH", async () => {
    const bin = path.join(dir, "bin");
    await rm(bin, { recursive: true, force: true });
    await import("node:fs/promises").then((fs) => fs.mkdir(bin));
    await writeFile(path.join(bin, "qemu-system-x86_64"), "#!/bin/sh\n", { mode: 0o755 });
    assert.equal(await findQemu({ PATH: `/nonexistent:${bin}` }), path.join(bin, "qemu-system-x86_64"));
  });

  it("fails with QEMU_NOT_FOUND and install instructions", async () => {
    await assert.rejects(findQemu({ PATH: "/nonexistent" }), (error: unknown) => {
      assert.ok(error instanceof SupermachineError);
      assert.equal(error.code, "QEMU_NOT_FOUND");
      assert.match(error.message, /apt-get install qemu-system-x86/);
      return true;
    });
    await assert.rejects(
      findQemu({ SUPERMACHINE_QEMU: path.join(dir, "missing"), PATH: "" }),
      /SUPERMACHINE_QEMU/,
    );
  });
});

describe("hostReport", () => {
  it("reports a QEMU whose --version fails as not found, with the reason, and still reports the rest", async () => {
    const broken = path.join(dir, "qemu-broken");
    await writeFile(broken, "#!/bin/sh\nexit 3\n", { mode: 0o755 });
    const report = await hostReport({ env: { ...process.env, SUPERMACHINE_QEMU: broken } });
    assert.equal(report.qemu.found, false);
    assert.match(report.qemu.found ? "" : report.qemu.error, /--version failed/);
    assert.ok(["kvm", "tcg"].includes(report.accelerator.accel));
  });
});
