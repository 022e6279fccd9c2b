/**
 * Property-based tests of the tar reader, with a seeded generator (FUZZ_SEED, FUZZ_RUNS to run
 * longer: `FUZZ_RUNS=20000 node --test test/unit/rootfs-tar-fuzz.test.ts`):
 * - random valid archives written by Python's tarfile (USTAR, GNU, PAX; every entry type, long
 *   names, big ids, negative and large times, binary content) read back exactly as tarfile
 *   reads them;
 * - random mutations of valid archives (bit flips, overwritten header fields, truncation, blocks
 *   inserted, dropped or repeated), read and applied to a tree, end in entries or a typed error —
 *   never another exception, a hang, or memory growth beyond the limits.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, it } from "node:test";
import { SupermachineError } from "../../src/errors.ts";
import { applyLayer, DEFAULT_ROOTFS_LIMITS, Spool } from "../../src/rootfs/apply-layer.ts";
import { FileTree } from "../../src/rootfs/file-tree.ts";
import { DEFAULT_TAR_LIMITS, type TarEntry, TarReader } from "../../src/rootfs/tar-reader.ts";
import { file, symlink, tar } from "../fixtures/hostile-layers/tar-builder.ts";

const SEED = Number(process.env.FUZZ_SEED ?? 20240601);
const RUNS = Number(process.env.FUZZ_RUNS ?? 1500);
const work = mkdtempSync(join(tmpdir(), "rootfs-fuzz-"));
after(() => rmSync(work, { recursive: true, force: true }));

/** xorshift32: the same seed gives the same cases everywhere. */
function rng(seed: number): (n: number) => number {
  let x = seed >>> 0 || 1;
  return (n) => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x % n;
  };
}

async function* chunks(data: Buffer, size: number): AsyncGenerator<Buffer> {
  for (let i = 0; i < data.length; i += size) yield data.subarray(i, i + size);
}

interface Seen {
  name: string;
  type: string;
  size: number;
  mode: number;
  uid: number;
  gid: number;
  mtime: number;
  linkname: string;
  dev: string;
  sha256: string;
}

async function readAll(data: Buffer, chunk: number): Promise<Seen[]> {
  const reader = new TarReader(chunks(data, chunk), { layer: "fuzz" });
  const out: Seen[] = [];
  for await (const e of reader.entries()) out.push(await seen(e));
  return out;
}

async function seen(e: TarEntry): Promise<Seen> {
  const hash = createHash("sha256");
  for await (const c of e.body()) hash.update(c);
  return {
    name: e.name.replace(/\/+$/, ""),
    type: e.type,
    size: e.size,
    mode: e.mode,
    uid: e.uid,
    gid: e.gid,
    mtime: e.mtime,
    linkname: e.linkname,
    dev: e.type === "char" || e.type === "block" ? `${e.devMajor}:${e.devMinor}` : "",
    sha256: hash.digest("hex"),
  };
}

