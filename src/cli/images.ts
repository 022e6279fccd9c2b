/** The store's commands: pull (and bake), images, rmi, prune, snapshot ls / rm. */
import { Image, type ImagePullOptions, Store } from "../index.ts";
import { type Cli, positiveInt, UsageError } from "./cli.ts";
import { ago, bytes, json, table } from "./output.ts";
import type { Progress } from "./progress.ts";

/** Options of every command that may pull. */
export interface PullFlags {
  platform?: string;
  insecureRegistry?: string[];
  quiet?: boolean;
}

/** Library pull options from the command line's, reporting to `progress`. */
export function pullOptions(flags: PullFlags, cli: Cli, progress: Progress): ImagePullOptions {
  return {
    ...(flags.platform ? { platform: flags.platform } : {}),
    ...(flags.insecureRegistry?.length ? { insecureRegistries: flags.insecureRegistry } : {}),
    signal: cli.signal,
    onProgress: progress.pull,
    onRootfsProgress: progress.rootfs,
  };
}

export interface PullCommandFlags extends PullFlags {
  name?: string;
  memory?: string;
  vcpus?: string;
  json?: boolean;
}

export async function pullCommand(cli: Cli, reference: string, flags: PullCommandFlags): Promise<number> {
  // Loaded here: the progress bars' module (and Node's readline under it) is for pulls only.
  const { Progress, progressMode } = await import("./progress.ts");
  const progress = new Progress(progressMode(flags.quiet === true));
  const pull = { ...pullOptions(flags, cli, progress), pullPolicy: "always" as const };
  if (flags.name === undefined && (flags.memory !== undefined || flags.vcpus !== undefined)) {
    throw new UsageError("--memory and --vcpus describe a snapshot: give --name too");
  }
  let image: Image;
  try {
    if (flags.name === undefined) {
      image = await Image.pull(reference, pull);
    } else {
      const builder = Image.builder(reference).name(flags.name).pullOptions(pull).signal(cli.signal);
      const memory = positiveInt(flags.memory, "--memory");
      const vcpus = positiveInt(flags.vcpus, "--vcpus");
      if (memory !== undefined) builder.memoryMiB(memory);
      if (vcpus !== undefined) builder.vcpus(vcpus);
      const started = Date.now();
      progress.step(`baking snapshot ${flags.name} (boot, workload, snapshot)`);
      image = await builder.build();
      progress.step(`snapshot ${flags.name} ready in ${((Date.now() - started) / 1000).toFixed(1)} s`);
    }
  } finally {
    progress.finish();
  }
  const snapshot = image.snapshot?.manifest.name;
  if (flags.json) {
    json(cli, {
      reference: image.reference,
      digest: image.digest,
      platform: image.platform,
      rootfs: image.rootfsPath,
      ...(snapshot === undefined ? {} : { snapshot, snapshotDir: image.snapshot?.dir }),
    });
  } else if (snapshot === undefined) {
    cli.out(`${image.reference}@${image.digest}`);
  } else {
    cli.out(`${snapshot}: snapshot of ${image.reference}@${image.digest}`);
  }
  return 0;
}

export async function imagesCommand(cli: Cli, flags: { json?: boolean }): Promise<number> {
  const records = await new Store().images();
  if (flags.json) {
    json(cli, records);
    return 0;
  }
  table(
    cli,
    ["REFERENCE", "DIGEST", "PLATFORM", "SIZE", "PULLED"],
    records.map((r) => [
      r.reference,
      r.manifestDigest.replace(/^sha256:/, "").slice(0, 12),
      r.platform,
      bytes(r.sizeBytes),
      ago(r.pulledAt),
    ]),
  );
  return 0;
}

export async function rmiCommand(
  cli: Cli,
  references: readonly string[],
  flags: { platform?: string },
): Promise<number> {
  for (const reference of references) {
    await new Store().removeImage(reference, flags.platform ? { platform: flags.platform } : {});
    cli.out(`removed ${reference}`);
  }
  return 0;
}

export async function pruneCommand(cli: Cli, flags: { json?: boolean }): Promise<number> {
  const result = await new Store().prune({ signal: cli.signal });
  if (flags.json) json(cli, result);
  else
    cli.out(
      `removed ${result.removedBlobs.length} blobs and ${result.removedRootfs} root filesystems, freed ${bytes(result.freedBytes)}`,
    );
  return 0;
}

export async function snapshotsCommand(cli: Cli, flags: { json?: boolean }): Promise<number> {
  const list = await new Store().snapshots();
  if (flags.json) {
    json(cli, list);
    return 0;
  }
  table(
    cli,
    ["NAME", "IMAGE", "MEMORY", "VCPUS", "SIZE", "CREATED"],
    list.map((s) => [
      s.name,
      s.manifest?.reference || "-",
      s.manifest ? `${s.manifest.memoryMiB} MiB` : "-",
      s.manifest ? String(s.manifest.vcpus) : "-",
      bytes(s.sizeBytes),
      s.manifest ? ago(s.manifest.createdAt) : `unusable: ${s.error ?? "?"}`,
    ]),
  );
  return 0;
}

export async function snapshotRmCommand(
  cli: Cli,
  names: readonly string[],
  flags: { force?: boolean },
): Promise<number> {
  for (const name of names) {
    await new Store().removeSnapshot(name, { force: flags.force === true });
    cli.out(`removed ${name}`);
  }
  return 0;
}

/** True when a baked snapshot of that name is in the store. */
export async function snapshotExists(name: string): Promise<boolean> {
  if (!/^[A-Za-z0-9][A-Za-z0-9_.-]*$/.test(name)) return false;
  return (await new Store().snapshots()).some((s) => s.name === name);
}
