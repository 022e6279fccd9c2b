/**
 * Server rows of `npm run bench` (also `node bench/main.ts --only serve`, or alone:
 * `node bench/serve.ts [--quick]`): `supermachine serve` on loopback (a separate process, with a
 * token and a pool declared on its command line) used through `supermachine/client`, against the
 * same work on an embedded pool of the same snapshot and size in this process (the floor):
 *
 * - a one-shot exec of `echo x`: acquire → exec → release as one request (`pool.exec()`) against
 *   `acquire()` → `exec()` → `release()` on the embedded pool; both pools kept warm;
 * - that exec's requests/s at 1, 8 and 32 concurrent clients (each its own `connect()`) against
 *   as many concurrent callers of the embedded pool;
 * - stdout throughput of a streamed exec (`dd` of 64 MiB) over the WebSocket of `lease.spawn()`
 *   against `lease.spawn()` on an embedded VM.
 *
 * Both pools (POOL_VMS VMs each) stay up for the whole section and every measurement alternates
 * between them, so changes of load on a shared machine hit both alike.
 */
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { connect, type RemotePool } from "../src/client/index.ts";
import { type ExecEvent, Image, type Pool } from "../src/index.ts";
import { busyboxOci } from "../test/helpers/busybox-oci.ts";
import { scratchDir } from "../test/helpers/scratch.ts";
import { startServe } from "../test/helpers/serve.ts";
import { summarize, Table } from "./table.ts";

const SNAPSHOT = "bench-serve";
const POOL_VMS = 4;
const CONCURRENCY = [1, 8, 32];
const STREAM_MIB = 64;
const DD = ["dd", "if=/dev/zero", "bs=1048576", `count=${STREAM_MIB}`];

/** What each side offers the bench: the one-shot exec, and a streamed exec's stdout byte count. */
interface Side {
  label: string;
  /** One caller's one-shot exec of `echo x` (`caller` < the concurrency of the round). */
  oneShot(caller: number): Promise<void>;
  /** Spawns {@link DD} on a VM of the pool and counts its stdout to the end. */
  streamBytes(): Promise<number>;
  /** Sets up `n` concurrent callers (a client each, for the server). */
  callers(n: number): Promise<void>;
}

/** Adds a row for each side (the first is the floor the others are compared with). */
function addRows(
  table: Table,
  sides: readonly Side[],
  what: string,
  unit: string,
  samples: readonly number[][],
): void {
  const floor = `${sides[0]!.label}: ${what}`;
  for (const [i, side] of sides.entries()) {
    table.add({
      name: `${side.label}: ${what}`,
      unit,
      summary: summarize(samples[i]!),
      ...(unit === "ms" ? {} : { higherIsBetter: true }),
      ...(i > 0 ? { against: floor } : {}),
    });
  }
}

/** Every measurement alternates between the sides, so changes of load hit them alike. */
async function measure(table: Table, sides: readonly Side[], quick: boolean): Promise<void> {
  // Warm every VM of each pool (TCG translates the agent's and the command's code on first use).
  for (const side of sides) {
    await side.callers(POOL_VMS);
    for (let i = 0; i < 3; i++)
      await Promise.all(Array.from({ length: POOL_VMS }, (_, c) => side.oneShot(c)));
  }

  const latency: number[][] = sides.map(() => []);
  for (let i = 0; i < (quick ? 30 : 100); i++) {
    for (const [s, side] of sides.entries()) {
      const t0 = performance.now();
      await side.oneShot(0);
      latency[s]!.push(performance.now() - t0);
    }
  }
  addRows(table, sides, "one-shot exec `echo x`", "ms", latency);

  for (const clients of CONCURRENCY) {
    for (const side of sides) await side.callers(clients);
    const requests = Math.max(clients * 2, quick ? 32 : 96);
    const rates: number[][] = sides.map(() => []);
    for (let round = 0; round < (quick ? 2 : 3); round++) {
      for (const [s, side] of sides.entries()) {
        let next = 0;
        const t0 = performance.now();
        await Promise.all(
          Array.from({ length: clients }, async (_, caller) => {
            while (next < requests) {
              next++;
              await side.oneShot(caller);
            }
          }),
        );
        rates[s]!.push(requests / ((performance.now() - t0) / 1000));
      }
    }
    addRows(table, sides, `one-shot exec, ${clients} concurrent client(s)`, "req/s", rates);
  }

  const bytes = STREAM_MIB * 1024 * 1024;
  const what = `stdout of a streamed exec (dd ${STREAM_MIB} MiB)`;
  const stream: number[][] = sides.map(() => []);
  for (let i = 0; i < (quick ? 2 : 4); i++) {
    for (const [s, side] of sides.entries()) {
      const t0 = performance.now();
      const got = await side.streamBytes();
      stream[s]!.push(bytes / 1e6 / ((performance.now() - t0) / 1000));
      if (got !== bytes) throw new Error(`${side.label}: ${what}: ${got} bytes instead of ${bytes}`);
    }
  }
  addRows(table, sides, what, "MB/s", stream);
}

