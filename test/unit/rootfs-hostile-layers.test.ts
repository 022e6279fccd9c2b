/**
 * Hostile layers through the whole pipeline (tar → tree → ext4 writer): each one
 * is either refused with a typed error naming layer and entry, or resolved inside the image root.
 * Every case also checks that nothing next to the output changed: a sentinel directory (the
 * stand-in for the host's /etc: hostile symlinks point at its absolute path) and a canary file.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import {
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { LayerError } from "../../src/errors.ts";
import { flattenLayers } from "../../src/rootfs/index.ts";
import { cat, debugfs, fingerprint, fsck, ls, stat } from "../fixtures/hostile-layers/inspect-image.ts";
import {
  dir,
  END,
  entryBytes,
  file,
  hardlink,
  header,
  paxData,
  symlink,
  tar,
} from "../fixtures/hostile-layers/tar-builder.ts";

const base = mkdtempSync(join(tmpdir(), "rootfs-hostile-"));
const sentinel = join(base, "sentinel");
const canary = join(base, "canary.txt");
const outDir = join(base, "out");
const layersDir = join(base, "layers");
let before_: Map<string, string>;
let passwdHash: string;

/** Images and layer blobs are large: list them by name only. */
const skipOutputs = (rel: string): boolean => rel.startsWith("layers/") || /^out\/(image-|\.)/.test(rel);
const hash = (p: string): string => createHash("sha256").update(readFileSync(p)).digest("hex");

before(() => {
  mkdirSync(join(sentinel, "etc"), { recursive: true });
  writeFileSync(join(sentinel, "etc", "passwd"), "root:x:0:0:sentinel\n");
  writeFileSync(join(sentinel, "canary"), "do not touch\n");
  symlinkSync("etc/passwd", join(sentinel, "link-to-passwd"));
  writeFileSync(canary, "canary\n");
  mkdirSync(outDir);
  writeFileSync(join(outDir, "neighbour"), "next to the output\n");
  mkdirSync(layersDir);
  before_ = fingerprint(base, skipOutputs);
  passwdHash = hash("/etc/passwd");
});

after(() => rmSync(base, { recursive: true, force: true }));

let n = 0;
function layerFile(data: Buffer): string {
  const p = join(layersDir, `layer-${n++}.tar`);
  writeFileSync(p, data);
  return p;
}

/** Builds an image from raw layer bytes; the output goes to out/image-N.ext4. */
async function build(layers: Buffer[]) {
  const output = join(outDir, `image-${n++}.ext4`);
  const result = await flattenLayers({
    layers: layers.map((data, i) => ({
      path: layerFile(data),
      mediaType: "application/vnd.oci.image.layer.v1.tar",
      digest: `sha256:${"0".repeat(63)}${i}`,
    })),
    output,
    freeBytes: 8 * 1024 * 1024,
  });
  return { output, result };
}

/** Nothing but image files (and the neighbour) in out/, nothing changed elsewhere. */
function assertUntouched(): void {
  const now = fingerprint(base, skipOutputs);
  for (const [k, v] of before_) {
    if (k === "out" || k === "layers") continue; // directories whose mtime changes with our outputs
    assert.equal(now.get(k), v, `${k} changed`);
  }
  for (const k of now.keys()) assert.ok(before_.has(k), `${k} appeared`);
  assert.deepEqual(
    readdirSync(outDir).filter((f) => !/^image-\d+\.ext4$/.test(f)),
    ["neighbour"],
    "only images appear next to the output",
  );
  assert.equal(hash("/etc/passwd"), passwdHash, "the host's /etc/passwd changed");
  assert.deepEqual(
    readdirSync(outDir).filter((f) => f.startsWith(".")),
    [],
    "temporary files left next to the output",
  );
}

async function refused(
  layers: Buffer[],
  code: "UNSAFE_LAYER" | "CORRUPT_LAYER",
  entry: string | undefined,
  layerIndex = layers.length - 1,
): Promise<void> {
  const imagesBefore = readdirSync(outDir).length;
  await assert.rejects(build(layers), (err: unknown) => {
    assert.ok(err instanceof LayerError, `expected a LayerError, got ${err}`);
    assert.equal(err.code, code, err.message);
    assert.equal(err.layer, `sha256:${"0".repeat(63)}${layerIndex}`);
    if (entry !== undefined) assert.equal(err.entry, entry, err.message);
    return true;
  });
  assert.equal(readdirSync(outDir).length, imagesBefore, "no output on failure");
  assertUntouched();
}

async function resolvedInside(layers: Buffer[], check: (image: string) => void): Promise<void> {
  const { output } = await build(layers);
  const f = fsck(output);
  assert.equal(f.status, 0, f.output);
  check(output);
  assertUntouched();
}

