/**
 * The QemuProcess behind a Vm, for tests that need what the Vm API does not offer yet (the
 * mounts port). It wraps `QemuProcess.launch` to remember every process this test process starts,
 * by VM id (a Vm's id is its QEMU's).
 * TODO(lead): replace with a test-only accessor once src/vm exposes one.
 */
import type { Vm } from "../../src/index.ts";
import { QemuProcess } from "../../src/vmm/index.ts";

const byId = new Map<string, QemuProcess>();
const launch = QemuProcess.launch.bind(QemuProcess);
QemuProcess.launch = async (options) => {
  const qemu = await launch(options);
  byId.set(qemu.id, qemu);
  void qemu.exited.then(() => byId.delete(qemu.id));
  return qemu;
};

/** The QEMU process of `vm` (started by this test process). */
export function qemuOf(vm: Vm): QemuProcess {
  const qemu = byId.get(vm.id);
  if (qemu === undefined) throw new Error(`no QEMU process recorded for VM ${vm.id}`);
  return qemu;
}
