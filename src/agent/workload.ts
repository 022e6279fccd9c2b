/**
 * The workload (docs/protocol.md, "The workload"): the image's entrypoint, started once and owned by
 * the VM rather than by an agent session — a new `HELLO` leaves it running, `SHUTDOWN` ends it. The
 * agent keeps its output in a 1 MiB ring, so it never blocks on it; {@link workloadLogs} reads the
 * ring (and follows new output) under the host's credit.
 */

import { Readable } from "node:stream";
import { AbortError, ExecStartError, GuestIoError, SupermachineError } from "../errors.ts";
import { type AgentCallOptions, agentTimeout, timeoutOption, Watchdog } from "./deadline.ts";
import { type ExecRequest, envList } from "./exec-channel.ts";
import { describeType, type Frame, MessageType } from "./frame-codec.ts";
import {
  AgentErrorCode,
  agentErrorCodeName,
  DEFAULT_WINDOW,
  decodeError,
  decodeOk,
  decodeWorkloadStatus,
  encodeWorkloadLogs,
  encodeWorkloadQuery,
  encodeWorkloadSignal,
  encodeWorkloadStart,
  type WorkloadStatusMessage,
} from "./messages.ts";
import { protocolError } from "./protocol-error.ts";
import { request } from "./request-stream.ts";
import { signalName, signalNumber } from "./signals.ts";
import { GuestCredit, type StreamHandler, type StreamHost, type StreamLink } from "./stream-link.ts";
import { syscallError } from "./syscall-error.ts";

/** What to run as the workload (the image's `Entrypoint` + `Cmd`, env, `WorkingDir`, `User`). */
export interface WorkloadSpec {
  argv: readonly string[];
  /** The complete environment: `KEY=VALUE` strings or a record. */
  env?: ExecRequest["env"];
  /** Working directory, default `/`. */
  cwd?: string | undefined;
  /** `name`, `uid`, `name:group` or `uid:gid`; default root. */
  user?: string | undefined;
}

/** The workload's state as the agent reports it. */
export interface WorkloadStatus {
  /** `none`: never started (or its start failed); `running`; `exited`. */
  state: "none" | "running" | "exited";
  pid: number | null;
  exitCode: number | null;
  /** Signal name (`"SIGKILL"`) when it was killed by a signal. */
  signal: string | null;
  signalNumber: number | null;
}

/** Options of {@link workloadLogs}. */
export interface WorkloadLogsOptions {
  /** After what the agent holds, stream new output until the workload exits. */
  follow?: boolean | undefined;
  /**
   * Which output: default both, interleaved in the order the agent read them (stdout and stderr
   * are separate pipes: lines written close together to both may swap).
   */
  streams?: "stdout" | "stderr" | "both" | undefined;
  signal?: AbortSignal | undefined;
  /** Without `follow`: longest wait for the agent, in milliseconds (default 30 000). */
  timeoutMs?: number | undefined;
}

const STATES = ["none", "running", "exited"] as const;

/** A `WORKLOAD_STATUS` in host terms. */
export function workloadStatusFrom(m: WorkloadStatusMessage): WorkloadStatus {
  return {
    state: STATES[m.state],
    pid: m.pid ?? null,
    exitCode: m.exitCode ?? null,
    signal: m.signal === undefined ? null : signalName(m.signal),
    signalNumber: m.signal ?? null,
  };
}

function statusResult(operation: string) {
  return (result: Uint8Array | undefined): WorkloadStatus => {
    if (result === undefined) throw protocolError(`${operation}: OK without WORKLOAD_STATUS`);
    return workloadStatusFrom(decodeWorkloadStatus(result));
  };
}

/**
 * Starts the workload; resolves with its status (`running`, pid) once it is running. Rejects with
 * `EXEC_NOT_FOUND` (no such program) or `EXEC_START` (bad cwd or user, or a workload already running).
 */
export async function startWorkload(
  host: StreamHost,
  spec: WorkloadSpec,
  opts: AgentCallOptions = {},
): Promise<WorkloadStatus> {
  const argv = [...spec.argv];
  const payload = encodeWorkloadStart({ argv, env: envList(spec.env), cwd: spec.cwd, user: spec.user });
  return request(
    host,
    MessageType.WORKLOAD_START,
    payload,
    {
      operation: "startWorkload",
      result: MessageType.WORKLOAD_STATUS,
      finish: statusResult("startWorkload"),
      fail: (m) => {
        const detail = m.message ? `: ${m.message}` : "";
        return m.code === AgentErrorCode.NOT_FOUND
          ? new ExecStartError("EXEC_NOT_FOUND", `workload ${JSON.stringify(argv[0])} not found${detail}`, {
              argv,
              errno: m.errno,
            })
          : new ExecStartError(
              "EXEC_START",
              `cannot start the workload ${JSON.stringify(argv[0])} (${agentErrorCodeName(m.code)})${detail}`,
              { argv, errno: m.errno },
            );
      },
    },
    opts,
  );
}

/** The workload's status: none, running (pid), or exited (code or signal). */
export async function workloadStatus(host: StreamHost, opts: AgentCallOptions = {}): Promise<WorkloadStatus> {
  return request(
    host,
    MessageType.WORKLOAD_QUERY,
    encodeWorkloadQuery(),
    {
      operation: "workloadStatus",
      result: MessageType.WORKLOAD_STATUS,
      finish: statusResult("workloadStatus"),
      fail: (m) =>
        new GuestIoError(`workloadStatus failed in the guest (${agentErrorCodeName(m.code)})`, {
          path: "",
          errno: m.errno,
        }),
    },
    opts,
  );
}

