import { Image } from "supermachine";

const reference = process.argv[2] ?? "localhost:5000/busybox:1";

const image = await Image.pull(reference);
await using vm = await image.start({ memoryMiB: 256 });

// A long-lived process: started, left running, talked to with other commands.
const service = await vm.spawn(["sh", "-c", "echo 0 > /tmp/count; while :; do sleep 1; done"]);
await vm.exec(["sh", "-c", "until [ -e /tmp/count ]; do sleep 0.1; done"]);
for (let i = 0; i < 3; i++) {
  await vm.exec(["sh", "-c", "echo $(($(cat /tmp/count) + 1)) > /tmp/count"]);
}
console.log(`count: ${new TextDecoder().decode(await vm.readFile("/tmp/count")).trim()}`); // count: 3

// Stop it like a service manager would: a signal, then wait for its exit.
service.kill("SIGTERM");
const outcome = await service.wait();
console.log(`service ended by ${outcome.signal ?? `exit ${outcome.exitCode}`}`);
