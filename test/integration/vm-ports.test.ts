/**
 * Guest ports on the host, on real VMs: a busybox httpd started as the workload of a bake, reached
 * in restored clones through `vm.exposeTcp` (many requests, concurrency, a 50 MB body byte for byte,
 * a slow reader with bounded host memory) and `vm.connect` (half-close, a refused port); the
 * workload's status, logs and signals.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { subscribe, unsubscribe } from "node:diagnostics_channel";
import { type IncomingMessage, request } from "node:http";
import { after, before, describe, it, type TestContext } from "node:test";
import { bakeSnapshot } from "../../src/image/index.ts";
import { type Snapshot, Vm } from "../../src/index.ts";
import { EMPTY_IMAGE_CONFIG } from "../../src/oci/index.ts";
import { resolveRootfs } from "../../src/rootfs/index.ts";
import { scratchDir } from "../helpers/scratch.ts";
import { busyboxRootfs, vmSkipReason } from "../helpers/vm.ts";

const BIG_BYTES = 50 * 1024 * 1024;
/** The workload: busybox httpd serving /www (which the warm-up fills; it exists before httpd starts). */
const HTTPD = ["sh", "-c", "mkdir -p /www && exec httpd -f -p 8080 -h /www"];

function get(port: number, path: string): Promise<IncomingMessage> {
  return new Promise((resolve, reject) => {
    const req = request({ host: "127.0.0.1", port, path, agent: false }, resolve);
    req.on("error", reject);
    req.end();
  });
}

async function body(res: IncomingMessage): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of res) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

