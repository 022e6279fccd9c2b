import { Image } from "supermachine";

const reference = process.argv[2] ?? "localhost:5000/busybox:1";

// Pull, flatten, boot, warm up, snapshot: once (cached by image digest, settings and warm-up tag).
const image = await Image.builder(reference)
  .name("busybox_warm")
  .memoryMiB(256)
  .vcpus(1)
  .withWarmup(async (vm) => {
    await vm.exec(["sh", "-c", "echo warmed up > /tmp/warm"]);
  })
  .warmupTag("v1")
  .build();

// Every acquire is a fresh clone of the baked VM, restored in a fraction of a boot.
await using pool = await image.pool().min(1).max(4).build();
await using vm = await pool.acquire();
const out = await vm
  .execBuilder()
  .stageFile("/tmp/main.sh", 'echo "hello from $(uname -s), $(cat /tmp/warm)"')
  .argv(["sh", "-n", "/tmp/main.sh"]) // check the script…
  .chain(["sh", "/tmp/main.sh"]) // …then run it, only if the check passed (like &&)
  .timeout(30_000)
  .output();
console.log(out.stdoutText); // hello from Linux, warmed up
