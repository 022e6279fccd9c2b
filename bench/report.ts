/**
 * `npm run bench -- --write`: each section that ran replaces its own block of
 * docs/benchmarks.md, between `<!-- bench:SECTION -->` and `<!-- /bench:SECTION -->` (appended
 * at the end when the document has none yet): when and how it was measured, on what, its rows,
 * and a reading of each row. The text around the blocks is written by hand.
 */
import { execFileSync } from "node:child_process";
import { readFile, writeFile } from "node:fs/promises";
import { availableParallelism, cpus, loadavg, release, totalmem } from "node:os";
import { hostAccelerator } from "../src/index.ts";
import { findQemu } from "../src/vmm/accelerator.ts";
import { fmt, type SectionRow, type Table } from "./table.ts";

/** What a run was measured on and under: the header of every block it writes. */
export interface RunContext {
  readonly command: string;
  readonly started: Date;
  readonly loadAtStart: number;
}

export function startRun(argv: readonly string[]): RunContext {
  return {
    command: ["npm run bench --", ...argv].join(" ").replace(/ --$/, ""),
    started: new Date(),
    loadAtStart: loadavg()[0]!,
  };
}

async function machine(): Promise<string> {
  const { accel } = await hostAccelerator();
  const qemu = execFileSync(await findQemu(), ["--version"], { encoding: "utf8" }).split("\n")[0]!;
  const gib = (totalmem() / 2 ** 30).toFixed(0);
  return `${cpus()[0]?.model.trim() ?? "unknown CPU"}, ${availableParallelism()} cores, ${gib} GiB, Linux ${release()}, ${qemu.replace(/^QEMU emulator /, "QEMU ")}, accelerator ${accel}, Node ${process.version}`;
}

/** A Markdown code span of `text`, which may hold backticks itself. */
function code(text: string): string {
  return text.includes("`") ? `\`\` ${text} \`\`` : `\`${text}\``;
}

function reading(table: Table, row: SectionRow): string {
  const s = row.summary;
  const spread = s.n > 1 ? ` (${fmt(s.min)}–${fmt(s.max)}, n ${s.n})` : "";
  const parts = [`${code(row.name.trim())}: ${fmt(s.median)} ${row.unit}${spread}`];
  if (row.against !== undefined && table.ratio(row) !== undefined)
    parts.push(`${table.ratioText(row)}× ${code(row.against.trim())}`);
  const met = table.met(row);
  if (met !== undefined) parts.push(`budget ${row.budget}: ${met ? "met" : "**not met**"}`);
  return `- ${parts.join("; ")}.${row.reading === undefined ? "" : ` ${row.reading}`}`;
}

function block(section: string, header: string, table: Table, rows: readonly SectionRow[]): string {
  return [
    `<!-- bench:${section} -->`,
    header,
    "",
    table.render(rows),
    "",
    ...rows.map((row) => reading(table, row)),
    `<!-- /bench:${section} -->`,
  ].join("\n");
}

/** `doc` with the block of `section` replaced by `text` (which has its markers), or appended under a heading. */
export function replaceBlock(doc: string, section: string, text: string): string {
  const begin = `<!-- bench:${section} -->`;
  const end = `<!-- /bench:${section} -->`;
  const at = doc.indexOf(begin);
  const until = doc.indexOf(end);
  return at === -1 || until < at
    ? `${doc.trimEnd()}\n\n## ${section}\n\n${text}\n`
    : doc.slice(0, at) + text + doc.slice(until + end.length);
}

/** Replace (or append) the block of every section with rows in `table`. */
export async function writeReport(path: string, table: Table, run: RunContext): Promise<void> {
  const ended = new Date();
  const minutes = ((ended.getTime() - run.started.getTime()) / 60_000).toFixed(1);
  const on = await machine();
  let doc = await readFile(path, "utf8");
  const sections = [...new Set(table.rows.map((row) => row.section))];
  for (const section of sections) {
    const header =
      `Measured ${run.started.toISOString().slice(0, 16).replace("T", " ")} UTC by \`${run.command}\` ` +
      `(${minutes} min for the run; 1-minute load average ${run.loadAtStart.toFixed(1)} at its start, ` +
      `${loadavg()[0]!.toFixed(1)} at its end) on ${on}.`;
    const text = block(
      section,
      header,
      table,
      table.rows.filter((row) => row.section === section),
    );
    doc = replaceBlock(doc, section, text);
  }
  await writeFile(path, doc);
  process.stderr.write(`bench: wrote ${sections.join(", ")} into ${path}\n`);
}
