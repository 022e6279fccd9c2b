/** `oci:PATH[:TAG]` layouts and `docker-archive:FILE[:NAME:TAG]` tarballs imported into the store. */
import assert from "node:assert/strict";
import { mkdir, mkdtemp, readdir, readFile, rm, truncate, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import { afterEach, beforeEach, describe, test } from "node:test";
import { gzipSync } from "node:zlib";
import { DigestMismatchError, PlatformNotFoundError, SupermachineError } from "../../src/errors.ts";
import { listImages, pullImage, resolveLocalImage } from "../../src/oci/pull.ts";
import {
  makeDockerArchive,
  makeImage,
  makeIndex,
  sha256,
  tarBytes,
  writeOciLayout,
} from "../helpers/oci-kit.ts";

let work: string;
let dataDir: string;

beforeEach(async () => {
  work = await mkdtemp(join(tmpdir(), "oci-local-"));
  dataDir = join(work, "data");
});
afterEach(async () => {
  await rm(work, { recursive: true, force: true });
});

function code(expected: string, message?: RegExp) {
  return (e: unknown) => {
    assert.ok(SupermachineError.is(e), String(e));
    assert.equal(e.code, expected, e.message);
    if (message) assert.match(e.message, message);
    return true;
  };
}

async function assertNoLeftovers(): Promise<void> {
  const tmp = await readdir(join(dataDir, "oci", "tmp")).catch(() => []);
  assert.deepEqual(tmp, []);
}

describe("oci: layouts", () => {
  test("tag selection, recorded reference, layers stored and verified", async () => {
    const one = makeImage({ cmd: ["one"] });
    const two = makeImage({ cmd: ["two"], compression: "zstd" });
    const dir = await writeOciLayout(join(work, "layout"), { v1: one, v2: two });
    const a = await pullImage(`oci:${dir}:v1`, { dataDir });
    assert.equal(a.reference, `oci:${dir}:v1`);
    assert.equal(a.source, "oci-layout");
    assert.deepEqual(a.config.cmd, ["one"]);
    assert.equal(a.manifestDigest, one.manifest.digest);
    const b = await pullImage(`oci:${dir}:v2`, { dataDir });
    assert.deepEqual(b.config.cmd, ["two"]);
    assert.deepEqual(
      b.layers.map((l) => l.compression),
      ["zstd", "zstd"],
    );
    for (const l of [...a.layers, ...b.layers]) assert.equal(sha256(await readFile(l.path)), l.digest);
    // a relative path is recorded absolute; resolveLocalImage finds it without reading the layout
    const rel = relative(process.cwd(), dir);
    assert.equal((await pullImage(`oci:${rel}:v1`, { dataDir })).reference, `oci:${dir}:v1`);
    await rm(dir, { recursive: true });
    assert.equal((await resolveLocalImage(`oci:${dir}:v1`, { dataDir })).manifestDigest, one.manifest.digest);
    assert.deepEqual(
      (await listImages({ dataDir })).map((r) => r.reference),
      [`oci:${dir}:v1`, `oci:${dir}:v2`],
    );
    await assertNoLeftovers();
  });

  test("without a tag: the only image, or an error naming the tags", async () => {
    const single = await writeOciLayout(join(work, "single"), { latest: makeImage() });
    assert.equal((await pullImage(`oci:${single}`, { dataDir })).reference, `oci:${single}`);
    const many = await writeOciLayout(join(work, "many"), { a: makeImage(), b: makeImage() });
    await assert.rejects(
      pullImage(`oci:${many}`, { dataDir }),
      code("INVALID_REFERENCE", /holds 2 images.*tags: a, b/),
    );
    await assert.rejects(
      pullImage(`oci:${many}:c`, { dataDir }),
      code("IMAGE_NOT_FOUND", /no image tagged "c"; tags: a, b/),
    );
  });

  test("a path containing ':' works, with and without a tag", async () => {
    const dir = await writeOciLayout(join(work, "with:colon"), { t: makeImage() });
    assert.equal((await pullImage(`oci:${dir}`, { dataDir })).reference, `oci:${dir}`);
    assert.equal((await pullImage(`oci:${dir}:t`, { dataDir })).reference, `oci:${dir}:t`);
  });

  test("an index under a tag: platform selection", async () => {
    const amd = makeImage({ seed: "amd" });
    const arm = makeImage({ architecture: "arm64", seed: "arm" });
    const index = makeIndex([amd, arm]);
    const dir = await writeOciLayout(join(work, "multi"), { latest: { index, images: [amd, arm] } });
    const a = await pullImage(`oci:${dir}:latest`, { dataDir });
    assert.equal(a.manifestDigest, amd.manifest.digest);
    assert.equal(a.indexDigest, index.digest);
    const b = await pullImage(`oci:${dir}:latest`, { dataDir, platform: "linux/arm64" });
    assert.equal(b.manifestDigest, arm.manifest.digest);
    assert.equal(b.platform, "linux/arm64");
    await assert.rejects(
      pullImage(`oci:${dir}:latest`, { dataDir, platform: "linux/riscv64" }),
      (e: unknown) => e instanceof PlatformNotFoundError && e.available.join() === "linux/amd64,linux/arm64",
    );
  });

  test("a single arm64 image is not taken for amd64", async () => {
    const dir = await writeOciLayout(join(work, "arm"), { latest: makeImage({ architecture: "arm64" }) });
    await assert.rejects(
      pullImage(`oci:${dir}`, { dataDir }),
      (e: unknown) => e instanceof PlatformNotFoundError,
    );
    const tmp = await readdir(join(dataDir, "oci", "images"));
    assert.deepEqual(tmp, []);
  });

  test("a corrupt blob in the layout: DIGEST_MISMATCH and nothing stored under its name", async () => {
    const image = makeImage({ layerSizes: [5000] });
    const dir = await writeOciLayout(join(work, "bad"), { latest: image });
    const layerPath = join(dir, "blobs", "sha256", image.layers[0]!.digest.slice(7));
    const bytes = await readFile(layerPath);
    bytes[100]! ^= 1;
    await writeFile(layerPath, bytes);
    await assert.rejects(
      pullImage(`oci:${dir}`, { dataDir }),
      (e: unknown) => e instanceof DigestMismatchError,
    );
    const blobs = await readdir(join(dataDir, "oci", "blobs", "sha256"));
    assert.ok(!blobs.includes(image.layers[0]!.digest.slice(7)));
    await assertNoLeftovers();
    // a truncated blob (size differs from the descriptor) is malformed
    await writeFile(layerPath, bytes.subarray(0, 10));
    await assert.rejects(pullImage(`oci:${dir}`, { dataDir }), code("INVALID_ARGUMENT", /ended after 10 of/));
    await rm(layerPath);
    await assert.rejects(pullImage(`oci:${dir}`, { dataDir }), code("INVALID_ARGUMENT", /missing/));
    await assertNoLeftovers();
  });

  test("not a layout, or no such directory", async () => {
    await mkdir(join(work, "empty"));
    await assert.rejects(
      pullImage(`oci:${join(work, "empty")}`, { dataDir }),
      code("INVALID_ARGUMENT", /no oci-layout file/),
    );
    await assert.rejects(pullImage(`oci:${join(work, "nope")}`, { dataDir }), code("IMAGE_NOT_FOUND"));
    await assert.rejects(pullImage("oci:", { dataDir }), code("INVALID_REFERENCE"));
    const dir = await writeOciLayout(join(work, "broken"), { latest: makeImage() });
    await writeFile(join(dir, "index.json"), "{");
    await assert.rejects(pullImage(`oci:${dir}`, { dataDir }), code("INVALID_ARGUMENT", /not valid JSON/));
  });
});

describe("docker-archive:", () => {
  test("uncompressed layers (docker save), name selection with normalisation", async () => {
    const image = makeImage({ layerSizes: [3000, 40_000], cmd: ["hello"] });
    const file = join(work, "img.tar");
    await writeFile(file, makeDockerArchive([{ image, tags: ["busybox:1.36"] }]));
    const a = await pullImage(`docker-archive:${file}`, { dataDir });
    assert.equal(a.reference, `docker-archive:${file}`);
    assert.equal(a.source, "docker-archive");
    assert.deepEqual(a.config.cmd, ["hello"]);
    assert.equal(a.configDigest, image.config.digest);
    assert.deepEqual(
      a.layers.map((l) => [l.digest, l.diffId, l.compression, l.size]),
      image.layerTars.map((t, i) => [image.diffIds[i], image.diffIds[i], "none", t.length]),
    );
    for (const l of a.layers) assert.equal(sha256(await readFile(l.path)), l.digest);
    for (const name of ["busybox:1.36", "docker.io/library/busybox:1.36", "library/busybox:1.36"]) {
      const b = await pullImage(`docker-archive:${file}:${name}`, { dataDir });
      assert.equal(b.manifestDigest, a.manifestDigest, name);
      assert.equal(b.reference, `docker-archive:${file}:${name}`);
    }
    await assert.rejects(
      pullImage(`docker-archive:${file}:busybox:1.35`, { dataDir }),
      code("IMAGE_NOT_FOUND", /no image named busybox:1.35; it has: busybox:1.36/),
    );
    await assertNoLeftovers();
  });

  test("gzipped layers behind symlinks, long member names, a gzipped archive", async () => {
    const image = makeImage({ layerSizes: [3000, 20_000] });
    const raw = makeDockerArchive([{ image, tags: ["app:1"] }], { layerCompression: "gzip", symlinks: true });
    const file = join(work, "img.tar.gz");
    await writeFile(file, gzipSync(raw));
    const a = await pullImage(`docker-archive:${file}:app:1`, { dataDir });
    assert.deepEqual(
      a.layers.map((l) => [l.compression, l.diffId]),
      image.diffIds.map((d) => ["gzip", d]),
    );
    for (const l of a.layers) {
      assert.notEqual(l.digest, l.diffId);
      assert.equal(sha256(await readFile(l.path)), l.digest);
    }
    await assertNoLeftovers();

    const longName = `${"d".repeat(120)}/layer.tar`;
    const tar = tarBytes([
      { name: "cfg.json", data: image.config.bytes },
      { name: longName, data: image.layerTars[0] },
      { name: "l2.tar", data: image.layerTars[1] },
      {
        name: "manifest.json",
        data: JSON.stringify([{ Config: "cfg.json", RepoTags: null, Layers: [longName, "./l2.tar"] }]),
      },
    ]);
    const file2 = join(work, "long.tar");
    await writeFile(file2, tar);
    const b = await pullImage(`docker-archive:${file2}`, { dataDir });
    assert.deepEqual(
      b.layers.map((l) => l.digest),
      image.diffIds,
    );
  });

  test("several images: a name is required", async () => {
    const one = makeImage();
    const two = makeImage();
    const file = join(work, "two.tar");
    await writeFile(
      file,
      makeDockerArchive([
        { image: one, tags: ["one:1"] },
        { image: two, tags: ["two:1", "localhost:5000/two:2"] },
      ]),
    );
    await assert.rejects(
      pullImage(`docker-archive:${file}`, { dataDir }),
      code("INVALID_REFERENCE", /holds 2 images/),
    );
    assert.equal(
      (await pullImage(`docker-archive:${file}:one:1`, { dataDir })).configDigest,
      one.config.digest,
    );
    assert.equal(
      (await pullImage(`docker-archive:${file}:localhost:5000/two:2`, { dataDir })).configDigest,
      two.config.digest,
    );
  });

  test("a file name with ':' in it", async () => {
    const file = join(work, "a:b.tar");
    await writeFile(file, makeDockerArchive([{ image: makeImage(), tags: ["x:1"] }]));
    assert.equal(
      (await pullImage(`docker-archive:${file}`, { dataDir })).reference,
      `docker-archive:${file}`,
    );
    assert.equal(
      (await pullImage(`docker-archive:${file}:x:1`, { dataDir })).reference,
      `docker-archive:${file}:x:1`,
    );
  });

  test("malformed archives", async () => {
    const image = makeImage();
    const file = join(work, "bad.tar");
    const good = makeDockerArchive([{ image, tags: ["x:1"] }]);
    await writeFile(file, good.subarray(0, 2048));
    await assert.rejects(pullImage(`docker-archive:${file}`, { dataDir }), code("INVALID_ARGUMENT"));
    await writeFile(file, tarBytes([{ name: "manifest.json", data: "[{}]" }]));
    await assert.rejects(
      pullImage(`docker-archive:${file}`, { dataDir }),
      code("INVALID_ARGUMENT", /lacks Config/),
    );
    await writeFile(
      file,
      tarBytes([
        { name: "c.json", data: image.config.bytes },
        { name: "manifest.json", data: JSON.stringify([{ Config: "c.json", Layers: ["missing.tar"] }]) },
      ]),
    );
    await assert.rejects(
      pullImage(`docker-archive:${file}`, { dataDir }),
      code("INVALID_ARGUMENT", /missing\.tar is missing/),
    );
    await writeFile(file, Buffer.alloc(1024, 0x41));
    await assert.rejects(
      pullImage(`docker-archive:${file}`, { dataDir }),
      code("INVALID_ARGUMENT", /octal|checksum/),
    );
    await writeFile(file, good);
    await truncate(file, good.length - 3000);
    await assert.rejects(pullImage(`docker-archive:${file}`, { dataDir }));
    await assert.rejects(
      pullImage(`docker-archive:${join(work, "missing.tar")}`, { dataDir }),
      code("IMAGE_NOT_FOUND"),
    );
    await assertNoLeftovers();
    assert.deepEqual(await readdir(join(dataDir, "oci", "images")), []);
  });
});
