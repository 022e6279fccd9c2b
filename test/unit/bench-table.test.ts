/** The bench's table: budgets checked against ratios or medians, ratios printed, blocks replaced. */
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { replaceBlock } from "../../bench/report.ts";
import { summarize, Table } from "../../bench/table.ts";

function table(floor: number, value: number, budget: string): Table {
  const t = new Table();
  t.add({ name: "floor", unit: "ms", summary: summarize([floor]) });
  t.add({ name: "row", unit: "ms", summary: summarize([value]), against: "floor", budget });
  return t;
}

describe("bench table", () => {
  it("checks ratio budgets both ways and median budgets", () => {
    assert.equal(table(100, 120, "≤ 1.2×").met(table(100, 120, "≤ 1.2×").rows[1]!), true);
    const over = table(100, 121, "≤ 1.2×");
    assert.equal(over.met(over.rows[1]!), false);
    const low = table(100, 89, "≥ 0.9×");
    assert.equal(low.met(low.rows[1]!), false);
    const ms = table(100, 61, "≤ 60 ms (TCG)");
    assert.equal(ms.met(ms.rows[1]!), false);
    const none = new Table();
    none.add({ name: "x", unit: "ms", summary: summarize([1]) });
    assert.equal(none.met(none.rows[0]!), undefined);
  });

  it("prints a third decimal where two would round a ratio onto its bound", () => {
    const t = table(98.9, 49.4, "≥ 0.5×");
    assert.equal(t.met(t.rows[1]!), false);
    assert.equal(t.ratioText(t.rows[1]!), "0.499");
    assert.match(t.render(), /\| 0\.499× \| ≥ 0\.5× *\| \*\*no\*\* \|/);
    const plain = table(100, 137, "≤ 1.2×");
    assert.equal(plain.ratioText(plain.rows[1]!), "1.37");
  });

  it("records the section each row was measured in", () => {
    const t = new Table();
    t.section = "spine";
    t.add({ name: "a", unit: "ms", summary: summarize([1]) });
    t.section = "pull";
    t.add({ name: "b", unit: "ms", summary: summarize([1]) });
    assert.deepEqual(
      t.rows.map((r) => r.section),
      ["spine", "pull"],
    );
  });

  it("replaces a section's block and leaves the text around it, or appends a new one", () => {
    const doc = "intro\n<!-- bench:spine -->\nold\n<!-- /bench:spine -->\nafter\n";
    const text = "<!-- bench:spine -->\nnew\n<!-- /bench:spine -->";
    assert.equal(replaceBlock(doc, "spine", text), `intro\n${text}\nafter\n`);
    const added = replaceBlock(doc, "pull", "<!-- bench:pull -->\nx\n<!-- /bench:pull -->");
    assert.ok(added.startsWith(doc.trimEnd()));
    assert.ok(added.endsWith("\n\n## pull\n\n<!-- bench:pull -->\nx\n<!-- /bench:pull -->\n"));
  });
});
