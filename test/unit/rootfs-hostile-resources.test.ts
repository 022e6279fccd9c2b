/**
 * Layers that attack the host's memory and disk through the whole pipeline: xattr floods, a
 * small zstd layer that expands to 200 GB (declared in its frames or not), zeros that must stay
 * holes, and a disk that fills up. Each is refused early with a typed error naming what failed,
 * with bounded memory growth (process.memoryUsage: rss + arrayBuffers), and nothing is left next
 * to the output.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdirSync, mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, it } from "node:test";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";
import { LayerError, SupermachineError } from "../../src/errors.ts";
import { flattenLayers } from "../../src/rootfs/index.ts";
import { END, entryBytes, file, header } from "../fixtures/hostile-layers/tar-builder.ts";
import { zstdFrame } from "../fixtures/hostile-layers/zstd-frames.ts";

const work = mkdtempSync(join(tmpdir(), "rootfs-resources-"));
after(() => rmSync(work, { recursive: true, force: true }));
const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
let n = 0;

function memory(): number {
  const m = process.memoryUsage();
  return m.rss + m.arrayBuffers;
}

/** Flattens one layer blob into a fresh output directory; returns the error and what it cost. */
async function attempt(blob: Buffer | string, limits = {}) {
  const dir = join(work, `case-${n++}`);
  mkdirSync(dir);
  const path = typeof blob === "string" ? blob : join(dir, "layer.blob");
  if (typeof blob !== "string") writeFileSync(path, blob);
  const out = join(dir, "out");
  const before = memory();
  let error: unknown;
  try {
    await flattenLayers({
      layers: [{ path, mediaType: "application/vnd.oci.image.layer.v1.tar+zstd", digest: "sha256:hostile" }],
      output: join(out, "image.ext4"),
      freeBytes: 16 * MiB,
      durable: false,
      limits,
    });
  } catch (err) {
    error = err;
  }
  const growth = memory() - before;
  return { error, growth, left: readdirSync(out) };
}

function assertRefused(
  r: Awaited<ReturnType<typeof attempt>>,
  code: string,
  message: RegExp,
  entry?: string,
): void {
  assert.ok(SupermachineError.is(r.error), `expected a typed error, got ${String(r.error)}`);
  assert.equal(r.error.code, code, r.error.message);
  assert.match(r.error.message, message);
  assert.doesNotMatch(r.error.message, /\n/);
  if (entry !== undefined) {
    assert.ok(r.error instanceof LayerError);
    assert.equal(r.error.entry, entry);
  }
  assert.ok(r.growth < 200 * MiB, `host memory grew by ${Math.round(r.growth / MiB)} MiB`);
  assert.deepEqual(r.left, [], "files left next to the output");
}

const pad = (len: number) => Buffer.alloc((512 - (len % 512)) % 512);

/** One tar entry `name` whose PAX header carries `SCHILY.xattr.user.big` of `valueBytes` × 'v', as zstd frames. */
function xattrEntry(name: string, valueBytes: number): Buffer {
  const key = " SCHILY.xattr.user.big=";
  let len = key.length + valueBytes + 1;
  len += String(len).length;
  if (String(len).length + key.length + valueBytes + 1 !== len) len++;
  const prefix = Buffer.from(`${len}${key}`);
  return zstdFrame(
    [
      header({ name: "PaxHeaders/x", type: "x", size: len }),
      prefix,
      { byte: 0x76, count: valueBytes },
      Buffer.from("\n"),
      pad(len),
      header(file(name, "")),
    ],
    true,
  );
}

/** `count` tar entries of `size` zero bytes each, as zstd frames (declared or not), then the end marker. */
function zeroLayer(count: number, size: number, declare: boolean): Buffer {
  const frames: Buffer[] = [];
  for (let i = 0; i < count; i++) {
    frames.push(
      zstdFrame(
        [header(file(`zeros-${i}`, "", { size })), { byte: 0, count: size + pad(size).length }],
        declare,
      ),
    );
  }
  frames.push(zstdFrame([END], declare));
  return Buffer.concat(frames);
}

