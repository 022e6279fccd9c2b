/**
 * Test kit for the OCI code: synthetic images (OCI layouts, docker-save archives) built in
 * process, and an in-process registry (node:http) that can misbehave on purpose — drop a
 * connection mid-blob, serve wrong bytes, answer 500, send more bytes than declared — for the
 * cases a real registry cannot produce. Real-registry tests use `test/helpers/registry.ts`.
 */

import { createCipheriv, createHash, randomBytes } from "node:crypto";
import { mkdir, writeFile } from "node:fs/promises";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { gzipSync, zstdCompressSync } from "node:zlib";

export const MT = {
  ociIndex: "application/vnd.oci.image.index.v1+json",
  ociManifest: "application/vnd.oci.image.manifest.v1+json",
  ociConfig: "application/vnd.oci.image.config.v1+json",
  dockerList: "application/vnd.docker.distribution.manifest.list.v2+json",
  dockerManifest: "application/vnd.docker.distribution.manifest.v2+json",
  dockerConfig: "application/vnd.docker.container.image.v1+json",
  dockerLayer: "application/vnd.docker.image.rootfs.diff.tar.gzip",
  schema1Signed: "application/vnd.docker.distribution.manifest.v1+prettyjws",
} as const;

export function sha256(bytes: Uint8Array): string {
  return `sha256:${createHash("sha256").update(bytes).digest("hex")}`;
}

// ---- tar ---------------------------------------------------------------------------------------

export interface TarEntry {
  readonly name: string;
  readonly data?: Uint8Array | string;
  /** "file" (default), "dir", "symlink", "hardlink". */
  readonly type?: "file" | "dir" | "symlink" | "hardlink";
  readonly linkName?: string;
  readonly mode?: number;
}

function octal(n: number, width: number): string {
  return `${n.toString(8).padStart(width - 1, "0")}\0`;
}

/** A ustar archive (names up to 100 bytes, or a PAX `path` record for longer ones). */
export function tarBytes(entries: readonly TarEntry[]): Buffer {
  const blocks: Buffer[] = [];
  const header = (name: string, size: number, typeflag: string, linkName: string, mode: number) => {
    const h = Buffer.alloc(512);
    h.write(name.slice(0, 100), 0, "utf8");
    h.write(octal(mode, 8), 100, "ascii");
    h.write(octal(0, 8), 108, "ascii");
    h.write(octal(0, 8), 116, "ascii");
    h.write(octal(size, 12), 124, "ascii");
    h.write(octal(0, 12), 136, "ascii");
    h.write("        ", 148, "ascii");
    h.write(typeflag, 156, "ascii");
    h.write(linkName, 157, "utf8");
    h.write("ustar\0", 257, "ascii");
    h.write("00", 263, "ascii");
    let sum = 0;
    for (const b of h) sum += b;
    h.write(octal(sum, 7), 148, "ascii");
    h[155] = 0x20;
    return h;
  };
  const pad = (n: number) => Buffer.alloc((512 - (n % 512)) % 512);
  for (const e of entries) {
    const data = e.data === undefined ? Buffer.alloc(0) : Buffer.from(e.data);
    if (Buffer.byteLength(e.name) > 100) {
      const rec = ` path=${e.name}\n`;
      let len = rec.length + 1;
      while (`${len}${rec}`.length !== len) len = `${len}${rec}`.length;
      const pax = Buffer.from(`${len}${rec}`);
      blocks.push(header("PaxHeader", pax.length, "x", "", 0o644), pax, pad(pax.length));
    }
    const type = e.type ?? "file";
    const flag = type === "dir" ? "5" : type === "symlink" ? "2" : type === "hardlink" ? "1" : "0";
    const size = type === "file" ? data.length : 0;
    blocks.push(header(e.name, size, flag, e.linkName ?? "", e.mode ?? (type === "dir" ? 0o755 : 0o644)));
    if (size > 0) blocks.push(data, pad(size));
  }
  blocks.push(Buffer.alloc(1024));
  return Buffer.concat(blocks);
}

