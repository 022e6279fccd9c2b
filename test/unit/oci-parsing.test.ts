import assert from "node:assert/strict";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, test } from "node:test";
import { PlatformNotFoundError, SupermachineError } from "../../src/errors.ts";
import {
  credentialsFromDockerConfig,
  dockerConfigPath,
  loadDockerCredentials,
  registryKey,
} from "../../src/oci/docker-config.ts";
import { ImageConfigError, parseImageConfig } from "../../src/oci/image-config.ts";
import { assertRunnableImage, parseManifestDocument } from "../../src/oci/manifest.ts";
import { MANIFEST_ACCEPT } from "../../src/oci/media-types.ts";
import { formatPlatform, parsePlatform, platformScore, selectPlatform } from "../../src/oci/platform.ts";
import { apiHost, isLoopbackHost } from "../../src/oci/registry-client.ts";
import { parseWwwAuthenticate } from "../../src/oci/www-authenticate.ts";

const D = (c: string) => `sha256:${c.repeat(64)}`;

describe("WWW-Authenticate", () => {
  const cases: [string, { scheme: string; params: Record<string, string>; token68?: string }[]][] = [
    ["", []],
    ['Basic realm="registry"', [{ scheme: "basic", params: { realm: "registry" } }]],
    [
      'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull"',
      [
        {
          scheme: "bearer",
          params: {
            realm: "https://auth.docker.io/token",
            service: "registry.docker.io",
            scope: "repository:library/alpine:pull",
          },
        },
      ],
    ],
    [
      'Bearer realm="http://127.0.0.1:1/token",service="s",scope="repository:a/b:pull,push",error="insufficient_scope"',
      [
        {
          scheme: "bearer",
          params: {
            realm: "http://127.0.0.1:1/token",
            service: "s",
            scope: "repository:a/b:pull,push",
            error: "insufficient_scope",
          },
        },
      ],
    ],
    // case-insensitive scheme and names, spaces around '=' and ','
    [
      'BEARER  Realm = "r" ,  Service=svc ,SCOPE="x"',
      [{ scheme: "bearer", params: { realm: "r", service: "svc", scope: "x" } }],
    ],
    // escaped quotes and backslashes inside a quoted string
    [
      'Basic realm="a \\"quoted\\" \\\\ realm"',
      [{ scheme: "basic", params: { realm: 'a "quoted" \\ realm' } }],
    ],
    // two challenges in one header (as fetch joins repeated headers)
    [
      'Basic realm="x", Bearer realm="https://t/token",service="s"',
      [
        { scheme: "basic", params: { realm: "x" } },
        { scheme: "bearer", params: { realm: "https://t/token", service: "s" } },
      ],
    ],
    [
      'Bearer realm="https://t/token",scope="repository:a:pull,push", Basic realm="b,c"',
      [
        { scheme: "bearer", params: { realm: "https://t/token", scope: "repository:a:pull,push" } },
        { scheme: "basic", params: { realm: "b,c" } },
      ],
    ],
    // a scheme alone, token68, empty list elements
    ["Negotiate", [{ scheme: "negotiate", params: {} }]],
    ["Negotiate abc+/def==", [{ scheme: "negotiate", params: {}, token68: "abc+/def==" }]],
    [
      ', , Basic realm="x",, ,Bearer realm="y"',
      [
        { scheme: "basic", params: { realm: "x" } },
        { scheme: "bearer", params: { realm: "y" } },
      ],
    ],
    // an unterminated quoted string takes the rest
    ['Bearer realm="https://t/token', [{ scheme: "bearer", params: { realm: "https://t/token" } }]],
    // duplicate parameters: the first wins
    ['Bearer realm="a",realm="b"', [{ scheme: "bearer", params: { realm: "a" } }]],
    // an empty value
    ['Bearer realm="",service=', [{ scheme: "bearer", params: { realm: "", service: "" } }]],
  ];
  for (const [header, expected] of cases) {
    test(JSON.stringify(header), () => {
      const got = parseWwwAuthenticate(header).map((c) => ({
        scheme: c.scheme,
        params: { ...c.params },
        ...(c.token68 !== undefined ? { token68: c.token68 } : {}),
      }));
      assert.deepEqual(got, expected);
    });
  }
  test("null and undefined", () => {
    assert.deepEqual(parseWwwAuthenticate(null), []);
    assert.deepEqual(parseWwwAuthenticate(undefined), []);
  });
});

