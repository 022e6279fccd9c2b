/** Summaries and the printed table of `npm run bench`. */

export interface Summary {
  readonly n: number;
  readonly min: number;
  readonly median: number;
  readonly p95: number;
  readonly max: number;
}

export function summarize(samples: readonly number[]): Summary {
  if (samples.length === 0) throw new Error("no samples");
  const sorted = [...samples].sort((a, b) => a - b);
  const at = (q: number) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]!;
  return {
    n: sorted.length,
    min: sorted[0]!,
    // The middle sample, or the mean of the two middle ones.
    median: (sorted[Math.floor((sorted.length - 1) / 2)]! + sorted[Math.ceil((sorted.length - 1) / 2)]!) / 2,
    p95: at(0.95),
    max: sorted[sorted.length - 1]!,
  };
}

export interface Row {
  readonly name: string;
  readonly unit: string;
  readonly summary: Summary;
  /** Name of the floor/baseline row this one is compared with, measured in the same run. */
  readonly against?: string;
  /** Budget on the ratio (row median / baseline median), e.g. "≤ 1.2". */
  readonly budget?: string;
  /** For throughputs, a higher number is better: the ratio is still row/baseline, and its budget a lower bound ("≥ 0.9"). */
  readonly higherIsBetter?: boolean;
  /** What the row means, for the reading `--write` puts under the table (one sentence). */
  readonly reading?: string;
}

/** A row as added: with the section of `npm run bench` that measured it. */
export interface SectionRow extends Row {
  readonly section: string;
}

export class Table {
  readonly rows: SectionRow[] = [];
  /** The section whose rows are being added. */
  section = "";

  add(row: Row): void {
    this.rows.push({ ...row, section: this.section });
    process.stderr.write(`bench: ${row.name}: median ${fmt(row.summary.median)} ${row.unit}\n`);
  }

  /**
   * Whether the row meets its budget: "≤ 1.2×"/"≥ 0.9×" bound the ratio, "≤ 60 ms", "≤ 5 %",
   * "= 0" the median. Undefined without a budget (or a ratio the budget needs).
   */
  met(row: Row): boolean | undefined {
    const m = /^(≤|≥|=)\s*([\d.]+)\s*(×?)/.exec(row.budget ?? "");
    if (!m) return undefined;
    const value = m[3] === "×" ? this.ratio(row) : row.summary.median;
    if (value === undefined) return undefined;
    const bound = Number(m[2]);
    return m[1] === "≤" ? value <= bound : m[1] === "≥" ? value >= bound : value === bound;
  }

  ratio(row: Row): number | undefined {
    if (!row.against) return undefined;
    const base = this.rows.find((r) => r.name === row.against);
    if (!base) return undefined;
    return row.summary.median / base.summary.median;
  }

  /** The ratio with two decimals, or three where two would round it across its budget's bound. */
  ratioText(row: Row): string {
    const ratio = this.ratio(row);
    if (ratio === undefined) return "";
    const bound = /^(≤|≥|=)\s*([\d.]+)\s*×/.exec(row.budget ?? "")?.[2];
    const two = ratio.toFixed(2);
    return bound !== undefined && Number(two) === Number(bound) && ratio !== Number(bound)
      ? ratio.toFixed(3)
      : two;
  }

  render(rows: readonly Row[] = this.rows): string {
    const header = ["benchmark", "unit", "n", "min", "median", "p95", "max", "vs", "ratio", "budget", "met"];
    const lines = rows.map((row) => {
      const ratio = this.ratio(row);
      const met = this.met(row);
      return [
        row.name,
        row.unit,
        String(row.summary.n),
        fmt(row.summary.min),
        fmt(row.summary.median),
        fmt(row.summary.p95),
        fmt(row.summary.max),
        row.against ?? "",
        ratio === undefined ? "" : `${this.ratioText(row)}×`,
        row.budget ?? "",
        met === undefined ? "" : met ? "yes" : "**no**",
      ];
    });
    const widths = header.map((h, i) => Math.max(h.length, ...lines.map((l) => l[i]!.length)));
    const fmtLine = (cells: string[]) => `| ${cells.map((c, i) => c.padEnd(widths[i]!)).join(" | ")} |`;
    return [fmtLine(header), fmtLine(widths.map((w) => "-".repeat(w))), ...lines.map(fmtLine)].join("\n");
  }
}

export function fmt(n: number): string {
  if (n >= 100) return n.toFixed(0);
  if (n >= 10) return n.toFixed(1);
  if (n >= 1) return n.toFixed(2);
  return n.toFixed(3);
}