// Writes random archives with tarfile and prints what tarfile reads back from each.
const PYTHON = `
import hashlib, io, json, random, sys, tarfile
seed, count, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
r = random.Random(seed)
ALPHA = "abcXYZ019 _-.é☃"
def name(longest):
    parts = ["".join(r.choice(ALPHA) for _ in range(r.randint(1, 40))) for _ in range(r.randint(1, 8))]
    n = "/".join(p.strip(".") or "x" for p in parts)
    return n[:longest].rstrip("/") or "n"
results = []
for k in range(count):
    fmt = r.choice([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
    ustar = fmt == tarfile.USTAR_FORMAT
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8") as t:
        files = []
        for i in range(r.randint(0, 12)):
            ti = tarfile.TarInfo(f"{i}-" + name(90 if ustar else 300))
            kind = r.choice("ffffdlhcbp")
            ti.mode = r.randint(0, 0o7777)
            ti.uid = r.randint(0, 2097151 if ustar else 2**32 - 1)
            ti.gid = r.randint(0, 2097151 if ustar else 2**32 - 1)
            ti.mtime = r.randint(0, 2**33 - 1) if ustar else r.randint(-2**31, 2**34)
            data = b""
            if kind == "f":
                ti.type = tarfile.REGTYPE
                data = bytes(r.getrandbits(8) for _ in range(r.choice([0, 1, 511, 512, 513, r.randint(0, 5000)])))
                ti.size = len(data)
                files.append(ti.name)
            elif kind == "d": ti.type = tarfile.DIRTYPE
            elif kind == "l":
                ti.type = tarfile.SYMTYPE; ti.linkname = name(90 if ustar else 300)
            elif kind == "h" and files:
                ti.type = tarfile.LNKTYPE; ti.linkname = r.choice(files)
            elif kind in "cb":
                ti.type = tarfile.CHRTYPE if kind == "c" else tarfile.BLKTYPE
                ti.devmajor, ti.devminor = r.randint(0, 4095), r.randint(0, 2097151 if ustar else 1048575)
            else: ti.type = tarfile.FIFOTYPE
            try:
                t.addfile(ti, io.BytesIO(data))
            except ValueError:
                pass  # not representable in this format
    raw = buf.getvalue()
    with open(f"{out}/{k}.tar", "wb") as f: f.write(raw)
    members = []
    for m in tarfile.open(fileobj=io.BytesIO(raw), encoding="utf-8", errors="surrogateescape"):
        body = tarfile.open(fileobj=io.BytesIO(raw)).extractfile(m.name) if m.isreg() else None
        data = body.read() if body else b""
        kind = {tarfile.REGTYPE: "file", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink",
                tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}[m.type]
        members.append({"name": m.name.encode("utf-8", "surrogateescape").decode("latin1"), "type": kind,
            "size": m.size if m.isreg() else 0, "mode": m.mode & 0o7777, "uid": m.uid, "gid": m.gid,
            "mtime": int(m.mtime // 1), "linkname": m.linkname.encode("utf-8", "surrogateescape").decode("latin1"),
            "dev": f"{m.devmajor}:{m.devminor}" if m.ischr() or m.isblk() else "",
            "sha256": hashlib.sha256(data).hexdigest()})
    results.append(members)
json.dump(results, sys.stdout)
`;

describe("tar reader: property-based", () => {
  it(`reads random tarfile archives as tarfile reads them (seed ${SEED})`, async () => {
    const count = Math.max(20, Math.floor(RUNS / 10));
    const dir = mkdtempSync(join(work, "valid-"));
    const expected = JSON.parse(
      execFileSync("python3", ["-c", PYTHON, String(SEED), String(count), dir], {
        encoding: "utf8",
        maxBuffer: 256 << 20,
      }),
    ) as Seen[][];
    const pick = rng(SEED);
    let entries = 0;
    for (const [k, want] of expected.entries()) {
      const data = readFileSync(join(dir, `${k}.tar`));
      const got = await readAll(data, 1 + pick(8192));
      assert.deepEqual(got, want, `archive ${k} (seed ${SEED})`);
      entries += got.length;
    }
    assert.ok(entries > count, `only ${entries} entries generated`);
  });

  it(`survives random mutations with typed errors only (seed ${SEED}, ${RUNS} runs)`, async () => {
    const pick = rng(SEED ^ 0x5eed);
    const bases = [
      tar([
        { name: "d/", type: "5", mode: 0o755 },
        file("d/f", "hello world".repeat(100)),
        symlink("d/s", "f"),
        { name: "d/h", type: "1", linkname: "d/f" },
        {
          ...file("p", "pax"),
          pax: {
            path: "pax-path",
            "SCHILY.xattr.user.a": "v",
            "SCHILY.acl.access": "user::rw-,group::r--,other::r--",
          },
        },
        { ...file("l", "long"), longName: "a/".repeat(60) + "long" },
        { name: "dev/c", type: "3", devmajor: 1, devminor: 3 },
      ]),
      Buffer.concat([
        ...(() => {
          // An old GNU sparse entry and a PAX 0.1 sparse entry.
          const h = file("sparse", "abcd", { type: "S", format: "gnu" });
          return [tar([h], { end: false })];
        })(),
        tar([
          {
            ...file("s01", "xyz"),
            pax: { "GNU.sparse.map": "10,3", "GNU.sparse.size": "100", "GNU.sparse.numblocks": "1" },
          },
        ]),
      ]),
    ];
    const memoryBefore = process.memoryUsage();
    const spoolDir = mkdtempSync(join(work, "spool-"));
    let refused = 0;
    let accepted = 0;
    for (let run = 0; run < RUNS; run++) {
      const data = Buffer.from(bases[pick(bases.length)]!);
      const mutated = mutate(data, pick);
      const limits = {
        ...DEFAULT_TAR_LIMITS,
        ...DEFAULT_ROOTFS_LIMITS,
        maxEntrySizeBytes: 1 << 20,
        maxTotalBytes: 4 << 20,
      };
      try {
        if (run % 2 === 0) {
          const reader = new TarReader(chunks(mutated, 1 + pick(2000)), { layer: "fuzz", limits });
          for await (const e of reader.entries()) if (pick(2) === 0) for await (const _ of e.body());
        } else {
          const spool = new Spool(join(spoolDir, String(run)));
          mkdirSync(spool.dir);
          await applyLayer({
            tree: new FileTree(),
            source: chunks(mutated, 1 + pick(2000)),
            layer: "fuzz",
            spool,
            limits,
          }).finally(() => spool.endLayer());
        }
        accepted++;
      } catch (err) {
        if (!SupermachineError.is(err)) {
          // FUZZ_SEED and the run number reproduce the input.
          throw new Error(`run ${run} (seed ${SEED}): untyped ${String(err)}`, { cause: err });
        }
        refused++;
      }
    }
    rmSync(spoolDir, { recursive: true, force: true });
    const after = process.memoryUsage();
    const growth = after.rss - memoryBefore.rss + (after.arrayBuffers - memoryBefore.arrayBuffers);
    assert.ok(growth < 256 * 1024 * 1024, `memory grew by ${growth} bytes`);
    assert.ok(refused > 0 && accepted > 0, `refused ${refused}, accepted ${accepted}`);
  });
});

