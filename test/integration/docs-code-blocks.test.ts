/**
 * Docs that run: every fenced code block in README.md and docs/*.md is code that the suite checks.
 * A block is one of:
 * - `ts`, right after `<!-- example: examples/NAME.ts -->`: the file word for word (examples/ is
 *   type-checked by `npm run typecheck`, and run below or by readme-example.test.ts);
 * - `sh`, right after `<!-- run -->`: run below with bash -e, `supermachine` on PATH, `$ROOTFS`
 *   (the bundled busybox root filesystem) and `$IMAGE` (it as an OCI layout);
 * - any language, right after `<!-- not run: WHY -->`: the reason names what checks it instead;
 * - no language or `text`: not code (diagrams, synopses, output).
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, it } from "node:test";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { scratchDir } from "../helpers/scratch.ts";
import { busyboxRootfs, vmTest } from "../helpers/vm.ts";

const run = promisify(execFile);
const root = fileURLToPath(new URL("../../", import.meta.url));

/**
 * Docs whose blocks are still sketches of internal APIs (with `…` in them), owned by the areas
 * they describe. Convert a doc's blocks, then take it off this list; the last test fails for a
 * doc listed here that has nothing left to convert.
 */
const NOT_YET_CONVERTED = new Set([
  "docs/fixtures.md",
  "docs/oci.md",
  "docs/pool.md",
  "docs/rootfs.md",
  "docs/snapshots.md",
  "docs/vmm.md",
]);

interface Block {
  doc: string;
  line: number;
  lang: string;
  annotation: string | undefined;
  text: string;
}

function blocksOf(doc: string): Block[] {
  const lines = readFileSync(join(root, doc), "utf8").split("\n");
  const blocks: Block[] = [];
  for (let i = 0; i < lines.length; i++) {
    const open = /^```(\S*)\s*$/.exec(lines[i]!);
    if (!open) continue;
    const end = lines.findIndex((line, j) => j > i && /^```\s*$/.test(line));
    assert.ok(end > i, `${doc}:${i + 1}: unclosed code block`);
    const before = lines[i - 1]?.trim() ?? "";
    blocks.push({
      doc,
      line: i + 1,
      lang: open[1]!,
      annotation: /^<!--\s*(.*?)\s*-->$/.exec(before)?.[1],
      text: `${lines.slice(i + 1, end).join("\n")}\n`,
    });
    i = end;
  }
  return blocks;
}

const docs = [
  "README.md",
  ...readdirSync(join(root, "docs"))
    .filter((f) => f.endsWith(".md"))
    .map((f) => `docs/${f}`),
];
const blocks = docs.flatMap(blocksOf);
const isCode = (b: Block) => b.lang !== "" && b.lang !== "text";

/** What is wrong with a block, or undefined. */
function problem(block: Block): string | undefined {
  if (!isCode(block)) return undefined;
  const where = `${block.doc}:${block.line}`;
  const a = block.annotation ?? "";
  if (/^not run: .{10,}/.test(a)) return undefined;
  if (block.lang === "ts") {
    const path = /^example: (examples\/[\w.-]+\.ts)$/.exec(a)?.[1];
    if (path === undefined) return `${where}: a ts block must follow <!-- example: examples/NAME.ts -->`;
    let file: string;
    try {
      file = readFileSync(join(root, path), "utf8");
    } catch {
      return `${where}: ${path} does not exist`;
    }
    return file === block.text ? undefined : `${where}: differs from ${path}`;
  }
  if (block.lang === "sh")
    return a === "run"
      ? undefined
      : `${where}: an sh block must follow <!-- run --> or <!-- not run: WHY -->`;
  return `${where}: a ${block.lang} block must follow <!-- not run: WHY --> (or be text)`;
}

describe("code blocks in README.md and docs/", () => {
  it("each is an example file word for word, run here, or says what checks it", () => {
    const problems = blocks
      .filter((b) => !NOT_YET_CONVERTED.has(b.doc))
      .map(problem)
      .filter(Boolean);
    assert.deepEqual(problems, []);
  });

  it("the docs not yet converted still have blocks to convert", () => {
    for (const doc of NOT_YET_CONVERTED) {
      const open = blocks
        .filter((b) => b.doc === doc)
        .map(problem)
        .filter(Boolean);
      assert.ok(open.length > 0, `${doc} has nothing left to convert: take it off NOT_YET_CONVERTED`);
    }
  });
});

vmTest(
  "the sh blocks marked run, and the examples, run",
  async ({ t }) => {
    const work = await scratchDir("sm-docs-");
    const rootfs = await busyboxRootfs();
    const layout = (
      await run("bash", [join(root, "scripts/build-busybox-oci.sh"), join(work, "busybox-oci")])
    ).stdout.trim();
    const env = {
      ...process.env,
      PATH: `${join(root, "bin")}:${process.env.PATH}`,
      SUPERMACHINE_DATA_DIR: join(work, "data"),
      SUPERMACHINE_RUNTIME_DIR: join(work, "run"),
      ROOTFS: rootfs,
      IMAGE: `oci:${layout}`,
    };
    for (const block of blocks.filter((b) => b.lang === "sh" && b.annotation === "run")) {
      try {
        await run("bash", ["-euo", "pipefail", "-c", block.text], { cwd: work, env, timeout: 300_000 });
      } catch (error) {
        const e = error as { stdout?: string; stderr?: string };
        t.diagnostic(`stdout: ${e.stdout}\nstderr: ${e.stderr}`);
        assert.fail(`${block.doc}:${block.line} failed: ${(error as Error).message}`);
      }
    }

    const example = async (name: string, arg: string) =>
      (
        await run(process.execPath, ["--conditions=source", join(root, "examples", name), arg], {
          env,
          timeout: 300_000,
        })
      ).stdout;
    assert.match(await example("first-vm.ts", rootfs), /^accelerator: (kvm|tcg)\nLinux 6\.1\.\d+\n$/);
    assert.equal(await example("network.ts", rootfs), "hello from the host\nadmin refused\n");
    assert.equal(
      await example("verifier-loop.ts", env.IMAGE),
      '"echo \\"$((6 * 7))\\"": ok: 42\n"if then fi": failed (exit 2)\n"exit 3": failed (exit 3)\n"while :; do :; done": timed out\n',
    );
    assert.equal(await example("long-lived-service.ts", env.IMAGE), "count: 3\nservice ended by SIGTERM\n");
    assert.equal(await example("mounts.ts", rootfs), "from the host\n/etc/passwd\ntrue\n");
    assert.match(
      await example("snapshots-and-pools.ts", env.IMAGE),
      /^baked\nactivated in \d+ ms\n\[ 'baked,a', 'baked,b', 'baked,c' \]\n3\n$/,
    );
  },
  { timeout: 600_000 },
);
