/**
 * QEMU's migration protocol, as supermachine uses it for snapshots (docs/snapshots.md):
 *
 * - Save: the VM is paused; the device state (and, unless guest RAM lives in a shared file that
 *   `x-ignore-shared` leaves out, the RAM) is migrated to a unix socket the host listens on, and
 *   the host writes the stream to a file. (`exec:` URIs would spawn a process, which the strict
 *   seccomp sandbox forbids.)
 * - Load: QEMU was started with `-incoming defer` and the state file as its fd 3; `migrate-incoming
 *   fd:3` reads it with the vCPUs stopped.
 *
 * Only this module and the process supervision send QMP commands.
 */

import { createWriteStream } from "node:fs";
import { createServer } from "node:net";
import { join } from "node:path";
import { pipeline } from "node:stream/promises";
import { VmError } from "../errors.ts";
import type { QmpClient, QmpEvent } from "./qmp-client.ts";

/** The file descriptor a restored QEMU reads its incoming state from (see `LaunchOptions.incomingStatePath`). */
export const INCOMING_STATE_FD = 3;

/** What the migration steps need of a running QEMU. */
export interface MigrationTarget {
  readonly qmp: QmpClient;
  readonly stateDir: string;
  readonly consoleLogPath: string;
  readonly stderrTail: string;
  /** Rejects with `VM_EXITED` when QEMU exits (raced against every wait). */
  exitedError(what: string): Promise<never>;
}

export interface SaveStateOptions {
  /**
   * Leave guest RAM out of the stream because it lives in a shared memory file (`x-ignore-shared`):
   * the state is then tiny. False: the RAM is in the stream.
   */
  ignoreShared: boolean;
  timeoutMs?: number;
  signal?: AbortSignal;
}

export interface LoadStateOptions {
  /** As when the state was saved: RAM comes from the memory file, not the stream. */
  ignoreShared: boolean;
  timeoutMs?: number;
  signal?: AbortSignal;
  /** For messages: what is being loaded (a snapshot dir, …). */
  what: string;
}

const FINAL_STATUSES: ReadonlySet<string> = new Set(["completed", "failed", "cancelled"]);

function migrationEnded(event: QmpEvent): boolean {
  return FINAL_STATUSES.has(String(event.data?.status));
}

function capabilities(ignoreShared: boolean) {
  return {
    capabilities: [
      { capability: "x-ignore-shared", state: ignoreShared },
      { capability: "events", state: true },
    ],
  };
}

function tail(text: string): string {
  return text.trim().split("\n").slice(-5).join("\n");
}

/** Save the (paused) VM's state into `path`, which must not exist yet. */
export async function saveState(
  target: MigrationTarget,
  path: string,
  options: SaveStateOptions,
): Promise<void> {
  const { qmp } = target;
  await qmp.execute("migrate-set-capabilities", capabilities(options.ignoreShared));
  const socketPath = join(target.stateDir, "migrate.sock");
  const server = createServer();
  server.maxConnections = 1;
  const written = new Promise<void>((resolve, reject) => {
    server.once("connection", (socket) => {
      server.close();
      pipeline(socket, createWriteStream(path, { flags: "wx", mode: 0o600 })).then(resolve, reject);
    });
  });
  written.catch(() => {});
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(socketPath, () => resolve());
  });
  try {
    const finished = qmp.waitForEvent("MIGRATION", {
      filter: migrationEnded,
      ...(options.timeoutMs === undefined ? {} : { timeoutMs: options.timeoutMs }),
      ...(options.signal === undefined ? {} : { signal: options.signal }),
    });
    finished.catch(() => {});
    await qmp.execute("migrate", { uri: `unix:${socketPath}` });
    const event = await Promise.race([finished, target.exitedError("saving the VM state")]);
    if (event.data?.status !== "completed") {
      const info = await qmp
        .execute<{ "error-desc"?: string }>("query-migrate")
        .catch((): { "error-desc"?: string } => ({}));
      throw new VmError(
        "VMM_FAILED",
        `saving the VM state failed: ${String(event.data?.status)}${info["error-desc"] ? ` (${info["error-desc"]})` : ""} (console log: ${target.consoleLogPath})`,
        { consoleLogPath: target.consoleLogPath },
      );
    }
    await written;
  } finally {
    server.close();
  }
}

/** Load the state QEMU holds on {@link INCOMING_STATE_FD} (`-incoming defer`); vCPUs stay stopped. */
export async function loadState(target: MigrationTarget, options: LoadStateOptions): Promise<void> {
  const { qmp } = target;
  await qmp.execute("migrate-set-capabilities", capabilities(options.ignoreShared));
  const loaded = qmp.waitForEvent("MIGRATION", {
    filter: migrationEnded,
    ...(options.timeoutMs === undefined ? {} : { timeoutMs: options.timeoutMs }),
    ...(options.signal === undefined ? {} : { signal: options.signal }),
  });
  loaded.catch(() => {});
  await qmp.execute("migrate-incoming", { uri: `fd:${INCOMING_STATE_FD}` });
  const event = await Promise.race([loaded, target.exitedError(`loading ${options.what}`)]).catch(
    (error: unknown) => {
      // QEMU exits after a failed load, with the reason on stderr.
      if (error instanceof VmError && error.code === "VM_EXITED") {
        throw new VmError(
          "VM_EXITED",
          `QEMU exited while loading ${options.what}: ${tail(target.stderrTail)} (console log: ${target.consoleLogPath})`,
          { consoleLogPath: target.consoleLogPath, qemuExitCode: error.qemuExitCode },
          { cause: error },
        );
      }
      throw error;
    },
  );
  if (event.data?.status !== "completed") {
    throw new VmError(
      "VMM_FAILED",
      `loading ${options.what} failed (${String(event.data?.status)}): ${tail(target.stderrTail)} (console log: ${target.consoleLogPath})`,
      { consoleLogPath: target.consoleLogPath },
    );
  }
}
