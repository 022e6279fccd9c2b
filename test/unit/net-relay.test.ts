/**
 * The allow-list relay `sm-net` (hosttools/sm-net.c) as a host process, started through the same
 * confinement chain QEMU runs under (setpriv → prlimit → sm-net), with busybox in its namespace
 * standing in for QEMU: what the namespace lets out, what the relay admits and reports, the
 * bounds, and supervision. No VM (test/integration/network-vm.test.ts has those).
 */
import assert from "node:assert/strict";
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { createSocket } from "node:dgram";
import { once } from "node:events";
import { readFileSync } from "node:fs";
import { open } from "node:fs/promises";
import { createServer, type Server, Socket } from "node:net";
import { networkInterfaces } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { promisify } from "node:util";
import { confinedCommand, confinementTools, qemuLimits, vmQemuIdentity } from "../../src/vmm/confinement.ts";
import { parseRelayStatus, probeNetRelay, type RelayStatus, relayArgs } from "../../src/vmm/net-relay.ts";

const ROOT = join(import.meta.dirname, "..", "..");
const BUSYBOX = "/bin/busybox";
let relay: string;

before(async () => {
  await promisify(execFile)("make", ["-s", "-C", join(ROOT, "hosttools")]);
  relay = join(ROOT, "hosttools", "build", "sm-net");
});

interface Run {
  child: ChildProcess;
  statuses: RelayStatus[];
  /** Resolves at the `ready` line (the program was exec'd). */
  ready: Promise<void>;
  /** The program's stdout, once every process holding it (the relay, the program) has ended. */
  stdout: Promise<string>;
  /** The first line the program wrote. */
  firstLine: Promise<string>;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** sm-net with `rules` (and `extra` flags) running `program` in its namespace, as QEMU would run. */
async function runRelay(rules: string[], program: string[], extra: string[] = []): Promise<Run> {
  const tools = await confinementTools();
  const handle = await open(relay, "r");
  try {
    const args = [...relayArgs({ exeFd: 4, statusFd: 3, rules }), ...extra, "--", ...program];
    const command = confinedCommand(tools, args, vmQemuIdentity("relay-test"), qemuLimits(64));
    const child = spawn(command.command, command.argv, {
      stdio: ["ignore", "pipe", "pipe", "pipe", handle.fd],
      env: {},
      detached: true,
    });
    await once(child, "spawn");
    const statuses: RelayStatus[] = [];
    let markReady!: () => void;
    const ready = new Promise<void>((resolve) => {
      markReady = resolve;
    });
    let pending = "";
    (child.stdio[3] as NodeJS.ReadableStream).setEncoding("utf8");
    (child.stdio[3] as NodeJS.ReadableStream).on("data", (text: string) => {
      pending += text;
      for (let nl = pending.indexOf("\n"); nl >= 0; nl = pending.indexOf("\n")) {
        const status = parseRelayStatus(pending.slice(0, nl));
        assert.ok(status !== undefined, `unknown status line ${pending.slice(0, nl)}`);
        statuses.push(status);
        if (status.kind === "ready") markReady();
        pending = pending.slice(nl + 1);
      }
    });
    let stderr = "";
    child.stderr!.on("data", (chunk: Buffer) => {
      stderr += chunk.toString();
    });
    let text = "";
    let markLine!: (line: string) => void;
    const firstLine = new Promise<string>((resolve) => {
      markLine = resolve;
    });
    child.stdout!.on("data", (chunk: Buffer) => {
      text += chunk.toString();
      if (text.includes("\n")) markLine(text.slice(0, text.indexOf("\n")));
    });
    const stdout = new Promise<string>((resolve) => child.stdout!.once("close", () => resolve(text)));
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
      child.once("close", (code, signal) => {
        if (code !== 0 && stderr !== "") process.stderr.write(`sm-net stderr: ${stderr}`);
        resolve({ code, signal });
      }),
    );
    return { child, statuses, ready, stdout, firstLine, exited };
  } finally {
    await handle.close();
  }
}

/** Runs a shell script in the namespace and resolves with its output once everything ended. */
async function sh(rules: string[], script: string, extra: string[] = []) {
  const run = await runRelay(rules, [BUSYBOX, "sh", "-c", script], extra);
  const [stdout, exit] = await Promise.all([run.stdout, run.exited]);
  return { stdout, exit, statuses: run.statuses };
}

