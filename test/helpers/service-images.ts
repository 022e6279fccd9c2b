/**
 * The server images of the service checks, built offline from Debian packages by
 * `test/fixtures/services/build.sh` (docs/fixtures.md, "Server images").
 *
 * ```ts
 * import { serviceImages } from "../helpers/service-images.ts";
 * const services = await serviceImages();   // builds once per machine (root needed), then cached
 * services.images.nginx.source;             // "oci:/…/oci:nginx", what registry.push() takes
 * services.images.postgres.imageConfig.User; // "postgres"
 * ```
 *
 * The first call in a process runs the build script (a cache hit takes well under a second; a
 * build from nothing a few minutes, with root and the Debian archive); later calls share the
 * result. SUPERMACHINE_SERVICE_IMAGES_DIR uses an already built output directory as is.
 */
import { readFile } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { type ImageFacts, runBuildScript } from "./fixtures.ts";

const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
export const serviceImagesBuildScript = join(repoRoot, "test/fixtures/services/build.sh");

export const SERVICE_NAMES = [
  "nginx",
  "httpd",
  "redis",
  "memcached",
  "postgres",
  "python",
  "node",
  "rust",
] as const;
export type ServiceName = (typeof SERVICE_NAMES)[number];

/** The image config's `config` object, as the build wrote it. */
export interface ServiceImageConfig {
  Env: string[];
  Entrypoint?: string[];
  Cmd?: string[];
  User?: string;
  WorkingDir?: string;
  ExposedPorts?: Record<string, object>;
  Volumes?: Record<string, object>;
  StopSignal?: string;
  Labels: Record<string, string>;
}

export interface ServiceImage extends Omit<ImageFacts, "ref"> {
  /** Its ref in the shared layout: the image's name. */
  ref: ServiceName;
  /** The skopeo source of this image: `oci:LAYOUT:NAME`. */
  source: string;
  /** The Debian package the image is made for, and its version. */
  package: string;
  version: string;
  imageConfig: ServiceImageConfig;
}

export interface ServiceImages {
  /** The build output directory. */
  root: string;
  /** The OCI layout holding every image (ref = the image's name). */
  layout: string;
  /** Layer 1 of every image: the Debian fixture's base layer, the same blob. */
  base: { digest: string; diffId: string; size: number; uncompressedSize: number };
  images: Record<ServiceName, ServiceImage>;
  /** The superuser the postgres image was initialised with. */
  postgres: { user: string; password: string; database: string };
}

let pending: Promise<ServiceImages> | undefined;

/** Builds (once per process; cached on disk between runs) and describes the server images. */
export function serviceImages(): Promise<ServiceImages> {
  pending ??= load().catch((err: unknown) => {
    pending = undefined;
    throw err;
  });
  return pending;
}

async function load(): Promise<ServiceImages> {
  const root =
    process.env.SUPERMACHINE_SERVICE_IMAGES_DIR || (await runBuildScript(serviceImagesBuildScript));
  const raw = JSON.parse(await readFile(join(root, "services.json"), "utf8"));
  if (raw.formatVersion !== 1)
    throw new Error(`${root}/services.json: unknown formatVersion ${raw.formatVersion}`);
  const layout = join(root, raw.layout);
  const images = {} as Record<ServiceName, ServiceImage>;
  for (const name of SERVICE_NAMES) {
    const facts = raw.images[name];
    if (facts === undefined) throw new Error(`${root}/services.json has no image ${name}`);
    images[name] = { ...facts, layout, source: `oci:${layout}:${name}` };
  }
  return { root, layout, base: raw.base, images, postgres: raw.images.postgres.postgres };
}