describe("guest ports and the workload", { timeout: 900_000 }, () => {
  let skip: string | undefined;
  let snapshot: Snapshot;
  const vms: Vm[] = [];

  before(async () => {
    skip = await vmSkipReason();
    if (skip !== undefined) return;
    const dataDir = await scratchDir("sm-ports-");
    const rootfs = await resolveRootfs(await busyboxRootfs(), { dataDir });
    const { snapshot: baked } = await bakeSnapshot({
      name: "busybox-httpd",
      image: {
        reference: "busybox-httpd",
        digest: rootfs.key,
        platform: "linux/amd64",
        config: { ...EMPTY_IMAGE_CONFIG, cmd: HTTPD },
        rootfsPath: rootfs.imagePath,
      },
      execDefaults: { env: { PATH: "/bin:/sbin:/usr/bin:/usr/sbin" }, cwd: "/", user: "root" },
      workload: HTTPD,
      memoryMiB: 256,
      vcpus: 1,
      warmup: async (vm) => {
        await vm.fs.mkdir("/www", { recursive: true });
        await vm.fs.writeFile("/www/index.html", "hello from the guest\n");
        await vm.exec(["sh", "-c", `head -c ${BIG_BYTES} /dev/urandom > /www/big`]);
      },
      warmupTag: "ports-v1",
      dataDir,
    });
    snapshot = baked;
  });

  after(async () => {
    await Promise.all(vms.map((vm) => vm.kill()));
  });

  const restored = async () => {
    const vm = await Vm.restore(snapshot);
    vms.push(vm);
    return vm;
  };

  const vmIt = (name: string, fn: (t: TestContext) => Promise<void>) =>
    it(name, async (t) => {
      if (skip !== undefined) return t.skip(skip);
      try {
        await fn(t);
      } catch (error) {
        for (const vm of vms) t.diagnostic(`VM ${vm.id} console log: ${vm.consoleLogPath}`);
        throw error;
      }
    });

  vmIt("exposeTcp serves 1,000 sequential and 100 concurrent requests from a restored clone", async () => {
    const vm = await restored();
    assert.equal((await vm.workloadStatus()).state, "running");
    await using port = await vm.exposeTcp(0, 8080);
    assert.ok(port.hostPort > 0);
    for (let i = 0; i < 1000; i++) {
      const res = await get(port.hostPort, "/index.html");
      assert.equal(res.statusCode, 200);
      assert.equal((await body(res)).toString(), "hello from the guest\n");
    }
    const answers = await Promise.all(
      Array.from({ length: 100 }, async () =>
        (await body(await get(port.hostPort, "/index.html"))).toString(),
      ),
    );
    assert.deepEqual(new Set(answers), new Set(["hello from the guest\n"]));
  });

  vmIt("a 50 MB response arrives byte for byte, and a slow reader keeps host memory bounded", async () => {
    const vm = await restored();
    const expected = createHash("sha256")
      .update(await vm.fs.readFile("/www/big"))
      .digest("hex");
    await using port = await vm.exposeTcp(0, 8080);
    const fast = await get(port.hostPort, "/big");
    assert.equal(
      createHash("sha256")
        .update(await body(fast))
        .digest("hex"),
      expected,
    );

    // The slow reader: one chunk per event-loop turn; the rest waits in the guest, not on the host.
    const before = process.memoryUsage();
    const slow = await get(port.hostPort, "/big");
    const hash = createHash("sha256");
    let peak = 0;
    let total = 0;
    for await (const chunk of slow) {
      hash.update(chunk as Buffer);
      total += (chunk as Buffer).length;
      const now = process.memoryUsage();
      peak = Math.max(peak, now.arrayBuffers - before.arrayBuffers, now.rss - before.rss);
      await new Promise((resolve) => setImmediate(resolve));
    }
    assert.equal(total, BIG_BYTES);
    assert.equal(hash.digest("hex"), expected);
    assert.ok(peak < 64 * 1024 * 1024, `host memory grew by ${peak} bytes for a slow reader`);
  });

  vmIt("connect(): half-close both ways, and a closed port fails at once with ECONNREFUSED", async () => {
    const vm = await restored();
    // A server that reads until the client ends its side, then answers the byte count.
    await vm.fs.writeFile("/tmp/count.sh", "#!/bin/sh\nwc -c\n", { mode: 0o755 });
    await vm.exec(["sh", "-c", "nc -l -p 9000 -e /tmp/count.sh >/dev/null 2>&1 &"]);
    let socket: Awaited<ReturnType<Vm["connect"]>> | undefined;
    for (let i = 0; i < 100 && socket === undefined; i++) {
      socket = await vm.connect(9000).catch((error: { code?: string }) => {
        if (error.code !== "ECONNREFUSED") throw error;
        return undefined; // not listening yet
      });
    }
    assert.ok(socket, "the guest's nc never listened");
    socket.end(Buffer.alloc(300_000, 1));
    const chunks: Buffer[] = [];
    for await (const chunk of socket) chunks.push(chunk as Buffer);
    assert.equal(Buffer.concat(chunks).toString().trim(), "300000");

    await assert.rejects(vm.connect(9999), { code: "ECONNREFUSED", port: 9999 });
  });

  vmIt("workloadSignal(SIGTERM) stops a workload that handles it; its exit and logs are seen", async () => {
    const vm = await restored();
    // The baked httpd is the workload: replace it with one that traps TERM.
    assert.equal((await vm.workloadStatus()).state, "running");
    await vm.workloadSignal("SIGKILL");
    const exits: unknown[] = [];
    const onExit = (message: unknown) => exits.push(message);
    subscribe("supermachine:vm:workload-exit", onExit);
    try {
      while ((await vm.workloadStatus()).state === "running") await new Promise((r) => setImmediate(r));
      await vm.startWorkload([
        "sh",
        "-c",
        'trap "echo bye; exit 7" TERM; echo ready; while :; do sleep 1; done',
      ]);
      const logs = vm.workloadLogs({ follow: true });
      let text = "";
      let signalled = false;
      for await (const chunk of logs) {
        text += Buffer.from(chunk as Uint8Array).toString();
        if (text.includes("ready\n") && !signalled) {
          signalled = true;
          await vm.workloadSignal("SIGTERM");
        }
      }
      // The TERM reaches the whole process group: when it lands while `sleep` runs, the shell
      // also reports its child's end ("Terminated") before the trap's "bye".
      assert.match(text, /^ready\n(Terminated\n)?bye\n$/);
      const status = await vm.workloadStatus();
      assert.deepEqual([status.state, status.exitCode], ["exited", 7]);
      assert.ok(exits.some((e) => (e as { status: { exitCode: number } }).status.exitCode === 7));
    } finally {
      unsubscribe("supermachine:vm:workload-exit", onExit);
    }
  });

  vmIt(
    "vm.fs: every method, Node-style error codes, and a watch that sees create, modify and delete",
    async () => {
      const vm = await restored();
      const fs = vm.fs;
      assert.equal(await fs.mkdir("/t/a/b", { recursive: true }), "/t");
      await fs.writeFile("/t/a/b/f.txt", "one");
      assert.equal(await fs.readFile("/t/a/b/f.txt", { encoding: "utf8" }), "one");
      const st = await fs.stat("/t/a/b/f.txt");
      assert.equal(st.isFile(), true);
      assert.equal(st.size, 3);
      await fs.chmod("/t/a/b/f.txt", 0o600);
      assert.equal((await fs.stat("/t/a/b/f.txt")).mode & 0o777, 0o600);
      await fs.symlink("b/f.txt", "/t/a/link");
      assert.equal(await fs.readlink("/t/a/link"), "b/f.txt");
      assert.equal((await fs.lstat("/t/a/link")).isSymbolicLink(), true);
      assert.equal(await fs.realpath("/t/a/link"), "/t/a/b/f.txt");
      await fs.rename("/t/a/b/f.txt", "/t/a/b/g.txt");
      assert.deepEqual(await fs.readdir("/t/a/b"), ["g.txt"]);
      const entries = await fs.readdir("/t/a", { withFileTypes: true });
      assert.deepEqual(entries.map((e) => [e.name, e.isDirectory(), e.isSymbolicLink()]).sort(), [
        ["b", true, false],
        ["link", false, true],
      ]);
      await fs.truncate("/t/a/b/g.txt", 1);
      assert.equal((await fs.stat("/t/a/b/g.txt")).size, 1);
      assert.equal(await fs.exists("/t/a/b/g.txt"), true);
      assert.equal(await fs.exists("/t/nope"), false);
      await assert.rejects(fs.stat("/t/nope"), { code: "ENOENT", syscall: "stat", path: "/t/nope" });
      await assert.rejects(fs.mkdir("/t/a"), { code: "EEXIST" });
      await assert.rejects(fs.readdir("/t/a/b/g.txt"), { code: "ENOTDIR" });
      await assert.rejects(fs.rm("/t/a"), { code: "EISDIR" });

      const watcher = fs.watch("/t", { recursive: true });
      await watcher.ready;
      const seen: string[] = [];
      const events = (async () => {
        for await (const event of watcher) {
          seen.push(`${event.eventType} ${event.filename}`);
          if (event.eventType === "delete" && event.filename === "a/b/new.txt") break;
        }
      })();
      await fs.writeFile("/t/a/b/new.txt", "x");
      await vm.exec(["sh", "-c", "echo more >> /t/a/b/new.txt"]);
      await fs.rm("/t/a/b/new.txt");
      await events;
      watcher.close();
      assert.ok(seen.includes("create a/b/new.txt") || seen.includes("rename a/b/new.txt"), seen.join(", "));
      assert.ok(seen.includes("modify a/b/new.txt"), seen.join(", "));
      assert.ok(seen.includes("delete a/b/new.txt"), seen.join(", "));

      await fs.rm("/t", { recursive: true });
      assert.equal(await fs.exists("/t"), false);
      await fs.rm("/t", { recursive: true, force: true });
    },
  );

  vmIt("ports close with the VM", async () => {
    const vm = await restored();
    const port = await vm.exposeTcp(0, 8080);
    assert.equal((await get(port.hostPort, "/index.html")).statusCode, 200);
    await vm.stop();
    await assert.rejects(get(port.hostPort, "/index.html"), { code: "ECONNREFUSED" });
  });
});
