/** Content store: atomic blobs and records, prune, and the pull/prune locks (also across processes). */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { once } from "node:events";
import { mkdtemp, readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, test } from "node:test";
import { DigestMismatchError, SupermachineError } from "../../src/errors.ts";
import {
  BlobSizeError,
  BlobWriter,
  ContentStore,
  defaultDataDir,
  type ImageRecord,
} from "../../src/oci/content-store.ts";
import { listImages, pruneImages, pullImage, removeImage } from "../../src/oci/pull.ts";
import { makeImage, sha256, writeOciLayout } from "../helpers/oci-kit.ts";

let dataDir: string;
let store: ContentStore;

beforeEach(async () => {
  dataDir = await mkdtemp(join(tmpdir(), "oci-store-"));
  store = await ContentStore.open(dataDir);
});
afterEach(async () => {
  await rm(dataDir, { recursive: true, force: true });
});

const tmpFiles = () => readdir(join(store.root, "tmp"));

function record(
  reference: string,
  digests: { manifest: string; config: string; layers: string[] },
): ImageRecord {
  return {
    version: 1,
    reference,
    source: "registry",
    platform: "linux/amd64",
    manifestDigest: digests.manifest,
    manifestMediaType: "application/vnd.oci.image.manifest.v1+json",
    configDigest: digests.config,
    layers: digests.layers.map((d) => ({
      digest: d,
      mediaType: "application/vnd.oci.image.layer.v1.tar",
      size: 1,
    })),
    sizeBytes: 3,
    pulledAt: new Date(0).toISOString(),
  };
}

describe("data dir", () => {
  test("SUPERMACHINE_DATA_DIR, else XDG_DATA_HOME/supermachine, else ~/.local/share/supermachine", () => {
    assert.equal(defaultDataDir({ SUPERMACHINE_DATA_DIR: "/d", XDG_DATA_HOME: "/x", HOME: "/h" }), "/d");
    assert.equal(defaultDataDir({ XDG_DATA_HOME: "/x", HOME: "/h" }), "/x/supermachine");
    assert.equal(defaultDataDir({ XDG_DATA_HOME: "relative", HOME: "/h" }), "/h/.local/share/supermachine");
    assert.equal(defaultDataDir({ HOME: "/h" }), "/h/.local/share/supermachine");
  });
});

