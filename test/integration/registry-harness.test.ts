/**
 * Proves the test registry harness (test/helpers/registry.ts) with plain HTTP requests: what the
 * registry client tests rely on must hold before they can mean anything.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { request } from "node:https";
import { after, before, describe, test } from "node:test";
import { type FixtureImages, fixtureImages } from "../helpers/fixtures.ts";
import { startRegistry, type TestRegistry } from "../helpers/registry.ts";

const OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json";

function sha256(bytes: Uint8Array): string {
  return `sha256:${createHash("sha256").update(bytes).digest("hex")}`;
}

async function get(url: string, headers: Record<string, string> = {}) {
  const res = await fetch(url, { headers });
  const body = new Uint8Array(await res.arrayBuffer());
  return { res, body, text: () => new TextDecoder().decode(body) };
}

function basic(user: string, pass: string): string {
  return `Basic ${Buffer.from(`${user}:${pass}`).toString("base64")}`;
}

/** `Bearer realm="…",service="…",scope="…"` → { realm, service, scope, error } */
function parseChallenge(header: string | null): Record<string, string> {
  assert.ok(header, "expected a WWW-Authenticate header");
  const match = /^Bearer\s+(.*)$/i.exec(header);
  assert.ok(match, `expected a Bearer challenge, got ${header}`);
  const params: Record<string, string> = {};
  for (const m of match[1]!.matchAll(/(\w+)="([^"]*)"/g)) params[m[1]!] = m[2]!;
  return params;
}

let fx: FixtureImages;
before(async () => {
  fx = await fixtureImages();
});

describe("open registry", () => {
  let registry: TestRegistry;
  before(async () => {
    registry = await startRegistry();
  });
  after(() => registry?.stop());

  test("serves a pushed OCI manifest, byte for byte, only with the OCI type accepted", async () => {
    const { digest, reference } = await registry.push(fx.busybox, "library/busybox:1");
    assert.equal(reference, `${registry.host}/library/busybox:1`);
    assert.equal(digest, fx.images.busybox.digest, "the push preserves the manifest digest");

    const ok = await get(`${registry.url}/v2/library/busybox/manifests/1`, { accept: OCI_MANIFEST });
    assert.equal(ok.res.status, 200);
    assert.equal(ok.res.headers.get("content-type"), OCI_MANIFEST);
    assert.equal(ok.res.headers.get("docker-content-digest"), digest);
    assert.equal(sha256(ok.body), digest);
    const manifest = JSON.parse(ok.text());
    assert.equal(manifest.layers[0].digest, fx.images.busybox.layers[0]!.digest);

    const byDigest = await get(`${registry.url}/v2/library/busybox/manifests/${digest}`, {
      accept: OCI_MANIFEST,
    });
    assert.equal(byDigest.res.status, 200);

    const noOci = await get(`${registry.url}/v2/library/busybox/manifests/1`, { accept: DOCKER_MANIFEST });
    assert.equal(noOci.res.status, 404);
    assert.equal(JSON.parse(noOci.text()).errors[0].code, "MANIFEST_UNKNOWN");
  });

  test("serves blobs with digest, ranges and BLOB_UNKNOWN", async () => {
    const layer = fx.images.busybox.layers[0]!;
    const full = await get(`${registry.url}/v2/library/busybox/blobs/${layer.digest}`);
    assert.equal(full.res.status, 200);
    assert.equal(full.res.headers.get("docker-content-digest"), layer.digest);
    assert.equal(full.body.length, layer.size);
    assert.equal(sha256(full.body), layer.digest);

    const part = await get(`${registry.url}/v2/library/busybox/blobs/${layer.digest}`, {
      range: "bytes=10-19",
    });
    assert.equal(part.res.status, 206);
    assert.deepEqual(part.body, full.body.subarray(10, 20));

    const unknown = await get(`${registry.url}/v2/library/busybox/blobs/sha256:${"0".repeat(64)}`);
    assert.equal(unknown.res.status, 404);
  });

  test("keeps zstd and uncompressed layers as pushed, even after their gzip twin", async () => {
    for (const [tag, facts] of [
      ["zstd", fx.images.busyboxZstd],
      ["plain", fx.images.busyboxUncompressed],
    ] as const) {
      const { digest } = await registry.push(facts.layout, `library/busybox:${tag}`);
      assert.equal(digest, facts.digest);
      const { res, text } = await get(`${registry.url}/v2/library/busybox/manifests/${tag}`, {
        accept: OCI_MANIFEST,
      });
      assert.equal(res.status, 200);
      const layer = JSON.parse(text()).layers[0];
      assert.equal(layer.mediaType, facts.layers[0]!.mediaType);
      assert.equal(layer.digest, facts.layers[0]!.digest);
    }
  });

  test("serves the multi-arch image as an OCI index, or as a Docker manifest list", async () => {
    const oci = await registry.push(fx.multiarch, "multi:latest", { all: true });
    assert.equal(oci.digest, fx.images.multiarch.digest);
    const index = await get(`${registry.url}/v2/multi/manifests/latest`, { accept: OCI_INDEX });
    assert.equal(index.res.status, 200);
    assert.equal(index.res.headers.get("content-type"), OCI_INDEX);
    const parsed = JSON.parse(index.text());
    assert.deepEqual(
      parsed.manifests.map((m: { platform: { architecture: string } }) => m.platform.architecture),
      ["amd64", "arm64"],
    );
    const child = await get(`${registry.url}/v2/multi/manifests/${parsed.manifests[1].digest}`, {
      accept: OCI_MANIFEST,
    });
    assert.equal(child.res.status, 200, "the arm64 child was pushed too");
    const noIndex = await get(`${registry.url}/v2/multi/manifests/latest`, { accept: OCI_MANIFEST });
    assert.equal(noIndex.res.status, 404);

    await registry.push(fx.multiarch, "multi:v2s2", { all: true, format: "v2s2" });
    const list = await get(`${registry.url}/v2/multi/manifests/v2s2`, {
      accept: `${DOCKER_LIST}, ${OCI_INDEX}`,
    });
    assert.equal(list.res.status, 200);
    assert.equal(list.res.headers.get("content-type"), DOCKER_LIST);
  });

  test("pushes a docker-archive as a Docker schema 2 image", async () => {
    await registry.push(fx.dockerArchive, "from-archive:latest");
    const { res, text } = await get(`${registry.url}/v2/from-archive/manifests/latest`, {
      accept: `${DOCKER_MANIFEST}, ${OCI_MANIFEST}`,
    });
    assert.equal(res.status, 200);
    assert.equal(res.headers.get("content-type"), DOCKER_MANIFEST);
    const manifest = JSON.parse(text());
    assert.equal(manifest.layers.length, 1);
  });

  test("corruptBlob changes a stored blob's bytes but not its length", async () => {
    const layer = fx.images.busybox.layers[0]!;
    await registry.corruptBlob(layer.digest);
    const { res, body } = await get(`${registry.url}/v2/library/busybox/blobs/${layer.digest}`);
    assert.equal(res.status, 200);
    assert.equal(body.length, layer.size);
    assert.notEqual(sha256(body), layer.digest);
  });
});

