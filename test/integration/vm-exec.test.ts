/**
 * Exec semantics on a real VM (QEMU; TCG on hosts without KVM). One VM serves the whole file so
 * the cases stay fast; each case leaves the guest as it found it.
 */
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { describe } from "node:test";
import { ExecError, ExecStartError, ExecTimeoutError, SupermachineError, Vm } from "../../src/index.ts";
import { busyboxRootfs, sharedVm } from "../helpers/vm.ts";

describe("exec in a VM", { timeout: 600_000 }, () => {
  const { it: vmIt } = sharedVm(async () => Vm.start({ rootfs: await busyboxRootfs(), memoryMiB: 256 }));

  vmIt("runs a command and reports its output and exit code", async (vm) => {
    const out = await vm
      .execBuilder()
      .argv(["sh", "-c", "echo hi; echo oops >&2; exit 3"])
      .reject(false)
      .output();
    assert.equal(out.exitCode, 3);
    assert.equal(out.signal, null);
    assert.equal(out.stdoutText, "hi\n");
    assert.equal(out.stderrText, "oops\n");
    assert.equal(out.timedOut, false);
    assert.ok(out.durationMs > 0);
    assert.ok(out.peakRssKiB > 0, `peakRssKiB ${out.peakRssKiB}`);
  });

  vmIt("output() rejects on a non-zero exit with the outcome attached", async (vm) => {
    await assert.rejects(vm.exec(["sh", "-c", "exit 7"]), (error: unknown) => {
      assert.ok(error instanceof ExecError);
      assert.equal(error.code, "EXEC_FAILED");
      assert.equal(error.exitCode, 7);
      return true;
    });
  });

  vmIt("reports every exit code from 0 to 255", async (vm) => {
    const script = 'code=$1; exit "$code"';
    for (let code = 0; code <= 255; code++) {
      const out = await vm
        .execBuilder()
        .argv(["sh", "-c", script, "sh", String(code)])
        .reject(false)
        .output();
      assert.equal(out.exitCode, code);
    }
  });

  vmIt("reports death by signal", async (vm) => {
    const out = await vm.execBuilder().argv(["sh", "-c", "kill -9 $$"]).reject(false).output();
    assert.equal(out.exitCode, null);
    assert.equal(out.signal, "SIGKILL");
    await assert.rejects(vm.exec(["sh", "-c", "kill -TERM $$"]), ExecError);
  });

  vmIt("streams 10 MiB of stdout intact", async (vm) => {
    const size = 10 * 1024 * 1024;
    const out = await vm.exec(["sh", "-c", `yes 0123456789abcdef | head -c ${size}`]);
    assert.equal(out.stdout.byteLength, size);
    const expected = Buffer.alloc(size, "0123456789abcdef\n");
    assert.ok(Buffer.from(out.stdout).equals(expected));
  });

  vmIt("keeps 4 MiB of stdout and 4 MiB of stderr written at the same time apart and intact", async (vm) => {
    // Both pipes fill while the agent splices frames out of them (docs/agent.md).
    const size = 4 * 1024 * 1024;
    const out = await vm.exec([
      "sh",
      "-c",
      `yes out-line | head -c ${size} & yes err-line | head -c ${size} >&2; wait`,
    ]);
    assert.ok(Buffer.from(out.stdout).equals(Buffer.alloc(size, "out-line\n")));
    assert.ok(Buffer.from(out.stderr).equals(Buffer.alloc(size, "err-line\n")));
  });

  vmIt("round-trips binary stdin", async (vm) => {
    const input = randomBytes(3 * 1024 * 1024 + 17);
    const out = await vm.execBuilder().argv(["cat"]).stdin(input).output();
    assert.ok(Buffer.from(out.stdout).equals(input));
  });

  vmIt("streams stdin and stdout interactively through spawn()", async (vm) => {
    const handle = await vm
      .execBuilder()
      .argv(["sh", "-c", "while read line; do echo got:$line; done"])
      .spawn();
    assert.ok(handle.pid > 1);
    await handle.stdin.write(new TextEncoder().encode("one\ntwo\n"));
    await handle.stdin.end();
    const chunks: Uint8Array[] = [];
    for await (const event of handle) if (event.kind === "stdout") chunks.push(event.data);
    const outcome = await handle.wait();
    assert.equal(outcome.exitCode, 0);
    assert.equal(Buffer.concat(chunks).toString(), "got:one\ngot:two\n");
  });

  vmIt("kills a whole process tree on timeout", async (vm) => {
    const started = Date.now();
    await assert.rejects(
      vm
        .execBuilder()
        .argv(["sh", "-c", "sleep 100 & sleep 100 & wait"])
        .timeout(1_000)
        .killGrace(500)
        .output(),
      (error: unknown) => {
        assert.ok(error instanceof ExecTimeoutError);
        assert.equal(error.code, "EXEC_TIMEOUT");
        assert.equal(error.timeoutMs, 1_000);
        assert.equal(error.outcome.timedOut, true);
        return true;
      },
    );
    assert.ok(Date.now() - started < 20_000);
    const left = await vm
      .execBuilder()
      .argv(["sh", "-c", "ps -o pid,args | grep 'sleep 100' | grep -v grep || true"])
      .output();
    assert.equal(left.stdoutText, "");
  });

  vmIt("fails with a typed error when the program does not exist", async (vm) => {
    await assert.rejects(vm.exec(["/no/such/program"]), (error: unknown) => {
      assert.ok(error instanceof ExecStartError);
      assert.equal(error.code, "EXEC_NOT_FOUND");
      return true;
    });
    await assert.rejects(vm.execBuilder().argv(["true"]).cwd("/no/such/dir").output(), (error: unknown) => {
      assert.ok(error instanceof ExecStartError);
      assert.equal(error.code, "EXEC_START");
      return true;
    });
  });

  vmIt("stages files and chains steps like &&", async (vm) => {
    const out = await vm
      .execBuilder()
      .stageFile("/tmp/stage/hello.sh", "#!/bin/sh\necho staged $1\n", { mode: 0o755 })
      .argv(["/tmp/stage/hello.sh", "one"])
      .chain(["sh", "-c", "echo second"])
      .output();
    assert.equal(out.stdoutText, "staged one\nsecond\n");
    const failed = await vm
      .execBuilder()
      .argv(["sh", "-c", "echo first; exit 4"])
      .chain(["sh", "-c", "echo never"])
      .reject(false)
      .output();
    assert.equal(failed.exitCode, 4);
    assert.equal(failed.stdoutText, "first\n");
  });

  vmIt("applies env, cwd and user", async (vm) => {
    const out = await vm
      .execBuilder()
      .argv(["sh", "-c", 'echo "$GREETING $(pwd) $(id -u):$(id -g) $HOME"'])
      .env({ GREETING: "hello" })
      .cwd("/tmp")
      .user("app")
      .output();
    assert.equal(out.stdoutText, "hello /tmp 1000:1000 /home/app\n");
    const numeric = await vm.execBuilder().argv(["id", "-u"]).user("4242:4243").output();
    assert.equal(numeric.stdoutText, "4242\n");
  });

  vmIt("runs on a terminal with a window size that follows resize", async (vm) => {
    const out = await vm.execBuilder().argv(["stty", "size"]).tty().winsize(40, 100).output();
    assert.equal(out.stdoutText.trim(), "40 100");
    const handle = await vm
      .execBuilder()
      .argv(["sh", "-c", "read x; stty size"])
      .tty()
      .winsize(24, 80)
      .spawn();
    handle.resize(50, 132);
    await handle.stdin.write(new TextEncoder().encode("go\r"));
    const outcome = await handle.wait();
    assert.match(outcome.stdoutText, /50 132/);
  });

  vmIt("delivers signals to a running process", async (vm) => {
    const handle = await vm.execBuilder().argv(["sleep", "100"]).spawn();
    await handle.kill("SIGTERM");
    const outcome = await handle.wait();
    assert.equal(outcome.signal, "SIGTERM");
  });

  vmIt("writes and reads back a 50 MB file byte for byte", async (vm) => {
    const data = randomBytes(50 * 1000 * 1000);
    await vm.writeFile("/tmp/big.bin", data, { mode: 0o600 });
    const back = await vm.readFile("/tmp/big.bin");
    assert.equal(back.byteLength, data.byteLength);
    assert.equal(
      createHash("sha256").update(back).digest("hex"),
      createHash("sha256").update(data).digest("hex"),
    );
    const mode = await vm.exec(["stat", "-c", "%a", "/tmp/big.bin"]);
    assert.equal(mode.stdoutText, "600\n");
    await vm.exec(["rm", "/tmp/big.bin"]);
  });

  vmIt("reports a missing file as a typed error", async (vm) => {
    await assert.rejects(vm.readFile("/no/such/file"), (error: unknown) => {
      assert.ok(SupermachineError.is(error));
      assert.equal(error.code, "GUEST_IO");
      return true;
    });
  });

  vmIt("never writes to the root filesystem it booted from", async (vm) => {
    await vm.exec(["sh", "-c", "echo changed > /etc/sm-written && sync"]);
    const again = await Vm.start({ rootfs: await busyboxRootfs(), memoryMiB: 256 });
    try {
      const out = await again.exec(["sh", "-c", "test -e /etc/sm-written && echo present || echo absent"]);
      assert.equal(out.stdoutText, "absent\n");
    } finally {
      await again.stop();
    }
  });
});
