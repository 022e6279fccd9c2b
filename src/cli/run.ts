import { constants as osConstants } from "node:os";
import type { ExecHandle } from "../index.ts";
import { Image, Store, Vm } from "../index.ts";
import { formatOptions, type OptionSpec, parseArgs, usage } from "./args.ts";
import type { Cli } from "./cli.ts";
import { PULL_OPTIONS, positiveInt, pullOptions } from "./images.ts";
import { ProgressDisplay } from "./progress.ts";

export const RUN_OPTIONS: readonly OptionSpec[] = [
  {
    name: "rootfs",
    kind: "string",
    value: "PATH",
    help: "boot this root filesystem (ext4 image or directory) instead of an IMAGE",
  },
  {
    name: "entrypoint",
    kind: "string",
    value: "CMD",
    help: "replace the image's Entrypoint (and drop its Cmd)",
  },
  {
    name: "rm",
    kind: "boolean",
    help: "accepted for docker compatibility: every VM is removed when it ends",
  },
  { name: "pull", kind: "string", value: "POLICY", help: "missing (default), always or never" },
  ...PULL_OPTIONS,
  {
    name: "interactive",
    short: "i",
    kind: "boolean",
    help: "forward standard input (default when it is not a terminal)",
  },
  { name: "tty", short: "t", kind: "boolean", help: "run the command on a pseudo-terminal" },
  { name: "env", short: "e", kind: "multi", value: "K=V", help: "set an environment variable (repeatable)" },
  { name: "workdir", short: "w", kind: "string", value: "DIR", help: "working directory in the guest" },
  { name: "user", short: "u", kind: "string", value: "USER", help: "user: name, uid, name:group or uid:gid" },
  { name: "memory", short: "m", kind: "string", value: "MiB", help: "guest memory in MiB (default 512)" },
  { name: "vcpus", kind: "string", value: "N", help: "number of vCPUs (default 1)" },
  { name: "timeout", kind: "string", value: "MS", help: "kill the command after this many milliseconds" },
  { name: "help", short: "h", kind: "boolean", help: "show this help" },
];

export const RUN_HELP = `Usage: supermachine run [OPTIONS] IMAGE|SNAPSHOT [--] [ARG...]
       supermachine run [OPTIONS] --rootfs PATH [--] COMMAND [ARG...]

Start a microVM and run a command in it: the image's Entrypoint + Cmd (ARGs replace Cmd), or
COMMAND on a root filesystem. A name baked with 'supermachine pull --name NAME' restores from
that snapshot (its workload already running) instead of booting; otherwise IMAGE is pulled when
missing, flattened and booted. Standard streams pass through; the exit code is the command's
(128+N when killed by signal N; 125 for supermachine's own errors). Standard input is forwarded
with -i, or when it is not a terminal.

${formatOptions(RUN_OPTIONS)}`;

