/**
 * QemuProcess, QmpClient and the runtime dirs against real QEMU (TCG). No guest kernel is needed:
 * without one QEMU runs its firmware and idles; where a guest must write to the console or exit,
 * a 300-byte PVH "kernel" made here does exactly that (see {@link testKernel}).
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { once } from "node:events";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { createServer, createServer as createTcpServer, type Server, Socket } from "node:net";
import path from "node:path";
import { createInterface } from "node:readline";
import { after, before, describe, it, type TestContext } from "node:test";
import { fileURLToPath } from "node:url";
import { AbortError, VmError } from "../../src/errors.ts";
import {
  buildQemuArgs,
  findQemu,
  type LaunchOptions,
  QemuProcess,
  QmpError,
  resolveAssetPaths,
  sweepStaleVms,
} from "../../src/vmm/index.ts";
import { procStartTime } from "../../src/vmm/state-dir.ts";
import { vmSkipReason } from "../helpers/vm.ts";

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const skip = await vmSkipReason();
const qemuPath = skip === undefined ? await findQemu() : undefined;

let tmp: string;
let counter = 0;
before(async () => {
  // Short: unix socket paths must fit in 108 bytes.
  tmp = await mkdtemp("/tmp/smvt-");
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

/** A fresh runtime root, so that each test sees only its own VMs. */
async function freshRoot(): Promise<string> {
  const root = path.join(tmp, `r${counter++}`);
  await mkdir(root);
  return root;
}

const tiny = { accel: "tcg", memoryMiB: 64, vcpus: 1 } as const;

/** Launch a VM for one test; print its console log path if the test fails; always stop it. */
async function withVm(
  t: TestContext,
  options: Partial<LaunchOptions>,
  body: (vm: QemuProcess, root: string) => Promise<void>,
): Promise<void> {
  const root = options.runtimeDir ?? (await freshRoot());
  const vm = await QemuProcess.launch({ machine: tiny, runtimeDir: root, ...options });
  try {
    await body(vm, root);
  } catch (error) {
    t.diagnostic(`console log: ${vm.consoleLogPath}; QEMU stderr: ${vm.stderrTail}`);
    throw error;
  } finally {
    await vm.kill();
  }
}

/**
 * A minimal PVH guest "kernel" (ELF64 with a Xen PHYS32_ENTRY note, 32-bit code): writes
 * `message` to the serial port `repeat` times (waiting for the transmitter like a real driver), then either triple-faults (QEMU exits, because of
 * -no-reboot) or halts forever.
 */
