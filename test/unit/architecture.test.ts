/**
 * The layering rules of docs/architecture.md, checked on the source tree so that they stay true:
 * modules import only modules below them, through their barrel; the leaves import only `errors`
 * and `internal`; the CLI only the public entry (and the server, for `serve`); the server only the
 * public entry and the wire protocol; the client and the wire protocol no VM code (types of the
 * public entry, `errors`, and `internal`, whose pure helpers and values they share with the
 * library); no import cycles between files; only `src/vmm/` talks QMP.
 */
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { describe, it } from "node:test";
import { fileURLToPath } from "node:url";

const SRC = resolve(dirname(fileURLToPath(import.meta.url)), "../../src");

/** Layers, bottom up. A module may import modules of a lower layer only (and itself). */
const LAYERS: Record<string, number> = {
  errors: 0,
  internal: 1,
  oci: 2,
  rootfs: 2,
  vmm: 2,
  agent: 2,
  ninep: 2,
  snapshot: 3,
  vm: 4,
  pool: 5,
  image: 6,
  index: 7,
  testing: 7,
  wire: 8,
  server: 9,
  client: 9,
  cli: 10,
};
/** Modules that are one file rather than a folder with a barrel. */
const FILE_MODULES = new Set(["errors", "index", "testing"]);

export interface SourceFile {
  /** Path relative to `src/`, e.g. `vm/boot.ts`. */
  path: string;
  text: string;
}

export interface Import {
  from: string;
  to: string;
  typeOnly: boolean;
}

function listSources(dir: string, base = dir): SourceFile[] {
  const out: SourceFile[] = [];
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const full = join(dir, entry.name);
    if (entry.isDirectory()) out.push(...listSources(full, base));
    else if (entry.name.endsWith(".ts"))
      out.push({ path: relative(base, full), text: readFileSync(full, "utf8") });
  }
  return out;
}

/**
 * Every relative import of every file (static, side-effect only, re-exports and dynamic), resolved
 * to `src/`-relative paths.
 */
export function importsOf(files: readonly SourceFile[]): Import[] {
  const out: Import[] = [];
  const pattern =
    /(?:^|\n)\s*(import|export)\s+(type\s+)?[^;]*?from\s+"(\.[^"]+)"|import\(\s*"(\.[^"]+)"\s*\)|(?:^|\n)\s*import\s+"(\.[^"]+)"/g;
  for (const file of files) {
    for (const match of file.text.matchAll(pattern)) {
      const spec = match[3] ?? match[4] ?? match[5];
      if (spec === undefined) continue;
      const to = relative(SRC, resolve(SRC, dirname(file.path), spec));
      out.push({ from: file.path, to, typeOnly: match[2] !== undefined });
    }
  }
  return out;
}

export function moduleOf(path: string): string {
  const first = path.split("/")[0] ?? "";
  return first.endsWith(".ts") ? first.slice(0, -3) : first;
}

/** Broken rules, one line each (empty: all good). */
export function layeringViolations(files: readonly SourceFile[]): string[] {
  const problems: string[] = [];
  for (const file of files) {
    if (!(moduleOf(file.path) in LAYERS))
      problems.push(`${file.path}: module ${moduleOf(file.path)} has no layer`);
  }
  for (const { from, to, typeOnly } of importsOf(files)) {
    const a = moduleOf(from);
    const b = moduleOf(to);
    if (a === b) continue;
    const rankA = LAYERS[a];
    const rankB = LAYERS[b];
    if (rankA === undefined || rankB === undefined) {
      problems.push(`${from} imports ${to}: unknown module`);
      continue;
    }
    if (rankB >= rankA)
      problems.push(`${from} imports ${to}: ${a} may not import ${b} (same or higher layer)`);
    if (!FILE_MODULES.has(b) && to !== `${b}/index.ts`) {
      problems.push(`${from} imports ${to}: reach ${b} through its barrel ${b}/index.ts`);
    }
    if (a === "cli" && b !== "index" && b !== "testing" && b !== "server") {
      problems.push(`${from} imports ${to}: the CLI uses the public API (src/index.ts) only`);
    }
    if (a === "server" && b !== "index" && b !== "wire") {
      problems.push(
        `${from} imports ${to}: the server uses the public API (src/index.ts) and the wire protocol only`,
      );
    }
    if (
      (a === "client" || a === "wire") &&
      !(b === "errors" || b === "internal" || b === "wire" || (b === "index" && typeOnly))
    ) {
      problems.push(
        `${from} imports ${to}: the ${a} carries no VM code (types from src/index.ts with import type, errors, internal${a === "client" ? ", wire" : ""})`,
      );
    }
  }
  return problems;
}

