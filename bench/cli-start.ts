/**
 * CLI start-time rows of `npm run bench`: `supermachine --help` and `supermachine images` (an
 * empty store) as an installed package runs them — the launcher in bin/ and the bundle in dist/,
 * copied without src/ — against `node -e 0`, runs interleaved. Builds dist/ first.
 */
import { execFileSync, spawnSync } from "node:child_process";
import { cp, mkdir, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { summarize, type Table } from "./table.ts";

const root = new URL("../", import.meta.url).pathname;

export async function cliStartBench(table: Table, quick: boolean): Promise<void> {
  execFileSync(process.execPath, [join(root, "scripts/build.ts")], { cwd: root, stdio: "inherit" });
  const work = await mkdtemp(join(tmpdir(), "sm-cli-bench-"));
  try {
    const pkg = join(work, "supermachine");
    await mkdir(pkg);
    for (const entry of ["bin", "dist", "package.json"])
      await cp(join(root, entry), join(pkg, entry), { recursive: true });
    const env = { ...process.env, SUPERMACHINE_DATA_DIR: join(work, "data") };
    const bin = join(pkg, "bin", "supermachine");
    const commands: Record<string, string[]> = {
      "node -e 0": [process.execPath, "-e", "0"],
      "supermachine --help": [bin, "--help"],
      "supermachine images": [bin, "images"],
    };
    const samples: Record<string, number[]> = Object.fromEntries(
      Object.keys(commands).map((name) => [name, []]),
    );
    const runs = quick ? 10 : 30;
    for (let i = 0; i < runs + 1; i++) {
      for (const [name, [command, ...args]] of Object.entries(commands)) {
        const t0 = performance.now();
        const result = spawnSync(command!, args, { env, stdio: ["ignore", "ignore", "pipe"] });
        const ms = performance.now() - t0;
        if (result.status !== 0) throw new Error(`${name} failed: ${result.stderr}`);
        // The first round fills Node's compile cache, as a user's first run does.
        if (i > 0) samples[name]!.push(ms);
      }
    }
    table.add({ name: "node -e 0", unit: "ms", summary: summarize(samples["node -e 0"]!) });
    for (const name of ["supermachine --help", "supermachine images"]) {
      table.add({
        name: `CLI start: ${name}`,
        unit: "ms",
        summary: summarize(samples[name]!),
        against: "node -e 0",
        budget: "≤ 150 ms",
      });
    }
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}