/**
 * Sends a signal (name or Linux number) to the workload's process group. Rejects with a
 * `GuestIoError` `ESRCH` when no workload is running.
 */
export async function signalWorkload(
  host: StreamHost,
  signal: string | number,
  opts: AgentCallOptions = {},
): Promise<void> {
  const signo = signalNumber(signal);
  if (signo === undefined)
    throw new SupermachineError("INVALID_ARGUMENT", `unknown signal ${JSON.stringify(signal)}`);
  return request(
    host,
    MessageType.WORKLOAD_SIGNAL,
    encodeWorkloadSignal(signo),
    {
      operation: `signalWorkload ${signalName(signo)}`,
      finish: () => {},
      fail: (m) => syscallError(m, { syscall: "kill", path: "workload" }),
    },
    opts,
  );
}

/**
 * The workload's output as bytes: what the agent's ring holds (its last 1 MiB or so), then with
 * `follow` new output until the workload exits. Destroying the stream early ends the read.
 */
export function workloadLogs(host: StreamHost, opts: WorkloadLogsOptions = {}): Readable {
  const streams = opts.streams === "stdout" ? 1 : opts.streams === "stderr" ? 2 : 3;
  const timeoutMs = opts.follow ? undefined : timeoutOption(opts.timeoutMs);
  const payload = encodeWorkloadLogs({
    follow: opts.follow ? true : undefined,
    window: DEFAULT_WINDOW,
    streams: streams === 3 ? undefined : streams,
  });
  const { handler } = host.open(
    MessageType.WORKLOAD_LOGS,
    payload,
    (stream) => new WorkloadLogStream(host.link, stream, DEFAULT_WINDOW, timeoutMs),
  );
  const signal = opts.signal;
  if (signal) {
    const onAbort = () =>
      handler.readable.destroy(new AbortError("workloadLogs aborted", { cause: signal.reason }));
    if (signal.aborted) onAbort();
    else signal.addEventListener("abort", onAbort, { once: true });
    handler.readable.once("close", () => signal.removeEventListener("abort", onAbort));
  }
  return handler.readable;
}

class WorkloadLogStream implements StreamHandler {
  readonly readable: Readable;
  readonly #link: StreamLink;
  readonly #stream: number;
  readonly #credit: GuestCredit;
  readonly #watchdog: Watchdog | undefined;
  readonly #queue: { data: Uint8Array; cost: number }[] = [];
  #wanting = false;
  #ok = false;
  #ended = false;

  constructor(link: StreamLink, stream: number, window: number, timeoutMs: number | undefined) {
    this.#link = link;
    this.#stream = stream;
    this.#credit = new GuestCredit(link, stream, window, () => !this.#ended);
    this.#watchdog =
      timeoutMs === undefined
        ? undefined
        : new Watchdog(timeoutMs, () => this.#fail(agentTimeout(link, "workloadLogs", timeoutMs), true));
    this.readable = new Readable({
      highWaterMark: 64 * 1024,
      read: () => {
        this.#wanting = true;
        this.#pump();
      },
      destroy: (error, callback) => {
        this.#fail(error ?? new GuestIoError("workloadLogs: stream destroyed", { path: "workload" }), true);
        callback(error);
      },
    });
  }

  onFrame(frame: Frame): void {
    this.#watchdog?.progress();
    switch (frame.type) {
      case MessageType.STDOUT:
      case MessageType.STDERR: {
        if (this.#ok) throw protocolError(`workload logs (stream ${this.#stream}): output after OK`);
        const cost = this.#credit.take(frame, `workload logs (stream ${this.#stream})`);
        if (frame.payload.length > 0) this.#queue.push({ data: frame.payload, cost });
        else this.#credit.grant(cost);
        this.#pump();
        return;
      }
      case MessageType.OK:
        decodeOk(frame.payload);
        this.#ok = true;
        this.#ended = true;
        this.#watchdog?.stop();
        this.#link.release(this.#stream);
        this.#pump();
        return;
      case MessageType.ERROR: {
        const m = decodeError(frame.payload);
        this.#fail(
          new GuestIoError(
            `workloadLogs failed in the guest (${agentErrorCodeName(m.code)})${m.message ? `: ${m.message}` : ""}`,
            {
              path: "workload",
              errno: m.errno,
            },
          ),
          false,
        );
        return;
      }
      default:
        throw protocolError(`workload logs (stream ${this.#stream}): unexpected ${describeType(frame.type)}`);
    }
  }

  onClose(error: Error): void {
    this.#fail(error, false);
  }

  #pump(): void {
    while (this.#wanting && this.#queue.length > 0) {
      const { data, cost } = this.#queue.shift()!;
      this.#credit.grant(cost);
      this.#wanting = this.readable.push(data);
    }
    if (this.#ok && this.#queue.length === 0 && this.#wanting) {
      this.#wanting = false;
      this.readable.push(null);
    }
    if (this.#watchdog) {
      if (this.#wanting && !this.#ended) this.#watchdog.arm();
      else this.#watchdog.disarm();
    }
  }

  #fail(error: Error, reset: boolean): void {
    if (this.#ended) return;
    if (reset) this.#link.reset(this.#stream, this.#credit.outstanding);
    this.#ended = true;
    this.#watchdog?.stop();
    this.#link.release(this.#stream);
    this.#queue.length = 0;
    if (this.readable.destroyed) return;
    if (this.readable.listenerCount("error") > 0) this.readable.destroy(error);
    else this.readable.destroy();
  }
}
