/**
 * Shared setup of the integration tests that boot real VMs.
 *
 * `vmTest` wraps `node:test`'s `test`: it makes sure QEMU and the guest assets exist (with
 * CI=true their absence is a failure, elsewhere the test is skipped with the reason), and when the
 * test fails it prints the console logs of the VMs it started.
 */
import { execFile } from "node:child_process";
import { readFile } from "node:fs/promises";
import { after, before, it, type TestContext, test } from "node:test";
import { promisify } from "node:util";
import { resolveAssetPaths, Vm, type VmConfig } from "../../src/index.ts";
import { findQemu } from "../../src/vmm/accelerator.ts";

const run = promisify(execFile);
const root = new URL("../../", import.meta.url).pathname;

let prerequisites: Promise<string | undefined> | undefined;

/** Why VM tests cannot run here, or undefined when they can. */
export function missingVmPrerequisite(): Promise<string | undefined> {
  prerequisites ??= (async () => {
    try {
      await findQemu();
      await resolveAssetPaths();
      return undefined;
    } catch (error) {
      return (error as Error).message;
    }
  })();
  return prerequisites;
}

/**
 * Why VM tests must be skipped here, or undefined when they can run. With `CI=true` a missing
 * prerequisite is a failure instead (it throws): CI never skips a VM test.
 */
export async function vmSkipReason(): Promise<string | undefined> {
  const missing = await missingVmPrerequisite();
  if (missing !== undefined && process.env.CI === "true") throw new Error(`VM tests cannot run: ${missing}`);
  return missing;
}

let busybox: Promise<string> | undefined;

/** The bundled busybox root filesystem directory (built by scripts/build-busybox-rootfs.sh). */
export function busyboxRootfs(): Promise<string> {
  busybox ??= (async () => {
    const { stdout } = await run("bash", [`${root}scripts/busybox-rootfs-path.sh`]);
    const dir = stdout.trim();
    await run("bash", [`${root}scripts/build-busybox-rootfs.sh`, dir]);
    return dir;
  })();
  return busybox;
}

export interface VmTestContext {
  t: TestContext;
  /** Boots a VM on the busybox rootfs (unless `config.rootfs` says otherwise); stopped after the test. */
  start(config?: Partial<VmConfig>): Promise<Vm>;
}

/** A test that boots VMs. */
export function vmTest(
  name: string,
  fn: (ctx: VmTestContext) => Promise<void>,
  options: { timeout?: number } = {},
) {
  test(name, { timeout: options.timeout ?? 120_000 }, async (t) => {
    const missing = await vmSkipReason();
    if (missing !== undefined) {
      t.skip(missing);
      return;
    }
    const vms: Vm[] = [];
    const start = async (config: Partial<VmConfig> = {}) => {
      const vm = await Vm.start({ rootfs: await busyboxRootfs(), memoryMiB: 256, ...config });
      vms.push(vm);
      return vm;
    };
    let failed = true;
    try {
      await fn({ t, start });
      failed = false;
    } finally {
      if (failed) {
        for (const vm of vms) {
          const log = await readFile(vm.consoleLogPath, "utf8").catch(() => "(none)");
          t.diagnostic(`console log of VM ${vm.id} (${vm.consoleLogPath}), last 4 KiB:\n${log.slice(-4096)}`);
        }
      }
      await Promise.all(vms.map((vm) => vm.kill()));
    }
  });
}

/**
 * Cases of one `describe()` sharing one VM: `start` runs once before them when VM tests can run
 * here (with CI=true their absence fails the suite; elsewhere every case is skipped with the
 * reason); a failing case prints the VM's console log path; the VM is killed after the suite.
 */
export function sharedVm(start: () => Promise<Vm>): {
  it(name: string, fn: (vm: Vm) => Promise<void>): void;
  current(): Vm;
} {
  let vm: Vm | undefined;
  let skipReason: string | undefined;
  before(async () => {
    skipReason = await vmSkipReason();
    if (skipReason !== undefined) return;
    vm = await start();
  });
  after(async () => {
    await vm?.kill();
  });
  return {
    it(name, fn) {
      it(name, async (t) => {
        if (skipReason !== undefined) return t.skip(skipReason);
        try {
          await fn(vm!);
        } catch (error) {
          t.diagnostic(`console log: ${vm?.consoleLogPath}`);
          throw error;
        }
      });
    },
    current: () => vm!,
  };
}