// ---- synthetic images --------------------------------------------------------------------------

export type Compression = "gzip" | "zstd" | "none";

export interface Blob {
  readonly mediaType: string;
  readonly digest: string;
  readonly size: number;
  readonly bytes: Buffer;
}

export interface SyntheticImage {
  readonly manifest: Blob;
  readonly config: Blob;
  readonly layers: readonly Blob[];
  readonly diffIds: readonly string[];
  readonly platform: { os: string; architecture: string; variant?: string };
  /** The uncompressed layer tars. */
  readonly layerTars: readonly Buffer[];
}

function blob(mediaType: string, bytes: Buffer): Blob {
  return { mediaType, digest: sha256(bytes), size: bytes.length, bytes };
}

function compress(tar: Buffer, c: Compression): Buffer {
  if (c === "gzip") return gzipSync(tar);
  if (c === "zstd") return zstdCompressSync(tar);
  return tar;
}

function layerMediaType(c: Compression, docker: boolean): string {
  if (docker) return c === "gzip" ? MT.dockerLayer : "application/vnd.docker.image.rootfs.diff.tar";
  return c === "gzip"
    ? "application/vnd.oci.image.layer.v1.tar+gzip"
    : c === "zstd"
      ? "application/vnd.oci.image.layer.v1.tar+zstd"
      : "application/vnd.oci.image.layer.v1.tar";
}

export interface ImageOptions {
  /** Sizes in bytes of the (random, incompressible) file in each layer. Default [1000, 70_000]. */
  readonly layerSizes?: readonly number[];
  readonly compression?: Compression;
  /** Docker schema 2 media types instead of OCI. */
  readonly docker?: boolean;
  readonly architecture?: string;
  readonly variant?: string;
  readonly os?: string;
  readonly cmd?: string[];
  /** Extra fields merged into the config's `config` object. */
  readonly configExtra?: Record<string, unknown>;
  /** Seed for the layer contents (images with the same seed share layers). */
  readonly seed?: string;
}

/** Deterministic, incompressible bytes (AES-CTR keystream keyed by the seed). */
function seededBytes(seed: string, size: number): Buffer {
  const key = createHash("sha256").update(seed).digest().subarray(0, 16);
  return createCipheriv("aes-128-ctr", key, Buffer.alloc(16)).update(Buffer.alloc(size));
}

export function makeImage(options: ImageOptions = {}): SyntheticImage {
  const c = options.compression ?? "gzip";
  const docker = options.docker ?? false;
  const seed = options.seed ?? randomBytes(8).toString("hex");
  const layerTars: Buffer[] = [];
  const layers: Blob[] = [];
  (options.layerSizes ?? [1000, 70_000]).forEach((size, i) => {
    const tar = tarBytes([
      { name: `layer${i}/`, type: "dir" },
      { name: `layer${i}/data.bin`, data: seededBytes(`${seed}/${i}`, size) },
    ]);
    layerTars.push(tar);
    layers.push(blob(layerMediaType(c, docker), compress(tar, c)));
  });
  const diffIds = layerTars.map(sha256);
  const platform = {
    os: options.os ?? "linux",
    architecture: options.architecture ?? "amd64",
    ...(options.variant ? { variant: options.variant } : {}),
  };
  const configDoc = {
    ...platform,
    created: "2024-01-01T00:00:00Z",
    config: {
      Env: ["PATH=/usr/bin:/bin", `SEED=${seed}`],
      Cmd: options.cmd ?? ["/bin/sh"],
      WorkingDir: "/",
      Labels: { "org.example.seed": seed },
      ...options.configExtra,
    },
    rootfs: { type: "layers", diff_ids: diffIds },
  };
  const config = blob(docker ? MT.dockerConfig : MT.ociConfig, Buffer.from(JSON.stringify(configDoc)));
  const manifestDoc = {
    schemaVersion: 2,
    mediaType: docker ? MT.dockerManifest : MT.ociManifest,
    config: { mediaType: config.mediaType, digest: config.digest, size: config.size },
    layers: layers.map((l) => ({ mediaType: l.mediaType, digest: l.digest, size: l.size })),
  };
  const manifest = blob(manifestDoc.mediaType, Buffer.from(JSON.stringify(manifestDoc)));
  return { manifest, config, layers, diffIds, platform, layerTars };
}

