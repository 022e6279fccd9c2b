/**
 * The test images, built offline by `test/fixtures/images/build.sh` (see docs/fixtures.md).
 *
 * ```ts
 * import { fixtureImages } from "../helpers/fixtures.ts";
 * const fx = await fixtureImages();          // builds once per machine (root needed), then cached
 * fx.busybox;                                // OCI layout dir (one image, ref "latest")
 * fx.images.busybox.digest;                  // its manifest digest, config, layers, diff_ids…
 * fx.debian; fx.expect.whiteouts; (await fx.expect.tree()).get("usr/bin/sudo")?.mode === "4755"
 * ```
 *
 * Paths: `busybox`, `busyboxZstd`, `busyboxUncompressed`, `multiarch` (an OCI index: linux/amd64 +
 * linux/arm64/v8), `debian`, `debianZstd` (OCI layout dirs), `dockerArchive` (a `docker save` tar,
 * `busybox:latest`), `busyboxRootfsDir` (the plain busybox root filesystem directory).
 *
 * The first call in a process runs the build script (a cache hit takes milliseconds; a build from
 * nothing ~4 min and needs root and the Debian archive); later calls share the result. Set
 * SUPERMACHINE_FIXTURES_DIR to use an already built output directory as is (e.g. one built by root,
 * read by a non-root user).
 */
import { spawn } from "node:child_process";
import { readFile } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
export const fixtureBuildScript = join(repoRoot, "test/fixtures/images/build.sh");

export interface LayerFacts {
  mediaType: string;
  digest: string;
  size: number;
  /** sha256 of the uncompressed tar (the config's `rootfs.diff_ids` entry). */
  diffId: string;
  uncompressedSize: number;
}

export interface Platform {
  architecture: string;
  os: string;
  variant?: string;
}

export interface ImageFacts {
  /** Absolute path of the OCI layout directory. */
  layout: string;
  /** The `org.opencontainers.image.ref.name` in its index.json. */
  ref: string;
  mediaType: string;
  /** Digest of the manifest (or of the index, for `multiarch`). */
  digest: string;
  size: number;
  platform: Platform;
  config: { digest: string; size: number };
  layers: LayerFacts[];
}

export interface IndexFacts {
  layout: string;
  ref: string;
  mediaType: string;
  digest: string;
  size: number;
  /** amd64 first, then arm64/v8. `busybox`: where that entry's binary comes from. */
  manifests: Array<
    Omit<ImageFacts, "layout" | "ref"> & { busybox: "debian-amd64" | "debian-arm64" | "amd64-fallback" }
  >;
}

/** One path of the flattened Debian image, as the kernel's overlayfs merges the three layers. */
export interface TreeEntry {
  /** Relative to `/`, no leading slash: `usr/bin/sudo`. */
  path: string;
  /** f file, d dir, l symlink, c/b device, p fifo, s socket */
  type: "f" | "d" | "l" | "c" | "b" | "p" | "s";
  /** Four octal digits including setuid/setgid/sticky: "4755". */
  mode: string;
  uid: number;
  gid: number;
  /** Bytes, for regular files; 0 otherwise. */
  size: number;
  /** sha256 hex of the content (f). */
  sha256?: string;
  /** Symlink target (l). */
  target?: string;
  /** "major,minor" (c, b). */
  device?: string;
  /** For hardlinked regular files: the first (sorted) path of the group, else undefined. */
  hardlinkOf?: string;
}

export interface WhiteoutFact {
  /** Absolute path inside the image that must not exist after flattening. */
  path: string;
  kind: "file" | "directory";
  fromLayer: number;
  whiteoutInLayer: number;
}

export interface OpaqueDirFact {
  path: string;
  opaqueInLayer: number;
  /** Everything below `path` after flattening, relative to it, sorted. */
  contents: string[];
  /** Direct children from the layers below that must be gone. */
  hidden: string[];
}

export interface DebianExpectations {
  user: { name: string; uid: number; gid: number; home: string; shell: string };
  /** The image config's `config` object (User, WorkingDir, Env, Entrypoint, Cmd, Labels). */
  config: {
    User: string;
    WorkingDir: string;
    Env: string[];
    Entrypoint: string[];
    Cmd: string[];
    Labels: Record<string, string>;
  };
  /** What Entrypoint + Cmd print when run as the image says. */
  defaultCommandOutput: string;
  /** Layer 1 names start with "./" (and has a "./" entry); layers 2 and 3 use bare names. */
  layerNamesHaveDotSlash: boolean[];
  layer2Packages: string[];
  layer2Whiteouts: string[];
  layer2OpaqueDirs: string[];
  whiteouts: WhiteoutFact[];
  opaqueDirs: OpaqueDirFact[];
  /** A directory of layer 1 that layer 3 replaces with a regular file (no whiteout). */
  replacedDirectoryByFile: string;
  setuidFiles: string[];
  setgidFiles: string[];
  /** Groups of absolute paths that are one inode, each sorted. */
  hardlinkGroups: string[][];
  /** Symlink path → target, verbatim. */
  symlinks: Record<string, string>;
  fifo: string;
  /** A path longer than 100 bytes (PAX `path` header). */
  longPath: string;
  pathWithSpaces: string;
  /** Path of debian-tree.tsv. */
  treeFile: string;
  /** The whole flattened tree, keyed by relative path (`usr/bin/sudo`); parsed once. */
  tree(): Promise<Map<string, TreeEntry>>;
}

