import { Image } from "supermachine";

const reference = process.argv[2] ?? "localhost:5000/busybox:1";

// Bake once: the image booted, warmed up and snapshotted (cached by digest, settings and tag).
const image = await Image.builder(reference).name("verifier").memoryMiB(256).warmupTag("v1").build();

// A fresh clone for every candidate: nothing one candidate did is seen by the next.
await using pool = await image.pool().min(1).max(4).restoreOnRelease(true).build();

async function verify(candidate: string): Promise<string> {
  await using vm = await pool.acquire();
  const outcome = await vm
    .execBuilder()
    .stageFile("/tmp/candidate.sh", candidate)
    .argv(["sh", "-n", "/tmp/candidate.sh"]) // "compile": a syntax check…
    .chain(["sh", "/tmp/candidate.sh"]) // …then run it, only if that passed
    .timeout(5_000) // a candidate that loops forever is killed
    .reject(false) // any exit or timeout is an outcome, not an exception
    .output();
  if (outcome.timedOut) return "timed out";
  return outcome.ok ? `ok: ${outcome.stdoutText.trim()}` : `failed (exit ${outcome.exitCode})`;
}

for (const candidate of ['echo "$((6 * 7))"', "if then fi", "exit 3", "while :; do :; done"]) {
  console.log(`${JSON.stringify(candidate)}: ${await verify(candidate)}`);
}
