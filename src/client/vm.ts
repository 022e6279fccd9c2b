/**
 * VMs on a server: `RemoteVm` (the library's `Vm` surface: exec, spawn, execBuilder, fs, files,
 * connect, exposeTcp, ping, stop, kill) and `RemotePooledVm` (a lease: the same, plus release and
 * discard). Each stays on the server that holds it; when that server cannot be reached, its
 * calls reject with `SERVER_UNAVAILABLE`.
 */

import type { Duplex } from "node:stream";
import { type ExecOutcome, VmError } from "../errors.ts";
import type {
  ConnectTcpOptions,
  ExecOptions,
  ExposedPort,
  ExposeTcpOptions,
  GuestFileStream,
  VmState,
  VmTimings,
  WriteFileOptions,
  WriteFileSource,
} from "../index.ts";
import { exposeTcp } from "../internal/index.ts";
import type { WireVm } from "../wire/index.ts";
import type { Endpoint } from "./endpoint.ts";
import {
  type ExecSite,
  execBuilder,
  type RemoteExecBuilder,
  type RemoteExecHandle,
  runExec,
  spawnExec,
} from "./exec.ts";
import { type RemoteFileSystem, readFileBytes, readFileStream, remoteFileSystem, writeFile } from "./fs.ts";
import { connectTcp } from "./ports.ts";

let makeVm: (endpoint: Endpoint, info: WireVm, onEnd: () => void) => RemoteVm;

/** Internal: the client's object for a VM a server holds. */
export function remoteVm(endpoint: Endpoint, info: WireVm, onEnd: () => void = () => {}): RemoteVm {
  return makeVm(endpoint, info, onEnd);
}

/** A VM on a server: the library's `Vm` methods, over the wire. End it with `stop()`, `kill()` or `await using`. */
export class RemoteVm {
  readonly id: string;
  readonly accelerator: "kvm" | "tcg";
  readonly timings: VmTimings;
  /** The guest's files, like `node:fs/promises`. */
  readonly fs: RemoteFileSystem;
  /** The server holding this VM. */
  readonly endpoint: string;
  readonly #site: ExecSite;
  readonly #ports = new Set<ExposedPort>();
  readonly #onEnd: () => void;
  #state: VmState = "running";
  #stopping: Promise<void> | undefined;

  static {
    makeVm = (endpoint, info, onEnd) => new RemoteVm(endpoint, info, onEnd);
  }

