/**
 * pullImage against the real registry (Debian's docker-registry, distribution 2.8) on loopback:
 * open, htpasswd Basic and Bearer-token modes, TLS, OCI and Docker media types, indexes, faults
 * the registry produces itself (corrupt or missing blobs), a connection cut by a proxy, and
 * concurrent pulls from several processes into one store.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { connect, createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, beforeEach, describe, test } from "node:test";
import {
  DigestMismatchError,
  PlatformNotFoundError,
  type RegistryError,
  SupermachineError,
} from "../../src/errors.ts";
import { listImages, type PullOptions, pruneImages, pullImage } from "../../src/oci/pull.ts";
import { makeImage, makeIndex, type SyntheticImage, sha256, writeOciLayout } from "../helpers/oci-kit.ts";
import { startRegistry, type TestRegistry } from "../helpers/registry.ts";

let work: string;
let dataDir: string;
let n = 0;

before(async () => {
  work = await mkdtemp(join(tmpdir(), "oci-int-"));
});
after(async () => {
  await rm(work, { recursive: true, force: true });
});
beforeEach(() => {
  dataDir = join(work, `data${++n}`);
});

function opts(extra: PullOptions = {}): PullOptions {
  return { dataDir, dockerConfigPath: false, retries: 2, retryDelayMs: 10, ...extra };
}

async function layoutOf(name: string, image: SyntheticImage): Promise<string> {
  return writeOciLayout(join(work, `layout-${name}-${n}`), { latest: image });
}

function code(expected: string, check?: (e: SupermachineError) => void) {
  return (e: unknown) => {
    assert.ok(SupermachineError.is(e), String(e));
    assert.equal(e.code, expected, e.message);
    check?.(e);
    return true;
  };
}

async function assertClean(failedDigest?: string): Promise<void> {
  const ls = (d: string) => readdir(join(dataDir, "oci", d)).catch(() => [] as string[]);
  assert.deepEqual(await ls("tmp"), [], "no temp files");
  assert.deepEqual(await ls("images"), [], "no image record");
  assert.deepEqual(await ls("locks"), [], "no locks");
  if (failedDigest)
    assert.ok(!(await ls("blobs/sha256")).includes(failedDigest.slice(7)), "no blob under the failed digest");
}

async function assertPulled(
  image: SyntheticImage,
  pulledLayers: readonly { path: string; digest: string }[],
) {
  assert.deepEqual(
    pulledLayers.map((l) => l.digest),
    image.layers.map((l) => l.digest),
  );
  for (const l of pulledLayers) assert.equal(sha256(await readFile(l.path)), l.digest);
}

describe("open registry", () => {
  let registry: TestRegistry;
  before(async () => {
    registry = await startRegistry();
  });
  after(async () => {
    await registry?.stop();
  });

  test("OCI manifest and Docker schema 2 of the same image", async (t) => {
    const image = makeImage({ layerSizes: [2000, 300_000], cmd: ["/bin/echo", "hi"] });
    const layout = await layoutOf("basic", image);
    const oci = await registry.push(layout, "app:oci");
    const v2 = await registry.push(layout, "app:v2s2", { format: "v2s2" });
    t.diagnostic(`registry log on failure: ${registry.url}`);
    const a = await pullImage(`${registry.host}/app:oci`, opts());
    assert.equal(a.manifestDigest, oci.digest);
    assert.equal(a.manifestDigest, image.manifest.digest);
    assert.deepEqual(a.config.cmd, ["/bin/echo", "hi"]);
    await assertPulled(image, a.layers);
    const b = await pullImage(`${registry.host}/app:v2s2`, opts());
    assert.equal(b.manifestDigest, v2.digest);
    assert.notEqual(b.manifestDigest, a.manifestDigest);
    assert.deepEqual(
      b.layers.map((l) => l.mediaType),
      [
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
      ],
    );
    assert.deepEqual(
      b.layers.map((l) => l.digest),
      a.layers.map((l) => l.digest),
    );
    const byDigest = await pullImage(`${registry.host}/app@${oci.digest}`, opts());
    assert.equal(byDigest.manifestDigest, oci.digest);
    assert.equal((await listImages({ dataDir })).length, 3);
  });

  for (const format of ["oci", "v2s2"] as const) {
    test(`multi-platform ${format === "oci" ? "OCI index" : "Docker manifest list"}: platform selection`, async () => {
      const amd = makeImage({ seed: `amd-${format}` });
      const arm = makeImage({ seed: `arm-${format}`, architecture: "arm64", variant: "v8" });
      const dir = await writeOciLayout(join(work, `multi-${format}`), {
        latest: { index: makeIndex([amd, arm]), images: [amd, arm] },
      });
      const pushed = await registry.push(dir, `multi:${format}`, {
        all: true,
        ...(format === "v2s2" ? { format } : {}),
      });
      const a = await pullImage(`${registry.host}/multi:${format}`, opts());
      assert.equal(a.indexDigest, pushed.digest);
      assert.equal(a.platform, "linux/amd64");
      assert.equal(a.config.diffIds[0], amd.diffIds[0]);
      const b = await pullImage(`${registry.host}/multi:${format}`, opts({ platform: "linux/arm64" }));
      assert.equal(b.platform, "linux/arm64");
      assert.equal(b.config.diffIds[0], arm.diffIds[0]);
      await assert.rejects(
        pullImage(`${registry.host}/multi:${format}`, opts({ platform: "linux/ppc64le" })),
        (e: unknown) =>
          e instanceof PlatformNotFoundError &&
          e.available.join() === "linux/amd64,linux/arm64" &&
          /available/.test(e.message),
      );
    });
  }

  test("failures leave the store clean, and a retry succeeds: missing tag, missing platform, corrupt and missing blobs", async () => {
    const image = makeImage({ layerSizes: [50_000, 60_000] });
    const layout = await layoutOf("faults", image);
    await assert.rejects(
      pullImage(`${registry.host}/faults:1`, opts()),
      code("MANIFEST_UNKNOWN", (e) => assert.equal((e as RegistryError).httpStatus, 404)),
    );
    await assertClean();
    await registry.push(layout, "faults:1");

    await assert.rejects(
      pullImage(`${registry.host}/faults:1`, opts({ platform: "linux/arm64" })),
      (e: unknown) => e instanceof PlatformNotFoundError,
    );
    await assertClean(image.layers[0]!.digest);

    const victim = image.layers[1]!.digest;
    await registry.corruptBlob(victim);
    await assert.rejects(
      pullImage(`${registry.host}/faults:1`, opts()),
      (e: unknown) => e instanceof DigestMismatchError && e.digest === victim,
    );
    await assertClean(victim);

    await registry.deleteBlob(victim);
    await assert.rejects(
      pullImage(`${registry.host}/faults:1`, opts()),
      code("REGISTRY_ERROR", (e) => assert.equal((e as RegistryError).httpStatus, 404)),
    );
    await assertClean(victim);

    await registry.push(layout, "faults:1");
    const ok = await pullImage(`${registry.host}/faults:1`, opts());
    await assertPulled(image, ok.layers);
    assert.deepEqual(await readdir(join(dataDir, "oci", "tmp")), []);
  });

  test("a connection cut mid-blob (by a proxy) is resumed with a Range request the registry honours", async () => {
    const image = makeImage({ layerSizes: [3_000_000], compression: "none" });
    await registry.push(await layoutOf("resume", image), "resume:1");
    const layer = image.layers[0]!;
    await using proxy = await CuttingProxy.start(registry.host, `/blobs/${layer.digest}`, 1_000_000);
    const pulled = await pullImage(`${proxy.host}/resume:1`, opts());
    assert.equal(proxy.cuts, 1);
    assert.ok(proxy.rangeRequests.length >= 1, "a Range request was sent");
    assert.match(proxy.rangeRequests[0]!, /^bytes=\d+-$/);
    await assertPulled(image, pulled.layers);
  });

  test("concurrent pulls of one image from separate processes into one store, then prune", async () => {
    const image = makeImage({ layerSizes: [400_000, 400_000, 400_000] });
    await registry.push(await layoutOf("conc", image), "conc:1");
    const script = `
      import { pullImage } from ${JSON.stringify(new URL("../../src/oci/pull.ts", import.meta.url).href)};
      const img = await pullImage(process.argv[1], { dataDir: process.argv[2], dockerConfigPath: false });
      process.stdout.write(img.manifestDigest);
    `;
    const run = async () => {
      const child = spawn(
        process.execPath,
        ["--input-type=module", "-e", script, `${registry.host}/conc:1`, dataDir],
        {
          stdio: ["ignore", "pipe", "pipe"],
        },
      );
      let out = "";
      let err = "";
      child.stdout.on("data", (c: Buffer) => {
        out += c;
      });
      child.stderr.on("data", (c: Buffer) => {
        err += c;
      });
      const [exitCode] = await once(child, "exit");
      assert.equal(exitCode, 0, err);
      return out;
    };
    const results = await Promise.all([run(), run(), run(), pruneImages({ dataDir })]);
    assert.deepEqual(results.slice(0, 3), [
      image.manifest.digest,
      image.manifest.digest,
      image.manifest.digest,
    ]);
    const [record] = await listImages({ dataDir });
    assert.equal(record?.manifestDigest, image.manifest.digest);
    const again = await pullImage(`${registry.host}/conc:1`, opts({ pullPolicy: "never" }));
    await assertPulled(image, again.layers);
    assert.deepEqual((await pruneImages({ dataDir })).removedBlobs, []);
  });
});

describe("Basic auth (htpasswd)", () => {
  let registry: TestRegistry;
  before(async () => {
    registry = await startRegistry({ auth: "basic" });
  });
  after(async () => {
    await registry?.stop();
  });

  test("no credentials, wrong password, right password, Docker config", async () => {
    const image = makeImage();
    await registry.push(await layoutOf("basic", image), "private/app:1");
    const ref = `${registry.host}/private/app:1`;
    await assert.rejects(
      pullImage(ref, opts()),
      code("REGISTRY_AUTH", (e) => assert.equal((e as RegistryError).httpStatus, 401)),
    );
    await assertClean();
    await assert.rejects(
      pullImage(ref, opts({ credentials: { username: registry.username, password: "wrong" } })),
      code("REGISTRY_AUTH", (e) => assert.match(e.message, /check the password/)),
    );
    await assertClean();
    const ok = await pullImage(
      ref,
      opts({ credentials: { username: registry.username, password: registry.password } }),
    );
    await assertPulled(image, ok.layers);

    const configDir = join(work, "docker-config");
    await rm(configDir, { recursive: true, force: true });
    await (await import("node:fs/promises")).mkdir(configDir);
    await writeFile(
      join(configDir, "config.json"),
      JSON.stringify({
        auths: {
          [registry.host]: {
            auth: Buffer.from(`${registry.username}:${registry.password}`).toString("base64"),
          },
        },
      }),
    );
    const viaConfig = await pullImage(ref, { ...opts(), dockerConfigPath: join(configDir, "config.json") });
    assert.equal(viaConfig.manifestDigest, image.manifest.digest);
  });
});

describe("Bearer tokens", () => {
  let registry: TestRegistry;
  before(async () => {
    registry = await startRegistry({ auth: "bearer" });
  });
  after(async () => {
    await registry?.stop();
  });

  test("anonymous (insufficient_scope), wrong password, right password; one token per pull", async () => {
    const image = makeImage({ layerSizes: [1000, 2000, 3000] });
    await registry.push(await layoutOf("bearer", image), "team/app:1");
    const ref = `${registry.host}/team/app:1`;
    await assert.rejects(
      pullImage(ref, opts()),
      code("REGISTRY_AUTH", (e) => assert.match(e.message, /insufficient_scope/)),
    );
    await assertClean();
    await assert.rejects(
      pullImage(ref, opts({ credentials: { username: registry.username, password: "wrong" } })),
      code("REGISTRY_AUTH", (e) => assert.match(e.message, /token server .* refused the credentials/)),
    );
    await assertClean();
    const before = registry.token!.requests.length;
    const ok = await pullImage(
      ref,
      opts({ credentials: { username: registry.username, password: registry.password } }),
    );
    await assertPulled(image, ok.layers);
    const mine = registry.token!.requests.slice(before);
    assert.equal(mine.length, 1, "the token is reused for the manifest and every blob");
    assert.deepEqual(mine[0]!.scopes, ["repository:team/app:pull"]);
    assert.equal(mine[0]!.service, registry.token!.service);
    assert.equal(mine[0]!.account, registry.username);
  });

  test("a registry that lets anonymous users pull", async () => {
    await using open = await startRegistry({ auth: "bearer", anonymousPull: true });
    const image = makeImage();
    await open.push(await layoutOf("anon", image), "pub/app:1");
    const ok = await pullImage(`${open.host}/pub/app:1`, opts());
    await assertPulled(image, ok.layers);
    assert.equal(open.token!.requests.at(-1)?.account, null);
  });
});

describe("TLS", () => {
  test("HTTPS with a private CA: trusted through NODE_EXTRA_CA_CERTS, refused without it", async () => {
    await using registry = await startRegistry({ tls: true });
    const image = makeImage();
    await registry.push(await layoutOf("tls", image), "secure/app:1");
    const ref = `${registry.host}/secure/app:1`;
    // This process does not trust the certificate (NODE_EXTRA_CA_CERTS is read at startup).
    await assert.rejects(
      pullImage(ref, opts({ retries: 0 })),
      code("REGISTRY_UNREACHABLE", (e) => assert.match(e.message, /NODE_EXTRA_CA_CERTS/)),
    );
    await assertClean();
    // Listed as insecure, it is tried over plain HTTP, which a TLS server answers with 400.
    await assert.rejects(
      pullImage(ref, opts({ retries: 0, insecureRegistries: [registry.host] })),
      code("REGISTRY_UNREACHABLE", (e) => assert.match(e.message, /not trusted.*NODE_EXTRA_CA_CERTS/)),
    );
    const script = `
      import { pullImage } from ${JSON.stringify(new URL("../../src/oci/pull.ts", import.meta.url).href)};
      const img = await pullImage(process.argv[1], { dataDir: process.argv[2], dockerConfigPath: false });
      process.stdout.write(img.manifestDigest);
    `;
    const child = spawn(process.execPath, ["--input-type=module", "-e", script, ref, dataDir], {
      env: { ...process.env, NODE_EXTRA_CA_CERTS: registry.caCertPath },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let out = "";
    let err = "";
    child.stdout.on("data", (c: Buffer) => {
      out += c;
    });
    child.stderr.on("data", (c: Buffer) => {
      err += c;
    });
    const [exitCode] = await once(child, "exit");
    assert.equal(exitCode, 0, err);
    assert.equal(out, image.manifest.digest);
  });
});

/**
 * A TCP proxy in front of a registry that cuts the connection once, after `cutAfter` response
 * bytes of the first request whose path contains `pathPart`, and records Range headers.
 */
