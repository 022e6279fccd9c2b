/**
 * Initramfs images whose /init is NOT the supermachine agent but a busybox script that lies to
 * the host over the agent channel: the host must fail with a typed error and carry on.
 */
import { execFile } from "node:child_process";
import { chmod, copyFile, mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { scratchDir } from "./scratch.ts";

const run = promisify(execFile);

/** A busybox /init prologue that sets `$port` to the guest's device of the `sm.agent` port. */
export const FIND_PORT = `#!/bin/busybox sh
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox mount -t sysfs sys /sys
port=""
while [ -z "$port" ]; do
  for p in /sys/class/virtio-ports/*; do
    [ "$(/bin/busybox cat "$p/name" 2>/dev/null)" = sm.agent ] && port=/dev/\${p##*/}
  done
done
while [ ! -e "$port" ]; do :; done
`;

/** What the fake agent sends. */
export type Lie = "garbage" | "oversized-frame" | "bad-hello";

const BODIES: Record<Lie, string> = {
  // Random bytes forever.
  garbage: `/bin/busybox cat /dev/urandom > "$port"\n`,
  // A header announcing a 4 GiB payload.
  "oversized-frame": `/bin/busybox printf '\\377\\377\\377\\377\\000\\000\\000\\000\\001\\000' > "$port"\n/bin/busybox cat /dev/zero > "$port"\n`,
  // A well-formed header of an unknown type on stream 0.
  "bad-hello": `/bin/busybox printf '\\000\\000\\000\\000\\000\\000\\000\\000\\177\\000' > "$port"\n/bin/busybox sleep 1000\n`,
};

/** Builds (in a temp dir removed after the test file) an initramfs whose init tells `lie`. */
export async function hostileInitramfs(lie: Lie): Promise<string> {
  return busyboxInitramfs(`${FIND_PORT}${BODIES[lie]}`, await scratchDir("sm-hostile-"));
}

/** Builds, in `dir`, an initramfs of busybox-static whose /init is `script`. */
export async function busyboxInitramfs(script: string, dir: string): Promise<string> {
  const tree = join(dir, "tree");
  await mkdir(join(tree, "bin"), { recursive: true });
  await mkdir(join(tree, "dev"));
  await mkdir(join(tree, "sys"));
  await copyFile("/bin/busybox", join(tree, "bin", "busybox"));
  await writeFile(join(tree, "init"), script);
  await chmod(join(tree, "init"), 0o755);
  const out = join(dir, "initramfs.cpio");
  await run("sh", ["-c", `cd "${tree}" && find . | sort | cpio -o -H newc --quiet > "${out}"`]);
  return out;
}
