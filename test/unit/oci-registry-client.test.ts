/**
 * Registry client and pullImage against an in-process registry (node:http) that misbehaves on
 * purpose: the cases a real registry cannot produce.
 */
import assert from "node:assert/strict";
import diagnosticsChannel from "node:diagnostics_channel";
import { mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { PassThrough } from "node:stream";
import { after, afterEach, before, beforeEach, describe, test } from "node:test";
import {
  DigestMismatchError,
  PlatformNotFoundError,
  RegistryError,
  SupermachineError,
} from "../../src/errors.ts";
import { BlobWriter, ContentStore } from "../../src/oci/content-store.ts";
import { streamBody } from "../../src/oci/http-get.ts";
import { PULL_PROGRESS_CHANNEL, type PullProgress } from "../../src/oci/progress.ts";
import { listImages, type PullOptions, pullImage, resolveLocalImage } from "../../src/oci/pull.ts";
import { RegistryClient, receiveBody } from "../../src/oci/registry-client.ts";
import { FakeRegistry, MT, makeImage, makeIndex, type SyntheticImage, sha256 } from "../helpers/oci-kit.ts";

let dataDir: string;
let registry: FakeRegistry;

beforeEach(async () => {
  dataDir = await mkdtemp(join(tmpdir(), "oci-client-"));
});
afterEach(async () => {
  await registry?.stop();
  await rm(dataDir, { recursive: true, force: true });
});

const fast: PullOptions = { retries: 2, retryDelayMs: 1, dockerConfigPath: false };

function opts(extra: PullOptions = {}): PullOptions {
  return { dataDir, ...fast, ...extra };
}

/** Everything in the store, to check that failures leave nothing behind. */
async function storeState(): Promise<{ blobs: string[]; tmp: string[]; images: string[]; locks: string[] }> {
  const ls = (d: string) => readdir(join(dataDir, "oci", d)).catch(() => [] as string[]);
  return {
    blobs: (await ls("blobs/sha256")).map((h) => `sha256:${h}`),
    tmp: await ls("tmp"),
    images: await ls("images"),
    locks: await ls("locks"),
  };
}

async function assertClean(failedDigest?: string): Promise<void> {
  const s = await storeState();
  assert.deepEqual(s.tmp, [], "no temp files");
  assert.deepEqual(s.images, [], "no image record");
  assert.deepEqual(s.locks, [], "no lock files");
  if (failedDigest) assert.ok(!s.blobs.includes(failedDigest), "no blob under the failed digest");
}

async function assertStored(image: SyntheticImage): Promise<void> {
  for (const l of image.layers) {
    const bytes = await readFile(join(dataDir, "oci", "blobs", "sha256", l.digest.slice(7)));
    assert.equal(sha256(bytes), l.digest);
  }
}

function rejectsWith(code: string, check?: (e: SupermachineError) => void) {
  return (e: unknown) => {
    assert.ok(SupermachineError.is(e), `expected a SupermachineError, got ${String(e)}`);
    assert.equal(e.code, code, e.message);
    check?.(e);
    return true;
  };
}

describe("pull from a registry", () => {
  test("OCI image: Accept header, blobs verified and stored, record, progress events", async () => {
    registry = await FakeRegistry.start();
    const image = makeImage({ layerSizes: [10, 300_000, 5000] });
    registry.add("team/app", "1.0", image);
    const events: PullProgress[] = [];
    const channelEvents: unknown[] = [];
    const onMessage = (m: unknown) => channelEvents.push(m);
    diagnosticsChannel.subscribe(PULL_PROGRESS_CHANNEL, onMessage);
    try {
      const pulled = await pullImage(
        `${registry.host}/team/app:1.0`,
        opts({ onProgress: (e) => events.push(e) }),
      );
      assert.equal(pulled.reference, `${registry.host}/team/app:1.0`);
      assert.equal(pulled.source, "registry");
      assert.equal(pulled.manifestDigest, image.manifest.digest);
      assert.equal(pulled.configDigest, image.config.digest);
      assert.equal(pulled.platform, "linux/amd64");
      assert.deepEqual(pulled.config.cmd, ["/bin/sh"]);
      assert.deepEqual(
        pulled.layers.map((l) => [l.digest, l.size, l.diffId, l.compression]),
        image.layers.map((l, i) => [l.digest, l.size, image.diffIds[i], "gzip"]),
      );
      for (const l of pulled.layers) assert.equal(sha256(await readFile(l.path)), l.digest);
    } finally {
      diagnosticsChannel.unsubscribe(PULL_PROGRESS_CHANNEL, onMessage);
    }
    const accept = String(registry.requests.find((r) => r.path.includes("/manifests/"))?.headers.accept);
    for (const t of [MT.ociIndex, MT.ociManifest, MT.dockerList, MT.dockerManifest])
      assert.ok(accept.includes(t), t);
    assert.ok(!accept.includes("distribution.manifest.v1"));

    assert.deepEqual(channelEvents, events);
    assert.equal(events.at(-1)?.type, "done");
    const resolved = events.find((e) => e.type === "resolved");
    assert.deepEqual(resolved, {
      type: "resolved",
      reference: `${registry.host}/team/app:1.0`,
      manifestDigest: image.manifest.digest,
      platform: "linux/amd64",
      layerCount: 3,
      totalBytes: image.config.size + image.layers.reduce((n, l) => n + l.size, 0),
    });
    for (const l of image.layers) {
      const mine = events.filter((e) => e.type === "blob" && e.digest === l.digest);
      assert.equal(mine[0]?.type === "blob" && mine[0].state, "downloading");
      assert.deepEqual(mine.at(-1), {
        type: "blob",
        reference: `${registry.host}/team/app:1.0`,
        kind: "layer",
        digest: l.digest,
        bytesDone: l.size,
        totalBytes: l.size,
        state: "done",
      });
    }
    const done = events.at(-1);
    assert.ok(
      done?.type === "done" &&
        done.downloadedBytes === image.config.size + image.layers.reduce((n, l) => n + l.size, 0),
    );

    // A second pull fetches only the manifest; every blob is reported cached.
    const before = registry.requests.length;
    const again: PullProgress[] = [];
    await pullImage(`${registry.host}/team/app:1.0`, opts({ onProgress: (e) => again.push(e) }));
    const paths = registry.requests.slice(before).map((r) => r.path);
    assert.ok(
      paths.every((p) => !p.includes("/blobs/")),
      paths.join(" "),
    );
    assert.ok(again.filter((e) => e.type === "blob").every((e) => e.type === "blob" && e.state === "cached"));
    assert.equal((await listImages({ dataDir })).length, 1);
    assert.equal((await storeState()).tmp.length, 0);
  });

  test("blobs come on connections of their own, through node:http when Node uses the environment's proxy", async () => {
    registry = await FakeRegistry.start();
    const image = makeImage({ layerSizes: [300_000, 5000] });
    registry.add("app", "1", image);
    const blobDigests = new Set([image.config.digest, ...image.layers.map((l) => l.digest)]);
    const connections = (path: (p: string) => boolean) =>
      registry.requests.filter((r) => path(r.path)).map((r) => String(r.headers.connection));
    await pullImage(`${registry.host}/app:1`, opts());
    const isBlob = (p: string) => blobDigests.has(p.slice(p.lastIndexOf("/") + 1));
    assert.deepEqual(new Set(connections(isBlob)), new Set(["close"]));
    assert.deepEqual(new Set(connections((p) => p.includes("/manifests/"))), new Set(["keep-alive"]));
    await rm(join(dataDir, "oci"), { recursive: true });
    registry.requests.length = 0;
    // What Node 24 reads at start to send requests through HTTP_PROXY / HTTPS_PROXY.
    process.env.NODE_USE_ENV_PROXY = "1";
    try {
      const pulled = await pullImage(`${registry.host}/app:1`, opts());
      await assertStored(image);
      assert.equal(pulled.layers.length, 2);
    } finally {
      delete process.env.NODE_USE_ENV_PROXY;
    }
    assert.deepEqual(new Set(connections(isBlob)), new Set(["keep-alive"]));
  });

  test("Docker manifest list: platform selection; arm64 and amd64 records side by side", async () => {
    registry = await FakeRegistry.start();
    const amd = makeImage({ docker: true, seed: "amd" });
    const arm = makeImage({ docker: true, architecture: "arm64", variant: "v8", seed: "arm" });
    const list = makeIndex([amd, arm], true, [
      {
        mediaType: MT.dockerManifest,
        digest: `sha256:${"e".repeat(64)}`,
        size: 1,
        platform: { os: "unknown", architecture: "unknown" },
      },
    ]);
    registry.add("multi", "latest", { index: list, images: [amd, arm] });
    const a = await pullImage(`${registry.host}/multi`, opts());
    assert.equal(a.manifestDigest, amd.manifest.digest);
    assert.equal(a.indexDigest, list.digest);
    assert.equal(a.platform, "linux/amd64");
    const b = await pullImage(`${registry.host}/multi:latest`, opts({ platform: "linux/aarch64" }));
    assert.equal(b.manifestDigest, arm.manifest.digest);
    assert.equal(b.platform, "linux/arm64");
    assert.equal(
      (await resolveLocalImage(`${registry.host}/multi`, { dataDir, platform: "linux/arm64/v8" }))
        .manifestDigest,
      arm.manifest.digest,
    );
    assert.equal(
      (await resolveLocalImage(`${registry.host}/multi@${list.digest}`, { dataDir })).manifestDigest,
      amd.manifest.digest,
    );
    assert.deepEqual(
      (await listImages({ dataDir })).map((r) => r.platform),
      ["linux/amd64", "linux/arm64"],
    );
  });

  test("pull by digest verifies the manifest bytes", async () => {
    registry = await FakeRegistry.start();
    const image = makeImage();
    registry.add("app", "v1", image);
    const pulled = await pullImage(`${registry.host}/app@${image.manifest.digest}`, opts());
    assert.equal(pulled.reference, `${registry.host}/app@${image.manifest.digest}`);
    // A registry that answers a digest request with other bytes.
    const other = makeImage();
    registry.fault = (_req, res, { path }) => {
      if (!path.endsWith(`/manifests/${other.manifest.digest}`)) return false;
      res.writeHead(200, { "content-type": MT.ociManifest });
      res.end(image.manifest.bytes);
      return true;
    };
    await assert.rejects(
      pullImage(`${registry.host}/app@${other.manifest.digest}`, opts()),
      (e: unknown) =>
        e instanceof DigestMismatchError &&
        e.digest === other.manifest.digest &&
        e.actualDigest === image.manifest.digest,
    );
  });

  test("a Docker-Content-Digest header that disagrees with the manifest bytes is an error", async () => {
    registry = await FakeRegistry.start();
    const image = makeImage();
    registry.add("app", "v1", image);
    registry.fault = (_req, res, { path }) => {
      if (!path.endsWith("/manifests/v1")) return false;
      res.writeHead(200, {
        "content-type": MT.ociManifest,
        "docker-content-digest": `sha256:${"0".repeat(64)}`,
      });
      res.end(image.manifest.bytes);
      return true;
    };
    await assert.rejects(pullImage(`${registry.host}/app:v1`, opts()), rejectsWith("DIGEST_MISMATCH"));
    await assertClean();
  });

  test("schema 1 manifests are refused", async () => {
    registry = await FakeRegistry.start();
    registry.fault = (_req, res, { path }) => {
      if (!path.includes("/manifests/")) return false;
      res.writeHead(200, { "content-type": MT.schema1Signed });
      res.end(JSON.stringify({ schemaVersion: 1, name: "old", tag: "latest", fsLayers: [], history: [] }));
      return true;
    };
    await assert.rejects(pullImage(`${registry.host}/old`, opts()), rejectsWith("UNSUPPORTED_MEDIA_TYPE"));
    await assertClean();
  });

  test("unknown tag: MANIFEST_UNKNOWN with the HTTP status", async () => {
    registry = await FakeRegistry.start();
    await assert.rejects(
      pullImage(`${registry.host}/nothing:here`, opts()),
      rejectsWith("MANIFEST_UNKNOWN", (e) => {
        assert.ok(e instanceof RegistryError);
        assert.equal(e.httpStatus, 404);
        assert.equal(e.registry, registry.host);
      }),
    );
    await assertClean();
  });

  test("a single-platform image for another architecture is PLATFORM_NOT_FOUND", async () => {
    registry = await FakeRegistry.start();
    const arm = makeImage({ architecture: "arm64" });
    registry.add("armonly", "1", arm);
    await assert.rejects(
      pullImage(`${registry.host}/armonly:1`, opts()),
      (e: unknown) =>
        e instanceof PlatformNotFoundError &&
        e.platform === "linux/amd64" &&
        e.available.join() === "linux/arm64",
    );
    await assertClean(arm.layers[0]!.digest);
    assert.equal(
      (await pullImage(`${registry.host}/armonly:1`, opts({ platform: "linux/arm64" }))).platform,
      "linux/arm64",
    );
  });

  test("an index without the platform lists what it has", async () => {
    registry = await FakeRegistry.start();
    const arm = makeImage({ architecture: "arm64" });
    const s390 = makeImage({ architecture: "s390x" });
    registry.add("multi", "1", { index: makeIndex([arm, s390]), images: [arm, s390] });
    await assert.rejects(
      pullImage(`${registry.host}/multi:1`, opts()),
      (e: unknown) =>
        e instanceof PlatformNotFoundError &&
        /available: linux\/arm64, linux\/s390x/.test(e.message) &&
        e.available.length === 2,
    );
    await assertClean();
  });
});

describe("faults", () => {
  test("a connection dropped mid-blob is resumed with a Range request", async () => {
    registry = await FakeRegistry.start();
    const image = makeImage({ layerSizes: [2_000_000], compression: "none" });
    const layer = image.layers[0]!;
    registry.add("app", "1", image);
    const half = 1_000_000;
    registry.fault = (_req, res, { path, count }) => {
      if (!path.endsWith(layer.digest) || count !== 1) return false;
      res.writeHead(200, { "content-length": layer.size, "content-type": "application/octet-stream" });
      res.write(layer.bytes.subarray(0, half), () => res.socket?.destroy());
      return true;
    };
    const pulled = await pullImage(`${registry.host}/app:1`, opts());
    const blobRequests = registry.requests.filter((r) => r.path.endsWith(layer.digest));
    assert.equal(blobRequests.length, 2);
    const range = /^bytes=(\d+)-$/.exec(String(blobRequests[1]!.headers.range));
    assert.ok(range, `second request has a Range header: ${blobRequests[1]!.headers.range}`);
    assert.ok(Number(range[1]) > 0 && Number(range[1]) <= half, range[1]);
    assert.equal(sha256(await readFile(pulled.layers[0]!.path)), layer.digest);
  });

  test("a body is paused while 8 MiB wait for the disk, and arrives whole", async () => {
    registry = await FakeRegistry.start();
    const image = makeImage({ layerSizes: [12 * 1024 * 1024 + 3], compression: "none" });
    const layer = image.layers[0]!;
    registry.add("app", "1", image);
    // A file whose first write finishes only after 8 MiB more than it holds were accepted.
    const file = Buffer.alloc(layer.size);
    const writeSizes: number[] = [];
    let releaseFirst: (() => void) | undefined;
    const firstReleased = new Promise<void>((resolve) => {
      releaseFirst = resolve;
    });
    const fh = {
      async writev(chunks: Uint8Array[], position: number) {
        const bytes = Buffer.concat(chunks);
        writeSizes.push(bytes.length);
        if (writeSizes.length === 1) await firstReleased;
        bytes.copy(file, position);
        return { bytesWritten: bytes.length };
      },
      datasync: async () => {},
    };
    const writer = new BlobWriter(fh as never, layer.digest, "sha256", layer.size);
    const client = new RegistryClient(registry.host, { dockerConfigPath: false });
    await client.fetchBlob("app", layer, writer, {
      onBytes: (done) => {
        if (writeSizes.length > 0 && done >= writeSizes[0]! + 8 * 1024 * 1024) setImmediate(releaseFirst!);
      },
    });
    await writer.flush();
    assert.equal(writer.finalDigest(), layer.digest);
    assert.equal(sha256(file), layer.digest);
    assert.ok(writeSizes[1]! >= 8 * 1024 * 1024, `second write ${writeSizes[1]}`);
    assert.ok(Math.max(...writeSizes) <= 8 * 1024 * 1024 + 256 * 1024, `writes ${writeSizes.join(" ")}`);
  });

  test("receiving stops while the writer is 8 MiB behind and resumes when it caught up", async () => {
    let releaseFirst: (() => void) | undefined;
    const firstReleased = new Promise<void>((resolve) => {
      releaseFirst = resolve;
    });
    let writes = 0;
    const fh = {
      async writev(chunks: Uint8Array[]) {
        if (++writes === 1) await firstReleased;
        return { bytesWritten: chunks.reduce((n, c) => n + c.length, 0) };
      },
      datasync: async () => {},
    };
    const mib = Buffer.alloc(1024 * 1024, 7);
    const body = new PassThrough();
    const writer = new BlobWriter(fh as never, sha256(Buffer.alloc(0)), "sha256", undefined);
    const received = receiveBody(streamBody(body), writer, undefined, undefined);
    for (let i = 0; i < 10; i++) body.write(mib);
    await new Promise((resolve) => setImmediate(resolve));
    // 1 MiB is being written and 8 MiB wait: the 10th MiB stays in the body.
    assert.equal(writer.bytesWritten, 9 * mib.length);
    assert.equal(body.isPaused(), true);
    releaseFirst?.();
    body.end(mib);
    assert.equal(await received, undefined);
    assert.equal(writer.bytesWritten, 11 * mib.length);
  });

  test("a node:http body that broke before anyone read it reports the break at once", async () => {
    const body = new PassThrough();
    body.on("error", () => {}); // as httpGet's responses have
    body.destroy(new Error("socket hang up"));
    await new Promise((resolve) => setImmediate(resolve));
    const outcome = await streamBody(body).consume(() => assert.fail("no chunk"));
    assert.match(String(outcome), /socket hang up/);
  });

  test("a server that ignores Range restarts the blob from byte 0", async () => {
    registry = await FakeRegistry.start();
    const image = makeImage({ layerSizes: [600_000], compression: "none" });
    const layer = image.layers[0]!;
    registry.add("app", "1", image);
    registry.fault = (_req, res, { path, count }) => {
      if (!path.endsWith(layer.digest)) return false;
      res.writeHead(200, { "content-length": layer.size });
      if (count === 1) res.write(layer.bytes.subarray(0, 300_000), () => res.socket?.destroy());
      else res.end(layer.bytes);
      return true;
    };
    const pulled = await pullImage(`${registry.host}/app:1`, opts());
    assert.equal(sha256(await readFile(pulled.layers[0]!.path)), layer.digest);
    assert.equal(registry.countOf(`/v2/app/blobs/${layer.digest}`), 2);
  });

  test("wrong bytes: DIGEST_MISMATCH, nothing stored; a retry against a fixed registry succeeds", async () => {
    registry = await FakeRegistry.start();
    const image = makeImage({ layerSizes: [100_000, 2000] });
    const bad = image.layers[0]!;
    registry.add("app", "1", image);
    registry.fault = (_req, res, { path }) => {
      if (!path.endsWith(bad.digest)) return false;
      const wrong = Buffer.from(bad.bytes);
      wrong[wrong.length >> 1]! ^= 0xff;
      res.writeHead(200, { "content-length": wrong.length });
      res.end(wrong);
      return true;
    };
    await assert.rejects(
      pullImage(`${registry.host}/app:1`, opts()),
      (e: unknown) =>
        e instanceof DigestMismatchError && e.digest === bad.digest && e.actualDigest !== bad.digest,
    );
    await assertClean(bad.digest);
    registry.fault = undefined;
    await pullImage(`${registry.host}/app:1`, opts());
    await assertStored(image);
  });

  test("500 twice then 200: retried with backoff", async () => {
    registry = await FakeRegistry.start();
    const image = makeImage();
    registry.add("app", "1", image);
    const layer = image.layers[1]!;
    registry.fault = (_req, res, { path, count }) => {
      if ((path.endsWith("/manifests/1") || path.endsWith(layer.digest)) && count <= 2) {
        res.writeHead(500, { "content-type": "application/json" });
        res.end('{"errors":[{"code":"UNKNOWN","message":"boom"}]}');
        return true;
      }
      return false;
    };
    await pullImage(`${registry.host}/app:1`, opts());
    assert.equal(registry.countOf("/v2/app/manifests/1"), 3);
    assert.equal(registry.countOf(`/v2/app/blobs/${layer.digest}`), 3);
    await assertStored(image);
  });

  test("5xx every time: REGISTRY_ERROR after a bounded number of attempts", async () => {
    registry = await FakeRegistry.start();
    registry.fault = (_req, res, { path }) => {
      if (!path.includes("/manifests/")) return false;
      res.writeHead(503, { "retry-after": "0" });
      res.end();
      return true;
    };
    await assert.rejects(
      pullImage(`${registry.host}/app:1`, opts({ retries: 3 })),
      rejectsWith("REGISTRY_ERROR", (e) => assert.equal((e as RegistryError).httpStatus, 503)),
    );
    assert.equal(registry.countOf("/v2/app/manifests/1"), 4);
    await assertClean();
  });

  for (const chunked of [false, true]) {
    test(`more bytes than the descriptor declares (${chunked ? "chunked" : "Content-Length"}) is an error`, async () => {
      registry = await FakeRegistry.start();
      const image = makeImage({ layerSizes: [50_000] });
      const layer = image.layers[0]!;
      registry.add("app", "1", image);
      registry.fault = (_req, res, { path }) => {
        if (!path.endsWith(layer.digest)) return false;
        const body = Buffer.concat([layer.bytes, Buffer.alloc(4096, 1)]);
        res.writeHead(200, chunked ? {} : { "content-length": body.length });
        if (chunked) {
          res.write(body.subarray(0, 30_000));
          res.end(body.subarray(30_000));
        } else res.end(body);
        return true;
      };
      await assert.rejects(
        pullImage(`${registry.host}/app:1`, opts()),
        rejectsWith("REGISTRY_ERROR", (e) => assert.match(e.message, /sen(t|ds) .*more|descriptor says/)),
      );
      await assertClean(layer.digest);
    });
  }

  test("a body that ends early without an error is resumed", async () => {
    registry = await FakeRegistry.start();
    const image = makeImage({ layerSizes: [80_000] });
    const layer = image.layers[0]!;
    registry.add("app", "1", image);
    registry.fault = (_req, res, { path, count }) => {
      if (!path.endsWith(layer.digest) || count !== 1) return false;
      res.writeHead(200, {}); // chunked, ends cleanly after 10 000 bytes
      res.end(layer.bytes.subarray(0, 10_000));
      return true;
    };
    await pullImage(`${registry.host}/app:1`, opts());
    const second = registry.requests.filter((r) => r.path.endsWith(layer.digest))[1];
    assert.equal(second?.headers.range, "bytes=10000-");
    await assertStored(image);
  });

  test("connection dropped on every attempt: REGISTRY_UNREACHABLE, nothing stored, retry succeeds", async () => {
    registry = await FakeRegistry.start();
    const image = makeImage({ layerSizes: [100_000] });
    const layer = image.layers[0]!;
    registry.add("app", "1", image);
    registry.fault = (_req, res, { path }) => {
      if (!path.endsWith(layer.digest)) return false;
      res.socket?.destroy();
      return true;
    };
    await assert.rejects(pullImage(`${registry.host}/app:1`, opts()), rejectsWith("REGISTRY_UNREACHABLE"));
    await assertClean(layer.digest);
    registry.fault = undefined;
    await pullImage(`${registry.host}/app:1`, opts());
    await assertStored(image);
  });

  test("nothing listening: REGISTRY_UNREACHABLE", async () => {
    const server = createServer();
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    const port = (server.address() as { port: number }).port;
    await new Promise<void>((r) => server.close(() => r()));
    await assert.rejects(
      pullImage(`127.0.0.1:${port}/app:1`, opts({ retries: 1 })),
      rejectsWith("REGISTRY_UNREACHABLE", (e) => assert.match(e.message, /ECONNREFUSED/)),
    );
    await assertClean();
  });

  test("abort during a blob download: ABORTED, nothing left behind", async () => {
    registry = await FakeRegistry.start();
    const image = makeImage({ layerSizes: [400_000] });
    const layer = image.layers[0]!;
    registry.add("app", "1", image);
    const controller = new AbortController();
    registry.fault = (_req, res, { path }) => {
      if (!path.endsWith(layer.digest)) return false;
      res.writeHead(200, { "content-length": layer.size });
      res.write(layer.bytes.subarray(0, 100_000), () => controller.abort(new Error("user cancelled")));
      return true; // never finishes
    };
    await assert.rejects(
      pullImage(`${registry.host}/app:1`, opts({ signal: controller.signal })),
      rejectsWith("ABORTED"),
    );
    await assertClean(layer.digest);
    await assert.rejects(
      pullImage(`${registry.host}/app:1`, opts({ signal: controller.signal })),
      rejectsWith("ABORTED"),
    );
  });

  test("layer downloads run in parallel, at most `concurrency` at once", async () => {
    registry = await FakeRegistry.start();
    const image = makeImage({ layerSizes: [1000, 2000, 3000, 4000, 5000, 6000] });
    registry.add("app", "1", image);
    let active = 0;
    let peak = 0;
    const layerDigests = new Set(image.layers.map((l) => l.digest));
    registry.fault = (_req, res, { path }) => {
      const digest = path.slice(path.lastIndexOf("/") + 1);
      if (!layerDigests.has(digest)) return false;
      active++;
      peak = Math.max(peak, active);
      const b = registry.blobs.get(digest)!;
      setTimeout(() => {
        active--;
        res.writeHead(200, { "content-length": b.size });
        res.end(b.bytes);
      }, 30);
      return true;
    };
    await pullImage(`${registry.host}/app:1`, opts({ concurrency: 3 }));
    assert.equal(peak, 3);
    await assertStored(image);
  });

  test("two pulls of the same image at once both succeed", async () => {
    registry = await FakeRegistry.start();
    const image = makeImage({ layerSizes: [300_000, 200_000] });
    registry.add("app", "1", image);
    const [a, b] = await Promise.all([
      pullImage(`${registry.host}/app:1`, opts()),
      pullImage(`${registry.host}/app:1`, opts()),
    ]);
    assert.equal(a.manifestDigest, b.manifestDigest);
    await assertStored(image);
    assert.deepEqual((await storeState()).tmp, []);
  });

  test("pullPolicy: missing uses the store, never does not touch the network", async () => {
    registry = await FakeRegistry.start();
    const image = makeImage();
    registry.add("app", "1", image);
    await assert.rejects(
      pullImage(`${registry.host}/app:1`, opts({ pullPolicy: "never" })),
      rejectsWith("IMAGE_NOT_FOUND"),
    );
    assert.equal(registry.requests.length, 0);
    await pullImage(`${registry.host}/app:1`, opts({ pullPolicy: "missing" }));
    const n = registry.requests.length;
    const again = await pullImage(`${registry.host}/app:1`, opts({ pullPolicy: "missing" }));
    assert.equal(registry.requests.length, n);
    assert.equal(again.manifestDigest, image.manifest.digest);
    assert.equal(
      (await pullImage(`${registry.host}/app:1`, opts({ pullPolicy: "never" }))).configDigest,
      image.config.digest,
    );
  });
});

describe("auth", () => {
  let configDir: string;
  before(async () => {
    configDir = await mkdtemp(join(tmpdir(), "oci-auth-"));
  });
  after(async () => {
    await rm(configDir, { recursive: true, force: true });
  });

  test("Bearer: quoted scope with a comma, Basic credentials at the realm, one token for every blob", async () => {
    registry = await FakeRegistry.start({ auth: "bearer", challengeScopeActions: "pull,push" });
    const image = makeImage({ layerSizes: [10, 20, 30] });
    registry.add("team/app", "1", image);
    await pullImage(
      `${registry.host}/team/app:1`,
      opts({ credentials: { username: "user", password: "secret" } }),
    );
    await assertStored(image);
    assert.equal(registry.tokenRequests, 1, "the token is cached per scope");
    const tokenRequest = registry.requests.find((r) => r.path.startsWith("/token"))!;
    const url = new URL(tokenRequest.path, "http://x");
    assert.equal(url.searchParams.get("service"), "fake-registry");
    assert.equal(
      tokenRequest.headers.authorization,
      `Basic ${Buffer.from("user:secret").toString("base64")}`,
    );
    const blobAuth = registry.requests
      .filter((r) => r.path.includes("/blobs/"))
      .map((r) => r.headers.authorization);
    assert.ok(blobAuth.every((a) => a?.startsWith("Bearer ")));
  });

  test("Bearer: concurrent requests of a fresh client share one token request", async () => {
    registry = await FakeRegistry.start({ auth: "bearer" });
    const image = makeImage({ layerSizes: [100, 200, 300, 400] });
    registry.add("app", "1", image);
    const store = await ContentStore.open(dataDir);
    const client = new RegistryClient(registry.host, {
      credentials: { username: "user", password: "secret" },
      dockerConfigPath: false,
    });
    await Promise.all(
      image.layers.map((l) => store.writeBlob(l.digest, l.size, (w) => client.fetchBlob("app", l, w))),
    );
    assert.equal(registry.tokenRequests, 1);
    await assertStored(image);
  });

  test("Bearer: the challenge's scope is what the token is asked for", async () => {
    registry = await FakeRegistry.start({ auth: "bearer", challengeScopeActions: "pull,push" });
    registry.add("team/app", "1", makeImage());
    await pullImage(
      `${registry.host}/team/app:1`,
      opts({ credentials: { username: "user", password: "secret" } }),
    );
    const scopes = registry.requests
      .filter((r) => r.path.startsWith("/token"))
      .map((r) => new URL(r.path, "http://x").searchParams.getAll("scope"));
    // The ping carries no scope, so the first token is for repository:team/app:pull.
    assert.deepEqual(scopes, [["repository:team/app:pull"]]);
  });

  test("Bearer: anonymous token without access is REGISTRY_AUTH", async () => {
    registry = await FakeRegistry.start({ auth: "bearer" });
    registry.add("app", "1", makeImage());
    await assert.rejects(
      pullImage(`${registry.host}/app:1`, opts()),
      rejectsWith("REGISTRY_AUTH", (e) => {
        assert.equal((e as RegistryError).httpStatus, 401);
        assert.match(e.message, /does not exist or needs credentials/);
      }),
    );
    await assertClean();
  });

  test("Bearer: wrong password is refused by the token server", async () => {
    registry = await FakeRegistry.start({ auth: "bearer" });
    registry.add("app", "1", makeImage());
    await assert.rejects(
      pullImage(
        `${registry.host}/app:1`,
        opts({ credentials: () => ({ username: "user", password: "nope" }) }),
      ),
      rejectsWith("REGISTRY_AUTH", (e) => assert.match(e.message, /refused the credentials of user "user"/)),
    );
    await assertClean();
  });

  test("Bearer: a plain-HTTP realm on a non-loopback host is refused", async () => {
    registry = await FakeRegistry.start();
    registry.fault = (_req, res) => {
      res.writeHead(401, {
        "www-authenticate": 'Bearer realm="http://auth.example.invalid/token",service="x"',
      });
      res.end();
      return true;
    };
    await assert.rejects(
      pullImage(`${registry.host}/app:1`, opts({ credentials: { username: "u", password: "p" } })),
      rejectsWith("REGISTRY_AUTH", (e) => assert.match(e.message, /refusing token realm/)),
    );
  });

  test("Basic: credentials from $DOCKER_CONFIG-style config; wrong and missing passwords", async () => {
    registry = await FakeRegistry.start({ auth: "basic" });
    const image = makeImage();
    registry.add("app", "1", image);
    const configPath = join(configDir, "config.json");
    const write = (password: string) =>
      writeFile(
        configPath,
        JSON.stringify({
          auths: {
            [`http://${registry.host}`]: { auth: Buffer.from(`user:${password}`).toString("base64") },
          },
        }),
      );

    await assert.rejects(
      pullImage(`${registry.host}/app:1`, opts()),
      rejectsWith("REGISTRY_AUTH", (e) => assert.match(e.message, /requires a user name and password/)),
    );
    await assertClean();
    await write("wrong");
    await assert.rejects(
      pullImage(`${registry.host}/app:1`, opts({ dockerConfigPath: configPath })),
      rejectsWith("REGISTRY_AUTH", (e) => assert.match(e.message, /check the password of user "user"/)),
    );
    await assertClean();
    await write("secret");
    await pullImage(`${registry.host}/app:1`, opts({ dockerConfigPath: configPath }));
    await assertStored(image);
    // explicit credentials win over the config file
    await assert.rejects(
      pullImage(
        `${registry.host}/app:1`,
        opts({ dockerConfigPath: configPath, credentials: { username: "user", password: "x" } }),
      ),
      rejectsWith("REGISTRY_AUTH"),
    );
  });
});

describe("store consistency", () => {
  // Each failure leaves no temp file, no record and no blob under a failed digest; after the
  // cause is fixed, the same pull succeeds into the same store.
  const scenarios: {
    name: string;
    code: string;
    auth?: "basic";
    setup(
      r: FakeRegistry,
      image: SyntheticImage,
    ): { options?: PullOptions; fix(): void; failedDigest?: string };
  }[] = [
    {
      name: "wrong password",
      code: "REGISTRY_AUTH",
      auth: "basic",
      setup(r, image) {
        r.add("app", "1", image);
        const creds = { username: "user", password: "wrong" };
        return {
          options: { credentials: () => creds },
          fix: () => Object.assign(creds, { password: "secret" }),
        };
      },
    },
    {
      name: "missing tag",
      code: "MANIFEST_UNKNOWN",
      setup(r, image) {
        return { fix: () => r.add("app", "1", image) };
      },
    },
    {
      name: "missing platform",
      code: "PLATFORM_NOT_FOUND",
      setup(r, image) {
        const arm = makeImage({ architecture: "arm64" });
        r.add("app", "1", { index: makeIndex([arm]), images: [arm] });
        return { fix: () => r.add("app", "1", { index: makeIndex([arm, image]), images: [arm, image] }) };
      },
    },
    {
      name: "digest mismatch",
      code: "DIGEST_MISMATCH",
      setup(r, image) {
        r.add("app", "1", image);
        const layer = image.layers[1]!;
        r.fault = (_req, res, { path }) => {
          if (!path.endsWith(layer.digest)) return false;
          res.writeHead(200, { "content-length": layer.size });
          res.end(Buffer.alloc(layer.size, 7));
          return true;
        };
        return {
          fix: () => {
            r.fault = undefined;
          },
          failedDigest: layer.digest,
        };
      },
    },
    {
      name: "dropped connection",
      code: "REGISTRY_UNREACHABLE",
      setup(r, image) {
        r.add("app", "1", image);
        const layer = image.layers[1]!;
        r.fault = (_req, res, { path }) => {
          if (!path.endsWith(layer.digest)) return false;
          res.writeHead(200, { "content-length": layer.size });
          res.write(layer.bytes.subarray(0, 1000), () => res.socket?.destroy());
          return true;
        };
        return {
          options: { retries: 0 },
          fix: () => {
            r.fault = undefined;
          },
          failedDigest: layer.digest,
        };
      },
    },
  ];
  for (const s of scenarios) {
    test(`${s.name}: nothing left behind, then a retry succeeds`, async () => {
      registry = await FakeRegistry.start({ auth: s.auth });
      const image = makeImage({ layerSizes: [5000, 120_000, 7000] });
      const { options, fix, failedDigest } = s.setup(registry, image);
      await assert.rejects(pullImage(`${registry.host}/app:1`, opts(options)), rejectsWith(s.code));
      await assertClean(failedDigest);
      fix();
      const pulled = await pullImage(`${registry.host}/app:1`, opts(options));
      assert.equal(pulled.manifestDigest, image.manifest.digest);
      await assertStored(image);
      const state = await storeState();
      assert.deepEqual([state.tmp, state.locks, state.images.length], [[], [], 1]);
    });
  }
});
