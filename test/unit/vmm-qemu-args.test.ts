import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { SupermachineError } from "../../src/errors.ts";
import { buildQemuArgs, kernelCommandLine, type MachineSpec } from "../../src/vmm/qemu-args.ts";

const base: MachineSpec = { accel: "tcg", memoryMiB: 256, vcpus: 1, qmpSocketPath: "/run/vm/qmp.sock" };

/** The value following each occurrence of `flag`. */
function values(args: string[], flag: string): string[] {
  return args.flatMap((arg, index) => (arg === flag ? [args[index + 1]!] : []));
}

/** True if `sequence` appears contiguously in `args`. */
function hasSequence(args: string[], ...sequence: string[]): boolean {
  return args.some((_, start) => sequence.every((item, offset) => args[start + offset] === item));
}

describe("buildQemuArgs", () => {
  it("minimal TCG machine, in the exact documented order", () => {
    assert.deepEqual(buildQemuArgs(base), [
      "-nodefaults",
      "-no-user-config",
      "-nographic",
      "-sandbox",
      "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
      "-M",
      "microvm,acpi=off,pit=on,pic=on,rtc=on,x-option-roms=off",
      "-accel",
      "tcg",
      "-cpu",
      "max",
      "-m",
      "256M",
      "-smp",
      "1",
      "-no-reboot",
      "-chardev",
      "stdio,id=con,signal=off",
      "-serial",
      "chardev:con",
      "-chardev",
      "socket,id=qmp,path=/run/vm/qmp.sock,server=off",
      "-mon",
      "chardev=qmp,mode=control",
      "-object",
      "rng-random,id=rng0,filename=/dev/urandom",
      "-device",
      "virtio-rng-device,rng=rng0,id=rng",
    ]);
  });

  const cases: { name: string; spec: Partial<MachineSpec>; has: string[][]; lacks?: string[] }[] = [
    { name: "kvm uses the host CPU", spec: { accel: "kvm" }, has: [["-accel", "kvm", "-cpu", "host"]] },
    { name: "memory and vcpus", spec: { memoryMiB: 1024, vcpus: 4 }, has: [["-m", "1024M", "-smp", "4"]] },
    { name: "sandbox off", spec: { sandbox: "off" }, has: [], lacks: ["-sandbox"] },
    {
      name: "sandbox allowing spawn",
      spec: { sandbox: "allow-spawn" },
      has: [["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=allow,resourcecontrol=deny"]],
    },
    { name: "name", spec: { name: "supermachine-ab12" }, has: [["-name", "supermachine-ab12"]] },
    {
      name: "shared memory file",
      spec: { memory: { kind: "file", path: "/snap/mem", share: true } },
      has: [
        ["-M", "microvm,acpi=off,pit=on,pic=on,rtc=on,x-option-roms=off,memory-backend=mem"],
        ["-object", "memory-backend-file,id=mem,size=256M,mem-path=/snap/mem,share=on"],
      ],
    },
    {
      name: "private (copy-on-write) memory file",
      spec: { memory: { kind: "file", path: "/snap/mem", share: false } },
      has: [["-object", "memory-backend-file,id=mem,size=256M,mem-path=/snap/mem,share=off"]],
    },
    {
      name: "anonymous memory has no backend object",
      spec: { memory: { kind: "anonymous" } },
      has: [],
      lacks: ["-object memory-backend-file"],
    },
    {
      name: "agent channel",
      spec: { agentSocketPath: "/run/vm/agent.sock" },
      has: [
        [
          "-device",
          "virtio-serial-device,id=vser0",
          "-chardev",
          "socket,id=agent,path=/run/vm/agent.sock,server=off",
          "-device",
          "virtserialport,bus=vser0.0,chardev=agent,name=sm.agent,id=agent0",
        ],
      ],
    },
    {
      name: "mounts channel: a second port on the agent's device, after the agent's",
      spec: { agentSocketPath: "/run/vm/agent.sock", mountSocketPath: "/run/vm/mounts.sock" },
      has: [
        [
          "-device",
          "virtserialport,bus=vser0.0,chardev=agent,name=sm.agent,id=agent0",
          "-chardev",
          "socket,id=mounts,path=/run/vm/mounts.sock,server=off",
          "-device",
          "virtserialport,bus=vser0.0,chardev=mounts,name=sm.mounts,id=mounts0",
        ],
      ],
    },
    {
      name: "raw read-only and qcow2 writable disks",
      spec: {
        disks: [
          { name: "root", path: "/img/root.ext4", format: "raw", readOnly: true },
          { path: "/vm/overlay.qcow2", format: "qcow2" },
        ],
      },
      has: [
        [
          "-blockdev",
          "node-name=root,driver=raw,read-only=on,file.driver=file,file.filename=/img/root.ext4",
          "-device",
          "virtio-blk-device,drive=root,id=blk-root,serial=root",
        ],
        [
          "-blockdev",
          "node-name=disk1,driver=qcow2,read-only=off,discard=unmap,file.driver=file,file.filename=/vm/overlay.qcow2",
          "-device",
          "virtio-blk-device,drive=disk1,id=blk-disk1,serial=disk1",
        ],
      ],
    },
    {
      name: "commas in paths are doubled",
      spec: { qmpSocketPath: "/a,b/qmp.sock", disks: [{ path: "/x,y.img", format: "raw" }] },
      has: [["-chardev", "socket,id=qmp,path=/a,,b/qmp.sock,server=off"]],
      lacks: ["file.filename=/x,y.img"],
    },
    {
      name: "network with forwards and mac",
      spec: {
        network: {
          mac: "52:54:00:AB:CD:EF",
          restrict: true,
          hostForwards: [
            { hostPort: 8080, guestPort: 80 },
            { protocol: "udp", hostAddress: "0.0.0.0", hostPort: 5353, guestPort: 53 },
          ],
        },
      },
      has: [
        [
          "-netdev",
          "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=udp:0.0.0.0:5353-:53",
          "-device",
          "virtio-net-device,netdev=n0,id=net0,mac=52:54:00:ab:cd:ef",
        ],
      ],
    },
    { name: "no network device unless asked", spec: {}, has: [], lacks: ["-netdev", "virtio-net-device"] },
    {
      name: "incoming defer, paused",
      spec: { incoming: "defer", paused: true },
      has: [["-incoming", "defer", "-S"]],
    },
    {
      name: "extra args come last",
      spec: { extraArgs: ["-global", "virtio-mmio.force-legacy=false"], paused: true },
      has: [["-S", "-global", "virtio-mmio.force-legacy=false"]],
    },
    {
      name: "kernel, initramfs and command line",
      spec: {
        kernelPath: "/k/vmlinux",
        initramfsPath: "/k/initrd",
        kernelArgs: ["quiet", "sm.epoch=1"],
        tscKHz: 2096021,
      },
      has: [
        [
          "-kernel",
          "/k/vmlinux",
          "-initrd",
          "/k/initrd",
          "-append",
          "console=ttyS0 reboot=t panic=-1 tsc_early_khz=2096021 tsc=reliable noreplace-smp no_timer_check lapic_timer_hz=1000000000 quiet sm.epoch=1",
        ],
      ],
    },
    {
      name: "no tsc_early_khz under kvm",
      spec: { accel: "kvm", kernelPath: "/k/vmlinux", tscKHz: 2096021 },
      has: [["-append", "console=ttyS0 reboot=t panic=-1"]],
    },
  ];

  for (const { name, spec, has, lacks } of cases) {
    it(name, () => {
      const args = buildQemuArgs({ ...base, ...spec });
      for (const sequence of has) {
        assert.ok(
          hasSequence(args, ...sequence),
          `expected ${JSON.stringify(sequence)} in ${JSON.stringify(args)}`,
        );
      }
      const joined = args.join(" ");
      for (const absent of lacks ?? [])
        assert.ok(!joined.includes(absent), `${absent} should not be in ${joined}`);
    });
  }

  it("is deterministic and puts fixed devices before optional ones", () => {
    const spec: MachineSpec = {
      ...base,
      agentSocketPath: "/run/vm/agent.sock",
      disks: [{ path: "/a.img", format: "raw" }],
      network: {},
    };
    assert.deepEqual(buildQemuArgs(spec), buildQemuArgs(structuredClone(spec)));
    const devices = values(buildQemuArgs(spec), "-device").map((device) => device.split(",")[0]);
    assert.deepEqual(devices, [
      "virtio-rng-device",
      "virtio-serial-device",
      "virtserialport",
      "virtio-blk-device",
      "virtio-net-device",
    ]);
    // Adding a disk does not change the devices before it.
    const more = buildQemuArgs({ ...spec, disks: [...spec.disks!, { path: "/b.img", format: "raw" }] });
    assert.deepEqual(values(more, "-device").slice(0, 4), values(buildQemuArgs(spec), "-device").slice(0, 4));
  });

  const invalid: { name: string; spec: Partial<MachineSpec> }[] = [
    { name: "tiny memory", spec: { memoryMiB: 8 } },
    { name: "fractional memory", spec: { memoryMiB: 256.5 } },
    { name: "zero vcpus", spec: { vcpus: 0 } },
    { name: "unknown accel", spec: { accel: "hvf" as never } },
    { name: "initramfs without kernel", spec: { initramfsPath: "/i" } },
    { name: "kernel args without kernel", spec: { kernelArgs: ["quiet"] } },
    { name: "bad disk name", spec: { disks: [{ name: "Root!", path: "/a", format: "raw" }] } },
    {
      name: "disk name too long for a serial",
      spec: { disks: [{ name: "a".repeat(21), path: "/a", format: "raw" }] },
    },
    {
      name: "duplicate disk names",
      spec: {
        disks: [
          { name: "d", path: "/a", format: "raw" },
          { name: "d", path: "/b", format: "raw" },
        ],
      },
    },
    { name: "unknown disk format", spec: { disks: [{ path: "/a", format: "vmdk" as never }] } },
    { name: "bad mac", spec: { network: { mac: "nope" } } },
    { name: "port 0", spec: { network: { hostForwards: [{ hostPort: 0, guestPort: 80 }] } } },
    {
      name: "hostname as forward address",
      spec: { network: { hostForwards: [{ hostAddress: "a,b", hostPort: 1, guestPort: 2 }] } },
    },
    { name: "incoming other than defer", spec: { incoming: "tcp:0:4444" as never } },
    { name: "kernel arg with a space", spec: { kernelPath: "/k", kernelArgs: ["a b"] } },
    { name: "tsc of zero", spec: { kernelPath: "/k", tscKHz: 0 } },
    { name: "a mounts port without the agent's device", spec: { mountSocketPath: "/run/vm/mounts.sock" } },
  ];
  for (const { name, spec } of invalid) {
    it(`rejects ${name}`, () => {
      assert.throws(
        () => buildQemuArgs({ ...base, ...spec }),
        (error: unknown) => error instanceof SupermachineError && error.code === "INVALID_ARGUMENT",
      );
    });
  }
});

describe("kernelCommandLine", () => {
  it("keeps quoted values with spaces", () => {
    assert.equal(
      kernelCommandLine({ accel: "kvm", kernelArgs: ['sm.env="A B"'] }),
      'console=ttyS0 reboot=t panic=-1 sm.env="A B"',
    );
  });
  it("adds tsc_early_khz only under tcg and only when known, then the TCG arguments (no noapictimer: its idle cost would stay with every clone of a bake)", () => {
    assert.equal(
      kernelCommandLine({ accel: "tcg" }),
      "console=ttyS0 reboot=t panic=-1 tsc=reliable noreplace-smp no_timer_check lapic_timer_hz=1000000000",
    );
    assert.equal(
      kernelCommandLine({ accel: "tcg", tscKHz: 1000, kernelArgs: ["quiet"] }),
      "console=ttyS0 reboot=t panic=-1 tsc_early_khz=1000 tsc=reliable noreplace-smp no_timer_check lapic_timer_hz=1000000000 quiet",
    );
  });
  it("adds nothing under kvm", () => {
    assert.equal(kernelCommandLine({ accel: "kvm", tscKHz: 1000 }), "console=ttyS0 reboot=t panic=-1");
  });
});
