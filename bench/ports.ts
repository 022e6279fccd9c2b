/**
 * Guest-port rows of `npm run bench` (also `node bench/main.ts --only ports`, or alone:
 * `node bench/ports.ts [--quick]`): HTTP from the host to a busybox httpd in the guest, through
 * `vm.exposeTcp` (the tunnel over the agent channel) and through QEMU's user-mode port forwarding
 * (`hostfwd`), against the same httpd run on the host's loopback. One Node client for all three,
 * without keep-alive (each request a new connection: what a connection costs is part of the
 * figure). See docs/network.md, "Reaching a guest port".
 *
 * The library does not offer `hostfwd` (exposeTcp always tunnels), so the bench installs one by
 * wrapping `QemuProcess.launch` for the one VM it boots; that VM has network `"outbound"`, which
 * `hostfwd` needs, and serves both paths.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { once } from "node:events";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { request } from "node:http";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { Vm } from "../src/index.ts";
import { QemuProcess } from "../src/vmm/qemu-process.ts";
import { busyboxRootfs } from "../test/helpers/vm.ts";
import { summarize, Table } from "./table.ts";

const SMALL = "x".repeat(1024);
const BIG_BYTES = 50 * 1024 * 1024;
const CLIENTS = 8;

/** One GET on a new connection; resolves with the body's length and SHA-256 (hex) once it has all arrived. */
function get(port: number, path: string, hash = false): Promise<{ bytes: number; sha256: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ host: "127.0.0.1", port, path, agent: false }, (res) => {
      const digest = hash ? createHash("sha256") : undefined;
      let bytes = 0;
      res.on("data", (chunk: Buffer) => {
        bytes += chunk.length;
        digest?.update(chunk);
      });
      res.on("end", () =>
        res.statusCode === 200
          ? resolve({ bytes, sha256: digest?.digest("hex") ?? "" })
          : reject(new Error(`GET ${path} on port ${port}: HTTP ${res.statusCode}`)),
      );
      res.on("error", reject);
    });
    req.on("error", reject);
    req.end();
  });
}

async function freePort(): Promise<number> {
  const server = createServer().listen(0, "127.0.0.1");
  await once(server, "listening");
  const { port } = server.address() as { port: number };
  server.close();
  return port;
}

/** Until the server answers (a server started in another process has no event to await). */
async function ready(port: number): Promise<void> {
  for (let i = 0; ; i++) {
    try {
      await get(port, "/small");
      return;
    } catch (error) {
      if (i === 500) throw error;
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }
}

interface Rows {
  latency: string;
  bulk: string;
  concurrent: string;
}

/** Measures one path and adds its three rows (compared with `floor`'s, when given). */
async function measure(
  table: Table,
  label: string,
  port: number,
  big: { sha256: string },
  quick: boolean,
  floor?: Rows,
): Promise<Rows> {
  const rows: Rows = {
    latency: `${label}: GET 1 KiB, new connection each`,
    bulk: `${label}: GET 50 MiB`,
    concurrent: `${label}: GET 1 KiB, ${CLIENTS} clients`,
  };
  const latency: number[] = [];
  for (let i = 0; i < (quick ? 50 : 200); i++) {
    const t0 = performance.now();
    const { bytes } = await get(port, "/small");
    latency.push(performance.now() - t0);
    if (bytes !== SMALL.length) throw new Error(`${rows.latency}: ${bytes} bytes instead of ${SMALL.length}`);
  }
  table.add({
    name: rows.latency,
    unit: "ms",
    summary: summarize(latency),
    ...(floor ? { against: floor.latency } : {}),
  });

  const bulk: number[] = [];
  for (let i = 0; i < (quick ? 2 : 3); i++) {
    const t0 = performance.now();
    const { bytes, sha256 } = await get(port, "/big", true);
    bulk.push(BIG_BYTES / 1e6 / ((performance.now() - t0) / 1000));
    if (bytes !== BIG_BYTES || sha256 !== big.sha256)
      throw new Error(`${rows.bulk}: the body differs from the file`);
  }
  table.add({
    name: rows.bulk,
    unit: "MB/s",
    summary: summarize(bulk),
    higherIsBetter: true,
    ...(floor ? { against: floor.bulk } : {}),
  });

  const perClient = quick ? 25 : 50;
  const concurrent: number[] = [];
  for (let i = 0; i < (quick ? 2 : 3); i++) {
    const t0 = performance.now();
    await Promise.all(
      Array.from({ length: CLIENTS }, async () => {
        for (let j = 0; j < perClient; j++) await get(port, "/small");
      }),
    );
    concurrent.push((CLIENTS * perClient) / ((performance.now() - t0) / 1000));
  }
  table.add({
    name: rows.concurrent,
    unit: "req/s",
    summary: summarize(concurrent),
    higherIsBetter: true,
    ...(floor ? { against: floor.concurrent } : {}),
  });
  return rows;
}

export async function portsBench(table: Table, quick: boolean): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), "sm-bench-ports-"));
  const bigBody = randomBytes(BIG_BYTES);
  const big = { sha256: createHash("sha256").update(bigBody).digest("hex") };
  let host: ChildProcess | undefined;
  let vm: Vm | undefined;
  const launch = QemuProcess.launch;
  try {
    await writeFile(join(dir, "small"), SMALL);
    await writeFile(join(dir, "big"), bigBody);

    // Floor: busybox httpd on the host's loopback.
    const hostPort = await freePort();
    host = spawn("busybox", ["httpd", "-f", "-p", `127.0.0.1:${hostPort}`, "-h", dir], { stdio: "ignore" });
    await ready(hostPort);
    const floor = await measure(table, "host httpd on loopback", hostPort, big, quick);
    host.kill();

    // The guest: the same httpd and files, one VM with a network device and a hostfwd to port 80.
    const forwardPort = await freePort();
    QemuProcess.launch = (options) => {
      options.machine.network = {
        ...options.machine.network,
        hostForwards: [{ hostPort: forwardPort, guestPort: 80 }],
      };
      return launch.call(QemuProcess, options);
    };
    vm = await Vm.start({ rootfs: await busyboxRootfs(), memoryMiB: 256, network: "outbound" });
    QemuProcess.launch = launch;
    await vm.fs.mkdir("/www", { recursive: true });
    await vm.fs.writeFile("/www/small", SMALL);
    await vm.fs.writeFile("/www/big", bigBody);
    await vm.spawn(["httpd", "-f", "-p", "80", "-h", "/www"]);
    await using tunnel = await vm.exposeTcp(0, 80);
    await ready(tunnel.hostPort);
    await measure(table, "exposeTcp (tunnel)", tunnel.hostPort, big, quick, floor);
    await ready(forwardPort);
    await measure(table, "QEMU hostfwd", forwardPort, big, quick, floor);
  } finally {
    QemuProcess.launch = launch;
    host?.kill();
    await vm?.kill();
    await rm(dir, { recursive: true, force: true });
  }
}

if (import.meta.main) {
  const table = new Table();
  await portsBench(table, process.argv.includes("--quick"));
  process.stdout.write(`${table.render()}\n`);
}
