/**
 * `supermachine/client`: the library's API over the wire, against `supermachine serve`
 * (docs/server-api.md). It carries no VM code: a client install needs no QEMU.
 */

export * from "../errors.ts";
export { RemoteExecBuilder, RemoteExecHandle } from "./exec.ts";
export { RemoteFileSystem } from "./fs.ts";
export { RemoteImage, RemoteImageBuilder, type RemoteSnapshot, type RemoteStartConfig } from "./image.ts";
export { RemotePool, RemotePoolBuilder } from "./pool.ts";
export type { ConnectOptions, RemoteImages, RemoteStore } from "./remote.ts";
export { connect, Remote } from "./remote.ts";
export { RemotePooledVm, RemoteVm } from "./vm.ts";