function checkEcho(stdout: string, where: string): void {
  if (stdout !== "x\n") throw new Error(`${where}: echo x printed ${JSON.stringify(stdout)}`);
}

async function countStdout(handle: AsyncIterable<ExecEvent>): Promise<number> {
  let bytes = 0;
  for await (const event of handle) if (event.kind === "stdout") bytes += event.data.length;
  return bytes;
}

function embedded(pool: Pool): Side {
  return {
    label: "embedded pool",
    async oneShot() {
      const lease = await pool.acquire();
      try {
        checkEcho((await lease.exec(["echo", "x"])).stdoutText, this.label);
      } finally {
        await lease.release();
      }
    },
    async streamBytes() {
      await using lease = await pool.acquire();
      await using handle = await lease.spawn(DD);
      return await countStdout(handle);
    },
    async callers() {},
  };
}

function served(url: string, token: string): Side & { close(): Promise<void> } {
  let pools: RemotePool[] = [];
  let clients: ReturnType<typeof connect>[] = [];
  const close = async () => {
    await Promise.all(clients.map((c) => c.close()));
    clients = [];
    pools = [];
  };
  return {
    label: "server (client over loopback)",
    async oneShot(caller) {
      checkEcho((await pools[caller]!.exec(["echo", "x"])).stdoutText, this.label);
    },
    async streamBytes() {
      const lease = await pools[0]!.acquire();
      try {
        await using handle = await lease.spawn(DD);
        return await countStdout(handle);
      } finally {
        await lease.release();
      }
    },
    async callers(n) {
      await close();
      clients = Array.from({ length: n }, () => connect(url, { token }));
      pools = await Promise.all(clients.map((c) => c.pool(SNAPSHOT)));
    },
    close,
  };
}

export async function serveBench(table: Table, quick: boolean): Promise<void> {
  const dataDir = await scratchDir("sm-bench-serve-");
  const image = await Image.builder(`oci:${await busyboxOci(join(dataDir, "oci"))}`)
    .name(SNAPSHOT)
    .memoryMiB(256)
    .pullOptions({ dataDir })
    .build();

  await using pool = await image.pool().min(POOL_VMS).max(POOL_VMS).restoreOnRelease(false).build();
  const server = await startServe({
    dataDir,
    args: [
      "--pool",
      `${SNAPSHOT}:min=${POOL_VMS},max=${POOL_VMS},restore-on-release=false`,
      "--max-vms",
      String(POOL_VMS),
    ],
  });
  const remote = served(server.url, server.token);
  try {
    await measure(table, [embedded(pool), remote], quick);
  } finally {
    await remote.close();
    server.child.kill("SIGTERM");
    const code = await server.exited;
    if (code !== 0) process.stderr.write(`bench: supermachine serve exited with ${code}\n`);
  }
}

if (import.meta.main) {
  const table = new Table();
  await serveBench(table, process.argv.includes("--quick"));
  process.stdout.write(`${table.render()}\n`);
}
