/**
 * The supervisor of one detached VM (see detached.ts for the life cycle): `run -d` starts it as
 * `main.js __supervise DIR`, detached, with an IPC channel on which it reports `ready` or the error
 * once. It holds the `Vm` and its published ports, runs the command (or follows the snapshot's
 * baked workload) with its output in the workload log, and serves exec / logs / stop on the
 * control socket until the command exits or it is stopped.
 */
import { closeSync, openSync, readFileSync, renameSync, statSync, writeSync } from "node:fs";
import { readFile, rm } from "node:fs/promises";
import { createServer, type Server } from "node:net";
import { basename, dirname } from "node:path";
import { PassThrough } from "node:stream";
import { Image, SupermachineError, Vm } from "../index.ts";
import {
  ControlChannel,
  type ControlReply,
  type ControlRequest,
  decode,
  encode,
  MAX_CHUNK_BYTES,
} from "./control.ts";
import {
  DetachedDir,
  type DetachedSpec,
  type DetachedState,
  LOG_MAX_BYTES,
  processStartTime,
} from "./detached.ts";
import { type PublishedPort, publishPorts } from "./ports.ts";
import {
  bakedWorkload,
  commandWorkload,
  stopSignalOf,
  stopWorkload,
  type WorkloadOutput,
} from "./workload.ts";

/** What the supervisor tells `run -d` on its IPC channel, once. */
export type SupervisorReport =
  | { type: "ready"; vmId: string; ports: PublishedPort[] }
  | { type: "error"; code: string; message: string };

export async function supervise(path: string): Promise<number> {
  const dir = new DetachedDir(basename(path), dirname(path));
  const spec = JSON.parse(await readFile(dir.specPath, "utf8")) as DetachedSpec;
  const stop = Promise.withResolvers<void>();
  process.on("SIGTERM", () => stop.resolve());
  process.on("SIGINT", () => stop.resolve());
  process.on("SIGHUP", () => {});

  let state: DetachedState = {
    name: dir.name,
    image: spec.rootfs === undefined ? spec.image! : `rootfs:${spec.rootfs}`,
    command: spec.argv ?? [],
    status: "starting",
    supervisorPid: process.pid,
    supervisorStartTime: processStartTime(process.pid) ?? "",
    createdAt: new Date().toISOString(),
  };
  await dir.writeState(state);

  const log = new WorkloadLog(dir.logPath);
  const toLog: WorkloadOutput = { stdout: (data) => log.write(data), stderr: (data) => log.write(data) };
  let vm: Vm | undefined;
  let server: Server | undefined;
  let exitCode: number | null = null;
  let error: string | undefined;
  const stopRequests: ControlChannel<ControlRequest, ControlReply>[] = [];
  try {
    const started = await startVm(spec, stop.promise);
    vm = started.vm;
    const ports = await publishPorts(vm, spec.ports ?? []);
    // A snapshot restored without a command: the workload its bake started (none: the VM idles).
    const workload =
      started.argv === undefined
        ? await bakedWorkload(vm, toLog, { merged: true })
        : commandWorkload(
            await vm.spawn(started.argv, {
              env: spec.env,
              ...(spec.cwd === undefined ? {} : { cwd: spec.cwd }),
              ...(spec.user === undefined ? {} : { user: spec.user }),
            }),
            toLog,
          );
    server = await listen(dir.socketPath, (channel) =>
      serve(channel, { vm: vm!, log, stopRequests, stop: stop.resolve }),
    );
    state = {
      ...state,
      vmId: vm.id,
      command: started.argv ?? [],
      status: "running",
      ...(ports.length > 0 ? { ports } : {}),
    };
    await dir.writeState(state);
    report({ type: "ready", vmId: vm.id, ports });

    const ended = workload
      ? workload.exit.then((code) => {
          exitCode = code;
        })
      : new Promise<void>(() => {});
    let stopping = false;
    const died = vm.done.then((reason) => {
      if (!stopping) error = `the VM exited: ${reason?.message ?? "unexpectedly"}`;
    });
    // Stopped: the workload gets its StopSignal and the grace period, as with docker stop.
    const stopped = stop.promise.then(async () => {
      stopping = true;
      error = "stopped";
      if (workload) await stopWorkload(workload, started.stopSignal);
    });
    await Promise.race([ended, died, stopped]);
    stopping = true;
  } catch (caught) {
    const code = SupermachineError.is(caught) ? caught.code : "VMM_FAILED";
    const message = caught instanceof Error ? caught.message : String(caught);
    error = message;
    report({ type: "error", code, message });
  } finally {
    await vm?.stop().catch(() => {});
    log.end();
    state = {
      ...state,
      status: "exited",
      exitCode,
      finishedAt: new Date().toISOString(),
      ...(error === undefined ? {} : { error }),
    };
    // The state says "exited" before the control socket goes: a client that finds no supervisor
    // finds the final state and the log file.
    if (spec.rm) await dir.remove();
    else await dir.writeState(state);
    server?.close();
    await rm(dir.socketPath, { force: true });
    for (const channel of stopRequests) channel.end({ type: "stopped" });
  }
  return 0;
}

