/**
 * Errors: docs/errors.md lists every code with its class, the source throws every code with the
 * class the table names, and `SupermachineError.is(err, code)` narrows.
 */
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { describe, it } from "node:test";
import { fileURLToPath } from "node:url";
import {
  ERROR_CODES,
  ExecTimeoutError,
  PoolTimeoutError,
  SupermachineError,
  VmError,
} from "../../src/errors.ts";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");

/** code → class name, from the table in docs/errors.md. */
function documentedClasses(): Map<string, string> {
  const table = new Map<string, string>();
  const text = readFileSync(join(ROOT, "docs/errors.md"), "utf8");
  for (const match of text.matchAll(/^\| `([A-Z_]+)` \| `(\w+)` \|/gm)) {
    assert.ok(!table.has(match[1]!), `${match[1]} is listed twice in docs/errors.md`);
    table.set(match[1]!, match[2]!);
  }
  return table;
}

function sources(dir: string): { path: string; text: string }[] {
  return readdirSync(dir, { withFileTypes: true, recursive: true })
    .filter((e) => e.isFile() && e.name.endsWith(".ts"))
    .map((e) => {
      const path = join(e.parentPath, e.name);
      return { path, text: readFileSync(path, "utf8") };
    });
}

describe("errors", () => {
  const documented = documentedClasses();

  it("docs/errors.md lists every code, and only those", () => {
    assert.deepEqual([...documented.keys()].sort(), [...ERROR_CODES].sort());
  });

  it("the source throws each code with the class docs/errors.md names", () => {
    const wrong: string[] = [];
    for (const { path, text } of sources(join(ROOT, "src"))) {
      for (const match of text.matchAll(/new (\w+)\(\s*"([A-Z_]+)"/g)) {
        const [, cls, code] = match;
        if (!(ERROR_CODES as readonly string[]).includes(code!)) continue;
        const expected = documented.get(code!);
        // QmpError is a VmError with code VMM_FAILED.
        if (cls !== expected && !(cls === "QmpError" && expected === "VmError")) {
          wrong.push(`${path}: new ${cls}("${code}") — docs/errors.md says ${expected}`);
        }
      }
    }
    assert.deepEqual(wrong, []);
  });

  it("is(err, code) narrows every code to the class docs/errors.md names", () => {
    const source = readFileSync(join(ROOT, "src/errors.ts"), "utf8");
    const body = /export interface ErrorClasses \{([^}]*)\}/.exec(source)?.[1] ?? "";
    const narrowed = new Map([...body.matchAll(/^\s*([A-Z_]+): (\w+);/gm)].map((m) => [m[1]!, m[2]!]));
    const expected = new Map([...documented].filter(([, cls]) => cls !== "SupermachineError"));
    assert.deepEqual(new Map([...narrowed].sort()), new Map([...expected].sort()));
  });

  it("is(err, code) checks the code and narrows to the class", () => {
    const timeout: unknown = new PoolTimeoutError("waited", { timeoutMs: 5 });
    assert.equal(SupermachineError.is(timeout), true);
    assert.equal(SupermachineError.is(timeout, "POOL_TIMEOUT"), true);
    assert.equal(SupermachineError.is(timeout, "EXEC_TIMEOUT"), false);
    if (SupermachineError.is(timeout, "POOL_TIMEOUT")) assert.equal(timeout.timeoutMs, 5);
    const exited: unknown = new VmError("VM_EXITED", "gone", { consoleLogPath: "/x/console.log" });
    if (SupermachineError.is(exited, "VM_EXITED")) assert.equal(exited.consoleLogPath, "/x/console.log");
    else assert.fail("not narrowed");
    assert.equal(SupermachineError.is(new Error("plain")), false);
    assert.equal(SupermachineError.is({ code: "VM_EXITED" }, "VM_EXITED"), false);
    assert.ok(
      new ExecTimeoutError("t", { outcome: {} as never, timeoutMs: 1, argv: [] }) instanceof
        SupermachineError,
    );
  });
});
