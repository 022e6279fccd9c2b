/** `supermachine run`: start a VM, run a command in it, in the foreground or detached (-d). */
import { type ExecHandle, Image, Vm } from "../index.ts";
import { type Cli, envPairs, positiveInt, UsageError } from "./cli.ts";
import type { DetachedSpec } from "./detached.ts";
import { type PullFlags, pullOptions, snapshotExists } from "./images.ts";
import { checkMounts, mountOrder, parseMount, parseVolume } from "./mounts.ts";
import { parsePublish, portLine, publishPorts } from "./ports.ts";
import { Progress, progressMode } from "./progress.ts";
import { attachTerminal, terminalSize, write } from "./terminal.ts";
import {
  bakedWorkload,
  commandWorkload,
  KILLED_EXIT_CODE,
  stopSignalOf,
  stopWorkload,
  type Workload,
  type WorkloadOutput,
} from "./workload.ts";

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
  publish: string[];
  volume: string[];
  mount: string[];
}

/** Our standard streams, with backpressure. */
const stdio: WorkloadOutput = {
  stdout: (data) => write(process.stdout, data),
  stderr: (data) => write(process.stderr, data),
};

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
  const ports = flags.publish.flatMap((value) => parsePublish(value));
  const mountFlags = [
    ...flags.volume.map((value) => parseVolume(value)),
    ...flags.mount.map((value) => parseMount(value)),
  ];
  if (flags.name !== undefined && !flags.detach)
    throw new UsageError("--name names a detached VM: add -d (exec, logs, stop and rm then find it by name)");
  if (flags.detach && (flags.tty || flags.interactive))
    throw new UsageError(
      "-d runs the command without a terminal or input: use 'supermachine exec -it NAME' later",
    );
  if (flags.detach && timeoutMs !== undefined) throw new UsageError("--timeout applies to a foreground run");
  await checkMounts(mountFlags);
  const mounts = mountOrder(mountFlags);

  const target = rootfs === undefined ? words[0]! : undefined;
  const isSnapshot = target !== undefined && (await snapshotExists(target));
  if (isSnapshot && (memoryMiB !== undefined || vcpus !== undefined))
    throw new UsageError(`${target} is a snapshot: its memory and vCPUs were fixed when it was baked`);
  const args = rootfs === undefined ? words.slice(1) : words;
  // A snapshot without a command: the workload its bake started (the image's Entrypoint + Cmd).
  const baked = isSnapshot && args.length === 0 && flags.entrypoint === undefined;
  if (baked) {
    const given = [
      flags.interactive && "-i",
      flags.tty && "-t",
      flags.env.length > 0 && "-e",
      flags.workdir !== undefined && "-w",
      flags.user !== undefined && "-u",
      timeoutMs !== undefined && "--timeout",
    ].filter(Boolean);
    if (given.length > 0)
      throw new UsageError(
        `${given.join(", ")} apply to a command: ${target} runs the workload started when it was baked (give a command after ${target} to run another)`,
      );
  }

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
      ...(ports.length > 0 ? { ports } : {}),
      ...(mounts.length > 0 ? { mounts } : {}),
      rm: flags.rm === true,
    };
    const { startDetached } = await import("./vms.ts");
    return startDetached(cli, spec, flags.name);
  }

  const tty = flags.tty === true;
  const stdinIsTty = process.stdin.isTTY === true;
  if (tty && !stdinIsTty) throw new UsageError("-t needs standard input to be a terminal");
  const machine = {
    ...(memoryMiB === undefined ? {} : { memoryMiB }),
    ...(vcpus === undefined ? {} : { vcpus }),
    ...(mounts.length > 0 ? { mounts } : {}),
    signal: cli.signal,
  };
  let vm: Vm;
  if (rootfs !== undefined) {
    vm = await Vm.start({ rootfs, ...machine });
  } else {
    image ??= await Image.fromSnapshot(target!);
    vm = await image.start(
      image.snapshot ? { signal: cli.signal, ...(mounts.length > 0 ? { mounts } : {}) } : machine,
    );
  }
  let forwardStdin = false;
  let detachTerminal = () => {};
  try {
    for (const port of await publishPorts(vm, ports)) cli.note(portLine(port));
    let workload = baked ? await bakedWorkload(vm, stdio) : undefined;
    let handle: ExecHandle | undefined;
    if (workload === undefined) {
      const entrypoint = flags.entrypoint === undefined ? undefined : [flags.entrypoint];
      const argv = image === undefined ? args : image.command({ entrypoint, args });
      if (argv.length === 0)
        throw new UsageError(`${target} has no Entrypoint or Cmd: give a command after the IMAGE`);
      const builder = vm.execBuilder().argv(argv).env(env);
      if (flags.workdir) builder.cwd(flags.workdir);
      if (flags.user) builder.user(flags.user);
      if (timeoutMs !== undefined) builder.timeout(timeoutMs);
      if (tty) {
        const { rows, cols } = terminalSize();
        builder.tty(true).winsize(rows, cols);
      }
      forwardStdin = flags.interactive === true || !stdinIsTty;
      if (forwardStdin) builder.stdin(process.stdin);
      const spawned = await builder.spawn();
      handle = spawned;
      detachTerminal = attachTerminal(tty, (rows, cols) => spawned.resize(rows, cols));
      workload = commandWorkload(spawned, stdio);
    }
    const code = await untilStopped(cli.signal, workload, stopSignalOf(image?.config));
    if ((await handle?.wait().catch(() => undefined))?.timedOut)
      cli.err("the command timed out and was killed");
    return code;
  } finally {
    detachTerminal();
    if (forwardStdin) process.stdin.destroy();
    await vm.stop();
  }
}

/**
 * Waits for the workload's exit status; when `signal` aborts (Ctrl-C, SIGTERM), stops it with
 * `stopSignal` as `stop` would, and returns its status then (SIGKILL's if it never reported one).
 */
async function untilStopped(
  signal: AbortSignal,
  workload: Workload,
  stopSignal: string | number,
): Promise<number> {
  const stopped = Promise.withResolvers<number>();
  const onAbort = () => {
    void stopWorkload(workload, stopSignal).then(() => stopped.resolve(KILLED_EXIT_CODE));
  };
  if (signal.aborted) onAbort();
  else signal.addEventListener("abort", onAbort, { once: true });
  try {
    return await Promise.race([workload.exit, stopped.promise]);
  } finally {
    signal.removeEventListener("abort", onAbort);
  }
}