describe("hostile layers against host memory and disk", () => {
  it("refuses a 1 MB layer carrying 1,000 × 1 MB xattrs at the first one", async () => {
    const blob = Buffer.concat([
      ...Array.from({ length: 1000 }, (_, i) => xattrEntry(`f${i}`, MiB)),
      zstdFrame([END], true),
    ]);
    assert.ok(blob.length < 40 * MiB, `layer of ${blob.length} bytes`);
    const r = await attempt(blob);
    // Refused while its PAX header is read: the entry's own name is not known yet.
    assertRefused(r, "CORRUPT_LAYER", /xattr "user\.big" of 1048576 bytes exceeds 65536/, "PaxHeaders/x");
  });

  it("refuses xattrs that fit one by one but not together (the image's xattr budget)", async () => {
    const blob = Buffer.concat([
      ...Array.from({ length: 3000 }, (_, i) => xattrEntry(`f${i}`, 3000)),
      zstdFrame([END], true),
    ]);
    const r = await attempt(blob, { maxXattrBytes: 4 * MiB });
    assertRefused(r, "UNSAFE_LAYER", /xattrs exceed 4194304 bytes \(limits\.maxXattrBytes\)/);
  });

  it("refuses a 10 MB zstd layer that declares 200 GB before decompressing it", async () => {
    const blob = zeroLayer(200, GiB, true);
    assert.ok(blob.length < 10 * MiB, `layer of ${blob.length} bytes`);
    const r = await attempt(blob);
    assertRefused(
      r,
      "UNSAFE_LAYER",
      /declares \d+ bytes decompressed, more than the 137438953472 left of limits\.maxTotalBytes/,
    );
  });

  it("refuses the same layer without declared sizes once it passes the configured total", async () => {
    const r = await attempt(zeroLayer(200, GiB, false), { maxTotalBytes: 2 * GiB });
    assertRefused(r, "UNSAFE_LAYER", /decompress to more than 2147483648 bytes/, "zeros-1");
  });

  it("spools and writes zeros as holes (a 1 GiB file of zeros costs almost no disk)", async () => {
    const dir = join(work, `zeros-${n++}`);
    mkdirSync(dir);
    const layer = join(dir, "layer.tar.zst");
    writeFileSync(layer, zeroLayer(1, GiB, false));
    const output = join(dir, "image.ext4");
    const image = await flattenLayers({
      layers: [{ path: layer, mediaType: "", digest: "sha256:zeros" }],
      output,
      freeBytes: 16 * MiB,
      durable: false,
    });
    assert.equal(image.fileBytes, GiB);
    const st = statSync(output);
    assert.ok(st.blocks * 512 < 64 * MiB, `the image takes ${st.blocks * 512} bytes of disk`);
  });

  it("checks free space before and while flattening, on a small file system (tmpfs in a mount namespace)", () => {
    const dir = join(work, `disk-${n++}`);
    const mnt = join(dir, "mnt");
    mkdirSync(mnt, { recursive: true });
    // 96 MiB of random data (incompressible: gzip keeps it that size) and a layer of zeros.
    const random = join(dir, "random.tar.gz");
    writeFileSync(
      random,
      gzipSync(Buffer.concat([entryBytes(file("etc/random.bin", randomBytes(96 * MiB))), END]), { level: 1 }),
    );
    const zeros = join(dir, "zeros.tar.zst");
    writeFileSync(zeros, zeroLayer(1, GiB, false));
    const index = fileURLToPath(new URL("../../src/rootfs/index.ts", import.meta.url));
    const script = join(dir, "child.ts");
    writeFileSync(
      script,
      `import { readdirSync } from "node:fs";
import { flattenLayers } from ${JSON.stringify(index)};
const out = {};
const build = async (name, path, minFreeDiskBytes) => {
  try {
    const r = await flattenLayers({ layers: [{ path, mediaType: "", digest: "sha256:" + name }], output: ${JSON.stringify(mnt)} + "/" + name + ".ext4", freeBytes: 16 << 20, durable: false, minFreeDiskBytes });
    out[name] = { ok: true, fileBytes: r.fileBytes };
  } catch (err) {
    out[name] = { code: err.code, message: err.message, left: readdirSync(${JSON.stringify(mnt)}) };
  }
};
await build("reserve", ${JSON.stringify(zeros)}, 64 << 20);
await build("random", ${JSON.stringify(random)}, 4 << 20);
await build("zeros", ${JSON.stringify(zeros)}, 4 << 20);
console.log(JSON.stringify(out));
`,
    );
    const r = spawnSync(
      "unshare",
      [
        "--user",
        "--map-root-user",
        "--mount",
        "sh",
        "-c",
        'mount -t tmpfs -o size=48m none "$0" && exec "$1" "$2"',
        mnt,
        process.execPath,
        script,
      ],
      { encoding: "utf8" },
    );
    assert.equal(r.status, 0, r.stderr);
    const out = JSON.parse(r.stdout) as Record<
      string,
      { ok?: boolean; code?: string; message?: string; left?: string[]; fileBytes?: number }
    >;
    // Before: a 48 MiB file system cannot keep a 64 MiB reserve.
    assert.equal(out.reserve?.code, "ROOTFS_BUILD");
    assert.match(out.reserve?.message ?? "", /not enough disk space for flattening the image/);
    // While: 96 MiB of data do not fit; refused naming the entry, before the disk is full.
    assert.equal(out.random?.code, "ROOTFS_BUILD");
    assert.match(
      out.random?.message ?? "",
      /not enough disk space for entry "etc\/random\.bin" of layer sha256:random/,
    );
    assert.deepEqual(out.random?.left, []);
    // 1 GiB of zeros fits in 48 MiB: holes in the spool and in the image.
    assert.deepEqual(out.zeros, { ok: true, fileBytes: GiB });
  });
});