describe("blobs", () => {
  const bytes = Buffer.from("hello blob");
  const digest = sha256(bytes);

  test("written atomically and verified; sha512 too", async () => {
    const path = await store.writeBlob(digest, bytes.length, async (w) => {
      await w.write(bytes.subarray(0, 4));
      await w.write(bytes.subarray(4));
    });
    assert.equal(path, join(store.root, "blobs", "sha256", digest.slice(7)));
    assert.deepEqual(await readFile(path), bytes);
    assert.ok(await store.hasBlob(digest, bytes.length));
    assert.ok(!(await store.hasBlob(digest, bytes.length + 1)));
    const { createHash } = await import("node:crypto");
    const d512 = `sha512:${createHash("sha512").update(bytes).digest("hex")}`;
    await store.putBlobBytes(d512, bytes);
    assert.ok(await store.hasBlob(d512));
    assert.deepEqual(await tmpFiles(), []);
  });

  test("wrong content: DigestMismatchError, no blob, no temp file", async () => {
    await assert.rejects(
      store.writeBlob(digest, bytes.length, (w) => w.write(Buffer.from("hello BLOB"))),
      (e: unknown) => e instanceof DigestMismatchError && e.digest === digest,
    );
    assert.ok(!(await store.hasBlob(digest)));
    assert.deepEqual(await tmpFiles(), []);
  });

  test("too long and too short content: BlobSizeError", async () => {
    await assert.rejects(
      store.writeBlob(digest, bytes.length, (w) => w.write(Buffer.concat([bytes, Buffer.from("!")]))),
      (e: unknown) => e instanceof BlobSizeError && e.tooLong,
    );
    await assert.rejects(
      store.writeBlob(digest, bytes.length, (w) => w.write(bytes.subarray(1))),
      (e: unknown) => e instanceof BlobSizeError && !e.tooLong && e.actualBytes === bytes.length - 1,
    );
    assert.deepEqual(await tmpFiles(), []);
  });

  test("a failing producer leaves nothing; reset() starts over", async () => {
    await assert.rejects(
      store.writeBlob(digest, bytes.length, async (w) => {
        await w.write(bytes.subarray(0, 3));
        throw new Error("network gone");
      }),
      /network gone/,
    );
    assert.deepEqual(await tmpFiles(), []);
    await store.writeBlob(digest, bytes.length, async (w) => {
      await w.write(Buffer.from("garbage"));
      await w.reset();
      await w.write(bytes);
    });
    assert.deepEqual(await readFile(store.blobPath(digest)), bytes);
  });

  test("large blob written in pieces with a write in flight", async () => {
    const big = Buffer.alloc(3 * 1024 * 1024 + 17);
    for (let i = 0; i < big.length; i++) big[i] = (i * 31) & 0xff;
    const d = sha256(big);
    await store.writeBlob(d, big.length, async (w) => {
      for (let off = 0; off < big.length; off += 65_536) await w.write(big.subarray(off, off + 65_536));
    });
    assert.equal(sha256(await readFile(store.blobPath(d))), d);
  });

  test("a blob past the background-sync size, reset halfway (a sync in flight), is stored whole", async () => {
    const big = Buffer.alloc(20 * 1024 * 1024 + 5);
    for (let i = 0; i < big.length; i++) big[i] = (i * 7 + (i >> 13)) & 0xff;
    const d = sha256(big);
    const path = await store.writeBlob(d, big.length, async (w) => {
      for (let off = 0; off < 12 * 1024 * 1024; off += 65_536) await w.write(big.subarray(off, off + 65_536));
      await w.reset();
      assert.equal(w.bytesWritten, 0);
      for (let off = 0; off < big.length; off += 65_536) await w.write(big.subarray(off, off + 65_536));
    });
    assert.equal((await stat(path)).size, big.length);
    assert.equal(sha256(await readFile(path)), d);
    assert.deepEqual(await tmpFiles(), []);
  });

  test("a write in flight does not stop the producer until 8 MiB wait; those go in one write", async () => {
    // A file handle whose writes finish when the test says so.
    const writes: { chunks: number; bytes: number; done: (error?: Error) => void }[] = [];
    const fh = {
      writev: (chunks: Uint8Array[]) =>
        new Promise<{ bytesWritten: number }>((resolve, reject) => {
          const bytes = chunks.reduce((n, c) => n + c.length, 0);
          writes.push({
            chunks: chunks.length,
            bytes,
            done: (error) => (error ? reject(error) : resolve({ bytesWritten: bytes })),
          });
        }),
      datasync: async () => {},
    };
    const mib = Buffer.alloc(1024 * 1024, 1);
    const w = new BlobWriter(fh as never, digest, "sha256", undefined);
    assert.equal(w.append(mib), true);
    assert.equal(writes.length, 1); // the first MiB is being written
    for (let i = 0; i < 7; i++) assert.equal(w.append(mib), true);
    assert.equal(w.append(mib), false); // 8 MiB wait: the producer should wait
    let drained = false;
    const draining = w.drained().then(() => {
      drained = true;
    });
    await new Promise((resolve) => setImmediate(resolve));
    assert.equal(drained, false);
    writes[0]!.done();
    await draining;
    assert.equal(writes.length, 2);
    assert.deepEqual(
      { chunks: writes[1]!.chunks, bytes: writes[1]!.bytes },
      { chunks: 8, bytes: 8 * mib.length },
    );
    // A failed write is thrown by the next write and by flush.
    writes[1]!.done(Object.assign(new Error("EIO: i/o error, write"), { code: "EIO" }));
    await w.settle();
    assert.throws(() => w.append(mib), /EIO/);
    await assert.rejects(w.write(mib), /EIO/);
    await assert.rejects(w.flush(), /EIO/);
    assert.equal(writes.length, 2);
  });

  test("commitAfter: the blob enters the store only once it resolves; its rejection leaves nothing", async () => {
    let allow: () => void = () => {};
    const gate = new Promise<void>((resolve) => {
      allow = resolve;
    });
    let reached: () => void = () => {};
    const waiting = new Promise<void>((resolve) => {
      reached = resolve;
    });
    // A thenable that tells when the store waits on it (after writing, verifying and syncing).
    const observed = {
      // biome-ignore lint/suspicious/noThenProperty: a thenable on purpose
      then(onFulfilled: () => void, onRejected: (e: unknown) => void) {
        reached();
        return gate.then(onFulfilled, onRejected);
      },
    } as Promise<void>;
    const writing = store.writeBlob(digest, bytes.length, (w) => w.write(bytes), observed);
    await Promise.race([waiting, writing.then(() => assert.fail("stored without waiting for commitAfter"))]);
    assert.ok(!(await store.hasBlob(digest)));
    allow();
    assert.equal(await writing, store.blobPath(digest));
    assert.deepEqual(await readFile(store.blobPath(digest)), bytes);

    const other = Buffer.from("another blob");
    const refused = Promise.reject(new Error("config refused"));
    refused.catch(() => {});
    await assert.rejects(
      store.writeBlob(sha256(other), other.length, (w) => w.write(other), refused),
      /config refused/,
    );
    assert.ok(!(await store.hasBlob(sha256(other))));
    assert.deepEqual(await tmpFiles(), []);
  });

  test("many concurrent writers of the same blob all succeed", async () => {
    await Promise.all(
      Array.from({ length: 8 }, () => store.writeBlob(digest, bytes.length, (w) => w.write(bytes))),
    );
    assert.deepEqual(await readFile(store.blobPath(digest)), bytes);
    assert.deepEqual(await tmpFiles(), []);
  });

  test("invalid digests are refused", async () => {
    assert.throws(
      () => store.blobPath("sha256:../../etc/passwd"),
      (e: unknown) => SupermachineError.is(e) && e.code === "STORE_ERROR",
    );
    await assert.rejects(
      store.writeBlob("md5:abc", 1, async () => {}),
      (e: unknown) => SupermachineError.is(e) && e.code === "STORE_ERROR",
    );
  });
});