async function tcpServer(reply: string): Promise<{ server: Server; port: number; accepted: () => number }> {
  let accepted = 0;
  const server = createServer((socket) => {
    accepted++;
    socket.on("error", () => {});
    socket.end(reply);
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  return { server, port: (server.address() as { port: number }).port, accepted: () => accepted };
}

describe("sm-net, the allow-list relay", { timeout: 30_000 }, () => {
  const servers: Server[] = [];
  after(() => {
    for (const server of servers) server.close();
  });
  const serve = async (reply: string) => {
    const s = await tcpServer(reply);
    servers.push(s.server);
    return s;
  };

  it("builds its namespace on this host (the probe the library runs once)", async () => {
    assert.equal(await probeNetRelay({ path: relay, identity: vmQemuIdentity("relay-test") }), undefined);
  });

  it("gives its program a namespace with only lo, which it cannot change, without capabilities", async () => {
    const { stdout, exit, statuses } = await sh(
      ["10.1.2.0/24:443"],
      `${BUSYBOX} ip -o link | ${BUSYBOX} cut -d: -f2; ` +
        `${BUSYBOX} grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status; ` +
        `${BUSYBOX} ip addr add 10.9.9.9/8 dev lo 2>&1 || echo addr-refused; ` +
        `${BUSYBOX} ip route add default dev lo 2>&1 || echo route-refused; ` +
        `${BUSYBOX} ip route show table local | ${BUSYBOX} grep -q '^local 10.1.2.0/24 dev lo' && echo anyip`,
    );
    assert.equal(exit.code, 0);
    assert.deepEqual(
      stdout
        .split("\n")
        .map((l) => l.trim())
        .filter((l) => l !== "" && !/Operation not permitted|RTNETLINK/.test(l)),
      [
        "lo",
        "CapEff:\t0000000000000000",
        "CapBnd:\t0000000000000000",
        "NoNewPrivs:\t1",
        "addr-refused",
        "route-refused",
        "anyip",
      ],
    );
    assert.deepEqual(statuses, [{ kind: "ready" }]);
  });

  it("relays a listed host port, refuses an unlisted one, resets a listed port's unlisted destination", async () => {
    const allowed = await serve("allowed\n");
    const other = await serve("other\n");
    const { stdout, statuses } = await sh(
      [`127.0.0.1:${allowed.port}`, `10.1.2.0/24:${other.port}`],
      [
        `echo | ${BUSYBOX} nc 127.0.0.1 ${allowed.port}`,
        // No listener in the namespace for an unlisted port: refused there, nothing leaves.
        `echo | ${BUSYBOX} nc 127.0.0.1 ${other.port + 1} 2>/dev/null || echo refused`,
        // A listed port, but the host's loopback is not listed for it: reset by the relay.
        `echo | ${BUSYBOX} nc 127.0.0.1 ${other.port} 2>/dev/null; echo after-reset`,
        // Not even routable in the namespace.
        `echo | ${BUSYBOX} nc 10.9.9.9 ${other.port} 2>&1 | ${BUSYBOX} grep -q unreachable && echo unreachable`,
      ].join("; "),
    );
    assert.equal(stdout, "allowed\nrefused\nafter-reset\nunreachable\n");
    assert.equal(other.accepted(), 0, "the unlisted destination was never connected to");
    assert.deepEqual(statuses, [{ kind: "ready" }, { kind: "deny", address: "127.0.0.1", port: other.port }]);
  });

  it("never opens the host's loopback through a non-loopback rule, 0.0.0.0/0 included", async () => {
    const target = await serve("loopback\n");
    const { stdout, statuses } = await sh(
      [`0.0.0.0/0:${target.port}`],
      `echo | ${BUSYBOX} nc 127.0.0.1 ${target.port}; echo done`,
    );
    assert.equal(stdout, "done\n");
    assert.equal(target.accepted(), 0);
    assert.deepEqual(statuses.at(-1), { kind: "deny", address: "127.0.0.1", port: target.port });
  });

  it("lets no UDP, DNS or ICMP out", async () => {
    // A DNS server stand-in on the host's loopback: it counts the datagrams that reach it.
    const udp = createSocket("udp4");
    let datagrams = 0;
    udp.on("message", () => {
      datagrams++;
    });
    udp.bind(0, "127.0.0.1");
    await once(udp, "listening");
    const udpPort = udp.address().port;
    const host = hostAddress();
    const lookup = (server: string, port: number) =>
      `${BUSYBOX} nslookup -port=${port} -timeout=1 -retry=1 example.org ${server} >/dev/null 2>&1 || echo dns-failed`;
    try {
      const { stdout } = await sh(
        // Even with the port listed for TCP.
        [`127.0.0.1:${udpPort}`, `0.0.0.0/0:53`],
        [
          lookup("127.0.0.1", udpPort),
          lookup(host, 53),
          `${BUSYBOX} ping -c 1 -W 1 ${host} >/dev/null 2>&1 || echo ping-failed`,
        ].join("; "),
      );
      assert.equal(stdout, "dns-failed\ndns-failed\nping-failed\n");
      assert.equal(datagrams, 0, "a datagram reached the host's loopback");
      // The same lookup from the host's namespace does reach it (the probe itself works).
      await promisify(execFile)(BUSYBOX, ["sh", "-c", lookup("127.0.0.1", udpPort)]);
      assert.ok(datagrams > 0);
    } finally {
      udp.close();
    }
  });

  it("resets an allowed connection whose destination does not answer within the connect timeout", async () => {
    // A listener whose accept queue is full: the kernel drops further SYNs, connect() hangs.
    const stuck = spawn(
      "python3",
      [
        "-c",
        "import socket,time; s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(0); print(s.getsockname()[1], flush=True); time.sleep(120)",
      ],
      { stdio: ["ignore", "pipe", "inherit"] },
    );
    const fillers: Socket[] = [];
    try {
      const [line] = (await once(stuck.stdout!, "data")) as [Buffer];
      const port = Number(line.toString().trim());
      for (let i = 0; i < 3; i++) {
        const socket = new Socket();
        socket.on("error", () => {});
        socket.connect(port, "127.0.0.1");
        fillers.push(socket);
      }
      const { stdout, statuses } = await sh(
        [`127.0.0.1:${port}`],
        `echo | ${BUSYBOX} nc 127.0.0.1 ${port} 2>/dev/null; echo ended`,
        ["--connect-timeout-ms", "300"],
      );
      assert.equal(stdout, "ended\n");
      assert.deepEqual(statuses.at(-1), {
        kind: "fail",
        address: "127.0.0.1",
        port,
        reason: "connect-timeout",
      });
    } finally {
      for (const socket of fillers) socket.destroy();
      stuck.kill("SIGKILL");
    }
  });

  it("resets connections beyond --max-conns and reports them", async () => {
    const held: Socket[] = [];
    // Never answers nor closes: the connections stay open (half-closed by the clients).
    const server = createServer({ allowHalfOpen: true }, (socket) => {
      socket.on("error", () => {});
      held.push(socket);
    });
    server.listen(0, "127.0.0.1");
    await once(server, "listening");
    servers.push(server);
    const port = (server.address() as { port: number }).port;
    try {
      const { stdout, statuses } = await sh(
        [`127.0.0.1:${port}`],
        // Two connections the server holds open, then a third.
        `${BUSYBOX} nc 127.0.0.1 ${port} </dev/null >/dev/null 2>&1 & a=$!; ` +
          `${BUSYBOX} nc 127.0.0.1 ${port} </dev/null >/dev/null 2>&1 & b=$!; ` +
          // Both ends of both connections show in the namespace (half-closed: the server holds them).
          `while [ $(${BUSYBOX} netstat -tn | ${BUSYBOX} grep -c ':${port} ') -lt 4 ]; do ${BUSYBOX} sleep 0.05; done; ` +
          `echo | ${BUSYBOX} nc 127.0.0.1 ${port} 2>/dev/null; echo third-ended; kill $a $b`,
        ["--max-conns", "2"],
      );
      assert.equal(stdout, "third-ended\n");
      assert.deepEqual(statuses.at(-1), {
        kind: "fail",
        address: "127.0.0.1",
        port,
        reason: "too-many-connections",
      });
    } finally {
      for (const socket of held) socket.destroy();
    }
  });

  it("ends the way its program ended: exit code, or signal", async () => {
    assert.deepEqual((await sh([], "exit 7")).exit, { code: 7, signal: null });
    assert.deepEqual((await sh([], "kill -TERM $$")).exit, { code: null, signal: "SIGTERM" });
  });

  it("passes SIGTERM on; its program dies when it is SIGKILLed", async () => {
    const run = await runRelay([], [BUSYBOX, "sh", "-c", "echo $$; exec sleep 600"]);
    await run.ready;
    const program = Number(await run.firstLine);
    assert.ok(isAlive(program));
    run.child.kill("SIGKILL");
    assert.deepEqual(await run.exited, { code: null, signal: "SIGKILL" });
    // The program held the same stdout: its end of file means the program is gone too.
    await run.stdout;
    assert.equal(isAlive(program), false, "the program outlived its relay");

    const term = await runRelay([], [BUSYBOX, "sleep", "600"]);
    await term.ready;
    term.child.kill("SIGTERM");
    assert.deepEqual(await term.exited, { code: null, signal: "SIGTERM" });
  });

  it("refuses bad arguments and running as root, with an error status line", async () => {
    const bad = await sh(["10.1.2.0/24:443"], "true", ["--allow", "10.1.2.0/24"]);
    assert.equal(bad.exit.code, 125);
    assert.equal(bad.statuses[0]?.kind, "error");
    if (process.getuid?.() === 0) {
      const direct = spawn(relay, ["--status-fd", "3", "--check"], {
        stdio: ["ignore", "ignore", "ignore", "pipe"],
      });
      let text = "";
      direct.stdio[3]!.on("data", (chunk: Buffer) => {
        text += chunk.toString();
      });
      const [code] = (await once(direct, "close")) as [number];
      assert.equal(code, 125);
      assert.match(text, /^error refusing to run as root/);
    }
  });
});

/** A non-loopback IPv4 address of this host: reachable from the host's namespace, never from the relay's. */
function hostAddress(): string {
  for (const addresses of Object.values(networkInterfaces())) {
    for (const a of addresses ?? []) if (a.family === "IPv4" && !a.internal) return a.address;
  }
  throw new Error("this host has no non-loopback IPv4 address to probe");
}

/** True while `pid` runs: not gone, not a zombie, not exiting (PF_EXITING, set before its files close). */
function isAlive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    const PF_EXITING = 0x4;
    return fields[0] !== "Z" && fields[0] !== "X" && (Number(fields[6]) & PF_EXITING) === 0;
  } catch {
    return false;
  }
}
