import { Image, type ImagePullOptions, Store } from "../index.ts";
import { formatOptions, type OptionSpec, parseArgs, usage } from "./args.ts";
import type { Cli } from "./cli.ts";
import { bytes, ProgressDisplay } from "./progress.ts";

/** Options shared by every command that may pull. */
export const PULL_OPTIONS: readonly OptionSpec[] = [
  {
    name: "platform",
    kind: "string",
    value: "OS/ARCH[/VARIANT]",
    help: "platform to pull (default linux/amd64)",
  },
  {
    name: "insecure-registry",
    kind: "multi",
    value: "HOST[:PORT]",
    help: "registry reachable over plain HTTP (loopback always is; repeatable)",
  },
];

const QUIET: OptionSpec = { name: "quiet", short: "q", kind: "boolean", help: "no progress display" };
const JSON_OPTION: OptionSpec = { name: "json", kind: "boolean", help: "print JSON for scripts" };
const HELP_OPTION: OptionSpec = { name: "help", short: "h", kind: "boolean", help: "show this help" };

/** Pull options from parsed command-line options. */
export function pullOptions(
  options: Record<string, unknown>,
  cli: Cli,
  display: ProgressDisplay,
): ImagePullOptions {
  return {
    ...(options.platform ? { platform: options.platform as string } : {}),
    ...(options["insecure-registry"] ? { insecureRegistries: options["insecure-registry"] as string[] } : {}),
    signal: cli.signal,
    onProgress: display.pull,
    onRootfsProgress: display.rootfs,
  };
}

const PULL_SPECS = [
  ...PULL_OPTIONS,
  {
    name: "name",
    kind: "string",
    value: "NAME",
    help: "also bake a snapshot named NAME (for fast restores)",
  },
  {
    name: "memory",
    short: "m",
    kind: "string",
    value: "MiB",
    help: "guest memory of the snapshot (default 512)",
  },
  { name: "vcpus", kind: "string", value: "N", help: "vCPUs of the snapshot (default 1)" },
  QUIET,
  JSON_OPTION,
  HELP_OPTION,
] as const satisfies readonly OptionSpec[];
export const PULL_HELP = `Usage: supermachine pull [OPTIONS] REFERENCE

Pull an image into the local store and flatten it into a root filesystem. REFERENCE is a registry
reference (alpine, localhost:5000/app:1, registry/x@sha256:…), oci:DIR[:TAG] or
docker-archive:FILE[:NAME:TAG]. With --name, also boot it, start its Entrypoint + Cmd in the
background and bake a snapshot: 'supermachine run NAME' then restores from it in a fraction of a
boot. The same inputs reuse the stored snapshot.

${formatOptions(PULL_SPECS)}`;

export async function pullCommand(cli: Cli, argv: readonly string[]): Promise<number> {
  const { options, positionals } = parseArgs(argv, PULL_SPECS);
  if (options.help) {
    cli.out(PULL_HELP);
    return 0;
  }
  if (positionals.length !== 1)
    throw usage("pull needs exactly one REFERENCE (see supermachine pull --help)");
  const display = new ProgressDisplay(
    process.stderr,
    !options.quiet && !options.json && process.stderr.isTTY === true,
  );
  const pull = { ...pullOptions(options, cli, display), pullPolicy: "always" as const };
  const name = options.name as string | undefined;
  if (name === undefined && (options.memory !== undefined || options.vcpus !== undefined)) {
    throw usage("--memory and --vcpus describe a snapshot: give --name too");
  }
  let image: Image;
  if (name === undefined) {
    image = await Image.pull(positionals[0]!, pull);
  } else {
    const builder = Image.builder(positionals[0]!).name(name).pullOptions(pull).signal(cli.signal);
    const memory = positiveInt(options.memory, "memory");
    const vcpus = positiveInt(options.vcpus, "vcpus");
    if (memory !== undefined) builder.memoryMiB(memory);
    if (vcpus !== undefined) builder.vcpus(vcpus);
    image = await builder.build();
  }
  display.finish();
  const snapshot = image.snapshot?.manifest.name;
  if (options.json) {
    cli.out(
      JSON.stringify({
        reference: image.reference,
        digest: image.digest,
        platform: image.platform,
        rootfs: image.rootfsPath,
        ...(snapshot === undefined ? {} : { snapshot, snapshotDir: image.snapshot?.dir }),
      }),
    );
  } else if (snapshot === undefined) {
    cli.out(`${image.reference}@${image.digest}`);
  } else {
    cli.out(`${snapshot}: snapshot of ${image.reference}@${image.digest}`);
  }
  return 0;
}

const IMAGES_SPECS = [JSON_OPTION, HELP_OPTION];
export const IMAGES_HELP = `Usage: supermachine images [--json]

List the images in the local store.

${formatOptions(IMAGES_SPECS)}`;