/** One to four random mutations of a valid archive. */
function mutate(data: Buffer, pick: (n: number) => number): Buffer {
  let out = data;
  for (let m = 1 + pick(4); m > 0; m--) {
    const blocks = Math.max(1, Math.floor(out.length / 512));
    const at = pick(blocks) * 512;
    switch (pick(8)) {
      case 0: // flip bytes anywhere
        for (let k = 1 + pick(8); k > 0; k--) {
          const i = pick(out.length);
          out[i] = out[i]! ^ (1 << pick(8));
        }
        break;
      case 1: {
        // overwrite a numeric header field with random bytes, keeping the checksum right
        const field = [100, 108, 116, 124, 136, 329, 337, 483][pick(8)]!;
        for (let k = 0; k < 12; k++)
          out[at + field + k] = [0, 0x20, 0x30 + pick(8), 0x80, 0xff, pick(256)][pick(6)]!;
        fixChecksum(out, at);
        break;
      }
      case 2: // change the type flag
        out[at + 156] = "0123456789AgxLKSVDMN\0"[pick(21)]!.charCodeAt(0);
        fixChecksum(out, at);
        break;
      case 3: // truncate
        out = out.subarray(0, pick(out.length + 1));
        break;
      case 4: // insert a block of garbage or zeros
        out = Buffer.concat([
          out.subarray(0, at),
          pick(2) ? Buffer.alloc(512) : randomBlock(pick),
          out.subarray(at),
        ]);
        break;
      case 5: // drop a block
        out = Buffer.concat([out.subarray(0, at), out.subarray(at + 512)]);
        break;
      case 6: // repeat a block
        out = Buffer.concat([out.subarray(0, at + 512), out.subarray(at, at + 512), out.subarray(at)]);
        break;
      default: {
        // a PAX-looking record with a random length
        const rec = Buffer.from(
          `${pick(100000)} ${["path", "size", "GNU.sparse.map", "SCHILY.xattr.user.x", "mtime"][pick(5)]}=${pick(1000000)}\n`,
        );
        rec.copy(out, Math.min(at, Math.max(0, out.length - rec.length)));
      }
    }
    if (out.length === 0) break;
  }
  return Buffer.from(out);
}

function randomBlock(pick: (n: number) => number): Buffer {
  const b = Buffer.alloc(512);
  for (let i = 0; i < 512; i++) b[i] = pick(256);
  fixChecksum(b, 0);
  return b;
}

function fixChecksum(buf: Buffer, at: number): void {
  if (at + 512 > buf.length) return;
  buf.fill(0x20, at + 148, at + 156);
  let sum = 0;
  for (let i = at; i < at + 512; i++) sum += buf[i]!;
  buf.write(`${sum.toString(8).padStart(6, "0")}\0 `, at + 148, "latin1");
}
