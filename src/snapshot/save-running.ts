/** `vm.snapshot(dir)`: save a running VM as a snapshot and keep it running. */

import { SupermachineError } from "../errors.ts";
import type { ExecDefaults } from "../vm/exec-builder.ts";
import type { LaunchMachineSpec, QemuProcess } from "../vmm/qemu-process.ts";
import type { Snapshot } from "./snapshot.ts";

export interface RunningVmParts {
  qemu: QemuProcess;
  machine: LaunchMachineSpec;
  overlayPath: string;
  source: Snapshot | undefined;
  defaults: ExecDefaults;
}

export async function saveRunningVm(
  _vm: RunningVmParts,
  _dir: string,
  _options: { name?: string; signal?: AbortSignal },
): Promise<Snapshot> {
  throw new SupermachineError("INVALID_ARGUMENT", "not available");
}
