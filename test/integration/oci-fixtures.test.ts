/**
 * The project's fixture images (built by test/fixtures/images/build.sh with skopeo, debootstrap…)
 * through every source: pushed to the real registry in OCI and Docker formats and pulled, read
 * straight from their OCI layouts, and imported from the docker-save archive. Digests, layers and
 * configs must match what the fixture build recorded.
 */
import assert from "node:assert/strict";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { type PulledImage, pullImage } from "../../src/oci/pull.ts";
import { type FixtureImages, fixtureImages, type ImageFacts } from "../helpers/fixtures.ts";
import { sha256 } from "../helpers/oci-kit.ts";
import { startRegistry, type TestRegistry } from "../helpers/registry.ts";

let fx: FixtureImages;
let registry: TestRegistry;
let work: string;

before(async () => {
  fx = await fixtureImages();
  registry = await startRegistry({ auth: "bearer" });
  work = await mkdtemp(join(tmpdir(), "oci-fx-"));
});
after(async () => {
  await registry?.stop();
  if (work) await rm(work, { recursive: true, force: true });
});

function opts(name: string, extra: { platform?: string } = {}) {
  return {
    dataDir: join(work, name),
    dockerConfigPath: false as const,
    credentials: { username: registry.username, password: registry.password },
    ...extra,
  };
}

async function assertMatches(
  pulled: PulledImage,
  facts: Omit<ImageFacts, "layout" | "ref">,
  sameManifest = true,
) {
  if (sameManifest) assert.equal(pulled.manifestDigest, facts.digest);
  assert.equal(pulled.configDigest, facts.config.digest);
  assert.deepEqual(
    pulled.layers.map((l) => [l.digest, l.size, l.diffId]),
    facts.layers.map((l) => [l.digest, l.size, l.diffId]),
  );
  for (const l of pulled.layers) assert.equal(sha256(await readFile(l.path)), l.digest);
}

describe("fixture images", () => {
  test("busybox (gzip, zstd, uncompressed) from the registry and from their layouts", async () => {
    for (const name of ["busybox", "busyboxZstd", "busyboxUncompressed"] as const) {
      const facts = fx.images[name];
      const pushed = await registry.push(fx[name], `fx/${name.toLowerCase()}:latest`);
      assert.equal(pushed.digest, facts.digest);
      const fromRegistry = await pullImage(`${registry.host}/fx/${name.toLowerCase()}:latest`, opts(name));
      await assertMatches(fromRegistry, facts);
      assert.deepEqual(fromRegistry.config.cmd, ["sh"]);
      assert.deepEqual(fromRegistry.config.exposedPorts, ["8080/tcp"]);
      const fromLayout = await pullImage(`oci:${fx[name]}:latest`, opts(`${name}-layout`));
      await assertMatches(fromLayout, facts);
      const compression = name === "busybox" ? "gzip" : name === "busyboxZstd" ? "zstd" : "none";
      assert.equal(fromLayout.layers[0]?.compression, compression);
    }
  });

  test("multiarch index, as an OCI index and as a Docker manifest list", async () => {
    const facts = fx.images.multiarch;
    const oci = await registry.push(fx.multiarch, "fx/multi:oci", { all: true });
    assert.equal(oci.digest, facts.digest);
    await registry.push(fx.multiarch, "fx/multi:v2s2", { all: true, format: "v2s2" });
    const [amd, arm] = facts.manifests as [(typeof facts.manifests)[0], (typeof facts.manifests)[0]];
    for (const tag of ["oci", "v2s2"]) {
      const a = await pullImage(`${registry.host}/fx/multi:${tag}`, opts(`multi-${tag}`));
      await assertMatches(a, amd, tag === "oci");
      assert.equal(a.platform, "linux/amd64");
      const b = await pullImage(
        `${registry.host}/fx/multi:${tag}`,
        opts(`multi-${tag}`, { platform: "linux/arm64/v8" }),
      );
      assert.equal(b.platform, "linux/arm64");
      assert.equal(b.config.architecture, "arm64");
      assert.deepEqual(
        b.layers.map((l) => l.diffId),
        arm.layers.map((l) => l.diffId),
      );
    }
    const fromLayout = await pullImage(
      `oci:${fx.multiarch}:latest`,
      opts("multi-layout", { platform: "linux/arm64" }),
    );
    assert.equal(fromLayout.manifestDigest, arm.digest);
    assert.equal(fromLayout.indexDigest, facts.digest);
  });

  test("docker-save archive: imported directly and pushed through the registry", async () => {
    const facts = fx.images.busybox;
    const imported = await pullImage(`docker-archive:${fx.dockerArchive}`, opts("archive"));
    assert.equal(imported.configDigest, facts.config.digest);
    assert.deepEqual(
      imported.layers.map((l) => [l.diffId, l.compression]),
      facts.layers.map((l) => [l.diffId, "none"]),
    );
    const named = await pullImage(
      `docker-archive:${fx.dockerArchive}:${fx.dockerArchiveReference}`,
      opts("archive"),
    );
    assert.equal(named.manifestDigest, imported.manifestDigest);
    await registry.push(fx.dockerArchive, "fx/from-archive:latest");
    const pulled = await pullImage(`${registry.host}/fx/from-archive:latest`, opts("archive-registry"));
    assert.equal(pulled.configDigest, facts.config.digest);
  });

  test("debian (three layers, gzip and zstd): registry and layout agree with the fixture facts", async () => {
    for (const name of ["debian", "debianZstd"] as const) {
      const facts = fx.images[name];
      await registry.push(fx[name], `fx/${name.toLowerCase()}:latest`);
      const pulled = await pullImage(`${registry.host}/fx/${name.toLowerCase()}:latest`, opts(name));
      await assertMatches(pulled, facts);
      assert.deepEqual(pulled.config.entrypoint, fx.expect.config.Entrypoint);
      assert.deepEqual(pulled.config.cmd, fx.expect.config.Cmd);
      assert.equal(pulled.config.user, fx.expect.config.User);
      assert.equal(pulled.config.workingDir, fx.expect.config.WorkingDir);
      assert.deepEqual(pulled.config.env, fx.expect.config.Env);
      // Layers shared with the first pull come from the store, not the layout.
      const fromLayout = await pullImage(`oci:${fx[name]}`, opts(name));
      assert.equal(fromLayout.manifestDigest, facts.digest);
    }
  });
});
