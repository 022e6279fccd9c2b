/**
 * `supermachine serve` as a separate process (bin/supermachine, the TypeScript sources), for tests
 * that talk to it over loopback, signal it and kill it. Each server gets its own runtime dir, so
 * its QEMU processes can be told apart (and counted after it exits).
 */
import { type ChildProcess, spawn } from "node:child_process";
import { readdirSync, readFileSync } from "node:fs";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { scratchDir } from "./scratch.ts";

const root = new URL("../../", import.meta.url).pathname;

export interface ServeProcess {
  readonly url: string;
  readonly token: string;
  readonly child: ChildProcess;
  readonly runtimeDir: string;
  /** Every JSON log line so far. */
  readonly logs: Record<string, unknown>[];
  /** Resolves with the exit code (or signal name) once the process ended. */
  readonly exited: Promise<number | string>;
  /** `/metrics`, as text. */
  metrics(): Promise<string>;
}

/** Starts `supermachine serve` on a free loopback port; resolves once it answers `/readyz` with 200. */
export async function startServe(options: {
  dataDir: string;
  args?: string[];
  token?: string;
}): Promise<ServeProcess> {
  const dir = await scratchDir("sm-serve-proc-");
  const token = options.token ?? `token-${Math.random().toString(36).slice(2)}-0123456789`;
  const tokenFile = join(dir, "token");
  await writeFile(tokenFile, `${token}\n`, { mode: 0o600 });
  const runtimeDir = join(dir, "run");
  const child = spawn(
    process.execPath,
    [
      join(root, "src/cli/main.ts"),
      "serve",
      "--listen",
      "127.0.0.1:0",
      "--token-file",
      tokenFile,
      ...(options.args ?? []),
    ],
    {
      env: { ...process.env, SUPERMACHINE_DATA_DIR: options.dataDir, SUPERMACHINE_RUNTIME_DIR: runtimeDir },
      stdio: ["ignore", "pipe", "pipe"],
    },
  );
  const logs: Record<string, unknown>[] = [];
  let stderr = "";
  child.stderr!.setEncoding("utf8");
  child.stderr!.on("data", (text: string) => {
    stderr += text;
  });
  const exited = new Promise<number | string>((resolve) =>
    child.once("exit", (code, signal) => resolve(code ?? signal ?? "unknown")),
  );
  const url = await new Promise<string>((resolve, reject) => {
    const lines = createInterface({ input: child.stdout! });
    lines.on("line", (line) => {
      try {
        const record = JSON.parse(line) as Record<string, unknown>;
        logs.push(record);
        if (record.msg === "listening") resolve(String(record.url));
      } catch {}
    });
    void exited.then((code) =>
      reject(new Error(`supermachine serve exited (${code}) before listening: ${stderr}`)),
    );
  });
  const metrics = async () => (await fetch(`${url}/metrics`)).text();
  // Ready: the host checks passed and the declared pools are built.
  for (let attempt = 0; ; attempt++) {
    const ready = await fetch(`${url}/readyz`).then((r) => r.status);
    if (ready === 200) break;
    if (attempt > 600) throw new Error(`supermachine serve at ${url} never became ready`);
    await new Promise((r) => setTimeout(r, 100));
  }
  return { url, token, child, runtimeDir, logs, exited, metrics };
}

/** The QEMU processes below `pid` (children, grandchildren …), by pid, with their `-name`. */
export function qemuDescendants(pid: number): Map<number, string> {
  const parents = new Map<number, number>();
  const names = new Map<number, string>();
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, "utf8");
      parents.set(Number(entry), Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]));
      const cmdline = readFileSync(`/proc/${entry}/cmdline`, "utf8").split("\0");
      if (cmdline[0]?.includes("qemu-system"))
        names.set(Number(entry), cmdline[cmdline.indexOf("-name") + 1] ?? "");
    } catch {}
  }
  const out = new Map<number, string>();
  for (const [qemu, name] of names) {
    for (let p = parents.get(qemu); p !== undefined && p > 1; p = parents.get(p)) {
      if (p === pid) {
        out.set(qemu, name);
        break;
      }
    }
  }
  return out;
}

/** Which of `qemus` (from {@link qemuDescendants}) still run (the same pid with the same `-name`). */
export function stillRunning(qemus: Map<number, string>): number[] {
  return [...qemus]
    .filter(([pid, name]) => {
      try {
        return readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").includes(name);
      } catch {
        return false;
      }
    })
    .map(([pid]) => pid);
}

/** VM runtime dirs (console log, sockets, overlay) left under a server's runtime dir. */
export function vmDirsLeft(runtimeDir: string): string[] {
  try {
    return readdirSync(join(runtimeDir, "vms"));
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return [];
    throw error;
  }
}

/** The value of one series in Prometheus text (`name{labels}` exactly as written), or undefined. */
export function metricValue(text: string, series: string): number | undefined {
  for (const line of text.split("\n")) {
    if (line.startsWith(`${series} `)) return Number(line.slice(series.length + 1));
  }
  return undefined;
}

/** Polls `check` every 50 ms until it returns true (at most `timeoutMs`): for state only a request can see. */
export async function until(what: string, check: () => Promise<boolean>, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