/** An index (OCI, or a Docker manifest list with `docker: true`) over images. */
export function makeIndex(images: readonly SyntheticImage[], docker = false, extra: object[] = []): Blob {
  const doc = {
    schemaVersion: 2,
    mediaType: docker ? MT.dockerList : MT.ociIndex,
    manifests: [
      ...images.map((img) => ({
        mediaType: img.manifest.mediaType,
        digest: img.manifest.digest,
        size: img.manifest.size,
        platform: img.platform,
      })),
      ...extra,
    ],
  };
  return blob(doc.mediaType, Buffer.from(JSON.stringify(doc)));
}

export function blobsOf(image: SyntheticImage): Blob[] {
  return [image.manifest, image.config, ...image.layers];
}

/**
 * Write an OCI image layout. `tags` maps a tag (ref.name annotation) to an image or an index (with
 * the images it lists). Returns the directory.
 */
export async function writeOciLayout(
  dir: string,
  tags: Record<string, SyntheticImage | { index: Blob; images: readonly SyntheticImage[] }>,
): Promise<string> {
  await mkdir(join(dir, "blobs", "sha256"), { recursive: true });
  const put = (b: Blob) => writeFile(join(dir, "blobs", "sha256", b.digest.slice("sha256:".length)), b.bytes);
  const manifests: object[] = [];
  for (const [tag, value] of Object.entries(tags)) {
    if ("index" in value) {
      await put(value.index);
      for (const img of value.images) for (const b of blobsOf(img)) await put(b);
      manifests.push({
        mediaType: value.index.mediaType,
        digest: value.index.digest,
        size: value.index.size,
        annotations: { "org.opencontainers.image.ref.name": tag },
      });
    } else {
      for (const b of blobsOf(value)) await put(b);
      manifests.push({
        mediaType: value.manifest.mediaType,
        digest: value.manifest.digest,
        size: value.manifest.size,
        platform: value.platform,
        annotations: { "org.opencontainers.image.ref.name": tag },
      });
    }
  }
  await writeFile(join(dir, "oci-layout"), JSON.stringify({ imageLayoutVersion: "1.0.0" }));
  await writeFile(
    join(dir, "index.json"),
    JSON.stringify({ schemaVersion: 2, mediaType: MT.ociIndex, manifests }),
  );
  return dir;
}

/**
 * A `docker save`-style archive: `manifest.json`, `repositories`, `<config>.json`, and per layer
 * `<id>/layer.tar` (a symlink to `<diffid>.tar` when `symlinks`), layers stored as compressed by
 * `layerCompression` (default: uncompressed, like `docker save`).
 */
export function makeDockerArchive(
  images: readonly { image: SyntheticImage; tags: readonly string[] }[],
  options: { layerCompression?: Compression; symlinks?: boolean } = {},
): Buffer {
  const entries: TarEntry[] = [];
  const manifest: object[] = [];
  const seen = new Set<string>();
  for (const { image, tags } of images) {
    const configName = `${image.config.digest.slice(7)}.json`;
    if (!seen.has(configName)) entries.push({ name: configName, data: image.config.bytes });
    seen.add(configName);
    const layerNames: string[] = [];
    image.layerTars.forEach((tar, i) => {
      const data = compress(tar, options.layerCompression ?? "none");
      const id = image.diffIds[i]!.slice(7);
      const file = `${id}.tar`;
      if (options.symlinks) {
        if (!seen.has(file)) entries.push({ name: file, data });
        entries.push({ name: `${id}/`, type: "dir" });
        entries.push({ name: `${id}/layer.tar`, type: "symlink", linkName: `../${file}` });
        layerNames.push(`${id}/layer.tar`);
      } else {
        if (!seen.has(file)) entries.push({ name: file, data });
        layerNames.push(file);
      }
      seen.add(file);
    });
    manifest.push({ Config: configName, RepoTags: tags, Layers: layerNames });
  }
  entries.push({ name: "manifest.json", data: JSON.stringify(manifest) });
  return tarBytes(entries);
}

