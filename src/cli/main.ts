#!/usr/bin/env node
/**
 * The `supermachine` command. Kept small: it loads commander and the grammar; each command loads
 * the library when it runs (start time: docs/cli.md). Exit codes: the command's for run and exec,
 * 125 for supermachine's own errors (one line on stderr), 126/127 when a command cannot run / is
 * not found, as docker's.
 */
import { subscribe } from "node:diagnostics_channel";
import { readFileSync } from "node:fs";
import { CommanderError } from "commander";
import { type Cli, CliError, exitCodeFor } from "./cli.ts";
import { buildProgram } from "./program.ts";

async function main(argv: readonly string[]): Promise<number> {
  if (argv[0] === "__supervise") {
    const { supervise } = await import("./supervisor.ts");
    return supervise(argv[1]!);
  }
  const controller = new AbortController();
  let interrupted = 0;
  const onSignal = (signal: NodeJS.Signals) => {
    interrupted += 1;
    if (interrupted > 1) process.exit(130);
    controller.abort(new Error(`interrupted by ${signal}`));
  };
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);
  const cli: Cli = {
    out: (text) => process.stdout.write(`${text}\n`),
    err: (text) => process.stderr.write(`supermachine: ${text}\n`),
    note: (text) => process.stderr.write(`${text}\n`),
    signal: controller.signal,
  };
  // Say once, and only to a person at a terminal, that TCG is emulation.
  subscribe("supermachine:vm:accelerator", (message) => {
    const choice = message as { accel: string; reason?: string };
    if (choice.accel === "tcg" && process.stderr.isTTY)
      cli.err(`note: ${choice.reason ?? "running under TCG"}`);
  });

  let exitCode = 0;
  const program = buildProgram(cli, packageVersion(), (code) => {
    exitCode = code;
  });
  if (argv.length === 0) {
    program.outputHelp();
    return 0;
  }
  try {
    await program.parseAsync(argv, { from: "user" });
    return exitCode;
  } catch (error) {
    if (error instanceof CommanderError) return error.exitCode === 0 ? 0 : 125;
    if (error instanceof CliError) {
      cli.err(error.message);
      return error.exitCode;
    }
    const { SupermachineError } = await import("../index.ts");
    if (SupermachineError.is(error)) {
      cli.err(firstLine(error.message));
      return exitCodeFor(error.code);
    }
    cli.err(`unexpected error: ${(error as Error)?.stack ?? String(error)}`);
    return 125;
  }
}

function firstLine(text: string): string {
  return text.split("\n")[0]!;
}

/** The version in our package.json (two dirs up from src/cli/ and from dist/cli/). */
function packageVersion(): string {
  try {
    return (
      JSON.parse(readFileSync(new URL("../../package.json", import.meta.url), "utf8")) as { version: string }
    ).version;
  } catch {
    return "unknown";
  }
}

process.exitCode = await main(process.argv.slice(2));