function testKernel(message: string, repeat: number, end: "reset" | "halt"): Buffer {
  const base = 0x100000;
  const text = Buffer.from(message);
  const noteOffset = 64 + 2 * 56;
  const codeOffset = noteOffset + 24;
  const u32 = (n: number) => {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(n);
    return b;
  };
  const rel8 = (target: number, next: number) => Buffer.from([(target - next) & 0xff]);
  const code = (messageAddress: number, idtAddress: number) => {
    const parts: Buffer[] = [];
    let length = 0;
    const emit = (...bytes: (Buffer | number[])[]) => {
      for (const b of bytes) {
        const buffer = Buffer.isBuffer(b) ? b : Buffer.from(b);
        parts.push(buffer);
        length += buffer.length;
      }
    };
    emit([0xbf], u32(repeat)); // mov edi, repeat
    const outer = length;
    emit([0xbe], u32(messageAddress)); // mov esi, message
    emit([0xb9], u32(text.length)); // mov ecx, length
    emit([0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    const inner = length;
    emit([0x66, 0x83, 0xc2, 0x05]); // add dx, 5 (line status register)
    const wait = length;
    emit([0xec, 0xa8, 0x20]); // in al, dx; test al, 0x20 (transmitter empty)
    emit([0x74], rel8(wait, length + 2)); // jz wait
    emit([0x66, 0x83, 0xea, 0x05]); // sub dx, 5
    emit([0xac, 0xee]); // lodsb; out dx, al
    emit([0xe2], rel8(inner, length + 2)); // loop inner
    emit([0x4f]); // dec edi
    emit([0x75], rel8(outer, length + 2)); // jnz outer
    if (end === "reset") emit([0x0f, 0x01, 0x1d], u32(idtAddress), [0xcc]); // lidt [empty]; int3
    const halt = length;
    emit([0xfa, 0xf4]); // cli; hlt
    emit([0xeb], rel8(halt, length + 2)); // jmp halt
    return Buffer.concat(parts);
  };
  const codeLength = code(0, 0).length;
  const messageOffset = codeOffset + codeLength;
  const idtOffset = messageOffset + text.length;
  const body = Buffer.concat([code(base + messageOffset, base + idtOffset), text, Buffer.alloc(6)]);
  const total = codeOffset + body.length;
  const entry = base + codeOffset;
  const header = Buffer.alloc(64);
  Buffer.from([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1]).copy(header);
  header.writeUInt16LE(2, 16); // ET_EXEC
  header.writeUInt16LE(62, 18); // EM_X86_64
  header.writeUInt32LE(1, 20);
  header.writeBigUInt64LE(BigInt(entry), 24);
  header.writeBigUInt64LE(64n, 32); // program headers
  header.writeUInt16LE(64, 52);
  header.writeUInt16LE(56, 54);
  header.writeUInt16LE(2, 56);
  header.writeUInt16LE(64, 58);
  const programHeader = (type: number, flags: number, offset: number, size: number, align: number) => {
    const ph = Buffer.alloc(56);
    ph.writeUInt32LE(type, 0);
    ph.writeUInt32LE(flags, 4);
    ph.writeBigUInt64LE(BigInt(offset), 8);
    ph.writeBigUInt64LE(BigInt(base + offset), 16);
    ph.writeBigUInt64LE(BigInt(base + offset), 24);
    ph.writeBigUInt64LE(BigInt(size), 32);
    ph.writeBigUInt64LE(BigInt(size), 40);
    ph.writeBigUInt64LE(BigInt(align), 48);
    return ph;
  };
  const note = Buffer.alloc(24);
  note.writeUInt32LE(4, 0);
  note.writeUInt32LE(8, 4);
  note.writeUInt32LE(18, 8); // XEN_ELFNOTE_PHYS32_ENTRY
  note.write("Xen\0", 12, "latin1");
  note.writeBigUInt64LE(BigInt(entry), 16);
  return Buffer.concat([
    header,
    programHeader(1, 7, 0, total, 0x1000),
    programHeader(4, 4, noteOffset, 24, 4),
    note,
    body,
  ]);
}

async function writeKernel(name: string, ...args: Parameters<typeof testKernel>): Promise<string> {
  const file = path.join(tmp, name);
  await writeFile(file, testKernel(...args));
  return file;
}

/** Poll (there is no event for a process that is not our child) until `pid` is gone. */
async function waitGone(pid: number, startTime: string, timeoutMs: number): Promise<number> {
  const started = performance.now();
  while (procStartTime(pid) === startTime) {
    if (performance.now() - started > timeoutMs)
      throw new Error(`process ${pid} still runs after ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
  return performance.now() - started;
}

/** Linux's `SCHED_BATCH` policy number. */
const SCHED_BATCH = 3;

/** The scheduling policy of a process or thread (field 41 of its `stat`). */
async function schedulingPolicy(statPath: string): Promise<number> {
  const stat = await readFile(statPath, "utf8");
  return Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[41 - 3]);
}

describe("QemuProcess", { skip }, () => {
  it("launches, answers QMP, connects the agent channel and stops cleanly", async (t) => {
    const root = await freshRoot();
    const vm = await QemuProcess.launch({ machine: tiny, runtimeDir: root });
    try {
      assert.equal(vm.state, "running");
      assert.ok(vm.stateDir.startsWith(path.join(root, "vms")));
      assert.equal((await stat(vm.stateDir)).mode & 0o777, 0o700);
      const owner = JSON.parse(await readFile(path.join(vm.stateDir, "owner.json"), "utf8"));
      assert.equal(owner.qemuPid, vm.pid);
      assert.equal(owner.hostPid, process.pid);
      assert.deepEqual(await vm.qmp.execute("query-status"), {
        status: "running",
        singlestep: false,
        running: true,
      });
      assert.equal(vm.qmp.greeting.version.qemu.major >= 7, true);
      assert.ok((await vm.agentSocket) instanceof Socket);
      assert.ok(vm.args.includes("-sandbox"), "sandbox is on where supported");
      const threads = await readdir(`/proc/${vm.pid}/task`);
      assert.ok(threads.length > 1, "QEMU runs several threads");
      for (const tid of threads) {
        assert.equal(
          await schedulingPolicy(`/proc/${vm.pid}/task/${tid}/stat`),
          SCHED_BATCH,
          `thread ${tid}`,
        );
      }
      await assert.rejects(vm.qmp.execute("no-such-command"), (error: unknown) => {
        assert.ok(error instanceof QmpError);
        assert.equal(error.qmpClass, "CommandNotFound");
        return true;
      });
    } catch (error) {
      t.diagnostic(`console log: ${vm.consoleLogPath}`);
      await vm.kill();
      throw error;
    }
    const stopping = vm.stop();
    assert.equal(vm.stop(), stopping, "stop() returns one cached promise");
    await stopping;
    assert.deepEqual(await vm.exited, { code: 0, signal: null });
    assert.equal(vm.state, "exited");
    assert.equal(existsSync(vm.stateDir), false, "a clean stop removes the dir");
    assert.equal(vm.qmp.closed, true);
    await assert.rejects(vm.qmp.execute("query-status"), { code: "VM_EXITED" });
    await vm.kill(); // idempotent after stop
  });

  it("accepts every device the argv builder makes (disks, network, file memory, paused)", async (t) => {
    const raw = path.join(tmp, "disk.raw");
    await writeFile(raw, Buffer.alloc(1024 * 1024));
    const qcow2 = path.join(tmp, "disk.qcow2");
    const img = spawn("qemu-img", ["create", "-q", "-f", "qcow2", qcow2, "1M"], { stdio: "inherit" });
    assert.equal((await once(img, "exit"))[0], 0);
    const memory = path.join(tmp, "mem");
    const port = await freePort();
    await withVm(
      t,
      {
        machine: {
          ...tiny,
          memory: { kind: "file", path: memory, share: true },
          disks: [
            { name: "root", path: raw, format: "raw", readOnly: true },
            { name: "scratch", path: qcow2, format: "qcow2" },
          ],
          network: { hostForwards: [{ hostPort: port, guestPort: 80 }] },
          paused: true,
        },
      },
      async (vm) => {
        const status = await vm.qmp.execute<{ status: string }>("query-status");
        assert.equal(status.status, "prelaunch");
        const blocks =
          await vm.qmp.execute<
            { device: string; qdev: string; inserted: { "node-name": string; ro: boolean } }[]
          >("query-block");
        const nodes = blocks.map((block) => [block.inserted["node-name"], block.inserted.ro]);
        assert.deepEqual(nodes, [
          ["root", true],
          ["scratch", false],
        ]);
        assert.equal((await stat(memory)).size, 64 * 1024 * 1024);
        const usernet = await vm.qmp.execute<string>("human-monitor-command", {
          "command-line": "info usernet",
        });
        assert.match(usernet, new RegExp(`HOST_FORWARD.*127\\.0\\.0\\.1\\s+${port}`));
        // A forward added at run time (the strict sandbox must allow it).
        const more = await freePort();
        await vm.qmp.execute("human-monitor-command", {
          "command-line": `hostfwd_add tcp:127.0.0.1:${more}-:22`,
        });
        await vm.qmp.execute("cont");
        assert.equal((await vm.qmp.execute<{ status: string }>("query-status")).status, "running");
      },
    );
  });

  it("lets the caller prepare per-VM files in the dir before QEMU starts", async (t) => {
    let overlay = "";
    await withVm(
      t,
      {
        prepare: async (stateDir) => {
          overlay = path.join(stateDir, "scratch.raw");
          await writeFile(overlay, Buffer.alloc(64 * 1024));
          return { disks: [{ name: "scratch", path: overlay, format: "raw" }] };
        },
      },
      async (vm) => {
        // QEMU got the file as a descriptor (an fdset), not by its path.
        const blocks = await vm.qmp.execute<{ inserted: { file: string } }[]>("query-block");
        assert.deepEqual(
          blocks.map((block) => block.inserted.file),
          ["/dev/fdset/1"],
        );
        await vm.stop();
        assert.equal(existsSync(overlay), false, "removed with the dir");
      },
    );
    const root = await freshRoot();
    await assert.rejects(
      QemuProcess.launch({
        machine: tiny,
        runtimeDir: root,
        prepare: () => {
          throw new Error("no overlay today");
        },
      }),
      /no overlay today/,
    );
    assert.deepEqual(await readdir(path.join(root, "vms")), []);
  });

  it("waits for an incoming migration with -incoming defer", async (t) => {
    await withVm(t, { machine: { ...tiny, incoming: "defer" } }, async (vm) => {
      assert.equal((await vm.qmp.execute<{ status: string }>("query-status")).status, "inmigrate");
    });
  });

  it("keeps the console in a bounded log and notices a guest that exits", async (t) => {
    const kernel = await writeKernel("chatty.elf", "console line from the guest\n", 600, "reset");
    const root = await freshRoot();
    const vm = await QemuProcess.launch({
      machine: { ...tiny, kernelPath: kernel },
      runtimeDir: root,
      consoleLogMaxBytes: 4096,
    });
    try {
      const output: Buffer[] = [];
      vm.console.on("output", (chunk: Buffer) => output.push(chunk));
      const exit = await vm.exited;
      assert.deepEqual(exit, { code: 0, signal: null }, "a triple fault ends QEMU (-no-reboot)");
      await vm.stop(); // resolves once the dir has been dealt with
      const log = await readFile(vm.consoleLogPath, "utf8");
      assert.ok(log.length <= 4096 + 80, `log is ${log.length} bytes`);
      assert.ok(log.startsWith("console line from the guest\n"));
      assert.ok(log.endsWith("console line from the guest\n"));
      assert.match(log, /\[supermachine: \d+ bytes of console output dropped\]/);
      assert.equal(vm.console.totalBytes, 600 * 28);
      // Live subscribers see everything from when they subscribed (the guest starts before launch resolves).
      const live = Buffer.concat(output).toString();
      assert.ok(live.length > 0 && "console line from the guest\n".repeat(600).endsWith(live));
      // It exited without being asked: a failure, so the dir stays with the log and an exit record.
      assert.deepEqual((await readdir(vm.stateDir)).sort(), ["console.log", "exit.json"]);
      const record = JSON.parse(await readFile(path.join(vm.stateDir, "exit.json"), "utf8"));
      assert.equal(record.reason, "failed");
      await assert.rejects(
        vm.agentSocket.then(() => vm.qmp.execute("query-status")),
        { code: "VM_EXITED" },
      );
    } catch (error) {
      t.diagnostic(`console log: ${vm.consoleLogPath}`);
      throw error;
    } finally {
      await vm.kill();
    }
  });

  it("rejects pending QMP calls with VM_EXITED when QEMU is killed from outside", async (t) => {
    await withVm(t, {}, async (vm) => {
      process.kill(vm.pid, "SIGSTOP"); // QEMU cannot answer now
      const pending = vm.qmp.execute("query-status");
      const event = vm.qmp.waitForEvent("SHUTDOWN");
      process.kill(vm.pid, "SIGKILL");
      await assert.rejects(pending, (error: unknown) => {
        assert.ok(error instanceof VmError);
        assert.equal(error.code, "VM_EXITED");
        assert.equal(error.consoleLogPath, vm.consoleLogPath);
        return true;
      });
      await assert.rejects(event, { code: "VM_EXITED" });
      assert.deepEqual(await vm.exited, { code: null, signal: "SIGKILL" });
      await vm.stop();
      assert.ok(existsSync(vm.consoleLogPath), "the console log of a failed VM is kept");
    });
  });

  it("fails fast with QEMU's stderr when QEMU cannot start", async () => {
    const root = await freshRoot();
    const started = performance.now();
    await assert.rejects(
      QemuProcess.launch({
        machine: { ...tiny, extraArgs: ["-device", "no-such-device"] },
        runtimeDir: root,
      }),
      (error: unknown) => {
        assert.ok(error instanceof VmError, String(error));
        assert.equal(error.code, "VMM_FAILED");
        assert.match(error.message, /exited with code 1 during startup/);
        assert.match(error.message, /no-such-device/);
        assert.equal(error.qemuExitCode, 1);
        assert.ok(error.consoleLogPath !== undefined && existsSync(error.consoleLogPath));
        return true;
      },
    );
    assert.ok(performance.now() - started < 5000);
  });

  it("honours a launch timeout and an abort signal, leaving nothing behind", async () => {
    const root = await freshRoot();
    await assert.rejects(QemuProcess.launch({ machine: tiny, runtimeDir: root, timeoutMs: 1 }), {
      code: "VMM_FAILED",
      message: /did not connect QMP within 1 ms/,
    });
    const [kept] = await readdir(path.join(root, "vms"));
    assert.ok(
      kept !== undefined && existsSync(path.join(root, "vms", kept, "exit.json")),
      "a timeout is a failure",
    );

    const aborted = await freshRoot();
    const controller = new AbortController();
    controller.abort();
    await assert.rejects(
      QemuProcess.launch({ machine: tiny, runtimeDir: aborted, signal: controller.signal }),
      AbortError,
    );
    const later = new AbortController();
    const launching = QemuProcess.launch({ machine: tiny, runtimeDir: aborted, signal: later.signal });
    setTimeout(() => later.abort(), 30);
    await assert.rejects(launching, AbortError);
    const left = await readdir(path.join(aborted, "vms")).catch(() => []);
    assert.deepEqual(left, [], "an abort removes the dir");
  });

  it("gives QEMU the incoming state file as its fd 3, waiting for it with the vCPUs stopped", async (t) => {
    const file = path.join(tmp, "fd-test");
    await writeFile(file, "");
    await withVm(t, { incomingStatePath: file }, async (vm) => {
      const { readlink } = await import("node:fs/promises");
      assert.equal(await readlink(`/proc/${vm.pid}/fd/3`), file);
      assert.ok(vm.args.includes("-incoming") && vm.args.includes("-S"));
    });
  });
});

describe("with the guest kernel", { skip }, () => {
  /**
   * Boots the guest kernel alone (no initramfs: it panics, and panic=-1 ends QEMU) with
   * `kernelArgs`, then hands the finished VM and its console log to `check`.
   */
  async function bootKernelAlone(
    t: TestContext,
    kernelArgs: string[],
    check: (vm: QemuProcess, log: string) => void,
  ): Promise<void> {
    const placeholder = path.join(await freshRoot(), "no-initramfs");
    await writeFile(placeholder, "");
    const kernel = (await resolveAssetPaths({ initramfs: placeholder })).kernel;
    const vm = await QemuProcess.launch({
      machine: { ...tiny, memoryMiB: 128, kernelPath: kernel, kernelArgs },
      runtimeDir: await freshRoot(),
    });
    try {
      assert.deepEqual(await vm.exited, { code: 0, signal: null });
      await vm.stop();
      check(vm, await readFile(vm.consoleLogPath, "utf8"));
    } catch (error) {
      t.diagnostic(`console log: ${vm.consoleLogPath}`);
      throw error;
    } finally {
      await vm.kill();
    }
  }

  it("boots it (no initramfs: the kernel panics, and panic=-1 ends QEMU)", async (t) => {
    await bootKernelAlone(t, ["quiet"], (vm, log) => {
      assert.ok(
        vm.args.some((arg) =>
          /^console=ttyS0 reboot=t panic=-1 tsc_early_khz=\d+ tsc=reliable noreplace-smp no_timer_check lapic_timer_hz=1000000000 quiet$/.test(
            arg,
          ),
        ),
      );
      assert.match(log, /Kernel panic - not syncing: VFS: Unable to mount root fs/);
    });
  });

  it("takes the local APIC timer's rate from the command line under TCG instead of calibrating it", async (t) => {
    await bootKernelAlone(t, ["apic=verbose"], (_vm, log) => {
      assert.match(log, /lapic timer already calibrated 4000000\b/);
      assert.doesNotMatch(log, /calibrating APIC timer/);
    });
  });
});

describe("supervision across host death", { skip }, () => {
  it("QEMU dies at once when its host is SIGKILLed, and a sweep removes the dir", async (t) => {
    const root = await freshRoot();
    const script = `
      import { QemuProcess } from ${JSON.stringify(path.join(repoRoot, "src/vmm/index.ts"))};
      const vm = await QemuProcess.launch({ machine: { accel: "tcg", memoryMiB: 64, vcpus: 1 }, runtimeDir: ${JSON.stringify(root)} });
      console.log(JSON.stringify({ pid: vm.pid, stateDir: vm.stateDir }));
      setInterval(() => {}, 1000);
    `;
    const data = path.join(root, "data");
    const diskRoot = path.join(data, "vms");
    const host: ChildProcess = spawn(process.execPath, ["--input-type=module", "-e", script], {
      stdio: ["ignore", "pipe", "inherit"],
      env: { ...process.env, SUPERMACHINE_DATA_DIR: data },
    });
    try {
      const [line] = (await once(createInterface({ input: host.stdout! }), "line")) as [string];
      const { pid, stateDir } = JSON.parse(line) as { pid: number; stateDir: string };
      const startTime = procStartTime(pid);
      assert.ok(startTime !== undefined, "QEMU runs");
      host.kill("SIGKILL");
      const ms = await waitGone(pid, startTime, 2000);
      t.diagnostic(`QEMU gone ${ms.toFixed(1)} ms after its host was SIGKILLed`);
      assert.ok(existsSync(stateDir));
      const diskDir = path.join(diskRoot, path.basename(stateDir));
      assert.ok(existsSync(diskDir));
      const result = await sweepStaleVms({ root, diskRoot });
      assert.deepEqual(result.removedDirs, [stateDir, diskDir]);
      assert.equal(existsSync(stateDir), false);
      assert.equal(existsSync(diskDir), false);
    } finally {
      host.kill("SIGKILL");
      await sweepStaleVms({ root, diskRoot }); // leaves no QEMU behind even when the test fails
    }
  });

  it("a sweep kills a live QEMU whose owner is gone and removes its dir", async () => {
    const root = await freshRoot();
    const dir = path.join(root, "vms", "orphan");
    await mkdir(dir, { recursive: true, mode: 0o700 });
    // QEMU connects to these; in real life they belonged to the dead host.
    const qmp = await listen(path.join(dir, "qmp.sock"));
    // A sweep knows its VM's QEMU by its name (pid and start time guard against reuse).
    const args = buildQemuArgs({
      ...tiny,
      sandbox: "off",
      name: "supermachine-orphan",
      qmpSocketPath: path.join(dir, "qmp.sock"),
    });
    const qemu = spawn(qemuPath!, args, { stdio: "ignore" });
    try {
      await once(qmp, "connection");
      const owner = spawn("true");
      await once(owner, "exit");
      await writeFile(
        path.join(dir, "owner.json"),
        JSON.stringify({
          hostPid: owner.pid,
          hostStartTime: "1",
          qemuPid: qemu.pid,
          qemuStartTime: procStartTime(qemu.pid!),
          createdAt: new Date().toISOString(),
        }),
      );
      const exited = once(qemu, "exit");
      const result = await sweepStaleVms({ root, diskRoot: path.join(root, "disks") });
      assert.deepEqual(result.killedPids, [qemu.pid]);
      assert.deepEqual(result.removedDirs, [dir]);
      assert.deepEqual(await exited, [null, "SIGKILL"]);
      assert.equal(existsSync(dir), false);
    } finally {
      qemu.kill("SIGKILL");
      qmp.close();
    }
  });

  it("launch sweeps stale VMs of its runtime root", async (t) => {
    const root = await freshRoot();
    const stale = path.join(root, "vms", "stale");
    await mkdir(stale, { recursive: true });
    await writeFile(
      path.join(stale, "owner.json"),
      JSON.stringify({ hostPid: 999_999_999, hostStartTime: "1", createdAt: new Date().toISOString() }),
    );
    await withVm(t, { runtimeDir: root }, async () => {
      assert.equal(existsSync(stale), false);
    });
  });
});

async function listen(socketPath: string): Promise<Server> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(socketPath, resolve));
  return server;
}

async function freePort(): Promise<number> {
  const server = createTcpServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as { port: number };
  await new Promise((resolve) => server.close(resolve));
  return port;
}
