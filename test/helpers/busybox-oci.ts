/** The bundled busybox as a one-layer OCI layout (scripts/build-busybox-oci.sh), in `dir`. */
import { execFile } from "node:child_process";
import { promisify } from "node:util";

const run = promisify(execFile);
const root = new URL("../../", import.meta.url).pathname;

export async function busyboxOci(dir: string): Promise<string> {
  const { stdout } = await run("bash", [`${root}scripts/build-busybox-oci.sh`, dir]);
  return stdout.trim();
}
