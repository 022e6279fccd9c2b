/**
 * Builds `dist/`, what the published package runs: declarations from `tsc`, JavaScript bundled by
 * esbuild. Why a bundle: Node resolves, reads and compiles every module file of an import graph
 * on each start; the library is ~90 files, and loading them one by one costs ~150 ms of CPU
 * where one bundle costs ~50 ms (docs/cli.md, start time). Entry points: the library
 * (`dist/index.js`), `supermachine/testing` (`dist/testing.js`), `supermachine/client`
 * (`dist/client/index.js`: no VM code, a few files of its own and the errors) and the CLI
 * (`dist/cli/main.js`), with shared code split into `dist/chunks/` so that all of them use one copy
 * of every class and the CLI loads the library only for commands that need it. The CLI's own
 * dependencies (commander, cli-progress, and for `serve` ws and prom-client) are bundled in, so the
 * package has no runtime dependencies; their licenses go to `dist/THIRD-PARTY-LICENSES.txt`.
 *
 * Usage: node scripts/build.ts [--release]
 *   --release  also record the guest assets' hashes (packages/guest-linux-x64/assets.json, made by
 *              scripts/build-guest-package.sh) in dist/guest-assets.json, which `resolveAssetPaths`
 *              checks the installed guest package against. `npm pack` runs this (prepack).
 */
import { execFileSync } from "node:child_process";
import { copyFile, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const dist = join(root, "dist");
const release = process.argv.includes("--release");

await rm(dist, { recursive: true, force: true });
execFileSync(
  process.execPath,
  [join(root, "node_modules/typescript/bin/tsc"), "-p", "tsconfig.build.json", "--emitDeclarationOnly"],
  { cwd: root, stdio: "inherit" },
);

const result = await build({
  absWorkingDir: root,
  entryPoints: ["src/index.ts", "src/testing.ts", "src/client/index.ts", "src/cli/main.ts"],
  outdir: "dist",
  outbase: "src",
  bundle: true,
  splitting: true,
  format: "esm",
  platform: "node",
  target: "node22.18",
  chunkNames: "chunks/[name]-[hash]",
  // Bundled CommonJS (cli-progress) calls require() for Node's built-ins.
  banner: {
    js: 'import { createRequire as __smRequire } from "node:module";\nconst require = __smRequire(import.meta.url);',
  },
  legalComments: "none",
  metafile: true,
  logLevel: "warning",
});

// Every emitted module is ASCII: Node decodes a module's source with one non-ASCII character in it
// into a two-byte string, twice the bytes to scan and check against the compile cache (`images`
// started 5-10 ms later with the 13 non-ASCII comment lines of its chunk). esbuild escapes strings
// and identifiers, but keeps the comments it copies as they are: write those in ASCII.
const nonAscii: string[] = [];
for (const output of Object.keys(result.metafile.outputs).filter((path) => path.endsWith(".js"))) {
  const lines = (await readFile(join(root, output), "utf8")).split("\n");
  lines.forEach((line, i) => {
    if (/[^\x00-\x7f]/.test(line)) nonAscii.push(`${output}:${i + 1}: ${line.trim().slice(0, 100)}`);
  });
}
if (nonAscii.length > 0) {
  console.error(
    "build: non-ASCII characters in the bundle (comments esbuild kept; write them in ASCII in the source):\n" +
      nonAscii.join("\n"),
  );
  process.exit(1);
}

// The license of every bundled package, as their MIT/ISC terms ask.
const packages = new Set<string>();
for (const input of Object.keys(result.metafile.inputs)) {
  const match = /node_modules\/((?:@[^/]+\/)?[^/]+)\//.exec(input);
  if (match) packages.add(match[1]!);
}
let notices = "Third-party software bundled into dist/ by scripts/build.ts.\n";
for (const name of [...packages].sort()) {
  const dir = join(root, "node_modules", name);
  const manifest = JSON.parse(await readFile(join(dir, "package.json"), "utf8")) as {
    version: string;
    license?: string;
  };
  const file = (await readdir(dir)).find((name) => /^(licen[cs]e|copying)/i.test(name));
  if (file === undefined) throw new Error(`build: ${name} has no license file to ship with the bundle`);
  const license = await readFile(join(dir, file), "utf8");
  notices += `\n## ${name} ${manifest.version} (${manifest.license ?? "see below"})\n\n${license.trim()}\n`;
}
await writeFile(join(dist, "THIRD-PARTY-LICENSES.txt"), notices);

if (release) {
  const recorded = join(root, "packages/guest-linux-x64/assets.json");
  try {
    await copyFile(recorded, join(dist, "guest-assets.json"));
  } catch {
    console.error(
      `build: ${recorded} is missing: run scripts/build-guest-package.sh before packing, so that the ` +
        "package records the hashes of the guest assets it ships with",
    );
    process.exit(1);
  }
}