describe("basic auth registry", () => {
  let registry: TestRegistry;
  before(async () => {
    registry = await startRegistry({ auth: "basic" });
  });
  after(() => registry?.stop());

  test("rejects missing and wrong credentials with 401 + WWW-Authenticate: Basic", async () => {
    const none = await get(`${registry.url}/v2/`);
    assert.equal(none.res.status, 401);
    assert.match(none.res.headers.get("www-authenticate") ?? "", /^Basic realm="[^"]+"/);

    const wrong = await get(`${registry.url}/v2/`, { authorization: basic(registry.username, "wrong") });
    assert.equal(wrong.res.status, 401);
    assert.match(wrong.res.headers.get("www-authenticate") ?? "", /^Basic /);

    const right = await get(`${registry.url}/v2/`, {
      authorization: basic(registry.username, registry.password),
    });
    assert.equal(right.res.status, 200);
  });

  test("push and pull with the credentials", async () => {
    const { digest } = await registry.push(fx.busybox, "busybox:latest");
    const { res } = await get(`${registry.url}/v2/busybox/manifests/latest`, {
      accept: OCI_MANIFEST,
      authorization: basic(registry.username, registry.password),
    });
    assert.equal(res.status, 200);
    assert.equal(res.headers.get("docker-content-digest"), digest);
  });
});

