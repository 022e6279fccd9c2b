import { mkdtemp, readFile, readlink, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Vm } from "supermachine";

const rootfs = process.argv[2] ?? "./rootfs";
const project = await mkdtemp(join(tmpdir(), "project-"));
try {
  await writeFile(join(project, "input.txt"), "from the host\n");

  // Files the guest creates belong to you; when you run as root, to `owner` (root only if you say so).
  const owner = process.getuid?.() === 0 ? { owner: { uid: 65534, gid: 65534 } } : {};

  // The host directory is live in the guest at /work: no copy, no sync step.
  await using vm = await Vm.start({
    rootfs,
    memoryMiB: 256,
    mounts: [{ hostPath: project, guestPath: "/work", symlinks: "opaque", ...owner }],
  });
  await vm.exec(["sh", "-c", "cat /work/input.txt > /work/output.txt; ln -s /etc/passwd /work/escape"]);
  console.log((await readFile(join(project, "output.txt"), "utf8")).trim()); // from the host

  // A symlink the guest made is stored as it is, and never followed (policy "opaque").
  console.log(await readlink(join(project, "escape"))); // /etc/passwd

  // Mounts attach and detach at run time too.
  await vm.unmount("/work");
  await vm.mount({ hostPath: project, guestPath: "/data", readOnly: true, ...owner });
  const denied = await vm.exec(["sh", "-c", "touch /data/x"], { reject: false });
  console.log(denied.stderrText.includes("Read-only file system")); // true
} finally {
  // The VM has stopped here (`await using` ends with the block): remove the host directory.
  await rm(project, { recursive: true, force: true });
}
