/** `supermachine run`: start a VM, run a command in it, in the foreground or detached (-d). */
import { type ExecHandle, Image, Vm } from "../index.ts";
import { type Cli, envPairs, positiveInt, UsageError } from "./cli.ts";
import type { DetachedSpec } from "./detached.ts";
import { type PullFlags, pullOptions, snapshotExists } from "./images.ts";
import { Progress, progressMode } from "./progress.ts";
import { attachTerminal, shellExitCode, terminalSize, write } from "./terminal.ts";

export interface RunFlags extends PullFlags {
  rootfs?: string;
  entrypoint?: string;
  rm?: boolean;
  pull?: string;
  interactive?: boolean;
  tty?: boolean;
  env: string[];
  workdir?: string;
  user?: string;
  memory?: string;
  vcpus?: string;
  timeout?: string;
  detach?: boolean;
  name?: string;
}

/** Returns the exit code: the command's, or (with -d) 0 once the VM runs. */
export async function runCommand(cli: Cli, positionals: readonly string[], flags: RunFlags): Promise<number> {
  // `run IMAGE -- ARG...`: the `--` after IMAGE ends supermachine's options, as the usage says.
  const words = positionals[1] === "--" ? [positionals[0]!, ...positionals.slice(2)] : [...positionals];
  const rootfs = flags.rootfs;
  if (words.length === 0)
    throw new UsageError(
      `run needs ${rootfs ? "a COMMAND" : "an IMAGE or --rootfs PATH"} (see supermachine run --help)`,
    );
  const policy = flags.pull ?? "missing";
  if (policy !== "missing" && policy !== "always" && policy !== "never")
    throw new UsageError(`--pull must be missing, always or never, not ${JSON.stringify(policy)}`);
  const env = envPairs(flags.env);
  const memoryMiB = positiveInt(flags.memory, "--memory");
  const vcpus = positiveInt(flags.vcpus, "--vcpus");
  const timeoutMs = positiveInt(flags.timeout, "--timeout");
  if (flags.name !== undefined && !flags.detach)
    throw new UsageError("--name names a detached VM: add -d (exec, logs, stop and rm then find it by name)");
  if (flags.detach && (flags.tty || flags.interactive))
    throw new UsageError(
      "-d runs the command without a terminal or input: use 'supermachine exec -it NAME' later",
    );
  if (flags.detach && timeoutMs !== undefined) throw new UsageError("--timeout applies to a foreground run");

  const target = rootfs === undefined ? words[0]! : undefined;
  const isSnapshot = target !== undefined && (await snapshotExists(target));
  if (isSnapshot && (memoryMiB !== undefined || vcpus !== undefined))
    throw new UsageError(`${target} is a snapshot: its memory and vCPUs were fixed when it was baked`);
  const args = rootfs === undefined ? words.slice(1) : words;

  let image: Image | undefined;
  if (target !== undefined && !isSnapshot) {
    // Pull here, where progress can be shown, also for -d (its supervisor then finds it stored).
    const progress = new Progress(progressMode(flags.quiet === true));
    try {
      image = await Image.pull(target, { ...pullOptions(flags, cli, progress), pullPolicy: policy });
    } finally {
      progress.finish();
    }
  }

  if (flags.detach) {
    const spec: DetachedSpec = {
      ...(rootfs === undefined ? { image: target!, snapshot: isSnapshot } : { rootfs }),
      pull: {
        ...(flags.platform ? { platform: flags.platform } : {}),
        ...(flags.insecureRegistry?.length ? { insecureRegistries: flags.insecureRegistry } : {}),
      },
      ...(args.length > 0 ? { argv: args } : {}),
      ...(flags.entrypoint === undefined ? {} : { entrypoint: flags.entrypoint }),
      env,
      ...(flags.workdir === undefined ? {} : { cwd: flags.workdir }),
      ...(flags.user === undefined ? {} : { user: flags.user }),
      ...(memoryMiB === undefined ? {} : { memoryMiB }),
      ...(vcpus === undefined ? {} : { vcpus }),
      rm: flags.rm === true,
    };
    const { startDetached } = await import("./vms.ts");
    return startDetached(cli, spec, flags.name);
  }

  const tty = flags.tty === true;
  const stdinIsTty = process.stdin.isTTY === true;
  if (tty && !stdinIsTty) throw new UsageError("-t needs standard input to be a terminal");
  const forwardStdin = flags.interactive === true || !stdinIsTty;
  const machine = {
    ...(memoryMiB === undefined ? {} : { memoryMiB }),
    ...(vcpus === undefined ? {} : { vcpus }),
    signal: cli.signal,
  };
  let vm: Vm;
  let argv: string[];
  if (rootfs !== undefined) {
    vm = await Vm.start({ rootfs, ...machine });
    argv = args;
  } else {
    image ??= await Image.fromSnapshot(target!);
    const entrypoint = flags.entrypoint === undefined ? undefined : [flags.entrypoint];
    argv = image.command({ entrypoint, args });
    if (argv.length === 0)
      throw new UsageError(`${target} has no Entrypoint or Cmd: give a command after the IMAGE`);
    vm = await image.start(image.snapshot ? { signal: cli.signal } : machine);
  }
  try {
    const builder = vm.execBuilder().argv(argv).env(env).signal(cli.signal);
    if (flags.workdir) builder.cwd(flags.workdir);
    if (flags.user) builder.user(flags.user);
    if (timeoutMs !== undefined) builder.timeout(timeoutMs);
    if (tty) {
      const { rows, cols } = terminalSize();
      builder.tty(true).winsize(rows, cols);
    }
    if (forwardStdin) builder.stdin(process.stdin);
    const handle = await builder.spawn();
    return await pump(handle, tty, forwardStdin);
  } finally {
    await vm.stop();
  }
}

/** Copies the command's output to ours and our terminal's size to it; returns its exit status. */
async function pump(handle: ExecHandle, tty: boolean, forwardStdin: boolean): Promise<number> {
  const detach = attachTerminal(tty, (rows, cols) => handle.resize(rows, cols));
  try {
    for await (const event of handle) {
      if (event.kind === "stdout") await write(process.stdout, event.data);
      else if (event.kind === "stderr") await write(process.stderr, event.data);
    }
    const outcome = await handle.wait();
    if (outcome.timedOut) process.stderr.write("supermachine: the command timed out and was killed\n");
    return shellExitCode(outcome.exitCode, outcome.signal);
  } finally {
    detach();
    if (forwardStdin) process.stdin.destroy();
  }
}
