/**
 * QmpClient against a scripted QMP peer on a real unix socket: the protocol corners that real
 * QEMU does not produce on demand (split messages, slow replies, garbage). The same client is
 * tested against real QEMU in test/integration/vmm-qemu-process.test.ts.
 */
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { connect, createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { SupermachineError, VmError } from "../../src/errors.ts";
import { QmpClient, QmpError } from "../../src/vmm/qmp-client.ts";

const GREETING = `${JSON.stringify({
  QMP: { version: { qemu: { major: 7, minor: 2, micro: 22 }, package: "test" }, capabilities: ["oob"] },
})}\r\n`;

let dir: string;
let counter = 0;
before(async () => {
  dir = await mkdtemp(path.join(tmpdir(), "sm-qmp-"));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

interface Command {
  execute: string;
  arguments?: Record<string, unknown>;
  id: number;
}

/** A peer that greets, then hands each command to `onCommand`. Returns the client and the peer socket. */
async function pair(
  onCommand: (command: Command, peer: Socket) => void,
  options: { greet?: boolean } = {},
): Promise<{ client: QmpClient; peer: Socket; server: Server }> {
  const socketPath = path.join(dir, `qmp-${counter++}.sock`);
  let peer: Socket | undefined;
  const server = createServer((socket) => {
    peer = socket;
    let buffer = "";
    socket.setEncoding("utf8");
    socket.on("data", (text: string) => {
      buffer += text;
      for (let newline = buffer.indexOf("\n"); newline !== -1; newline = buffer.indexOf("\n")) {
        const command = JSON.parse(buffer.slice(0, newline)) as Command;
        buffer = buffer.slice(newline + 1);
        if (command.execute === "qmp_capabilities") socket.write(`{"return": {}, "id": ${command.id}}\r\n`);
        else onCommand(command, socket);
      }
    });
    socket.on("error", () => {});
    if (options.greet !== false) socket.write(GREETING);
  });
  await new Promise<void>((resolve) => server.listen(socketPath, resolve));
  const socket = connect(socketPath);
  const client = await QmpClient.fromSocket(socket, {
    errorFields: () => ({ consoleLogPath: "/vm/console.log" }),
  });
  return { client, peer: peer!, server };
}

const reply = (peer: Socket, id: number, value: unknown) =>
  peer.write(`${JSON.stringify({ return: value, id })}\r\n`);

describe("QmpClient", () => {
  it("greets, executes, and matches replies by id across split and merged packets", async () => {
    const { client, server } = await pair((command, peer) => {
      const text = `${JSON.stringify({ event: "STOP", timestamp: { seconds: 1, microseconds: 2 } })}\r\n${JSON.stringify({ return: { echo: command.arguments }, id: command.id })}\r\n`;
      // Byte by byte: messages split anywhere, including inside UTF-8 sequences.
      const bytes = Buffer.from(text);
      for (let i = 0; i < bytes.length; i++) peer.write(bytes.subarray(i, i + 1));
    });
    assert.equal(client.greeting.version.qemu.major, 7);
    const events: string[] = [];
    client.on("event", (event) => events.push(event.event));
    const [a, b] = await Promise.all([
      client.execute("echo", { text: "héllo ✓" }),
      client.execute("echo", { text: "two" }),
    ]);
    assert.deepEqual(a, { echo: { text: "héllo ✓" } });
    assert.deepEqual(b, { echo: { text: "two" } });
    assert.deepEqual(events, ["STOP", "STOP"]);
    client.close();
    server.close();
  });

  it("turns QMP errors into QmpError with class and description", async () => {
    const { client, server } = await pair((command, peer) => {
      peer.write(
        `${JSON.stringify({ error: { class: "CommandNotFound", desc: "The command nope has not been found" }, id: command.id })}\r\n`,
      );
    });
    await assert.rejects(client.execute("nope"), (error: unknown) => {
      assert.ok(error instanceof QmpError);
      assert.ok(SupermachineError.is(error));
      assert.equal(error.code, "VMM_FAILED");
      assert.equal(error.qmpClass, "CommandNotFound");
      assert.equal(error.command, "nope");
      assert.match(error.qmpDesc, /has not been found/);
      assert.equal(error.consoleLogPath, "/vm/console.log");
      return true;
    });
    client.close();
    server.close();
  });

  it("rejects pending calls with VM_EXITED when the peer goes away", async () => {
    const { client, server } = await pair((_command, peer) => peer.destroy());
    const closed = new Promise((resolve) => client.once("close", () => resolve(true)));
    const waiting = client.waitForEvent("SHUTDOWN");
    await assert.rejects(client.execute("query-status"), (error: unknown) => {
      assert.ok(error instanceof VmError);
      assert.equal(error.code, "VM_EXITED");
      assert.equal(error.consoleLogPath, "/vm/console.log");
      return true;
    });
    await assert.rejects(waiting, { code: "VM_EXITED" });
    assert.equal(await closed, true);
    assert.equal(client.closed, true);
    await assert.rejects(client.execute("query-status"), { code: "VM_EXITED" });
    server.close();
  });

  it("aborts one call without disturbing the next reply", async () => {
    const held: Command[] = [];
    const { client, server, peer } = await pair((command) => held.push(command));
    const controller = new AbortController();
    const first = client.execute("slow", undefined, { signal: controller.signal });
    const second = client.execute("fast");
    controller.abort(new Error("enough"));
    await assert.rejects(first, { code: "ABORTED" });
    // Wait until both commands reached the peer, then answer both in order.
    while (held.length < 2) await new Promise((resolve) => peer.once("data", resolve));
    reply(peer, held[0]!.id, "late");
    reply(peer, held[1]!.id, "ok");
    assert.equal(await second, "ok");
    client.close();
    server.close();
  });

  it("times out a call", async () => {
    const { client, server } = await pair(() => {});
    await assert.rejects(client.execute("hang", undefined, { timeoutMs: 20 }), {
      code: "VMM_FAILED",
      message: /no reply within 20 ms/,
    });
    client.close();
    server.close();
  });

  it("waits for events by name and filter, with a timeout", async () => {
    const { client, server, peer } = await pair(() => {});
    const waiting = client.waitForEvent("MIGRATION", {
      filter: (event) => event.data?.status === "completed",
    });
    peer.write(`${JSON.stringify({ event: "MIGRATION", data: { status: "active" } })}\r\n`);
    peer.write(`${JSON.stringify({ event: "RESUME" })}\r\n`);
    peer.write(`${JSON.stringify({ event: "MIGRATION", data: { status: "completed" } })}\r\n`);
    assert.deepEqual((await waiting).data, { status: "completed" });
    await assert.rejects(client.waitForEvent("NEVER", { timeoutMs: 10 }), { code: "VMM_FAILED" });
    const controller = new AbortController();
    const aborted = client.waitForEvent("NEVER", { signal: controller.signal });
    controller.abort();
    await assert.rejects(aborted, { code: "ABORTED" });
    assert.equal(client.listenerCount("event"), 0, "listeners are removed");
    client.close();
    server.close();
  });

  it("iterates events until the connection closes", async () => {
    const { client, server, peer } = await pair(() => {});
    const seen: string[] = [];
    const done = (async () => {
      for await (const event of client.events()) seen.push(event.event);
    })();
    peer.write(`{"event":"STOP"}\r\n{"event":"RESUME"}\r\n`);
    await client.waitForEvent("RESUME");
    peer.end();
    await done;
    assert.deepEqual(seen, ["STOP", "RESUME"]);
    server.close();
  });

  it("fails the handshake when no greeting comes", async () => {
    const socketPath = path.join(dir, "silent.sock");
    const server = createServer((socket) => socket.on("error", () => {}));
    await new Promise<void>((resolve) => server.listen(socketPath, resolve));
    await assert.rejects(QmpClient.fromSocket(connect(socketPath), { timeoutMs: 50 }), {
      code: "VMM_FAILED",
      message: /greeting/,
    });
    server.close();
  });

  it("closes on a message that is not JSON", async () => {
    const { client, server } = await pair((_command, peer) => peer.write("this is not json\r\n"));
    await assert.rejects(client.execute("x"), { code: "VMM_FAILED", message: /not JSON/ });
    assert.equal(client.closed, true);
    server.close();
  });
});