describe("bearer token registry", () => {
  let registry: TestRegistry;
  let digest: string;
  before(async () => {
    registry = await startRegistry({ auth: "bearer" });
    ({ digest } = await registry.push(fx.busybox, "team/busybox:latest"));
  });
  after(() => registry?.stop());

  const manifestUrl = () => `${registry.url}/v2/team/busybox/manifests/latest`;

  async function tokenFor(challenge: Record<string, string>, authorization?: string) {
    const url = new URL(challenge.realm!);
    url.searchParams.set("service", challenge.service!);
    url.searchParams.set("scope", challenge.scope!);
    const { res, text } = await get(url.href, authorization ? { authorization } : {});
    return { status: res.status, body: res.status === 200 ? JSON.parse(text()) : undefined, res };
  }

  test("challenges with realm, service and scope; a token from the realm pulls", async () => {
    const first = await get(manifestUrl(), { accept: OCI_MANIFEST });
    assert.equal(first.res.status, 401);
    const challenge = parseChallenge(first.res.headers.get("www-authenticate"));
    assert.equal(challenge.realm, registry.token!.realm);
    assert.equal(challenge.service, registry.token!.service);
    assert.equal(challenge.scope, "repository:team/busybox:pull");

    const token = await tokenFor(challenge, basic(registry.username, registry.password));
    assert.equal(token.status, 200);
    assert.equal(typeof token.body.token, "string");
    assert.equal(token.body.access_token, token.body.token);
    const [header, claims] = token.body.token
      .split(".")
      .slice(0, 2)
      .map((part: string) => JSON.parse(Buffer.from(part, "base64url").toString("utf8")));
    assert.equal(header.alg, "RS256");
    assert.equal(header.x5c.length, 1);
    assert.equal(claims.iss, registry.token!.issuer);
    assert.equal(claims.aud, registry.token!.service);
    assert.deepEqual(claims.access, [{ type: "repository", name: "team/busybox", actions: ["pull"] }]);

    const pulled = await get(manifestUrl(), {
      accept: OCI_MANIFEST,
      authorization: `Bearer ${token.body.token}`,
    });
    assert.equal(pulled.res.status, 200);
    assert.equal(pulled.res.headers.get("docker-content-digest"), digest);
    const last = registry.token!.requests.at(-1)!;
    assert.equal(last.authenticated, true);
    assert.deepEqual(last.scopes, ["repository:team/busybox:pull"]);
  });

  test("an anonymous token gets insufficient_scope; garbage gets invalid_token", async () => {
    const first = await get(manifestUrl(), { accept: OCI_MANIFEST });
    const challenge = parseChallenge(first.res.headers.get("www-authenticate"));
    const anonymous = await tokenFor(challenge);
    assert.equal(anonymous.status, 200);
    const denied = await get(manifestUrl(), {
      accept: OCI_MANIFEST,
      authorization: `Bearer ${anonymous.body.token}`,
    });
    assert.equal(denied.res.status, 401);
    assert.equal(parseChallenge(denied.res.headers.get("www-authenticate")).error, "insufficient_scope");

    const garbage = await get(manifestUrl(), { accept: OCI_MANIFEST, authorization: "Bearer not.a.token" });
    assert.equal(garbage.res.status, 401);
    assert.equal(parseChallenge(garbage.res.headers.get("www-authenticate")).error, "invalid_token");
  });

  test("the token server refuses wrong credentials", async () => {
    const first = await get(manifestUrl(), { accept: OCI_MANIFEST });
    const challenge = parseChallenge(first.res.headers.get("www-authenticate"));
    const wrong = await tokenFor(challenge, basic(registry.username, "wrong"));
    assert.equal(wrong.status, 401);
    assert.match(wrong.res.headers.get("www-authenticate") ?? "", /^Basic /);
  });
});

test("anonymousPull: an anonymous token pulls but cannot push", async () => {
  await using registry = await startRegistry({ auth: "bearer", anonymousPull: true });
  await registry.push(fx.busybox, "public/busybox:latest");
  const url = `${registry.url}/v2/public/busybox/manifests/latest`;
  const challenge = parseChallenge(
    (await get(url, { accept: OCI_MANIFEST })).res.headers.get("www-authenticate"),
  );
  const tokenUrl = new URL(challenge.realm!);
  tokenUrl.searchParams.set("service", challenge.service!);
  tokenUrl.searchParams.set("scope", "repository:public/busybox:pull,push");
  const { token } = JSON.parse((await get(tokenUrl.href)).text());
  const pulled = await get(url, { accept: OCI_MANIFEST, authorization: `Bearer ${token}` });
  assert.equal(pulled.res.status, 200);
  assert.deepEqual(registry.token!.requests.at(-1)!.granted, [
    { type: "repository", name: "public/busybox", actions: ["pull"] },
  ]);
});

test("tls: serves HTTPS with a certificate for 127.0.0.1 signed by caCertPem", async () => {
  await using registry = await startRegistry({ tls: true });
  assert.match(registry.url, /^https:\/\/127\.0\.0\.1:\d+$/);
  await registry.push(fx.busybox, "secure/busybox:latest");
  const status = await new Promise<number>((resolve, reject) => {
    const req = request(`${registry.url}/v2/secure/busybox/manifests/latest`, {
      ca: registry.caCertPem,
      headers: { accept: OCI_MANIFEST },
    });
    req.once("response", (res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    });
    req.once("error", reject);
    req.end();
  });
  assert.equal(status, 200);
  await assert.rejects(fetch(`${registry.url}/v2/`), "an untrusted certificate is refused");
});

test("stop() ends the registry and is idempotent", async () => {
  const registry = await startRegistry();
  assert.equal((await get(`${registry.url}/v2/`)).res.status, 200);
  await Promise.all([registry.stop(), registry.stop()]);
  await registry.stop();
  await assert.rejects(fetch(`${registry.url}/v2/`));
});
