import { Image } from "supermachine";

const reference = process.argv[2] ?? "localhost:5000/busybox:1";

// Bake: pull, flatten, boot, run the warm-up, snapshot. The same inputs reuse the snapshot.
const image = await Image.builder(reference)
  .name("pool_demo")
  .memoryMiB(256)
  .withWarmup(async (vm) => {
    await vm.exec(["sh", "-c", "echo baked > /tmp/state"]);
  })
  .warmupTag("v1")
  .build();

// One clone, restored from the snapshot: it starts where the warm-up left off.
{
  await using vm = await image.start();
  console.log((await vm.exec(["cat", "/tmp/state"])).stdoutText.trim()); // baked
}

// A clone restored and paused ahead of time, activated when needed.
{
  const prestarted = await image.prestart();
  await using vm = await prestarted.activate();
  console.log(`activated in ${vm.timings.totalMs.toFixed(0)} ms`);
}

// A pool: warm clones, a fresh one for every acquire, at most 2 at a time.
await using pool = await image.pool().min(1).max(2).build();
const results = await Promise.all(
  ["a", "b", "c"].map(async (name) => {
    await using vm = await pool.acquire();
    await vm.exec(["sh", "-c", `echo ${name} >> /tmp/state`]);
    return (await vm.exec(["cat", "/tmp/state"])).stdoutText.split("\n").filter(Boolean).join(",");
  }),
);
console.log(results); // [ 'baked,a', 'baked,b', 'baked,c' ]: no clone sees another's writes
console.log(pool.stats().totalAcquired); // 3
