/**
 * Network policies on real VMs (docs/network.md): `none` has no way out; an allow-list admits its
 * host port and nothing else, whatever a root guest does (another address, other routes, raw
 * sockets, UDP, DNS), with QEMU confined behind the relay; a snapshot baked with a network device
 * gives clones that each reach the host with connections of their own under `outbound`, and
 * restores under an allow-list or `none` as well. The same probes that fail under the allow-list
 * succeed under `outbound`, so the attacks are real ones.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createSocket, type Socket as UdpSocket } from "node:dgram";
import { subscribe, unsubscribe } from "node:diagnostics_channel";
import { once } from "node:events";
import { readFileSync, readlinkSync } from "node:fs";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { createServer, type Server, type Socket } from "node:net";
import { networkInterfaces, tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { promisify } from "node:util";
import { Image, Vm } from "../../src/index.ts";
import { fixtureImages } from "../helpers/fixtures.ts";
import { processesOf } from "../helpers/processes.ts";
import { busyboxRootfs, vmSkipReason } from "../helpers/vm.ts";

const RAW_SYN_SOURCE = new URL("../fixtures/net/raw-syn.c", import.meta.url).pathname;

/** A TCP server on the host that counts connections and answers each with `reply(firstLine)`. */
interface HostServer {
  port: number;
  accepted: number;
  lines: string[];
  server: Server;
}

async function hostServer(host: string, reply: (line: string) => string, barrier = 1): Promise<HostServer> {
  const waiting: { socket: Socket; line: string }[] = [];
  // Half-open allowed: a client that shut its side down still gets the answer.
  const state: HostServer = {
    port: 0,
    accepted: 0,
    lines: [],
    server: createServer({ allowHalfOpen: true }),
  };
  state.server.on("connection", (socket) => {
    state.accepted++;
    socket.on("error", () => {});
    let buffered = "";
    socket.on("data", (chunk: Buffer) => {
      buffered += chunk.toString();
      const nl = buffered.indexOf("\n");
      if (nl < 0) return;
      const line = buffered.slice(0, nl);
      state.lines.push(line);
      // Answer only once `barrier` connections are open at the same time.
      waiting.push({ socket, line });
      if (waiting.length >= barrier) for (const w of waiting.splice(0)) w.socket.end(reply(w.line));
    });
  });
  state.server.listen(0, host);
  await once(state.server, "listening");
  state.port = (state.server.address() as { port: number }).port;
  return state;
}

/** A non-loopback IPv4 address of this host. */
function hostAddress(): string {
  for (const addresses of Object.values(networkInterfaces())) {
    for (const a of addresses ?? []) if (a.family === "IPv4" && !a.internal) return a.address;
  }
  return "192.0.2.1";
}

