/** A guest that lies on the agent channel gets a typed error, never a host crash or hang. */
import assert from "node:assert/strict";
import { Vm, VmError } from "../../src/index.ts";
import { hostileInitramfs, type Lie } from "../helpers/hostile-initramfs.ts";
import { busyboxRootfs, vmTest } from "../helpers/vm.ts";

for (const lie of ["garbage", "oversized-frame", "bad-hello"] as Lie[]) {
  vmTest(`a guest that sends ${lie} fails the start with AGENT_PROTOCOL`, async () => {
    const initramfs = await hostileInitramfs(lie);
    const started = Date.now();
    await assert.rejects(
      Vm.start({
        rootfs: await busyboxRootfs(),
        memoryMiB: 128,
        assets: { initramfs },
        bootTimeoutMs: 60_000,
      }),
      (error: unknown) => {
        assert.ok(error instanceof VmError, String(error));
        assert.equal(error.code, "AGENT_PROTOCOL");
        return true;
      },
    );
    assert.ok(Date.now() - started < 60_000, "the host noticed the lie before the boot timeout");
  });
}