// ---- in-process registry -----------------------------------------------------------------------

export interface RecordedRequest {
  readonly method: string;
  readonly path: string;
  readonly headers: IncomingMessage["headers"];
}

/** Return true when the request was fully handled (fault injection). */
export type Fault = (
  req: IncomingMessage,
  res: ServerResponse,
  ctx: { path: string; count: number },
) => boolean;

export interface FakeRegistryOptions {
  readonly auth?: "none" | "basic" | "bearer";
  readonly username?: string;
  readonly password?: string;
  /** Bearer challenge `scope` is sent quoted and may contain commas (`repository:x:pull,push`). */
  readonly challengeScopeActions?: string;
}

/**
 * A minimal Distribution API server: manifests by tag or digest (404 when the stored media type is
 * not in Accept, like distribution), blobs with Range support, `/token` for Bearer auth.
 */
export class FakeRegistry {
  readonly requests: RecordedRequest[] = [];
  readonly blobs = new Map<string, Blob>();
  /** repo → tag → digest */
  readonly tags = new Map<string, Map<string, string>>();
  fault: Fault | undefined;
  tokenRequests = 0;
  readonly #server: Server;
  readonly #options: FakeRegistryOptions;
  readonly #token = randomBytes(8).toString("hex");
  readonly #counts = new Map<string, number>();
  #port = 0;

  private constructor(options: FakeRegistryOptions) {
    this.#options = options;
    this.#server = createServer((req, res) => this.#handle(req, res));
  }

  static async start(options: FakeRegistryOptions = {}): Promise<FakeRegistry> {
    const r = new FakeRegistry(options);
    await new Promise<void>((resolve) => r.#server.listen(0, "127.0.0.1", resolve));
    r.#port = (r.#server.address() as AddressInfo).port;
    return r;
  }

  get host(): string {
    return `127.0.0.1:${this.#port}`;
  }

  get username(): string {
    return this.#options.username ?? "user";
  }

  get password(): string {
    return this.#options.password ?? "secret";
  }

  /** Add an image (and optionally an index) under repo:tag. */
  add(
    repo: string,
    tag: string,
    image: SyntheticImage | { index: Blob; images: readonly SyntheticImage[] },
  ): void {
    const put = (b: Blob) => this.blobs.set(b.digest, b);
    let top: Blob;
    if ("index" in image) {
      put(image.index);
      for (const img of image.images) for (const b of blobsOf(img)) put(b);
      top = image.index;
    } else {
      for (const b of blobsOf(image)) put(b);
      top = image.manifest;
    }
    let t = this.tags.get(repo);
    if (!t) {
      t = new Map();
      this.tags.set(repo, t);
    }
    t.set(tag, top.digest);
  }

  countOf(pathPrefix: string): number {
    return this.requests.filter((r) => r.path.startsWith(pathPrefix)).length;
  }

  async stop(): Promise<void> {
    this.#server.closeAllConnections();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop();
  }

  #authorized(req: IncomingMessage): boolean {
    const mode = this.#options.auth ?? "none";
    if (mode === "none") return true;
    const h = req.headers.authorization ?? "";
    if (mode === "basic") {
      return h === `Basic ${Buffer.from(`${this.username}:${this.password}`).toString("base64")}`;
    }
    return h === `Bearer ${this.#token}`;
  }