function report(message: SupervisorReport): void {
  if (process.send === undefined || !process.connected) return;
  process.send(message, () => process.disconnect());
}

async function startVm(
  spec: DetachedSpec,
  aborted: Promise<void>,
): Promise<{ vm: Vm; argv?: string[]; stopSignal: string | number }> {
  const controller = new AbortController();
  void aborted.then(() => controller.abort(new Error("stopped while starting")));
  const signal = controller.signal;
  const mounts = spec.mounts?.length ? { mounts: spec.mounts } : {};
  const machine = {
    ...(spec.memoryMiB === undefined ? {} : { memoryMiB: spec.memoryMiB }),
    ...(spec.vcpus === undefined ? {} : { vcpus: spec.vcpus }),
    ...mounts,
    signal,
  };
  if (spec.rootfs !== undefined)
    return {
      vm: await Vm.start({ rootfs: spec.rootfs, ...machine }),
      argv: spec.argv ?? [],
      stopSignal: stopSignalOf(undefined),
    };
  const image = spec.snapshot
    ? await Image.fromSnapshot(spec.image!)
    : await Image.pull(spec.image!, { ...spec.pull, pullPolicy: "missing", signal });
  const entrypoint = spec.entrypoint === undefined ? undefined : [spec.entrypoint];
  const argv =
    spec.snapshot && spec.argv === undefined && entrypoint === undefined
      ? undefined
      : image.command({ entrypoint, args: spec.argv });
  if (argv !== undefined && argv.length === 0)
    throw new SupermachineError(
      "INVALID_ARGUMENT",
      `${spec.image} has no Entrypoint or Cmd: give a command after the IMAGE`,
    );
  const vm = await image.start(image.snapshot ? { signal, ...mounts } : machine);
  const stopSignal = stopSignalOf(image.config);
  return argv === undefined ? { vm, stopSignal } : { vm, argv, stopSignal };
}

interface ServeContext {
  vm: Vm;
  log: WorkloadLog;
  stopRequests: ControlChannel<ControlRequest, ControlReply>[];
  stop: () => void;
}

async function serve(
  channel: ControlChannel<ControlRequest, ControlReply>,
  ctx: ServeContext,
): Promise<void> {
  const requests = channel[Symbol.asyncIterator]();
  try {
    const first = await requests.next();
    if (first.done) return;
    const request = first.value;
    if (request.op === "stop") {
      ctx.stopRequests.push(channel);
      ctx.stop();
    } else if (request.op === "logs") {
      await serveLogs(channel, ctx, request.follow);
    } else if (request.op === "exec") {
      await serveExec(channel, requests, ctx.vm, request);
    } else {
      channel.end({ type: "error", code: "INVALID_ARGUMENT", message: `unexpected request ${request.op}` });
    }
  } catch (error) {
    const code = SupermachineError.is(error) ? error.code : "INVALID_ARGUMENT";
    channel.end({ type: "error", code, message: (error as Error).message });
  }
}

