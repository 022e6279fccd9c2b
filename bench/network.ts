/**
 * Network rows of `npm run bench` (also runnable alone: `node bench/network.ts [--quick]`):
 * outbound TCP throughput from a guest to a server on the host's loopback (through 10.0.2.2),
 * under `outbound` (QEMU's user-mode network) and under an allow-list (the same, behind the relay
 * sm-net), against the same transfer host to host on loopback. The same programs everywhere:
 * busybox `dd | nc` sends, a Node server counts. See docs/network.md.
 */
import { execFile } from "node:child_process";
import { once } from "node:events";
import { createServer, type Server } from "node:net";
import { performance } from "node:perf_hooks";
import { promisify } from "node:util";
import { type NetworkPolicy, Vm } from "../src/index.ts";
import { busyboxRootfs } from "../test/helpers/vm.ts";
import { summarize, Table } from "./table.ts";

const MIB = 1024 * 1024;

/** A server that times, per connection, the arrival of `bytes` bytes (from the first one), then closes it. */
async function sink(bytes: number): Promise<{ server: Server; port: number; next(): Promise<number> }> {
  const waiters: ((ms: number) => void)[] = [];
  const server = createServer((socket) => {
    let got = 0;
    let first = 0;
    socket.on("error", () => {});
    socket.on("data", (chunk: Buffer) => {
      if (got === 0) first = performance.now();
      got += chunk.length;
      if (got >= bytes) {
        const ms = performance.now() - first;
        socket.destroy();
        waiters.shift()?.(ms);
      }
    });
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  return {
    server,
    port: (server.address() as { port: number }).port,
    next: () => new Promise((resolve) => waiters.push(resolve)),
  };
}

export async function networkBench(table: Table, quick: boolean): Promise<void> {
  const runs = quick ? 2 : 3;
  const mib = quick ? 8 : 32;
  const bytes = mib * MIB;
  const { server, port, next } = await sink(bytes);
  const send = `dd if=/dev/zero bs=65536 count=${(bytes / 65536).toString()} 2>/dev/null`;
  const rate = (ms: number) => bytes / 1e6 / (ms / 1000);
  const hostRow = `host → host TCP on loopback (busybox dd | nc, ${mib} MiB)`;
  try {
    const host: number[] = [];
    for (let i = 0; i < runs; i++) {
      const done = next();
      await promisify(execFile)("/bin/busybox", [
        "sh",
        "-c",
        `${send} | /bin/busybox nc 127.0.0.1 ${port}`,
      ]).catch(() => {});
      host.push(rate(await done));
    }
    table.add({ name: hostRow, unit: "MB/s", summary: summarize(host), higherIsBetter: true });

    const policies: [string, NetworkPolicy][] = [
      ["outbound", "outbound"],
      ["allow-list (relay)", { allow: [`host:${port}`] }],
    ];
    for (const [label, network] of policies) {
      const vm = await Vm.start({ rootfs: await busyboxRootfs(), memoryMiB: 256, network });
      try {
        const samples: number[] = [];
        for (let i = 0; i < runs; i++) {
          const done = next();
          await vm.exec(["sh", "-c", `${send} | nc 10.0.2.2 ${port}`], { reject: false, timeoutMs: 600_000 });
          samples.push(rate(await done));
        }
        table.add({
          name: `guest → host TCP, ${label} (${mib} MiB)`,
          unit: "MB/s",
          summary: summarize(samples),
          against: hostRow,
          higherIsBetter: true,
        });
      } finally {
        await vm.kill();
      }
    }
  } finally {
    server.close();
  }
}

if (import.meta.main) {
  const table = new Table();
  await networkBench(table, process.argv.includes("--quick"));
  process.stdout.write(`${table.render()}\n`);
}
