/**
 * The real guest agent, built from guest/ and run as an ordinary host process on an inherited
 * socket (`sm-init --channel-fd 3`), for contract tests without a VM.
 */
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { join } from "node:path";
import type { Duplex } from "node:stream";
import { promisify } from "node:util";
import { AgentClient, type AgentConnectOptions } from "../../src/agent/agent-client.ts";

const ROOT = join(import.meta.dirname, "..", "..");
let built: Promise<string> | undefined;

/** Runs `make -C guest` once per process; resolves with the path of `guest/build/sm-init`. */
export function agentBinary(): Promise<string> {
  built ??= promisify(execFile)("make", ["-s", "-C", join(ROOT, "guest")], {
    maxBuffer: 16 * 1024 * 1024,
  }).then(
    () => join(ROOT, "guest", "build", "sm-init"),
    (error: Error & { stderr?: string }) => {
      throw new Error(`make -C guest failed: ${error.message}\n${error.stderr ?? ""}`, { cause: error });
    },
  );
  return built;
}

/** A running host-mode agent: its process and the host end of its channel. */
export interface HostAgent {
  child: ChildProcess;
  socket: Duplex;
  /** Waits for the process to exit; resolves with its exit code or signal. */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** Kills the agent (SIGKILL) if it still runs and waits for it. */
  kill(): Promise<void>;
}

/** Spawns the agent on a fresh socketpair (stdio[3]). */
export async function spawnAgent(opts: { debug?: boolean } = {}): Promise<HostAgent> {
  const bin = await agentBinary();
  const args = ["--channel-fd", "3"];
  if (opts.debug) args.unshift("--debug");
  const child = spawn(bin, args, { stdio: ["ignore", "inherit", "inherit", "pipe"] });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.once("exit", (code, signal) => resolve({ code, signal }));
  });
  const socket = child.stdio[3] as Duplex;
  return {
    child,
    socket,
    exited,
    async kill() {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
      await exited;
    },
  };
}

/** Spawns the agent and connects an {@link AgentClient} to it. */
export async function connectAgent(
  opts: AgentConnectOptions & { debug?: boolean } = {},
): Promise<{ agent: HostAgent; client: AgentClient; [Symbol.asyncDispose](): Promise<void> }> {
  const agent = await spawnAgent(opts);
  try {
    const client = await AgentClient.connect(agent.socket, { timeoutMs: 10_000, ...opts });
    return {
      agent,
      client,
      async [Symbol.asyncDispose]() {
        client.close();
        await agent.kill();
      },
    };
  } catch (error) {
    await agent.kill();
    throw error;
  }
}