/** Import cycles between files (type-only imports included), each as `a -> b -> a`. */
export function importCycles(files: readonly SourceFile[]): string[] {
  const edges = new Map<string, string[]>();
  for (const { from, to } of importsOf(files)) {
    const list = edges.get(from) ?? [];
    list.push(to);
    edges.set(from, list);
  }
  const cycles: string[] = [];
  const state = new Map<string, "active" | "done">();
  const stack: string[] = [];
  const visit = (node: string) => {
    state.set(node, "active");
    stack.push(node);
    for (const next of edges.get(node) ?? []) {
      const s = state.get(next);
      if (s === "active") cycles.push([...stack.slice(stack.indexOf(next)), next].join(" -> "));
      else if (s === undefined) visit(next);
    }
    stack.pop();
    state.set(node, "done");
  };
  for (const file of files) if (!state.has(file.path)) visit(file.path);
  return cycles;
}

/** Files outside `src/vmm/` that touch QMP. */
export function qmpOutsideVmm(files: readonly SourceFile[]): string[] {
  return files
    .filter(
      (f) =>
        moduleOf(f.path) !== "vmm" &&
        /\.qmp\b|\bQmpClient\b|"migrate(-incoming|-set-capabilities)?"/.test(f.text),
    )
    .map((f) => f.path);
}

describe("architecture", () => {
  const files = listSources(SRC);

  it("modules import only lower layers, through their barrels; the leaves only errors and internal; the CLI only the public API", () => {
    assert.deepEqual(layeringViolations(files), []);
  });

  it("no import cycles between files", () => {
    assert.deepEqual(importCycles(files), []);
  });

  it("no file outside src/vmm/ sends QMP", () => {
    assert.deepEqual(qmpOutsideVmm(files), []);
  });

  it("catches what it is meant to catch", () => {
    const fake: SourceFile[] = [
      { path: "vmm/a.ts", text: 'import { Vm } from "../vm/index.ts";\n' },
      { path: "vm/index.ts", text: 'export { b } from "./b.ts";\n' },
      { path: "vm/b.ts", text: 'import type { c } from "./c.ts";\nimport { x } from "../oci/pull.ts";\n' },
      { path: "vm/c.ts", text: 'export { b } from "./b.ts";\nawait qemu.qmp.execute("stop");\n' },
      { path: "oci/index.ts", text: "" },
      { path: "oci/pull.ts", text: "" },
      { path: "cli/main.ts", text: 'import { Vm } from "../vm/index.ts";\n' },
      { path: "agent/d.ts", text: 'import "../pool/index.ts";\n' },
      { path: "pool/index.ts", text: "" },
      {
        path: "client/a.ts",
        text: 'import { Vm } from "../index.ts";\nimport type { Pool } from "../index.ts";\nimport { once } from "../internal/index.ts";\n',
      },
      { path: "internal/index.ts", text: "" },
      { path: "server/a.ts", text: 'import { Pool } from "../pool/index.ts";\n' },
    ];
    const problems = layeringViolations(fake);
    assert.ok(problems.some((p) => p.startsWith("vmm/a.ts imports vm/index.ts: vmm may not import vm")));
    assert.ok(problems.some((p) => p.includes("vm/b.ts imports oci/pull.ts: reach oci through its barrel")));
    assert.ok(
      problems.some((p) => p.includes("cli/main.ts imports vm/index.ts: the CLI uses the public API")),
    );
    assert.ok(
      problems.some((p) => p.startsWith("agent/d.ts imports pool/index.ts: agent may not import pool")),
    );
    assert.ok(
      problems.some((p) => p.startsWith("client/a.ts imports index.ts: the client carries no VM code")),
    );
    assert.equal(
      problems.filter((p) => p.startsWith("client/a.ts")).length,
      1,
      "import type from index, and internal, are fine",
    );
    assert.ok(
      problems.some((p) => p.startsWith("server/a.ts imports pool/index.ts: the server uses the public API")),
    );
    assert.deepEqual(importCycles(fake), ["vm/b.ts -> vm/c.ts -> vm/b.ts"]);
    assert.deepEqual(qmpOutsideVmm(fake), ["vm/c.ts"]);
  });
});
