import { readdir, rm, stat } from "node:fs/promises";
import { join } from "node:path";
import { SupermachineError } from "../errors.ts";
import { dataDir } from "../internal/paths.ts";
import type { ImageRecord, PruneResult } from "../oci/content-store.ts";
import type { ImageConfig } from "../oci/image-config.ts";
import type { PulledImage, PullOptions, StoreOptions } from "../oci/pull.ts";
import { listImages, pruneImages, pullImage, removeImage } from "../oci/pull.ts";
import { flattenLayers, ROOTFS_FORMAT_VERSION, type RootfsProgress } from "../rootfs/index.ts";
import { Vm } from "./vm.ts";
import type { VmConfig } from "./vm-config.ts";

/** Options of {@link Image.pull}. */
export interface ImagePullOptions extends PullOptions {
  /** Progress of flattening the layers into the root filesystem image. */
  onRootfsProgress?: ((event: RootfsProgress) => void) | undefined;
}

/** What `Image.start` accepts: a {@link VmConfig} without the root filesystem, which is the image's. */
export type ImageStartConfig = Omit<VmConfig, "rootfs">;

/**
 * An OCI/Docker image made ready to boot: its blobs pulled and verified, its layers flattened into
 * one root filesystem image (cached by manifest digest), its config applied to every VM.
 */
export class Image {
  /** Canonical reference (`docker.io/library/alpine:3.20`) or local source (`oci:/dir:tag`). */
  readonly reference: string;
  /** Digest of the image manifest. */
  readonly digest: string;
  /** `os/arch[/variant]`. */
  readonly platform: string;
  /** The image's config: entrypoint, cmd, env, working dir, user, exposed ports, stop signal. */
  readonly config: ImageConfig;
  /** The flattened root filesystem (ext4, never written to: VMs write to overlays). */
  readonly rootfsPath: string;

  private constructor(pulled: PulledImage, rootfsPath: string) {
    this.reference = pulled.reference;
    this.digest = pulled.manifestDigest;
    this.platform = pulled.platform;
    this.config = pulled.config;
    this.rootfsPath = rootfsPath;
  }

  /**
   * Pull `reference` (a registry reference, `oci:DIR[:TAG]` or `docker-archive:FILE[:NAME:TAG]`)
   * into the local store and flatten it. Both steps are cached: blobs by digest, the root
   * filesystem by manifest digest.
   */
  static async pull(reference: string, options: ImagePullOptions = {}): Promise<Image> {
    const pulled = await pullImage(reference, options);
    const rootfsPath = await flattenedRootfs(pulled, options);
    return new Image(pulled, rootfsPath);
  }

  /** The images in the local store. */
  static list(options: StoreOptions = {}): Promise<ImageRecord[]> {
    return listImages(options);
  }

  /**
   * Forget a stored image (every platform unless one is given) and its flattened root filesystem.
   * Its blobs stay until {@link Image.prune}. Throws `IMAGE_NOT_FOUND` when nothing matched.
   */
  static async remove(
    reference: string,
    options: StoreOptions & { platform?: string } = {},
  ): Promise<number> {
    const removed = await removeImage(reference, options);
    await pruneRootfsCache(options);
    return removed;
  }

  /** Delete blobs and flattened root filesystems that no stored image uses any more. */
  static async prune(
    options: StoreOptions & { signal?: AbortSignal } = {},
  ): Promise<PruneResult & { removedRootfs: number }> {
    const result = await pruneImages(options);
    const removedRootfs = await pruneRootfsCache(options);
    return { ...result, removedRootfs };
  }

  /** Boot a VM from this image. The image's env, working dir and user are the defaults of every exec. */
  start(config: ImageStartConfig = {}): Promise<Vm> {
    const defaults = imageExecDefaults(this.config);
    return Vm.start({
      ...config,
      rootfs: this.rootfsPath,
      env: { ...defaults.env, ...config.env },
      cwd: config.cwd ?? defaults.cwd,
      user: config.user ?? defaults.user,
    });
  }

  /**
   * The argv docker would run: `entrypoint` replaces the image's Entrypoint (and then the image's
   * Cmd is dropped); non-empty `args` replace Cmd.
   */
  command(
    overrides: { entrypoint?: readonly string[] | undefined; args?: readonly string[] | undefined } = {},
  ): string[] {
    return dockerCommand(this.config, overrides);
  }
}

/** Where the flattened root filesystem of an image lives. */
export function rootfsCachePath(manifestDigest: string, root = dataDir()): string {
  const hex = manifestDigest.replace(/^[a-z0-9]+:/, "");
  return join(root, "rootfs", "images", `${hex}-f${ROOTFS_FORMAT_VERSION}.ext4`);
}

/** Removes flattened root filesystems of images no longer in the store (and of older formats). */
async function pruneRootfsCache(options: StoreOptions): Promise<number> {
  const root = options.dataDir ?? dataDir();
  const keep = new Set((await listImages(options)).map((r) => rootfsCachePath(r.manifestDigest, root)));
  const dir = join(root, "rootfs", "images");
  const names = await readdir(dir).catch(() => [] as string[]);
  let removed = 0;
  for (const name of names) {
    const path = join(dir, name);
    if (!keep.has(path) && name.endsWith(".ext4")) {
      await rm(path, { force: true });
      removed++;
    }
  }
  return removed;
}

async function flattenedRootfs(pulled: PulledImage, options: ImagePullOptions): Promise<string> {
  const output = rootfsCachePath(pulled.manifestDigest, options.dataDir ?? dataDir());
  const existing = await stat(output).catch(() => undefined);
  if (existing?.isFile()) return output;
  await flattenLayers({
    layers: pulled.layers.map((layer) => ({
      path: layer.path,
      mediaType: layer.mediaType,
      digest: layer.digest,
    })),
    output,
    signal: options.signal,
    onProgress: options.onRootfsProgress,
  });
  return output;
}

/** Exec defaults from an image config: env (with PATH), working dir, user. */
export function imageExecDefaults(config: ImageConfig): {
  env: Record<string, string>;
  cwd: string;
  user: string;
} {
  const env: Record<string, string> = {};
  for (const entry of config.env) {
    const eq = entry.indexOf("=");
    if (eq > 0) env[entry.slice(0, eq)] = entry.slice(eq + 1);
  }
  return { env, cwd: config.workingDir || "/", user: config.user || "root" };
}

/** Docker's rules for combining Entrypoint, Cmd and the user's overrides. */
export function dockerCommand(
  config: Pick<ImageConfig, "entrypoint" | "cmd">,
  overrides: { entrypoint?: readonly string[] | undefined; args?: readonly string[] | undefined },
): string[] {
  const entrypoint = overrides.entrypoint ?? config.entrypoint ?? [];
  const args =
    overrides.args && overrides.args.length > 0
      ? overrides.args
      : overrides.entrypoint !== undefined
        ? []
        : (config.cmd ?? []);
  const argv = [...entrypoint, ...args];
  if (argv.length === 0) {
    throw new SupermachineError(
      "INVALID_ARGUMENT",
      "the image has no Entrypoint or Cmd: give a command to run",
    );
  }
  return argv;
}
