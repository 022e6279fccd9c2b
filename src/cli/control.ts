/**
 * The control protocol between the CLI and a detached VM's supervisor: one JSON object per line
 * over the supervisor's unix socket, bytes as base64. One request per connection, first line:
 *
 * - `{op: "exec", argv, env, cwd?, user?, tty, winsize?, stdin}`; then the client sends
 *   `{op: "stdin", data}`, `{op: "stdin-end"}`, `{op: "resize", rows, cols}`; the supervisor
 *   sends `{type: "stdout" | "stderr", data}` and at last `{type: "exit", exitCode, signal}`.
 *   The client closing the connection kills the command.
 * - `{op: "logs", follow}`: the supervisor sends `{type: "stdout", data}` with the log so far and,
 *   with `follow`, what comes until the workload ends; then `{type: "end"}`.
 * - `{op: "stop"}`: the supervisor stops the VM, answers `{type: "stopped"}` and exits.
 *
 * Any request can be answered `{type: "error", code, message}` (`code`: an `ErrorCode` of the
 * library, or `INVALID_ARGUMENT`). Lines are bounded (MAX_LINE_BYTES) on both sides: a longer one
 * ends the connection.
 */
import { createConnection, type Socket } from "node:net";
import { UsageError } from "./cli.ts";

const MAX_LINE_BYTES = 1024 * 1024;
/** Output chunks are split so that a line stays well under the bound. */
export const MAX_CHUNK_BYTES = 256 * 1024;

export type ControlRequest =
  | {
      op: "exec";
      argv: string[];
      env: Record<string, string>;
      cwd?: string;
      user?: string;
      tty: boolean;
      winsize?: { rows: number; cols: number };
      stdin: boolean;
    }
  | { op: "stdin"; data: string }
  | { op: "stdin-end" }
  | { op: "resize"; rows: number; cols: number }
  | { op: "logs"; follow: boolean }
  | { op: "stop" };

export type ControlReply =
  | { type: "stdout" | "stderr"; data: string }
  | { type: "exit"; exitCode: number | null; signal: string | null; timedOut?: boolean }
  | { type: "end" }
  | { type: "stopped" }
  | { type: "error"; code: string; message: string };

/** One side of a connection: send objects, iterate over the received ones. */
export class ControlChannel<In, Out> {
  readonly socket: Socket;
  readonly #queue: In[] = [];
  #wake: (() => void) | undefined;
  #ended = false;
  #error: Error | undefined;

  constructor(socket: Socket) {
    this.socket = socket;
    let buffer = "";
    socket.setEncoding("utf8");
    socket.on("data", (text: string) => {
      buffer += text;
      for (let nl = buffer.indexOf("\n"); nl !== -1; nl = buffer.indexOf("\n")) {
        const line = buffer.slice(0, nl);
        buffer = buffer.slice(nl + 1);
        try {
          this.#queue.push(JSON.parse(line) as In);
        } catch {
          this.#fail(new Error("malformed control message"));
          return;
        }
      }
      if (buffer.length > MAX_LINE_BYTES) this.#fail(new Error("control message too long"));
      this.#notify();
    });
    socket.on("error", (error) => this.#fail(error));
    socket.on("close", () => {
      this.#ended = true;
      this.#notify();
    });
  }

  send(message: Out): void {
    if (!this.socket.destroyed) this.socket.write(`${JSON.stringify(message)}\n`);
  }

  /** Sends and closes our side once written. */
  end(message?: Out): void {
    if (message !== undefined) this.send(message);
    this.socket.end();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<In> {
    for (;;) {
      const next = this.#queue.shift();
      if (next !== undefined) {
        yield next;
        continue;
      }
      if (this.#error) throw this.#error;
      if (this.#ended) return;
      await new Promise<void>((resolve) => {
        this.#wake = resolve;
      });
    }
  }

  #notify(): void {
    const wake = this.#wake;
    this.#wake = undefined;
    wake?.();
  }

  #fail(error: Error): void {
    this.#error ??= error;
    this.socket.destroy();
    this.#notify();
  }
}

/** Connects to a supervisor; a VM whose supervisor is not listening is a one-line error. */
export function connectControl(
  socketPath: string,
  name: string,
): Promise<ControlChannel<ControlReply, ControlRequest>> {
  return new Promise((resolve, reject) => {
    const socket = createConnection(socketPath);
    socket.once("connect", () => {
      socket.off("error", reject);
      resolve(new ControlChannel(socket));
    });
    socket.once("error", (error) => {
      reject(
        new UsageError(
          `VM ${name} is not running (its supervisor does not answer: ${(error as NodeJS.ErrnoException).code ?? error.message})`,
        ),
      );
    });
  });
}

export function encode(data: Uint8Array): string {
  return Buffer.from(data.buffer, data.byteOffset, data.byteLength).toString("base64");
}

export function decode(data: string): Buffer {
  return Buffer.from(data, "base64");
}