describe("hostile layers", () => {
  it("refuses ../ escapes", () => refused([tar([file("../escaped", "x")])], "UNSAFE_LAYER", "../escaped"));

  it("refuses escapes hidden inside a path", () =>
    refused([tar([dir("a/"), file("a/../../../escaped", "x")])], "UNSAFE_LAYER", "a/../../../escaped"));

  it("refuses absolute names", () =>
    refused([tar([file(`${sentinel}/pwned`, "x")])], "UNSAFE_LAYER", `${sentinel}/pwned`));

  it("refuses an absolute name hidden in a PAX path", () =>
    refused(
      [tar([{ ...file("innocent", "x"), pax: { path: "/etc/passwd" } }])],
      "UNSAFE_LAYER",
      "/etc/passwd",
    ));

  it("refuses a ../ name hidden in a GNU long name", () =>
    refused(
      [tar([{ ...file("innocent", "x"), longName: `${"a/".repeat(60)}${"../".repeat(70)}x` }])],
      "UNSAFE_LAYER",
      undefined,
    ));

  it("resolves a symlink to an absolute host directory, then a write through it, inside the image", () =>
    resolvedInside([tar([symlink("link", `${sentinel}/etc`), file("link/passwd", "pwned\n")])], (image) => {
      assert.equal(cat(image, `${sentinel}/etc/passwd`).toString(), "pwned\n");
      assert.equal(stat(image, ["/link"]).get("/link")?.type, "symlink");
    }));

  it("resolves a write through a symlink to /etc inside the image's /etc", () =>
    resolvedInside(
      [
        tar([dir("etc/"), file("etc/passwd", "image\n"), symlink("link", "/etc")]),
        tar([file("link/passwd", "replaced\n")]),
      ],
      (image) => {
        assert.equal(cat(image, "/etc/passwd").toString(), "replaced\n");
      },
    ));

  it("clamps a symlink to ../../.. at the image root", () =>
    resolvedInside(
      [tar([dir("a/"), symlink("a/up", "../../../../../.."), file("a/up/escaped", "E")])],
      (image) => {
        assert.equal(cat(image, "/escaped").toString(), "E");
        assert.deepEqual(ls(image, "/").sort(), ["a", "escaped", "lost+found"]);
      },
    ));

  it("refuses hardlinks to absolute or outside paths", async () => {
    await refused([tar([hardlink("hl", "/etc/passwd")])], "UNSAFE_LAYER", "hl");
    await refused([tar([hardlink("hl", "../../../../etc/passwd")])], "UNSAFE_LAYER", "hl");
    await refused([tar([hardlink("hl", `${sentinel.slice(1)}/canary`)])], "CORRUPT_LAYER", "hl");
  });

  it("looks up a hardlink through a symlink to a host path inside the image (not on the host)", () =>
    refused([tar([symlink("l", sentinel), hardlink("hl", "l/canary")])], "CORRUPT_LAYER", "hl"));

  it("refuses a symlink loop", () =>
    refused(
      [tar([symlink("a", "b"), symlink("b", "c"), symlink("c", "a"), file("a/x", "loop")])],
      "UNSAFE_LAYER",
      "a/x",
    ));

  it("keeps the last of duplicate entries", () =>
    resolvedInside(
      [
        tar([
          file("dup", "first"),
          file("dup", "second"),
          dir("d/", { mode: 0o700 }),
          dir("d/", { mode: 0o750 }),
        ]),
      ],
      (image) => {
        assert.equal(cat(image, "/dup").toString(), "second");
        assert.equal(stat(image, ["/d"]).get("/d")?.mode, 0o750);
      },
    ));

  it("follows a directory replaced by a symlink mid-layer inside the image", () =>
    resolvedInside(
      [
        tar([
          dir("d/"),
          file("d/before", "b"),
          symlink("d", sentinel),
          file("d/after", "a"),
          file("d/canary", "c"),
        ]),
      ],
      (image) => {
        assert.equal(
          stat(image, ["/d"]).get("/d")?.fastLink ?? "(long)",
          sentinel.length < 60 ? sentinel : "(long)",
        );
        assert.equal(cat(image, `${sentinel}/after`).toString(), "a");
        assert.equal(cat(image, `${sentinel}/canary`).toString(), "c");
        assert.equal(stat(image, ["/d/before"]).get("/d/before"), undefined);
      },
    ));

  it("creates device nodes only inside the image", () =>
    resolvedInside(
      [
        tar([
          dir("dev/"),
          { name: "dev/sda", type: "4", devmajor: 8, devminor: 0, mode: 0o660 },
          { name: "dev/mem", type: "3", devmajor: 1, devminor: 1, mode: 0o640, gid: 15 },
          { name: `${sentinel.slice(1)}/kmsg`, type: "3", devmajor: 1, devminor: 11 },
        ]),
      ],
      (image) => {
        const s = stat(image, ["/dev/sda", "/dev/mem", `${sentinel}/kmsg`]);
        assert.equal(s.get("/dev/sda")?.type, "block special");
        assert.equal(s.get("/dev/sda")?.device, "8:0");
        assert.equal(s.get("/dev/mem")?.device, "1:1");
        assert.equal(s.get("/dev/mem")?.gid, 15);
        assert.equal(s.get(`${sentinel}/kmsg`)?.device, "1:11");
      },
    ));

  it("refuses absurd sizes without reading or allocating them", async () => {
    const b256 = Buffer.alloc(12, 0xff);
    b256[0] = 0x80;
    await refused([tar([{ name: "huge", type: "0", sizeField: b256 }])], "CORRUPT_LAYER", "huge");
    await refused([tar([{ name: "huge", type: "0", size: 2 ** 40 }])], "CORRUPT_LAYER", "huge");
  });

  it("refuses truncated archives", async () => {
    const whole = tar([file("a", "x".repeat(5000)), file("b", "y")]);
    await refused([whole.subarray(0, 2048)], "CORRUPT_LAYER", "a");
    await refused([whole.subarray(0, whole.length - 1024 - 100)], "CORRUPT_LAYER", "b");
    await refused([tar([file("ok", "fine")]), whole.subarray(0, 5800)], "CORRUPT_LAYER", undefined, 1);
  });

  it("refuses a PAX header over the cap, keeps a large valid one", async () => {
    await refused(
      [Buffer.concat([header({ name: "pax", type: "x", size: 64 * 1024 * 1024 }), END])],
      "CORRUPT_LAYER",
      undefined,
    );
    // An 8 MB record (GNU tar accepts it; a sparse map of a fragmented file can be that long).
    const big = paxData({ comment: "c".repeat(8 * 1000 * 1000) });
    await resolvedInside(
      [
        Buffer.concat([
          header({ name: "pax", type: "x", data: big }),
          big,
          Buffer.alloc((512 - (big.length % 512)) % 512),
          entryBytes(file("x", "after the big header")),
          END,
        ]),
      ],
      (image) => assert.equal(cat(image, "/x").toString(), "after the big header"),
    );
  });

  it("refuses a whiteout that climbs out", () =>
    refused([tar([file("etc/.wh...")])], "UNSAFE_LAYER", "etc/.wh..."));

  it("refuses a layer that makes the root a file", () =>
    refused([tar([file(".", "root is a file")])], "CORRUPT_LAYER", "."));

  it("keeps hostile-looking names as plain names inside the image", () =>
    resolvedInside(
      [
        tar([
          file("-rf", "dash"),
          file("<2>", "inode syntax"),
          file('quote"d name', "q"),
          file("sp ace", "s"),
          file(Buffer.from([0xff, 0xfe, 0x41]), "latin1 bytes"),
          { ...file("x"), pax: { path: "n".repeat(255) } },
        ]),
      ],
      (image) => {
        assert.equal(cat(image, "/-rf").toString(), "dash");
        assert.equal(cat(image, "/<2>").toString(), "inode syntax");
        assert.equal(cat(image, '/quote"d name').toString(), "q");
        assert.equal(cat(image, "/sp ace").toString(), "s");
        assert.equal(
          cat(image, Buffer.from([0x2f, 0xff, 0xfe, 0x41]).toString("latin1")).toString(),
          "latin1 bytes",
        );
        assert.equal(stat(image, [`/${"n".repeat(255)}`]).get(`/${"n".repeat(255)}`)?.type, "regular");
      },
    ));

  it("the untouched-check notices a changed canary (it can fail)", () => {
    writeFileSync(canary, "changed\n");
    try {
      assert.throws(() => assertUntouched(), /canary\.txt changed/);
    } finally {
      writeFileSync(canary, "canary\n");
    }
    before_ = fingerprint(base, skipOutputs); // its mtime moved: take the reference again
    writeFileSync(join(sentinel, "new"), "x");
    try {
      assert.throws(() => assertUntouched(), /sentinel(\/new)? (appeared|changed)/);
    } finally {
      rmSync(join(sentinel, "new"));
    }
    before_ = fingerprint(base, skipOutputs); // mtimes moved: take the reference again
  });

  it("keeps a name with a line break", () =>
    resolvedInside([tar([file("bad\nname", "x")])], (image) => {
      assert.match(debugfs(image, ["ls -p /"])[0]!, /bad\nname/);
    }));
});
