/**
 * What `run` and a detached VM's supervisor wait on, in one shape: a command they started (an
 * exec), or the workload a snapshot's bake started (the image's Entrypoint + Cmd, owned by the
 * VM). Both copy their output somewhere, end with an exit status, and are stopped the same way:
 * the image's StopSignal (default SIGTERM), STOP_GRACE_MS to exit, then SIGKILL.
 */
import { subscribe, unsubscribe } from "node:diagnostics_channel";
import {
  type ExecHandle,
  type ImageConfig,
  SupermachineError,
  type Vm,
  type WorkloadStatus,
} from "../index.ts";
import { CliError } from "./cli.ts";
import { shellExitCode } from "./terminal.ts";

/** How long a workload has to exit after its StopSignal before it is killed (docker's default). */
export const STOP_GRACE_MS = 10_000;
/** How long a workload has to go after SIGKILL before the VM is stopped under it. */
const KILL_WAIT_MS = 5_000;
/** The exit status `run` reports for a workload that ended with its VM, unreported: SIGKILL's. */
export const KILLED_EXIT_CODE = 128 + 9;

/** Where a workload's output goes. */
export interface WorkloadOutput {
  stdout(data: Uint8Array): void | Promise<void>;
  stderr(data: Uint8Array): void | Promise<void>;
}

export interface Workload {
  /** Resolves with the exit status as a shell's (128 + N for signal N) once it ended and its output is copied. */
  readonly exit: Promise<number>;
  /** Sends a signal to it (its process group). */
  signal(signal: string | number): Promise<void>;
}

/** A command started by `vm.spawn` or an exec builder. */
export function commandWorkload(handle: ExecHandle, output: WorkloadOutput): Workload {
  const exit = (async () => {
    for await (const event of handle) {
      if (event.kind === "stdout") await output.stdout(event.data);
      else if (event.kind === "stderr") await output.stderr(event.data);
    }
    const outcome = await handle.wait();
    return shellExitCode(outcome.exitCode, outcome.signal);
  })();
  return {
    exit,
    signal: async (signal) => {
      if (!handle.exited) handle.kill(signal);
    },
  };
}

/**
 * The workload a snapshot's bake started, running in this restored VM (or already exited:
 * then what it wrote and its status); undefined when the snapshot has none. With `merged`, its
 * stdout and stderr both go to `output.stdout`, in the order the guest read them.
 */
export async function bakedWorkload(
  vm: Vm,
  output: WorkloadOutput,
  options: { merged?: boolean } = {},
): Promise<Workload | undefined> {
  const status = workloadExit(vm);
  const first = await status.current;
  if (first.state === "none") {
    status.cancel();
    return undefined;
  }
  const copy = async (
    streams: "stdout" | "stderr" | "both",
    write: (data: Uint8Array) => void | Promise<void>,
  ) => {
    try {
      for await (const chunk of vm.workloadLogs({ follow: true, streams })) await write(chunk as Uint8Array);
    } catch {
      // The VM went: the exit below says how it ended.
    }
  };
  const copied = options.merged
    ? [copy("both", (data) => output.stdout(data))]
    : [copy("stdout", (data) => output.stdout(data)), copy("stderr", (data) => output.stderr(data))];
  const exit = Promise.all([status.exited, ...copied]).then(([ended]) =>
    shellExitCode(ended.exitCode, ended.signal),
  );
  return { exit, signal: (signal) => vm.workloadSignal(signal) };
}

/**
 * The workload's status now (`current`) and once it exited (`exited`): the VM publishes
 * `supermachine:vm:workload-exit` when it does; the status asked after subscribing covers an exit
 * that came earlier. `exited` rejects when the VM ends first.
 */
function workloadExit(vm: Vm): {
  current: Promise<WorkloadStatus>;
  exited: Promise<WorkloadStatus>;
  cancel(): void;
} {
  const { promise: exited, resolve, reject } = Promise.withResolvers<WorkloadStatus>();
  const onExit = (message: unknown) => {
    const { id, status } = message as { id: string; status: WorkloadStatus };
    if (id === vm.id) resolve(status);
  };
  const cancel = () => unsubscribe("supermachine:vm:workload-exit", onExit);
  subscribe("supermachine:vm:workload-exit", onExit);
  void vm.done.then((error) =>
    reject(new CliError(`the VM ended before its workload exited${error ? `: ${error.message}` : ""}`)),
  );
  exited.then(cancel, cancel);
  const current = vm.workloadStatus();
  current.then((status) => {
    if (status.state === "exited") resolve(status);
  }, reject);
  return { current, exited, cancel };
}

/**
 * Stops a workload as `docker stop` does: `stopSignal`, up to `graceMs` for it to exit, then
 * SIGKILL and KILL_WAIT_MS more. Resolves when it exited or the waits are over (the caller then
 * stops the VM, which ends it for good).
 */
export async function stopWorkload(
  workload: Workload,
  stopSignal: string | number,
  graceMs = STOP_GRACE_MS,
): Promise<void> {
  // An image's StopSignal the guest does not know is SIGTERM; a workload that already exited
  // refuses the signal (ESRCH): nothing to do then.
  await workload.signal(stopSignal).catch(async (error: unknown) => {
    if (SupermachineError.is(error, "INVALID_ARGUMENT")) await workload.signal("SIGTERM").catch(() => {});
  });
  if (await settlesWithin(workload.exit, graceMs)) return;
  await workload.signal("SIGKILL").catch(() => {});
  await settlesWithin(workload.exit, KILL_WAIT_MS);
}

/** True when `promise` settles (either way) within `ms`. */
async function settlesWithin(promise: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<boolean>((resolve) => {
    timer = setTimeout(() => resolve(false), ms);
  });
  try {
    return await Promise.race([
      promise.then(
        () => true,
        () => true,
      ),
      timedOut,
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * The signal that stops an image's workload: its `StopSignal` (`SIGQUIT`, `QUIT` or `3`),
 * SIGTERM when it has none.
 */
export function stopSignalOf(config: ImageConfig | undefined): string | number {
  const signal = config?.stopSignal?.trim();
  if (signal === undefined || signal === "") return "SIGTERM";
  return /^\d+$/.test(signal) ? Number(signal) : signal.toUpperCase();
}
