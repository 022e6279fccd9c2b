import { hostReport, Vm } from "supermachine";

const rootfs = process.argv[2] ?? "./rootfs"; // a directory tree or an ext4 image

// What this host offers: KVM or TCG (and why), QEMU, the guest assets, the dirs.
const report = await hostReport();
console.log(`accelerator: ${report.accelerator.accel}`);

// Boot the root filesystem, run a command, stop the VM at the end of the block.
await using vm = await Vm.start({ rootfs, memoryMiB: 256 });
const out = await vm.exec(["uname", "-sr"]);
console.log(out.stdoutText.trim()); // Linux 6.1.…