async function serveExec(
  channel: ControlChannel<ControlRequest, ControlReply>,
  requests: AsyncIterator<ControlRequest>,
  vm: Vm,
  request: Extract<ControlRequest, { op: "exec" }>,
): Promise<void> {
  const stdin = request.stdin ? new PassThrough() : undefined;
  const handle = await vm.spawn(request.argv, {
    env: request.env,
    ...(request.cwd === undefined ? {} : { cwd: request.cwd }),
    ...(request.user === undefined ? {} : { user: request.user }),
    ...(request.tty ? { tty: true, ...(request.winsize ? { winsize: request.winsize } : {}) } : {}),
    ...(stdin === undefined ? {} : { stdin }),
  });
  channel.socket.once("close", () => {
    if (!handle.exited) handle.kill("SIGKILL");
  });
  void (async () => {
    for (;;) {
      const next = await requests.next().catch(() => ({ done: true as const, value: undefined }));
      if (next.done) break;
      const message = next.value;
      if (message.op === "stdin") stdin?.write(decode(message.data));
      else if (message.op === "stdin-end") stdin?.end();
      else if (message.op === "resize") handle.resize(message.rows, message.cols);
    }
    stdin?.end();
  })();
  for await (const event of handle) {
    if (event.kind === "stdout" || event.kind === "stderr") {
      for (let i = 0; i < event.data.length; i += MAX_CHUNK_BYTES)
        channel.send({ type: event.kind, data: encode(event.data.subarray(i, i + MAX_CHUNK_BYTES)) });
    }
  }
  const outcome = await handle.wait();
  channel.end({ type: "exit", exitCode: outcome.exitCode, signal: outcome.signal });
}

async function serveLogs(
  channel: ControlChannel<ControlRequest, ControlReply>,
  ctx: ServeContext,
  follow: boolean,
): Promise<void> {
  for (const chunk of ctx.log.contents()) channel.send({ type: "stdout", data: encode(chunk) });
  if (follow && !ctx.log.ended) {
    const unsubscribe = ctx.log.follow((data) => channel.send({ type: "stdout", data: encode(data) }));
    channel.socket.once("close", unsubscribe);
    await ctx.log.done;
    unsubscribe();
  }
  channel.end({ type: "end" });
}

/** Listens on the control socket, mode 0600 by the dir's 0700. */
function listen(
  path: string,
  onChannel: (channel: ControlChannel<ControlRequest, ControlReply>) => void,
): Promise<Server> {
  return new Promise((resolve, reject) => {
    const server = createServer((socket) => onChannel(new ControlChannel(socket)));
    server.once("error", reject);
    server.listen(path, () => {
      server.off("error", reject);
      resolve(server);
    });
  });
}

/**
 * The workload's output on disk, bounded: at LOG_MAX_BYTES the file moves to `.1` (replacing the
 * previous one) and a new one starts. Written synchronously, so that what a follower is sent after
 * reading the file continues it exactly.
 */
class WorkloadLog {
  readonly #path: string;
  #fd: number;
  #size: number;
  readonly #followers = new Set<(data: Uint8Array) => void>();
  readonly #done = Promise.withResolvers<void>();
  ended = false;

  constructor(path: string) {
    this.#path = path;
    this.#fd = openSync(path, "a", 0o600);
    this.#size = statSync(path).size;
  }

  get done(): Promise<void> {
    return this.#done.promise;
  }

  /** Appends; output that comes after the end (a VM going away) is dropped. */
  write(data: Uint8Array): void {
    if (this.ended) return;
    if (this.#size + data.length > LOG_MAX_BYTES && this.#size > 0) {
      closeSync(this.#fd);
      renameSync(this.#path, `${this.#path}.1`);
      this.#fd = openSync(this.#path, "a", 0o600);
      this.#size = 0;
    }
    writeSync(this.#fd, data);
    this.#size += data.length;
    for (const follower of this.#followers) follower(data);
  }

  /** The kept output: the rotated file, then the current one. */
  contents(): Buffer[] {
    return readLog(this.#path);
  }

  follow(onData: (data: Uint8Array) => void): () => void {
    this.#followers.add(onData);
    return () => this.#followers.delete(onData);
  }

  end(): void {
    if (this.ended) return;
    this.ended = true;
    closeSync(this.#fd);
    this.#done.resolve();
  }
}

/** A workload log as kept on disk: `.1` (if rotated) then the current file. */
export function readLog(path: string): Buffer[] {
  const out: Buffer[] = [];
  for (const file of [`${path}.1`, path]) {
    try {
      out.push(readFileSync(file));
    } catch {}
  }
  return out;
}