describe("image records", () => {
  test("put, get, list, remove; unreadable records are skipped", async () => {
    const r1 = record("docker.io/library/a:1", {
      manifest: sha256(Buffer.from("m")),
      config: sha256(Buffer.from("c")),
      layers: [],
    });
    await store.putImage(r1);
    await store.putImage({ ...r1, platform: "linux/arm64" });
    await store.putImage({ ...r1, reference: "docker.io/library/b:1" });
    assert.deepEqual(await store.getImage("docker.io/library/a:1", "linux/amd64"), r1);
    assert.equal(await store.getImage("docker.io/library/a:1", "linux/s390x"), undefined);
    await writeFile(join(store.root, "images", "garbage.json"), "{");
    assert.deepEqual(
      (await store.listImages()).map((r) => `${r.reference} ${r.platform}`),
      [
        "docker.io/library/a:1 linux/amd64",
        "docker.io/library/a:1 linux/arm64",
        "docker.io/library/b:1 linux/amd64",
      ],
    );
    assert.equal(await store.removeImage("docker.io/library/a:1", "linux/arm64"), 1);
    assert.equal(await store.removeImage("docker.io/library/a:1"), 1);
    assert.equal(await store.removeImage("docker.io/library/a:1"), 0);
    const left = (await readdir(join(store.root, "images"))).filter((n) => n !== "garbage.json");
    assert.equal(left.length, 1);
    assert.ok(left.every((n) => !n.startsWith(".tmp")));
  });

  test("removeImage via the public API normalises the reference and reports unknown images", async () => {
    await store.putImage(
      record("docker.io/library/alpine:latest", {
        manifest: sha256(Buffer.from("m")),
        config: sha256(Buffer.from("c")),
        layers: [],
      }),
    );
    await assert.rejects(
      removeImage("alpine:3", { dataDir }),
      (e: unknown) => SupermachineError.is(e) && e.code === "IMAGE_NOT_FOUND",
    );
    assert.equal(await removeImage("alpine", { dataDir }), 1);
    assert.deepEqual(await listImages({ dataDir }), []);
  });
});