describe("platforms", () => {
  const normal: [string, string][] = [
    ["linux/amd64", "linux/amd64"],
    ["linux/x86_64", "linux/amd64"],
    ["Linux/AMD64", "linux/amd64"],
    ["linux/amd64/v1", "linux/amd64"],
    ["linux/amd64/v3", "linux/amd64/v3"],
    ["linux/aarch64", "linux/arm64"],
    ["linux/arm64/v8", "linux/arm64"],
    ["linux/arm", "linux/arm/v7"],
    ["linux/armhf", "linux/arm/v7"],
    ["linux/armel", "linux/arm/v6"],
    ["linux/arm/7", "linux/arm/v7"],
    ["linux/i386", "linux/386"],
    ["windows/amd64", "windows/amd64"],
  ];
  for (const [input, out] of normal) {
    test(`normalise ${input}`, () => assert.equal(formatPlatform(parsePlatform(input)), out));
  }
  for (const bad of ["linux", "linux/", "/amd64", "linux/amd64/v1/x", "linux amd64", ""]) {
    test(`invalid ${JSON.stringify(bad)}`, () =>
      assert.throws(
        () => parsePlatform(bad),
        (e: unknown) => SupermachineError.is(e) && e.code === "INVALID_ARGUMENT",
      ));
  }

  const P = (s: string) => parsePlatform(s);
  test("scores", () => {
    assert.equal(platformScore(P("linux/amd64"), P("linux/amd64")), 0);
    assert.equal(platformScore(P("linux/arm64/v8"), P("linux/arm64")), 0);
    assert.equal(platformScore(P("linux/amd64/v3"), P("linux/amd64")), 1);
    assert.equal(platformScore(P("linux/amd64"), P("linux/amd64/v3")), 1);
    assert.equal(platformScore(P("linux/arm/v6"), P("linux/arm/v7")), 2);
    assert.equal(platformScore(P("linux/arm/v7"), P("linux/arm/v6")), undefined);
    assert.equal(platformScore(P("linux/arm64"), P("linux/amd64")), undefined);
    assert.equal(platformScore(P("windows/amd64"), P("linux/amd64")), undefined);
  });

  const entries = [
    { name: "attestation", platform: { os: "unknown", architecture: "unknown" } },
    { name: "arm64", platform: { os: "linux", architecture: "arm64", variant: "v8" } },
    { name: "amd64v3", platform: { os: "linux", architecture: "amd64", variant: "v3" } },
    { name: "amd64", platform: { os: "linux", architecture: "amd64" } },
    { name: "armv6", platform: { os: "linux", architecture: "arm", variant: "v6" } },
    { name: "noplatform" },
  ];
  const picks: [string, string][] = [
    ["linux/amd64", "amd64"],
    ["linux/amd64/v3", "amd64v3"],
    ["linux/arm64", "arm64"],
    ["linux/arm64/v8", "arm64"],
    ["linux/arm/v7", "armv6"],
  ];
  for (const [want, name] of picks) {
    test(`select ${want}`, () => assert.equal(selectPlatform(entries, P(want), "img").name, name));
  }
  test("missing platform lists what is available (without attestations)", () => {
    assert.throws(
      () => selectPlatform(entries, P("linux/s390x"), "registry/img:1"),
      (e: unknown) => {
        assert.ok(e instanceof PlatformNotFoundError);
        assert.equal(e.code, "PLATFORM_NOT_FOUND");
        assert.equal(e.platform, "linux/s390x");
        assert.deepEqual(e.available, ["linux/arm64", "linux/amd64/v3", "linux/amd64", "linux/arm/v6"]);
        assert.match(
          e.message,
          /registry\/img:1 has no image for platform linux\/s390x; available: linux\/arm64/,
        );
        return true;
      },
    );
  });
});

