/**
 * Stands in for the guest kernel's 9p client when the mount relay runs as a host process
 * (`sm-init --mount-relay --mount-exec PROG`): the relay runs PROG with the 9P socket as fd 3 and
 * the arguments `path msize readOnly`, where mount(2) would be called.
 *
 * Like mount(2), the first process does Tversion + Tattach and exits 0 (the relay answers
 * MOUNTED); like the kernel after mount(2) returns, a detached second process keeps the socket and
 * runs the workload named by the mount path's last component, reporting JSON lines to the unix
 * socket in $SM_FAKE_REPORT:
 * - `fail-N`: exit N at once (the "mount" fails with errno N);
 * - `hang…`: never read the socket;
 * - `transfer`: read `big` whole and report its sha256, write `upload` (SM_FAKE_UPLOAD bytes of a
 *   pattern), report, then wait for the end of the connection and report `eof`;
 * - anything else: attach, report, wait for the end of the connection and report `eof`.
 */
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { connect, Socket } from "node:net";
import { basename } from "node:path";
import { NinepClient } from "./ninep-client.ts";

const [mode, path, msizeArg] =
  process.argv[2] === "--phase2" ? process.argv.slice(2) : ["--phase1", ...process.argv.slice(2)];
const name = basename(path ?? "");
const msize = Number(msizeArg);

function report(message: object): Promise<void> {
  return new Promise((resolve) => {
    const s = connect(process.env.SM_FAKE_REPORT!, () =>
      s.end(`${JSON.stringify({ name, ...message })}\n`, () => resolve()),
    );
    s.on("error", () => resolve());
  });
}

/** A pattern the test can recompute: byte i is (i * 31 + 7) & 0xff. */
export function pattern(size: number): Buffer {
  const b = Buffer.allocUnsafe(size);
  for (let i = 0; i < size; i++) b[i] = (i * 31 + 7) & 0xff;
  return b;
}

async function phase1(): Promise<void> {
  if (name.startsWith("fail-")) process.exit(Number(name.slice(5)));
  if (name.startsWith("hang")) {
    // Keep the process alive: an await that never settles with nothing else pending ends Node (exit 13).
    setInterval(() => {}, 60_000);
    await new Promise(() => {});
  }
  const sock = new Socket({ fd: 3, readable: true, writable: true });
  sock.on("error", () => process.exit(5)); // cut while "mounting": the mount fails with EIO
  const client = await NinepClient.connect(sock, { msize });
  if (client.msize !== msize) process.exit(22);
  sock.pause();
  // The "kernel" keeps the connection: hand fd 3 to a detached process, like mount(2) returning.
  const child = spawn(process.execPath, [import.meta.filename, "--phase2", path!, String(msize)], {
    stdio: ["ignore", "ignore", "inherit", 3],
    detached: true,
  });
  child.unref();
  process.exit(0);
}

async function phase2(): Promise<void> {
  const sock = new Socket({ fd: 3, readable: true, writable: true });
  sock.on("error", () => {}); // the relay cuts the connection at unmount: that is the end, not an error
  const eof = new Promise<void>((resolve) => sock.once("close", () => resolve()));
  const client = new NinepClient(sock);
  client.msize = msize;
  // A fresh attach on another fid (the first process's fid 0 is still the server's).
  await client.rpc("Tattach", {
    fid: 1000,
    afid: 0xffff_ffff,
    uname: Buffer.from("root"),
    aname: Buffer.alloc(0),
    nUname: 0,
  });
  if (name === "transfer") {
    const big = await client.walk(1000, ["big"]);
    await client.lopen(big.fid, 0);
    const hash = createHash("sha256");
    let offset = 0n;
    for (;;) {
      const data = await client.read(big.fid, offset, msize - 24);
      if (data.length === 0) break;
      hash.update(data);
      offset += BigInt(data.length);
    }
    await client.clunk(big.fid);
    const size = Number(process.env.SM_FAKE_UPLOAD ?? 0);
    const up = await client.walk(1000, []);
    await client.rpc("Tlcreate", { fid: up.fid, name: Buffer.from("upload"), flags: 2, mode: 0o644, gid: 0 });
    const data = pattern(size);
    let written = 0;
    while (written < size) {
      written += await client.write(up.fid, BigInt(written), data.subarray(written, written + msize - 24));
    }
    await client.clunk(up.fid);
    await report({ event: "transfer", sha256: hash.digest("hex"), read: Number(offset), written });
  } else {
    await report({ event: "attached" });
  }
  await eof;
  await report({ event: "eof" });
  process.exit(0);
}

if (import.meta.main) await (mode === "--phase2" ? phase2() : phase1());