export async function imagesCommand(cli: Cli, argv: readonly string[]): Promise<number> {
  const { options, positionals } = parseArgs(argv, IMAGES_SPECS);
  if (options.help) {
    cli.out(IMAGES_HELP);
    return 0;
  }
  if (positionals.length > 0) throw usage("images takes no arguments");
  const records = await new Store().images();
  if (options.json) {
    cli.out(JSON.stringify(records, null, 2));
    return 0;
  }
  const rows = records.map((r) => [
    r.reference,
    r.manifestDigest.replace(/^sha256:/, "").slice(0, 12),
    r.platform,
    bytes(r.sizeBytes),
    r.pulledAt,
  ]);
  table(cli, ["REFERENCE", "DIGEST", "PLATFORM", "SIZE", "PULLED"], rows);
  return 0;
}

function table(cli: Cli, header: string[], rows: string[][]): void {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i]!.length)));
  for (const row of [header, ...rows]) {
    cli.out(
      row
        .map((c, i) => c.padEnd(widths[i]!))
        .join("  ")
        .trimEnd(),
    );
  }
}

/** A positive integer option, or undefined when absent. */
export function positiveInt(value: unknown, name: string): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n <= 0)
    throw usage(`--${name} expects a positive integer, got ${String(value)}`);
  return n;
}

const RMI_SPECS = [
  { name: "platform", kind: "string", value: "OS/ARCH", help: "remove only this platform" } as const,
  HELP_OPTION,
];
export const RMI_HELP = `Usage: supermachine rmi REFERENCE...

Remove images from the local store (their blobs go with the next prune).

${formatOptions(RMI_SPECS)}`;

export async function rmiCommand(cli: Cli, argv: readonly string[]): Promise<number> {
  const { options, positionals } = parseArgs(argv, RMI_SPECS);
  if (options.help) {
    cli.out(RMI_HELP);
    return 0;
  }
  if (positionals.length === 0) throw usage("rmi needs at least one REFERENCE");
  for (const reference of positionals) {
    await new Store().removeImage(
      reference,
      options.platform ? { platform: options.platform as string } : {},
    );
    cli.out(`removed ${reference}`);
  }
  return 0;
}

const SNAPSHOTS_SPECS = [JSON_OPTION, HELP_OPTION];
export const SNAPSHOTS_HELP = `Usage: supermachine snapshots [--json]

List the baked snapshots.

${formatOptions(SNAPSHOTS_SPECS)}`;

export async function snapshotsCommand(cli: Cli, argv: readonly string[]): Promise<number> {
  const { options, positionals } = parseArgs(argv, SNAPSHOTS_SPECS);
  if (options.help) {
    cli.out(SNAPSHOTS_HELP);
    return 0;
  }
  if (positionals.length > 0) throw usage("snapshots takes no arguments");
  const list = await new Store().snapshots();
  if (options.json) {
    cli.out(JSON.stringify(list, null, 2));
    return 0;
  }
  const rows = list.map((s) => [
    s.name,
    s.manifest?.reference || "-",
    s.manifest ? `${s.manifest.memoryMiB} MiB` : "-",
    s.manifest ? String(s.manifest.vcpus) : "-",
    bytes(s.sizeBytes),
    s.manifest?.createdAt ?? `unusable: ${s.error ?? "?"}`,
  ]);
  table(cli, ["NAME", "IMAGE", "MEMORY", "VCPUS", "SIZE", "CREATED"], rows);
  return 0;
}

const RM_SPECS = [
  { name: "force", short: "f", kind: "boolean", help: "remove even when other snapshots are layered on it" },
  HELP_OPTION,
] as const satisfies readonly OptionSpec[];
export const RM_HELP = `Usage: supermachine rm [--force] NAME...

Remove baked snapshots. Running VMs restored from them are not affected.

${formatOptions(RM_SPECS)}`;

export async function rmCommand(cli: Cli, argv: readonly string[]): Promise<number> {
  const { options, positionals } = parseArgs(argv, RM_SPECS);
  if (options.help) {
    cli.out(RM_HELP);
    return 0;
  }
  if (positionals.length === 0) throw usage("rm needs at least one snapshot NAME");
  for (const name of positionals) {
    await new Store().removeSnapshot(name, { force: options.force === true });
    cli.out(`removed ${name}`);
  }
  return 0;
}

const PRUNE_SPECS = [JSON_OPTION, HELP_OPTION];
export const PRUNE_HELP = `Usage: supermachine prune [--json]

Delete blobs and root filesystems that no stored image uses.

${formatOptions(PRUNE_SPECS)}`;

export async function pruneCommand(cli: Cli, argv: readonly string[]): Promise<number> {
  const { options, positionals } = parseArgs(argv, PRUNE_SPECS);
  if (options.help) {
    cli.out(PRUNE_HELP);
    return 0;
  }
  if (positionals.length > 0) throw usage("prune takes no arguments");
  const result = await new Store().prune({ signal: cli.signal });
  if (options.json) cli.out(JSON.stringify(result));
  else
    cli.out(
      `removed ${result.removedBlobs.length} blobs and ${result.removedRootfs} root filesystems, freed ${bytes(result.freedBytes)}`,
    );
  return 0;
}
