/**
 * A busybox image whose Cmd is a small service, for the CLI's tests: `httpd` on port 8080 serving
 * `/www`, a line on stdout once it listens, and traps that say which signal stopped it. Its
 * StopSignal is SIGQUIT (as nginx's), so a test can tell the StopSignal from the signal the CLI got:
 *
 * | signal  | the service prints  | exit code |
 * |---------|---------------------|-----------|
 * | SIGQUIT | `stopping on QUIT`  | 7         |
 * | SIGTERM | `stopping on TERM`  | 8         |
 * | SIGINT  | `stopping on INT`   | 9         |
 *
 * Built as an OCI layout from scripts/build-busybox-oci.sh's (its layer, plus one with /www and the
 * script), once per test process.
 */
import { execFile } from "node:child_process";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { gzipSync } from "node:zlib";
import { sha256, tarBytes } from "./oci-kit.ts";
import { scratchDir } from "./scratch.ts";

const run = promisify(execFile);
const root = new URL("../../", import.meta.url).pathname;

/** What `GET /` answers. */
export const SERVICE_PAGE = "hello from the service\n";
export const SERVICE_PORT = 8080;

const SCRIPT = `#!/bin/sh
# The traps come first: once "listening" is printed, a signal is reported.
trap 'echo "stopping on QUIT"; exit 7' QUIT
trap 'echo "stopping on TERM"; exit 8' TERM
trap 'echo "stopping on INT"; exit 9' INT
# httpd binds its port, then goes to the background: "listening" means it accepts.
httpd -p ${SERVICE_PORT} -h /www || exit 1
echo "listening on ${SERVICE_PORT}"
echo "a line on stderr" >&2
# A foreground sleep, not "sleep & wait": ash runs a trap once the current command ends, and a
# signal that comes between the fork and the wait would wait for the whole sleep. The signal
# also ends the sleep: ash's note about it ("Quit") goes to /dev/null.
while :; do sleep 1; done 2>/dev/null
`;

let built: Promise<string> | undefined;

/** The OCI layout dir of the service image (tag `latest`). */
export function serviceImageLayout(): Promise<string> {
  built ??= build();
  return built;
}

interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
}

async function build(): Promise<string> {
  const dir = await scratchDir("sm-service-image-");
  const busybox = join(dir, "busybox");
  await run("bash", [`${root}scripts/build-busybox-oci.sh`, busybox]);
  const blob = (digest: string) => join(busybox, "blobs", "sha256", digest.slice("sha256:".length));
  const index = JSON.parse(await readFile(join(busybox, "index.json"), "utf8")) as {
    manifests: Descriptor[];
  };
  const manifest = JSON.parse(await readFile(blob(index.manifests[0]!.digest), "utf8")) as {
    config: Descriptor;
    layers: Descriptor[];
  };
  const config = JSON.parse(await readFile(blob(manifest.config.digest), "utf8")) as {
    config: Record<string, unknown>;
    rootfs: { diff_ids: string[] };
  };

  const out = join(dir, "service");
  await mkdir(join(out, "blobs", "sha256"), { recursive: true });
  const put = async (bytes: Buffer, mediaType: string): Promise<Descriptor> => {
    const digest = sha256(bytes);
    await writeFile(join(out, "blobs", "sha256", digest.slice("sha256:".length)), bytes);
    return { mediaType, digest, size: bytes.length };
  };
  const base = manifest.layers[0]!;
  await put(await readFile(blob(base.digest)), base.mediaType);
  const tar = tarBytes([
    { name: "www/", type: "dir" },
    { name: "www/index.html", data: SERVICE_PAGE },
    { name: "usr/bin/serve", data: SCRIPT, mode: 0o755 },
  ]);
  const layer = await put(gzipSync(tar), "application/vnd.oci.image.layer.v1.tar+gzip");
  const configBlob = await put(
    Buffer.from(
      JSON.stringify({
        ...config,
        config: { ...config.config, Cmd: ["/usr/bin/serve"], StopSignal: "SIGQUIT" },
        rootfs: { type: "layers", diff_ids: [...config.rootfs.diff_ids, sha256(tar)] },
      }),
    ),
    "application/vnd.oci.image.config.v1+json",
  );
  const manifestBlob = await put(
    Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: "application/vnd.oci.image.manifest.v1+json",
        config: configBlob,
        layers: [base, layer],
      }),
    ),
    "application/vnd.oci.image.manifest.v1+json",
  );
  await writeFile(join(out, "oci-layout"), JSON.stringify({ imageLayoutVersion: "1.0.0" }));
  await writeFile(
    join(out, "index.json"),
    JSON.stringify({
      schemaVersion: 2,
      manifests: [{ ...manifestBlob, annotations: { "org.opencontainers.image.ref.name": "latest" } }],
    }),
  );
  return out;
}