  #challenge(repo: string | undefined): string {
    if (this.#options.auth === "basic") return 'Basic realm="fake"';
    const scope = repo ? `,scope="repository:${repo}:${this.#options.challengeScopeActions ?? "pull"}"` : "";
    return `Bearer realm="http://${this.host}/token",service="fake-registry"${scope}`;
  }

  #handle(req: IncomingMessage, res: ServerResponse): void {
    const url = new URL(req.url ?? "/", `http://${this.host}`);
    const path = url.pathname;
    this.requests.push({ method: req.method ?? "GET", path: `${path}${url.search}`, headers: req.headers });
    const count = (this.#counts.get(path) ?? 0) + 1;
    this.#counts.set(path, count);
    if (this.fault?.(req, res, { path, count })) return;

    if (path === "/token") {
      this.tokenRequests++;
      const h = req.headers.authorization;
      const good = `Basic ${Buffer.from(`${this.username}:${this.password}`).toString("base64")}`;
      if (h !== undefined && h !== good) {
        res.writeHead(401, { "content-type": "application/json" });
        res.end(JSON.stringify({ errors: [{ code: "UNAUTHORIZED", message: "bad credentials" }] }));
        return;
      }
      const token = h === good ? this.#token : "anonymous-token";
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify({ token, expires_in: 300 }));
      return;
    }
    const repoMatch = /^\/v2\/(.+)\/(manifests|blobs)\/([^/]+)$/.exec(path);
    if (!this.#authorized(req)) {
      res.writeHead(401, {
        "www-authenticate": this.#challenge(repoMatch?.[1]),
        "content-type": "application/json",
      });
      res.end(JSON.stringify({ errors: [{ code: "UNAUTHORIZED", message: "authentication required" }] }));
      return;
    }
    if (path === "/v2/") {
      res.writeHead(200, { "content-type": "application/json" });
      res.end("{}");
      return;
    }
    if (!repoMatch) {
      this.#notFound(res, "NAME_UNKNOWN");
      return;
    }
    const [, repo, kind, ref] = repoMatch as unknown as [string, string, string, string];
    if (kind === "manifests") {
      const digest = ref.includes(":") ? ref : this.tags.get(repo)?.get(ref);
      const b = digest ? this.blobs.get(digest) : undefined;
      if (!b) {
        this.#notFound(res, "MANIFEST_UNKNOWN");
        return;
      }
      const accept = String(req.headers.accept ?? "");
      if (!accept.split(",").some((a) => a.trim().split(";")[0] === b.mediaType)) {
        this.#notFound(res, "MANIFEST_UNKNOWN");
        return;
      }
      res.writeHead(200, {
        "content-type": b.mediaType,
        "content-length": b.size,
        "docker-content-digest": b.digest,
      });
      res.end(b.bytes);
      return;
    }
    const b = this.blobs.get(ref);
    if (!b) {
      this.#notFound(res, "BLOB_UNKNOWN");
      return;
    }
    const range = /^bytes=(\d+)-$/.exec(String(req.headers.range ?? ""));
    if (range) {
      const start = Number(range[1]);
      res.writeHead(206, {
        "content-type": "application/octet-stream",
        "content-length": b.size - start,
        "content-range": `bytes ${start}-${b.size - 1}/${b.size}`,
        "docker-content-digest": b.digest,
      });
      res.end(b.bytes.subarray(start));
      return;
    }
    res.writeHead(200, {
      "content-type": "application/octet-stream",
      "content-length": b.size,
      "accept-ranges": "bytes",
      "docker-content-digest": b.digest,
    });
    res.end(b.bytes);
  }

  #notFound(res: ServerResponse, code: string): void {
    res.writeHead(404, { "content-type": "application/json" });
    res.end(JSON.stringify({ errors: [{ code, message: code.toLowerCase().replace("_", " ") }] }));
  }
}