describe("VM networks", { timeout: 900_000 }, () => {
  let skipReason: string | undefined;
  let rawSyn: Buffer;
  let work: string;
  const servers: Server[] = [];
  let a: HostServer; // listed: host:A
  let b: HostServer; // never listed for the host's loopback (listed for a CIDR: the relay has a listener)
  let c: HostServer; // never listed at all
  let udp: UdpSocket;
  let datagrams = 0;
  const vms: Vm[] = [];
  const hostIp = hostAddress();

  before(async () => {
    skipReason = await vmSkipReason();
    if (skipReason !== undefined) return;
    work = await mkdtemp(join(tmpdir(), "sm-net-"));
    await promisify(execFile)("musl-gcc", ["-static", "-O2", "-o", join(work, "raw-syn"), RAW_SYN_SOURCE]);
    rawSyn = await readFile(join(work, "raw-syn"));
    a = await hostServer("127.0.0.1", (line) => `A:${line}\n`);
    b = await hostServer("0.0.0.0", () => "B\n");
    c = await hostServer("127.0.0.1", () => "C\n");
    servers.push(a.server, b.server, c.server);
    udp = createSocket("udp4");
    udp.on("message", () => {
      datagrams++;
    });
    udp.bind(0, "127.0.0.1");
    await once(udp, "listening");
  });

  after(async () => {
    await Promise.all(vms.map((vm) => vm.kill()));
    for (const server of servers) server.close();
    udp?.close();
    if (work !== undefined) await rm(work, { recursive: true, force: true });
  });

  const vmIt = (name: string, fn: () => Promise<void>) =>
    it(name, async (t) => {
      if (skipReason !== undefined) return t.skip(skipReason);
      try {
        await fn();
      } catch (error) {
        for (const vm of vms) t.diagnostic(`console log of VM ${vm.id}: ${vm.consoleLogPath}`);
        throw error;
      }
    });

  const track = (vm: Vm) => {
    vms.push(vm);
    return vm;
  };
  const sh = async (vm: Vm, script: string) =>
    (await vm.exec(["sh", "-c", script], { reject: false, timeoutMs: 60_000 })).stdoutText.trim();
  /** The first line a host service answers to "LINE", or "" when the connection failed. */
  const tcp = (vm: Vm, address: string, port: number, line = "hi") =>
    sh(vm, `echo ${line} | nc -w 3 ${address} ${port} 2>/dev/null | head -n 1`);
  /** A DNS query (UDP) to the host's loopback stand-in server at 10.0.2.2: did it arrive? */
  const udpArrives = async (vm: Vm) => {
    const before = datagrams;
    // The query waits for its answer (1 s, twice): a datagram that arrived has been counted by then.
    await sh(vm, `nslookup -port=${udp.address().port} -timeout=1 -retry=1 probe.example 10.0.2.2`);
    return datagrams > before;
  };
  const raw = async (vm: Vm, address: string, port: number) => {
    await vm.writeFile("/tmp/raw-syn", rawSyn, { mode: 0o755 });
    return sh(vm, `/tmp/raw-syn ${address} ${port} 2000`);
  };

  vmIt('"none": no network device, no route out', async () => {
    const vm = track(await Vm.start({ rootfs: await busyboxRootfs(), memoryMiB: 256 }));
    // The kernel's own tunnel device (sit0) aside, only loopback; no routes at all.
    assert.deepEqual(
      (await sh(vm, "ls /sys/class/net")).split("\n").filter((d) => d !== "sit0"),
      ["lo"],
    );
    assert.equal(await sh(vm, "ip route"), "");
    assert.match(await sh(vm, `nc -w 2 10.0.2.2 ${a.port} 2>&1`), /Network is unreachable/);
    assert.equal(a.accepted, 0);
    await vm.kill();
  });

  vmIt("an allow-list admits its host port and nothing else, whatever a root guest does", async () => {
    const denied: unknown[] = [];
    const onDeny = (message: unknown) => denied.push(message);
    subscribe("supermachine:net:deny", onDeny);
    try {
      const vm = track(
        await Vm.start({
          rootfs: await busyboxRootfs(),
          memoryMiB: 256,
          network: { allow: [`host:${a.port}`, `10.1.2.0/24:${b.port}`] },
        }),
      );
      assert.equal(await sh(vm, "id -u"), "0", "the guest runs these probes as root");
      assert.match(await sh(vm, "cat /etc/resolv.conf"), /nameserver 127\.0\.0\.1/);

      const attacks = async (stage: string) => {
        assert.equal(await tcp(vm, "10.0.2.2", a.port, stage), `A:${stage}`, `${stage}: the listed port`);
        assert.equal(await tcp(vm, "10.0.2.2", b.port), "", `${stage}: a port listed for another address`);
        assert.equal(await tcp(vm, "10.0.2.2", c.port), "", `${stage}: an unlisted port`);
        assert.equal(await tcp(vm, hostIp, b.port), "", `${stage}: the host's own address`);
        assert.notEqual(await raw(vm, "10.0.2.2", c.port), "syn-ack", `${stage}: a raw SYN`);
        await raw(vm, "10.0.2.2", b.port); // handshaken by the relay's listener, then reset: B never sees it
        assert.equal(await udpArrives(vm), false, `${stage}: UDP / DNS to the host`);
        assert.match(
          await sh(vm, "nslookup -timeout=1 -retry=1 example.org 10.0.2.3 2>&1"),
          /no servers could be reached|timed out/,
          `${stage}: QEMU's DNS`,
        );
        assert.match(
          await sh(vm, `nslookup -timeout=1 -retry=1 example.org ${hostIp} 2>&1`),
          /no servers could be reached|timed out/,
          `${stage}: another DNS server`,
        );
        assert.match(await sh(vm, `ping -c 1 -W 2 ${hostIp} 2>&1`), /0 packets received|100% packet loss/);
      };
      await attacks("as-booted");
      // Another address in the same network, the default route through QEMU's DNS address.
      await sh(
        vm,
        "ip addr flush dev eth0 && ip addr add 10.0.2.99/24 dev eth0 && ip route replace default via 10.0.2.3",
      );
      assert.match(
        await sh(vm, "ip -4 addr show eth0; ip route"),
        /10\.0\.2\.99[\s\S]*default via 10\.0\.2\.3/,
      );
      await attacks("other-address");
      // An address outside QEMU's network, a route for the host's network.
      await sh(
        vm,
        `ip addr flush dev eth0 && ip addr add 10.9.9.9/8 dev eth0 && ip route add 10.0.2.0/24 dev eth0 && ` +
          `ip route replace default via 10.0.2.2 && ip route add ${hostIp}/32 via 10.0.2.3`,
      );
      await attacks("outside-address");
      assert.equal(b.accepted, 0, "nothing reached the port listed only for another address");
      assert.equal(c.accepted, 0, "nothing reached the unlisted port");
      assert.ok(
        denied.some(
          (m) => JSON.stringify(m).includes(`"port":${b.port}`) && JSON.stringify(m).includes("127.0.0.1"),
        ),
        `a supermachine:net:deny event for 127.0.0.1:${b.port} (got ${JSON.stringify(denied)})`,
      );

      // QEMU runs behind the relay: in a network namespace of its own, confined as ever.
      const relay = processesOf([vm.id]).find(({ argv }) => argv[0]?.includes("qemu-system") !== true)?.pid;
      assert.ok(relay !== undefined, "the network relay runs for the VM");
      const [qemuPid] = readFileSync(`/proc/${relay}/task/${relay}/children`, "utf8")
        .trim()
        .split(" ")
        .map(Number);
      assert.ok(qemuPid !== undefined && qemuPid > 0, "QEMU is the relay's child");
      const status = readFileSync(`/proc/${qemuPid}/status`, "utf8");
      assert.match(readFileSync(`/proc/${qemuPid}/cmdline`, "utf8"), /qemu-system/);
      assert.match(status, /^CapEff:\s+0+$/m);
      assert.match(status, /^NoNewPrivs:\s+1$/m);
      assert.match(status, /^Seccomp:\s+2$/m);
      assert.doesNotMatch(status, /^Uid:\s+0\s/m);
      assert.notEqual(readlinkSync(`/proc/${qemuPid}/ns/net`), readlinkSync("/proc/self/ns/net"));
      assert.equal(readlinkSync(`/proc/${relay}/ns/net`), readlinkSync("/proc/self/ns/net"));
      await vm.kill();
      for (const pid of [relay, qemuPid!])
        assert.equal(isAlive(pid), false, `process ${pid} outlived its VM`);
    } finally {
      unsubscribe("supermachine:net:deny", onDeny);
    }
  });

  vmIt(
    "a snapshot baked with a network device: outbound clones with their own connections, and other policies",
    async () => {
      const dataDir = join(work, "data");
      process.env.SUPERMACHINE_DATA_DIR = dataDir;
      const image = await Image.builder(`oci:${(await fixtureImages()).busybox}`)
        .name("network-test")
        .memoryMiB(256)
        .network("outbound")
        .build();
      assert.deepEqual(image.snapshot?.manifest.network, { device: true, policy: "outbound" });

      // Two clones at once, each with a connection of its own: the server answers only when both are open.
      const barrier = await hostServer("127.0.0.1", (line) => `D:${line}\n`, 2);
      servers.push(barrier.server);
      const [one, two] = await Promise.all([image.start(), image.start()]);
      track(one!);
      track(two!);
      const replies = await Promise.all([
        tcp(one!, "10.0.2.2", barrier.port, "clone-1"),
        tcp(two!, "10.0.2.2", barrier.port, "clone-2"),
      ]);
      assert.deepEqual(replies, ["D:clone-1", "D:clone-2"]);
      assert.equal(barrier.accepted, 2);
      assert.match(await sh(one!, "cat /etc/resolv.conf"), /^nameserver 10\.0\.2\.3$/m);
      // What the allow-list refuses is open under outbound: the probes do work.
      const bBefore = b.accepted;
      assert.equal(await tcp(one!, "10.0.2.2", b.port), "B");
      assert.equal(await raw(one!, "10.0.2.2", c.port), "syn-ack");
      assert.equal(await udpArrives(one!), true);
      assert.ok(b.accepted > bBefore);
      await Promise.all([one!.kill(), two!.kill()]);

      // The same snapshot under an allow-list: a relay of the clone's own.
      const listed = track(await image.start({ network: { allow: [`host:${a.port}`] } }));
      assert.equal(await tcp(listed, "10.0.2.2", a.port, "clone-3"), "A:clone-3");
      assert.equal(await tcp(listed, "10.0.2.2", b.port), "");
      assert.equal(await udpArrives(listed), false);
      assert.match(await sh(listed, "cat /etc/resolv.conf"), /nameserver 127\.0\.0\.1/);
      await listed.kill();

      // Pre-started (as pools do): restored, configured and warmed under the allow-list, then activated.
      const prestarted = await image.prestart({ network: { allow: [`host:${a.port}`] } });
      const activated = track(await prestarted.activate());
      assert.equal(await tcp(activated, "10.0.2.2", a.port, "clone-4"), "A:clone-4");
      assert.equal(await tcp(activated, "10.0.2.2", b.port), "");
      await activated.kill();

      // And under none: the device is there, cut off.
      const aBefore = a.accepted;
      const cut = track(await image.start({ network: "none" }));
      assert.match(await sh(cut, "ls /sys/class/net"), /^eth0$/m);
      assert.equal(await tcp(cut, "10.0.2.2", a.port), "");
      assert.equal(await udpArrives(cut), false);
      assert.equal(a.accepted, aBefore);
      await cut.kill();
    },
  );
});

/** True while `pid` runs: not gone, not a zombie, not exiting. */
function isAlive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return fields[0] !== "Z" && fields[0] !== "X" && (Number(fields[6]) & 0x4) === 0;
  } catch {
    return false;
  }
}
