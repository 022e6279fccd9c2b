#!/usr/bin/env node
import { subscribe } from "node:diagnostics_channel";
import { SupermachineError } from "../index.ts";
import type { Cli } from "./cli.ts";
import {
  IMAGES_HELP,
  imagesCommand,
  PRUNE_HELP,
  PULL_HELP,
  pruneCommand,
  pullCommand,
  RM_HELP,
  RMI_HELP,
  rmCommand,
  rmiCommand,
  SNAPSHOTS_HELP,
  snapshotsCommand,
} from "./images.ts";
import { RUN_HELP, runCommand } from "./run.ts";

const HELP = `Usage: supermachine COMMAND [OPTIONS]

Run OCI/Docker images and root filesystems as isolated microVMs.

Commands:
  run       boot a microVM from an image or root filesystem and run a command in it
  pull      pull an image into the local store
  images    list stored images
  rmi       remove stored images
  prune     delete blobs and root filesystems no image uses
  snapshots list baked snapshots ('pull --name NAME' bakes one)
  rm        remove baked snapshots
  help      show this help

Run 'supermachine COMMAND --help' for a command's options.`;

const commands: Record<
  string,
  { run: (cli: Cli, argv: readonly string[]) => Promise<number>; help: string }
> = {
  run: { run: runCommand, help: RUN_HELP },
  pull: { run: pullCommand, help: PULL_HELP },
  images: { run: imagesCommand, help: IMAGES_HELP },
  rmi: { run: rmiCommand, help: RMI_HELP },
  prune: { run: pruneCommand, help: PRUNE_HELP },
  snapshots: { run: snapshotsCommand, help: SNAPSHOTS_HELP },
  rm: { run: rmCommand, help: RM_HELP },
};

async function main(argv: readonly string[]): Promise<number> {
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
    signal: controller.signal,
  };
  // Say once, and only to a person at a terminal, that TCG is emulation.
  subscribe("supermachine:vm:accelerator", (message) => {
    const choice = message as { accel: string; reason?: string };
    if (choice.accel === "tcg" && process.stderr.isTTY)
      cli.err(`note: ${choice.reason ?? "running under TCG"}`);
  });

  const [name, ...rest] = argv;
  if (name === undefined || name === "help" || name === "--help" || name === "-h") {
    cli.out(HELP);
    return name === undefined ? 125 : 0;
  }
  const command = commands[name];
  if (!command) {
    cli.err(`unknown command ${JSON.stringify(name)}\n\n${HELP}`);
    return 125;
  }
  try {
    return await command.run(cli, rest);
  } catch (error) {
    if (SupermachineError.is(error)) {
      cli.err(error.message);
      return 125;
    }
    cli.err(`unexpected error: ${(error as Error)?.stack ?? String(error)}`);
    return 125;
  }
}

process.exitCode = await main(process.argv.slice(2));