export interface FixtureImages {
  /** The build output directory. */
  root: string;
  busybox: string;
  busyboxZstd: string;
  busyboxUncompressed: string;
  multiarch: string;
  debian: string;
  debianZstd: string;
  dockerArchive: string;
  busyboxRootfsDir: string;
  images: {
    busybox: ImageFacts;
    busyboxZstd: ImageFacts;
    busyboxUncompressed: ImageFacts;
    debian: ImageFacts;
    debianZstd: ImageFacts;
    multiarch: IndexFacts;
  };
  /** The reference inside `dockerArchive`. */
  dockerArchiveReference: string;
  /** "debian" when the arm64 entry of `multiarch` has Debian's arm64 busybox. */
  multiarchArm64Busybox: "debian" | "amd64-fallback";
  expect: DebianExpectations;
}

let pending: Promise<FixtureImages> | undefined;

/** Builds (once per process; cached on disk between runs) and describes the test images. */
export function fixtureImages(): Promise<FixtureImages> {
  pending ??= load().catch((err: unknown) => {
    pending = undefined;
    throw err;
  });
  return pending;
}

/** Runs a fixture build script (its progress on our stderr) and returns the directory it printed last. */
export async function runBuildScript(script: string): Promise<string> {
  const child = spawn("bash", [script], { stdio: ["ignore", "pipe", "inherit"] });
  let stdout = "";
  child.stdout.setEncoding("utf8");
  child.stdout.on("data", (chunk: string) => {
    stdout += chunk;
  });
  const code = await new Promise<number | string>((resolvePromise, reject) => {
    child.once("error", reject);
    child.once("exit", (c, s) => resolvePromise(c ?? s ?? "unknown"));
  });
  if (code !== 0) throw new Error(`${script} failed (${code}); its output is above`);
  const dir = stdout.trim().split("\n").pop();
  if (!dir) throw new Error(`${script} printed no output directory`);
  return dir;
}

async function load(): Promise<FixtureImages> {
  const root = process.env.SUPERMACHINE_FIXTURES_DIR || (await runBuildScript(fixtureBuildScript));
  const raw = JSON.parse(await readFile(join(root, "fixtures.json"), "utf8"));
  if (raw.formatVersion !== 1)
    throw new Error(`${root}/fixtures.json: unknown formatVersion ${raw.formatVersion}`);
  const abs = (p: string): string => join(root, p);
  const image = (facts: ImageFacts): ImageFacts => ({ ...facts, layout: abs(facts.layout) });
  const images: FixtureImages["images"] = {
    busybox: image(raw.images.busybox),
    busyboxZstd: image(raw.images.busyboxZstd),
    busyboxUncompressed: image(raw.images.busyboxUncompressed),
    debian: image(raw.images.debian),
    debianZstd: image(raw.images.debianZstd),
    multiarch: { ...raw.images.multiarch, layout: abs(raw.images.multiarch.layout) },
  };
  const treeFile = abs(raw.debian.treeFile);
  let tree: Promise<Map<string, TreeEntry>> | undefined;
  return {
    root,
    busybox: images.busybox.layout,
    busyboxZstd: images.busyboxZstd.layout,
    busyboxUncompressed: images.busyboxUncompressed.layout,
    multiarch: images.multiarch.layout,
    debian: images.debian.layout,
    debianZstd: images.debianZstd.layout,
    dockerArchive: abs(raw.dockerArchive.path),
    busyboxRootfsDir: abs(raw.busyboxRootfsDir),
    images,
    dockerArchiveReference: raw.dockerArchive.reference,
    multiarchArm64Busybox: raw.multiarchArm64Busybox,
    expect: {
      ...raw.debian,
      treeFile,
      tree: () => {
        tree ??= readTree(treeFile);
        return tree;
      },
    },
  };
}

/** Parses a tree listing written by build.sh (`debian-tree.tsv`). */
export async function readTree(file: string): Promise<Map<string, TreeEntry>> {
  const map = new Map<string, TreeEntry>();
  for (const line of (await readFile(file, "utf8")).split("\n")) {
    if (line === "" || line.startsWith("#")) continue;
    const [path, type, mode, uid, gid, size, data, hardlink] = line.split("\t");
    if (hardlink === undefined) throw new Error(`${file}: malformed line ${JSON.stringify(line)}`);
    const entry: TreeEntry = {
      path: path!,
      type: type as TreeEntry["type"],
      mode: mode!,
      uid: Number(uid),
      gid: Number(gid),
      size: Number(size),
    };
    if (type === "f") entry.sha256 = data;
    else if (type === "l") entry.target = data;
    else if (type === "c" || type === "b") entry.device = data;
    if (hardlink !== "-") entry.hardlinkOf = hardlink;
    map.set(entry.path, entry);
  }
  return map;
}
