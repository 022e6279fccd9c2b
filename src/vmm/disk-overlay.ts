import { execFile } from "node:child_process";
import { chmod, mkdir, mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises";
import { join, resolve } from "node:path";
import { promisify } from "node:util";
import { SupermachineError, VmError } from "../errors.ts";
import { runtimeDir, throwIfAborted } from "../internal/index.ts";

const run = promisify(execFile);

/**
 * Creates a qcow2 overlay at `overlayPath` whose backing file is `basePath`, so a VM writes to its
 * own overlay and never to the shared base image (or snapshot disk state). The overlay is 0600.
 */
async function createDiskOverlay(
  basePath: string,
  overlayPath: string,
  opts: { baseFormat: "raw" | "qcow2"; signal?: AbortSignal | undefined },
): Promise<void> {
  const qemuImg = process.env.SUPERMACHINE_QEMU_IMG || "qemu-img";
  try {
    await run(
      qemuImg,
      ["create", "-q", "-f", "qcow2", "-F", opts.baseFormat, "-b", resolve(basePath), overlayPath],
      { signal: opts.signal },
    );
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === "ENOENT") {
      throw new SupermachineError(
        "QEMU_NOT_FOUND",
        "qemu-img not found: install qemu-utils (apt-get install qemu-utils) or set SUPERMACHINE_QEMU_IMG",
        { cause: error },
      );
    }
    if (code === "ABORT_ERR") throw error;
    throw new VmError(
      "VMM_FAILED",
      `qemu-img could not create a disk overlay on ${basePath}`,
      {},
      { cause: error },
    );
  }
  await chmod(overlayPath, 0o600);
}

/**
 * Overlays on one base, made fast: the first {@link create} makes a template overlay with
 * `qemu-img` (~100 ms); every overlay after that is a copy of the template's bytes (~0.5 ms).
 * Restores of one snapshot share one template.
 */
export class OverlayTemplate {
  readonly basePath: string;
  readonly #baseFormat: "raw" | "qcow2";
  #template: Promise<Buffer> | undefined;

  constructor(basePath: string, baseFormat: "raw" | "qcow2") {
    this.basePath = basePath;
    this.#baseFormat = baseFormat;
  }

  /** A new overlay at `path` (which must not exist), mode 0600. */
  async create(path: string): Promise<void> {
    this.#template ??= this.#make();
    this.#template.catch(() => {
      this.#template = undefined;
    });
    await writeFile(path, await this.#template, { flag: "wx", mode: 0o600 });
  }

  async #make(): Promise<Buffer> {
    const root = runtimeDir();
    await mkdir(root, { recursive: true, mode: 0o700 });
    const tmp = await mkdtemp(join(root, "overlay-template-"));
    try {
      const file = join(tmp, "overlay.qcow2");
      await createDiskOverlay(this.basePath, file, { baseFormat: this.#baseFormat });
      return await readFile(file);
    } finally {
      await rm(tmp, { recursive: true, force: true });
    }
  }
}

/** How many bases {@link createBootOverlay} keeps a template for (~200 KB each). */
const BOOT_TEMPLATES = 16;
const bootTemplates = new Map<string, OverlayTemplate>();

/**
 * A boot's overlay on a raw root filesystem image: a copy of a template made once per base file
 * as it is now (its device, inode, size and mtime), so the boots after the first of an image run
 * no `qemu-img`; a base rewritten in place gets a template of its own. The latest
 * {@link BOOT_TEMPLATES} bases are kept.
 */
export async function createBootOverlay(
  basePath: string,
  overlayPath: string,
  signal?: AbortSignal,
): Promise<void> {
  const info = await stat(basePath);
  const key = `${resolve(basePath)}\0${info.dev}:${info.ino}:${info.size}:${info.mtimeMs}`;
  let template = bootTemplates.get(key);
  if (template === undefined) {
    template = new OverlayTemplate(basePath, "raw");
    bootTemplates.set(key, template);
    if (bootTemplates.size > BOOT_TEMPLATES) bootTemplates.delete(bootTemplates.keys().next().value!);
  }
  throwIfAborted(signal, "VM start");
  await template.create(overlayPath);
}