describe("prune", () => {
  test("deletes unreferenced blobs and stale temp files, keeps what images use", async () => {
    const image = makeImage({ layerSizes: [100, 200] });
    const layout = await writeOciLayout(join(dataDir, "layout"), { a: image, b: makeImage() });
    await pullImage(`oci:${layout}:a`, { dataDir });
    const b = await pullImage(`oci:${layout}:b`, { dataDir });
    await writeFile(join(store.root, "tmp", "deadbeef.999999.abc.partial"), "junk");
    const dead = spawn(process.execPath, ["-e", ""]);
    await once(dead, "exit");
    await writeFile(join(store.root, "images", `.tmp.${dead.pid}.abcdef`), "{");
    await removeImage(`oci:${layout}:b`, { dataDir });
    const result = await pruneImages({ dataDir });
    assert.deepEqual(
      [...result.removedBlobs].sort(),
      [b.manifestDigest, b.configDigest, ...b.layers.map((l) => l.digest)].sort(),
    );
    assert.ok(result.freedBytes > 0);
    assert.equal(result.removedTempFiles, 2);
    assert.deepEqual(
      (await readdir(join(store.root, "images"))).filter((n) => n.startsWith(".")),
      [],
    );
    for (const d of [image.manifest.digest, image.config.digest, ...image.layers.map((l) => l.digest)]) {
      assert.ok(await store.hasBlob(d), d);
    }
    assert.deepEqual((await pruneImages({ dataDir })).removedBlobs, []);
    assert.deepEqual(await readdir(join(store.root, "locks")), []);
  });

  test("waits for a pull in progress in this process; a pull waits for a running prune", async () => {
    const orphan = Buffer.from("orphan");
    await store.putBlobBytes(sha256(orphan), orphan);
    let releasePull!: () => void;
    const pullHeld = new Promise<void>((r) => {
      releasePull = r;
    });
    let pullBody!: () => void;
    const pullStarted = new Promise<void>((r) => {
      pullBody = r;
    });
    const pull = store.withPullLock(async () => {
      pullBody();
      await pullHeld;
    });
    await pullStarted;
    let pruned = false;
    const prune = store.prune().then((r) => {
      pruned = true;
      return r;
    });
    // The prune lock appears while it waits for the pull.
    while (!(await readdir(join(store.root, "locks"))).includes("prune"))
      await new Promise((r) => setImmediate(r));
    assert.equal(pruned, false);
    // A second pull must wait for the prune, which waits for the first pull.
    let secondRan = false;
    const second = store.withPullLock(async () => {
      secondRan = true;
      assert.equal(pruned, true, "the second pull runs after the prune");
    });
    releasePull();
    await pull;
    const result = await prune;
    await second;
    assert.ok(secondRan);
    assert.deepEqual(result.removedBlobs, [sha256(orphan)]);
  });

  test("locks of dead processes are ignored and removed", async () => {
    const child = spawn(process.execPath, ["-e", ""]);
    await once(child, "exit");
    const deadPid = child.pid!;
    await writeFile(join(store.root, "locks", `pull.${deadPid}.abcdef`), `${deadPid}\n`);
    await writeFile(join(store.root, "locks", "prune"), `${deadPid}\n`);
    await store.withPullLock(async () => {});
    await store.prune();
    assert.deepEqual(await readdir(join(store.root, "locks")), []);
  });

  test("across processes: prune waits for another process's pull lock", async () => {
    const orphan = Buffer.from("orphan across processes");
    await store.putBlobBytes(sha256(orphan), orphan);
    const script = `
      import { ContentStore } from ${JSON.stringify(new URL("../../src/oci/content-store.ts", import.meta.url).href)};
      const store = await ContentStore.open(${JSON.stringify(dataDir)});
      await store.withPullLock(async () => {
        process.stdout.write("locked\\n");
        await new Promise((r) => process.stdin.once("data", r));
      });
      process.stdout.write("released\\n");
    `;
    const child: ChildProcess = spawn(process.execPath, ["--input-type=module", "-e", script], {
      stdio: ["pipe", "pipe", "inherit"],
    });
    try {
      const [first] = (await once(child.stdout!, "data")) as [Buffer];
      assert.equal(first.toString().trim(), "locked");
      let done = false;
      const prune = store.prune().then((r) => {
        done = true;
        return r;
      });
      await new Promise((r) => setTimeout(r, 300));
      assert.equal(done, false, "prune waits while another process pulls");
      assert.ok(await store.hasBlob(sha256(orphan)));
      child.stdin!.write("go\n");
      const result = await prune;
      assert.deepEqual(result.removedBlobs, [sha256(orphan)]);
    } finally {
      if (child.exitCode === null) child.kill("SIGKILL");
    }
    await stat(store.root);
  });
});