/** `supermachine run`: returns the exit code. */
export async function runCommand(cli: Cli, args: readonly string[]): Promise<number> {
  const { options, positionals } = parseArgs(args, RUN_OPTIONS, true);
  if (options.help) {
    cli.out(RUN_HELP);
    return 0;
  }
  const rootfs = options.rootfs as string | undefined;
  if (positionals.length === 0) {
    throw usage(
      `run needs ${rootfs ? "a COMMAND" : "an IMAGE or --rootfs PATH"} (see supermachine run --help)`,
    );
  }
  const policy = (options.pull as string | undefined) ?? "missing";
  if (policy !== "missing" && policy !== "always" && policy !== "never") {
    throw usage(`--pull must be missing, always or never, not ${JSON.stringify(policy)}`);
  }
  const env: Record<string, string> = {};
  for (const pair of (options.env as string[] | undefined) ?? []) {
    const eq = pair.indexOf("=");
    if (eq <= 0) throw usage(`-e expects KEY=VALUE, got ${JSON.stringify(pair)}`);
    env[pair.slice(0, eq)] = pair.slice(eq + 1);
  }
  const tty = options.tty === true;
  const stdinIsTty = process.stdin.isTTY === true;
  const forwardStdin = options.interactive === true || !stdinIsTty;
  if (tty && !stdinIsTty) throw usage("-t needs standard input to be a terminal");

  const memoryMiB = positiveInt(options.memory, "memory");
  const vcpus = positiveInt(options.vcpus, "vcpus");
  const machine = {
    ...(memoryMiB === undefined ? {} : { memoryMiB }),
    ...(vcpus === undefined ? {} : { vcpus }),
    signal: cli.signal,
  };
  let vm: Vm;
  let argv: string[];
  if (rootfs) {
    vm = await Vm.start({ rootfs, ...machine });
    argv = [...positionals];
  } else {
    const target = positionals[0]!;
    const entrypoint = options.entrypoint === undefined ? undefined : [options.entrypoint as string];
    let image: Image;
    if (await snapshotExists(target)) {
      if (memoryMiB !== undefined || vcpus !== undefined) {
        throw usage(`${target} is a snapshot: its memory and vCPUs were fixed when it was baked`);
      }
      image = await Image.fromSnapshot(target);
    } else {
      const display = new ProgressDisplay();
      image = await Image.pull(target, { ...pullOptions(options, cli, display), pullPolicy: policy });
      display.finish();
    }
    argv = image.command({ entrypoint, args: positionals.slice(1) });
    vm = await image.start(image.snapshot ? { signal: cli.signal } : machine);
  }
  try {
    const builder = vm.execBuilder().argv(argv).env(env).signal(cli.signal);
    if (options.workdir) builder.cwd(options.workdir as string);
    if (options.user) builder.user(options.user as string);
    const timeout = positiveInt(options.timeout, "timeout");
    if (timeout !== undefined) builder.timeout(timeout);
    if (tty) builder.tty(true).winsize(process.stdout.rows || 24, process.stdout.columns || 80);
    if (forwardStdin) builder.stdin(process.stdin);
    const handle = await builder.spawn();
    return await pump(handle, { tty, forwardStdin });
  } finally {
    await vm.stop();
  }
}

/** Copies the exec's output to ours and our terminal's size to it; returns the exit code. */
async function pump(handle: ExecHandle, opts: { tty: boolean; forwardStdin: boolean }): Promise<number> {
  const restore: Array<() => void> = [];
  if (opts.tty) {
    process.stdin.setRawMode(true);
    restore.push(() => process.stdin.setRawMode(false));
    const onResize = () => handle.resize(process.stdout.rows, process.stdout.columns);
    process.stdout.on("resize", onResize);
    restore.push(() => process.stdout.off("resize", onResize));
  }
  try {
    for await (const event of handle) {
      if (event.kind === "stdout") await write(process.stdout, event.data);
      else if (event.kind === "stderr") await write(process.stderr, event.data);
    }
    const outcome = await handle.wait();
    if (outcome.timedOut) process.stderr.write(`supermachine: command timed out and was killed\n`);
    if (outcome.exitCode !== null) return outcome.exitCode;
    return 128 + signalNumber(outcome.signal);
  } finally {
    for (const undo of restore.reverse()) undo();
    if (opts.forwardStdin) process.stdin.destroy();
  }
}

function write(stream: NodeJS.WriteStream, data: Uint8Array): Promise<void> {
  return new Promise((resolve, reject) => {
    stream.write(data, (error) => (error ? reject(error) : resolve()));
  });
}

function signalNumber(name: string | null): number {
  const signals = osConstants.signals as Readonly<Record<string, number>>;
  return (name !== null && signals[name]) || 0;
}

/** True when a baked snapshot of that name is in the store. */
async function snapshotExists(name: string): Promise<boolean> {
  if (!/^[A-Za-z0-9][A-Za-z0-9_.-]*$/.test(name)) return false;
  return (await new Store().snapshots()).some((s) => s.name === name);
}