class CuttingProxy {
  cuts = 0;
  readonly rangeRequests: string[] = [];
  readonly #server: Server;
  readonly #sockets = new Set<Socket>();

  private constructor(upstream: string, pathPart: string, cutAfter: number) {
    const [upHost, upPort] = upstream.split(":") as [string, string];
    this.#server = createServer((client) => {
      const server = connect(Number(upPort), upHost);
      this.#sockets.add(client);
      this.#sockets.add(server);
      let armed = false;
      let sent = 0;
      client.on("data", (chunk: Buffer) => {
        const text = chunk.toString("latin1");
        if (text.includes(pathPart)) {
          const range = /\r\nrange: *([^\r]+)/i.exec(text);
          if (range) this.rangeRequests.push(range[1]!);
          if (this.cuts === 0 && !range) {
            armed = true;
            sent = 0;
          }
        }
        server.write(chunk);
      });
      server.on("data", (chunk: Buffer) => {
        if (armed) {
          sent += chunk.length;
          if (sent > cutAfter) {
            armed = false;
            this.cuts++;
            client.write(chunk.subarray(0, chunk.length - (sent - cutAfter)), () => {
              client.destroy();
              server.destroy();
            });
            return;
          }
        }
        client.write(chunk);
      });
      const close = () => {
        client.destroy();
        server.destroy();
      };
      client.on("error", close);
      server.on("error", close);
      client.on("close", close);
      server.on("close", close);
    });
  }

  static async start(upstream: string, pathPart: string, cutAfter: number): Promise<CuttingProxy> {
    const p = new CuttingProxy(upstream, pathPart, cutAfter);
    await new Promise<void>((r) => p.#server.listen(0, "127.0.0.1", r));
    return p;
  }

  get host(): string {
    return `127.0.0.1:${(this.#server.address() as { port: number }).port}`;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    for (const s of this.#sockets) s.destroy();
    await new Promise<void>((r) => this.#server.close(() => r()));
  }
}