  private constructor(endpoint: Endpoint, info: WireVm, onEnd: () => void) {
    this.id = info.id;
    this.accelerator = info.accelerator;
    this.timings = info.timings;
    this.endpoint = endpoint.url;
    this.#onEnd = onEnd;
    const path = `/v1/vms/${encodeURIComponent(info.id)}`;
    this.#site = {
      endpoint,
      path,
      vmId: info.id,
      describe: () => `VM ${info.id} on ${endpoint.url}`,
      check: () => {
        if (this.#state === "stopped")
          throw new VmError("VM_STOPPED", `VM ${info.id} on ${endpoint.url} is stopped`);
      },
    };
    this.fs = remoteFileSystem(this.#site);
  }

  /** `running` until this client stopped it. */
  get state(): VmState {
    return this.#state;
  }

  execBuilder(): RemoteExecBuilder {
    return execBuilder(this.#site);
  }

  exec(argv: readonly string[], options: ExecOptions = {}): Promise<ExecOutcome> {
    return runExec(this.#site, argv, options);
  }

  spawn(argv: readonly string[], options: ExecOptions = {}): Promise<RemoteExecHandle> {
    return spawnExec(this.#site, argv, options);
  }

  writeFile(path: string, data: WriteFileSource, options: WriteFileOptions = {}): Promise<void> {
    return writeFile(this.#site, path, data, options);
  }

  readFile(path: string, options: { signal?: AbortSignal } = {}): Promise<Uint8Array> {
    return readFileBytes(this.#site, path, options);
  }

  readFileStream(path: string, options: { signal?: AbortSignal } = {}): Promise<GuestFileStream> {
    return readFileStream(this.#site, path, options);
  }

  /** Round trip from the server to the guest agent, in milliseconds. */
  async ping(): Promise<number> {
    this.#site.check?.();
    return (await this.#site.endpoint.json<{ ms: number }>("POST", `${this.#site.path}/ping`)).ms;
  }

  /** A connection to `port` inside the guest, through the server. */
  connect(port: number, options: ConnectTcpOptions = {}): Promise<Duplex> {
    return connectTcp(this.#site, port, options);
  }

  /** Listens on this host and carries every connection to `guestPort` in the guest, through the server. */
  async exposeTcp(hostPort: number, guestPort: number, options: ExposeTcpOptions = {}): Promise<ExposedPort> {
    const exposed = await exposeTcp((port) => this.connect(port), hostPort, guestPort, options);
    this.#ports.add(exposed);
    const close = exposed.close;
    exposed.close = () => {
      this.#ports.delete(exposed);
      return close();
    };
    return exposed;
  }

  /** Stop the VM on its server. Idempotent. */
  stop(): Promise<void> {
    this.#stopping ??= this.#end({});
    return this.#stopping;
  }

  /** Kill the VM on its server now. Idempotent. */
  kill(): Promise<void> {
    this.#stopping ??= this.#end({ kill: 1 });
    return this.#stopping;
  }

  /** Internal: how a lease ends (release or discard). */
  end(query: Record<string, number>): Promise<void> {
    this.#stopping ??= this.#end(query);
    return this.#stopping;
  }

  async #end(query: Record<string, number>): Promise<void> {
    this.#state = "stopped";
    for (const port of [...this.#ports]) void port.close();
    this.#onEnd();
    await this.#site.endpoint.request("DELETE", this.#site.path, { query }).catch((error: unknown) => {
      // Gone already (stopped by the server's idle timeout, or the server is gone): nothing to stop.
      if ((error as { code?: string }).code === "NOT_FOUND") return;
      throw error;
    });
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop();
  }
}

let makeLease: (vm: RemoteVm, acquireMs: number) => RemotePooledVm;

/** Internal: a lease of `vm`. */
export function remoteLease(vm: RemoteVm, acquireMs: number): RemotePooledVm {
  return makeLease(vm, acquireMs);
}

/** A VM acquired from a pool on a server: the library's `PooledVm`. Give it back with `release()` or `await using`. */
export class RemotePooledVm {
  readonly id: string;
  /** Milliseconds the server's `acquire()` waited for this VM. */
  readonly acquireMs: number;
  readonly #vm: RemoteVm;
  #returned: Promise<void> | undefined;

  static {
    makeLease = (vm, acquireMs) => new RemotePooledVm(vm, acquireMs);
  }

  private constructor(vm: RemoteVm, acquireMs: number) {
    this.#vm = vm;
    this.id = vm.id;
    this.acquireMs = acquireMs;
  }

  /** The VM. Throws `VM_STOPPED` once the lease was released or discarded. */
  get vm(): RemoteVm {
    if (this.#returned !== undefined) {
      throw new VmError("VM_STOPPED", `VM ${this.id} was returned to its pool: acquire another one`);
    }
    return this.#vm;
  }

  get released(): boolean {
    return this.#returned !== undefined;
  }

  exec(argv: readonly string[], options: ExecOptions = {}): Promise<ExecOutcome> {
    return this.vm.exec(argv, options);
  }

  spawn(argv: readonly string[], options: ExecOptions = {}): Promise<RemoteExecHandle> {
    return this.vm.spawn(argv, options);
  }

  execBuilder(): RemoteExecBuilder {
    return this.vm.execBuilder();
  }

  writeFile(path: string, data: WriteFileSource, options: WriteFileOptions = {}): Promise<void> {
    return this.vm.writeFile(path, data, options);
  }

  readFile(path: string, options: { signal?: AbortSignal } = {}): Promise<Uint8Array> {
    return this.vm.readFile(path, options);
  }

  /** Give the VM back to its pool. Idempotent. */
  release(): Promise<void> {
    this.#returned ??= this.#vm.end({});
    return this.#returned;
  }

  /** Throw the VM away (never handed out again). */
  discard(): Promise<void> {
    this.#returned ??= this.#vm.end({ discard: 1 });
    return this.#returned;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.release();
  }
}