describe("registry hosts", () => {
  const loopback: [string, boolean][] = [
    ["localhost", true],
    ["localhost:5000", true],
    ["127.0.0.1", true],
    ["127.0.0.1:5000", true],
    ["127.1.2.3:80", true],
    ["[::1]:5000", true],
    ["[::1]", true],
    ["127.0.0.256", false],
    ["128.0.0.1", false],
    ["localhost.example.com", false],
    ["registry:5000", false],
    ["[::2]:5000", false],
    ["docker.io", false],
  ];
  for (const [host, expected] of loopback)
    test(`loopback ${host}`, () => assert.equal(isLoopbackHost(host), expected));
  test("docker hub API host", () => {
    assert.equal(apiHost("docker.io"), "registry-1.docker.io");
    assert.equal(apiHost("index.docker.io"), "registry-1.docker.io");
    assert.equal(apiHost("localhost:5000"), "localhost:5000");
  });
});

describe("docker config credentials", () => {
  const keys: [string, string][] = [
    ["https://index.docker.io/v1/", "docker.io"],
    ["index.docker.io", "docker.io"],
    ["registry-1.docker.io", "docker.io"],
    ["docker.io", "docker.io"],
    ["http://localhost:5000", "localhost:5000"],
    ["https://Registry.Example.com/v2/", "registry.example.com"],
    ["registry.example.com:443", "registry.example.com:443"],
    ["[::1]:5000", "[::1]:5000"],
  ];
  for (const [key, expected] of keys) test(`key ${key}`, () => assert.equal(registryKey(key), expected));

  const b64 = (s: string) => Buffer.from(s).toString("base64");
  const config = {
    auths: {
      "https://index.docker.io/v1/": { auth: b64("hubuser:hub:pass") },
      "localhost:5000": { auth: b64("local:pw") },
      "http://127.0.0.1:6000": { username: "u6", password: "p6" },
      "registry.example.com": { auth: "" },
      "bad.example": { auth: b64("nocolon") },
      "exact.example": { identitytoken: "x" },
    },
  };
  const lookups: [string, { username: string; password: string } | undefined][] = [
    ["docker.io", { username: "hubuser", password: "hub:pass" }],
    ["index.docker.io", { username: "hubuser", password: "hub:pass" }],
    ["localhost:5000", { username: "local", password: "pw" }],
    ["localhost:5001", undefined],
    ["localhost", undefined],
    ["127.0.0.1:6000", { username: "u6", password: "p6" }],
    ["registry.example.com", undefined],
    ["bad.example", undefined],
    ["exact.example", undefined],
    ["other.example", undefined],
  ];
  for (const [registry, expected] of lookups) {
    test(`lookup ${registry}`, () =>
      assert.deepEqual(credentialsFromDockerConfig(config, registry), expected));
  }
  test("malformed configs give no credentials", () => {
    for (const c of [null, 1, "x", {}, { auths: null }, { auths: [] }, { auths: { "docker.io": 5 } }]) {
      assert.equal(credentialsFromDockerConfig(c, "docker.io"), undefined);
    }
  });
  test("path: $DOCKER_CONFIG/config.json, else ~/.docker/config.json", () => {
    assert.equal(dockerConfigPath({ DOCKER_CONFIG: "/etc/dc", HOME: "/home/x" }), "/etc/dc/config.json");
    assert.equal(dockerConfigPath({ HOME: "/home/x" }), "/home/x/.docker/config.json");
  });
  test("reads a config file; a missing or broken file means no credentials", async () => {
    const dir = await mkdtemp(join(tmpdir(), "oci-dc-"));
    try {
      const path = join(dir, "config.json");
      assert.equal(await loadDockerCredentials("localhost:5000", path), undefined);
      await writeFile(path, "{not json");
      assert.equal(await loadDockerCredentials("localhost:5000", path), undefined);
      await writeFile(path, JSON.stringify(config));
      assert.deepEqual(await loadDockerCredentials("localhost:5000", path), {
        username: "local",
        password: "pw",
      });
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe("manifests and media types", () => {
  const malformed = (m: string) => new Error(`MALFORMED: ${m}`);
  const enc = (v: unknown) => Buffer.from(JSON.stringify(v));
  const desc = (mediaType: string, c = "a", extra: object = {}) => ({
    mediaType,
    digest: D(c),
    size: 10,
    ...extra,
  });
  const ociManifest = {
    schemaVersion: 2,
    mediaType: "application/vnd.oci.image.manifest.v1+json",
    config: desc("application/vnd.oci.image.config.v1+json"),
    layers: [desc("application/vnd.oci.image.layer.v1.tar+gzip", "b")],
  };

  test("Accept names all four manifest types and not schema 1", () => {
    for (const t of [
      "application/vnd.oci.image.index.v1+json",
      "application/vnd.oci.image.manifest.v1+json",
      "application/vnd.docker.distribution.manifest.list.v2+json",
      "application/vnd.docker.distribution.manifest.v2+json",
    ]) {
      assert.ok(MANIFEST_ACCEPT.split(", ").includes(t), t);
    }
    assert.ok(!MANIFEST_ACCEPT.includes("distribution.manifest.v1"));
  });

  test("OCI manifest, Docker manifest, OCI index, Docker list", () => {
    assert.equal(parseManifestDocument(enc(ociManifest), undefined, malformed).kind, "manifest");
    const docker = {
      ...ociManifest,
      mediaType: "application/vnd.docker.distribution.manifest.v2+json",
      config: desc("application/vnd.docker.container.image.v1+json"),
      layers: [desc("application/vnd.docker.image.rootfs.diff.tar.gzip", "b")],
    };
    const m = parseManifestDocument(enc(docker), "application/json", malformed);
    assert.equal(m.kind, "manifest");
    assertRunnableImage(m as never);
    for (const t of [
      "application/vnd.oci.image.index.v1+json",
      "application/vnd.docker.distribution.manifest.list.v2+json",
    ]) {
      const idx = parseManifestDocument(
        enc({
          schemaVersion: 2,
          mediaType: t,
          manifests: [desc(ociManifest.mediaType, "c", { platform: { os: "linux", architecture: "amd64" } })],
        }),
        undefined,
        malformed,
      );
      assert.equal(idx.kind, "index");
      assert.deepEqual(idx.kind === "index" && idx.manifests[0]?.platform, {
        os: "linux",
        architecture: "amd64",
        variant: undefined,
      });
    }
  });

  test("media type from Content-Type or from the structure when the document has none", () => {
    const { mediaType: _, ...noType } = ociManifest;
    assert.equal(
      parseManifestDocument(enc(noType), "application/vnd.oci.image.manifest.v1+json", malformed).kind,
      "manifest",
    );
    assert.equal(parseManifestDocument(enc(noType), undefined, malformed).kind, "manifest");
    assert.equal(
      parseManifestDocument(enc({ schemaVersion: 2, manifests: [] }), undefined, malformed).kind,
      "index",
    );
  });

  test("schema 1 is refused as UNSUPPORTED_MEDIA_TYPE", () => {
    const s1 = { schemaVersion: 1, name: "x", tag: "latest", fsLayers: [] };
    for (const ct of [
      undefined,
      "application/vnd.docker.distribution.manifest.v1+prettyjws",
      "application/json",
    ]) {
      assert.throws(
        () => parseManifestDocument(enc(s1), ct, malformed),
        (e: unknown) =>
          SupermachineError.is(e) && e.code === "UNSUPPORTED_MEDIA_TYPE" && /schema 1/.test(e.message),
      );
    }
    assert.throws(
      () =>
        parseManifestDocument(
          enc({ ...ociManifest }),
          "application/vnd.docker.distribution.manifest.v1+prettyjws",
          malformed,
        ),
      (e: unknown) => SupermachineError.is(e) && e.code === "UNSUPPORTED_MEDIA_TYPE",
    );
  });

  test("unknown manifest media type", () => {
    assert.throws(
      () =>
        parseManifestDocument(
          enc({ ...ociManifest, mediaType: "application/vnd.cncf.helm.chart" }),
          undefined,
          malformed,
        ),
      (e: unknown) => SupermachineError.is(e) && e.code === "UNSUPPORTED_MEDIA_TYPE",
    );
  });

  test("artifacts, encrypted and foreign-format layers are not runnable images", () => {
    const artifact = { ...ociManifest, config: desc("application/vnd.cncf.helm.config.v1+json") };
    const encrypted = {
      ...ociManifest,
      layers: [desc("application/vnd.oci.image.layer.v1.tar+gzip+encrypted")],
    };
    for (const doc of [artifact, encrypted]) {
      const m = parseManifestDocument(enc(doc), undefined, malformed);
      assert.throws(
        () => assertRunnableImage(m as never),
        (e: unknown) => SupermachineError.is(e) && e.code === "UNSUPPORTED_MEDIA_TYPE",
      );
    }
    const zstd = { ...ociManifest, layers: [desc("application/vnd.oci.image.layer.v1.tar+zstd")] };
    assertRunnableImage(parseManifestDocument(enc(zstd), undefined, malformed) as never);
  });

  const bad: [string, unknown][] = [
    ["not JSON", "{"],
    ["not an object", [1]],
    ["schemaVersion 3", { ...ociManifest, schemaVersion: 3 }],
    ["missing config", { ...ociManifest, config: undefined }],
    ["layers not a list", { ...ociManifest, layers: {} }],
    ["bad digest", { ...ociManifest, layers: [{ ...desc("x"), digest: "sha256:xyz" }] }],
    ["md5 digest", { ...ociManifest, layers: [{ ...desc("x"), digest: `md5:${"a".repeat(32)}` }] }],
    ["negative size", { ...ociManifest, layers: [{ ...desc("x"), size: -1 }] }],
    ["fractional size", { ...ociManifest, layers: [{ ...desc("x"), size: 1.5 }] }],
    ["huge", { ...ociManifest, pad: "x".repeat(4 * 1024 * 1024) }],
    ["index without manifests", { schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json" }],
  ];
  for (const [name, doc] of bad) {
    test(`malformed: ${name}`, () => {
      const bytes = typeof doc === "string" ? Buffer.from(doc) : enc(doc);
      assert.throws(() => parseManifestDocument(bytes, undefined, malformed), /MALFORMED/);
    });
  }
});

describe("image config", () => {
  const enc = (v: unknown) => Buffer.from(JSON.stringify(v));
  test("full config", () => {
    const c = parseImageConfig(
      enc({
        architecture: "arm64",
        variant: "v8",
        os: "linux",
        created: "2024-01-01T00:00:00Z",
        config: {
          Entrypoint: ["/entry"],
          Cmd: ["run", "--x"],
          Env: ["A=1", "PATH=/bin"],
          WorkingDir: "/app",
          User: "1000:1000",
          ExposedPorts: { "80/tcp": {}, "53/udp": {} },
          StopSignal: "SIGQUIT",
          Labels: { a: "b", n: 1 },
          Volumes: { "/data": {} },
        },
        rootfs: { type: "layers", diff_ids: [D("a"), D("b")] },
        history: [{ created_by: "x" }],
      }),
    );
    assert.deepEqual(c, {
      entrypoint: ["/entry"],
      cmd: ["run", "--x"],
      env: ["A=1", "PATH=/bin"],
      workingDir: "/app",
      user: "1000:1000",
      exposedPorts: ["80/tcp", "53/udp"],
      stopSignal: "SIGQUIT",
      labels: { a: "b" },
      volumes: ["/data"],
      os: "linux",
      architecture: "arm64",
      variant: "v8",
      diffIds: [D("a"), D("b")],
      created: "2024-01-01T00:00:00Z",
    });
  });
  test("minimal and null fields", () => {
    const c = parseImageConfig(enc({ config: { Entrypoint: null, Cmd: null, Env: null, Labels: null } }));
    assert.equal(c.entrypoint, undefined);
    assert.equal(c.cmd, undefined);
    assert.deepEqual(c.env, []);
    assert.equal(c.workingDir, "");
    assert.equal(c.user, "");
    assert.deepEqual(c.labels, {});
    assert.deepEqual(c.diffIds, []);
    assert.deepEqual(parseImageConfig(enc({ config: { Entrypoint: [] } })).entrypoint, []);
    assert.deepEqual(parseImageConfig(enc({ config: { Cmd: "echo hi" } })).cmd, ["echo hi"]);
  });
  const bad: [string, Buffer][] = [
    ["not JSON", Buffer.from("{")],
    ["invalid UTF-8", Buffer.from([0x7b, 0xff, 0x7d])],
    ["array", enc([])],
    ["Env not strings", enc({ config: { Env: [1] } })],
    ["Cmd object", enc({ config: { Cmd: {} } })],
    ["User number", enc({ config: { User: 0 } })],
    ["bad diff_id", enc({ rootfs: { type: "layers", diff_ids: ["nope"] } })],
    ["rootfs type", enc({ rootfs: { type: "other", diff_ids: [] } })],
    ["too big", Buffer.alloc(8 * 1024 * 1024 + 1, 0x20)],
  ];
  for (const [name, bytes] of bad) {
    test(`malformed: ${name}`, () => assert.throws(() => parseImageConfig(bytes), ImageConfigError));
  }
});
