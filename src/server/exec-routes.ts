/**
 * Exec: one request that returns the outcome (on a VM, or on a pool: acquire → stage → run →
 * chain → release), and the streaming form over a WebSocket (stdin, stdout/stderr, resize,
 * signal, exit). The server always runs with `reject: false` and returns the outcome; the client
 * applies `reject` the way the library does.
 */

import { type ExecHandle, type ExecOptions, RemoteError, SupermachineError, type Vm } from "../index.ts";
import {
  CHANNEL,
  CLOSE_NORMAL,
  type ClientMessage,
  errorToWire,
  execOptionsFromWire,
  outcomeToWire,
  type StreamPeer,
} from "../wire/index.ts";
import { invalid, readJson, sendJson } from "./http.ts";
import type { RequestContext, StreamContext } from "./router.ts";
import type { ServerCore } from "./server-core.ts";
import { peerOf } from "./ws-peer.ts";

/** How long a new exec stream may take to send its `start` message. */
const START_TIMEOUT_MS = 10_000;

/** Request options with the server's output cap applied (`LIMIT_EXCEEDED` for more). */
function boundedOptions(core: ServerCore, body: unknown, signal: AbortSignal): ExecOptions {
  const options = execOptionsFromWire(body);
  const cap = core.limits.maxOutputBytes;
  if (typeof options.maxBufferBytes === "number" && options.maxBufferBytes > cap) {
    throw new RemoteError(
      "LIMIT_EXCEEDED",
      `maxBufferBytes ${options.maxBufferBytes} is above this server's limit of ${cap} (--max-output-bytes); stream the output with spawn() instead`,
    );
  }
  return { ...options, maxBufferBytes: options.maxBufferBytes ?? cap, reject: false, signal };
}

async function runOnVm(vm: Vm, body: Record<string, unknown>, ctx: RequestContext): Promise<void> {
  const options = boundedOptions(ctx.core, body, ctx.signal);
  const outcome = await vm.exec(body.argv as string[], options);
  sendJson(ctx.res, 200, { outcome: outcomeToWire(outcome) });
}

/** `POST /v1/vms/{id}/exec`. */
export async function execOnVm(ctx: RequestContext): Promise<void> {
  const body = await readJson(ctx.req, ctx.core.limits.maxBodyBytes);
  const started = performance.now();
  await ctx.core.holdings.using(ctx.params.id!, (held) => runOnVm(held.vm, body, ctx));
  ctx.core.metrics.execSeconds.observe({ mode: "oneshot" }, (performance.now() - started) / 1000);
}

/** `POST /v1/pools/{id}/exec`: acquire a VM, run, release it — the verifier loop in one request. */
export async function execOnPool(ctx: RequestContext): Promise<void> {
  const body = await readJson(ctx.req, ctx.core.limits.maxBodyBytes);
  const { holdings, metrics } = ctx.core;
  const started = performance.now();
  const pool = holdings.pool(ctx.params.id!);
  const held = await holdings.acquire(pool, ctx.signal);
  metrics.acquireSeconds.observe({ pool: pool.id }, (performance.now() - started) / 1000);
  ctx.note({ pool: pool.id, vm: held.id });
  try {
    await runOnVm(held.vm, body, ctx);
  } finally {
    await holdings.end(held, "stop");
  }
  metrics.execSeconds.observe({ mode: "pool" }, (performance.now() - started) / 1000);
}

/** `WS /v1/vms/{id}/exec`: one exec, streamed. */
export async function execStream(ctx: StreamContext): Promise<void> {
  const { core, ws } = ctx;
  await core.holdings.using(ctx.params.id!, async (held) => {
    let handle: ExecHandle | undefined;
    let started = 0;
    let startTimer: NodeJS.Timeout | undefined;
    const peer: StreamPeer = peerOf(ws, {
      control: async (message) => {
        const m = message as ClientMessage;
        if (m.type === "start") {
          if (handle !== undefined || started > 0) throw invalid("start sent twice");
          started = performance.now();
          clearTimeout(startTimer);
          handle = await spawn(held.vm, m, core, ctx.signal, peer);
          if (handle !== undefined) void pumpOutput(handle, peer, core, started);
          return;
        }
        if (handle === undefined) throw invalid(`${m.type} before start`);
        if (m.type === "stdin-end") await handle.stdin.end();
        else if (m.type === "resize") handle.resize(m.rows, m.cols);
        else if (m.type === "signal") handle.kill(m.signal);
        else throw invalid(`unknown message ${JSON.stringify(m.type)}`);
      },
      data: async (channel, bytes) => {
        if (channel !== CHANNEL.stdin || handle === undefined)
          throw invalid("data other than stdin after start");
        await handle.stdin.write(bytes);
      },
    });
    startTimer = setTimeout(
      () => peer.violation(`no start message within ${START_TIMEOUT_MS} ms`),
      START_TIMEOUT_MS,
    );
    const onAbort = () => peer.close(1001, "the server is shutting down");
    ctx.signal.addEventListener("abort", onAbort, { once: true });
    try {
      await peer.ended;
    } finally {
      clearTimeout(startTimer);
      ctx.signal.removeEventListener("abort", onAbort);
      // A client gone mid-stream leaves nothing running.
      await handle?.[Symbol.asyncDispose]();
    }
  });
}

async function spawn(
  vm: Vm,
  message: Extract<ClientMessage, { type: "start" }>,
  core: ServerCore,
  signal: AbortSignal,
  peer: StreamPeer,
): Promise<ExecHandle | undefined> {
  try {
    const options = execOptionsFromWire(message.options ?? {});
    const handle = await vm.spawn(message.argv, { ...options, signal });
    peer.sendControl({ type: "started", pid: handle.pid });
    return handle;
  } catch (error) {
    sendStreamError(peer, core, error);
    return undefined;
  }
}

async function pumpOutput(
  handle: ExecHandle,
  peer: StreamPeer,
  core: ServerCore,
  started: number,
): Promise<void> {
  try {
    for await (const event of handle) {
      if (event.kind === "exit") break;
      await peer.sendData(event.kind === "stdout" ? CHANNEL.stdout : CHANNEL.stderr, event.data);
    }
    const outcome = await handle.wait();
    peer.sendControl({
      type: "exit",
      exitCode: outcome.exitCode,
      signal: outcome.signal,
      outcome: outcomeToWire(outcome),
    });
    peer.close(CLOSE_NORMAL, "exit");
    core.metrics.execSeconds.observe({ mode: "stream" }, (performance.now() - started) / 1000);
  } catch (error) {
    if (!peer.isEnded) sendStreamError(peer, core, error);
  }
}

/** Reports `error` on a stream and ends it. */
export function sendStreamError(peer: StreamPeer, core: ServerCore, error: unknown): void {
  const wire = errorToWire(error);
  core.metrics.errors.inc({ code: wire.code });
  if (!SupermachineError.is(error))
    core.log("error", "stream failed", { error: (error as Error)?.stack ?? String(error) });
  peer.sendControl({ type: "error", error: wire });
  peer.close(CLOSE_NORMAL, wire.code);
}
