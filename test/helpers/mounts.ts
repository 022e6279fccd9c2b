/**
 * A host directory mounted through a MountChannel and served by serve9p: the composition of the
 * two leaves (src/agent and src/ninep may not import each other) that src/vm makes for users.
 */
import type { MountChannel, MountHandle } from "../../src/agent/mount-channel.ts";
import type { MountCacheMode } from "../../src/agent/mount-messages.ts";
import { type MountOwner, type NinepServer, type SymlinkPolicy, serve9p } from "../../src/ninep/index.ts";

export interface DirMount {
  hostPath: string;
  guestPath: string;
  readOnly?: boolean;
  symlinks?: SymlinkPolicy;
  owner?: MountOwner;
  msizeBytes?: number;
  cache?: MountCacheMode;
  maxFids?: number;
  timeoutMs?: number;
  signal?: AbortSignal;
}

export function mountDir(channel: MountChannel, m: DirMount): Promise<MountHandle<NinepServer>> {
  return channel.mount({
    guestPath: m.guestPath,
    ...(m.readOnly === undefined ? {} : { readOnly: m.readOnly }),
    ...(m.msizeBytes === undefined ? {} : { msizeBytes: m.msizeBytes }),
    ...(m.cache === undefined ? {} : { cache: m.cache }),
    ...(m.timeoutMs === undefined ? {} : { timeoutMs: m.timeoutMs }),
    ...(m.signal === undefined ? {} : { signal: m.signal }),
    serve: (stream, { guestPath, msizeBytes }) =>
      serve9p(stream, {
        root: m.hostPath,
        label: guestPath,
        maxMsize: msizeBytes,
        ...(m.readOnly === undefined ? {} : { readOnly: m.readOnly }),
        ...(m.symlinks === undefined ? {} : { symlinks: m.symlinks }),
        ...(m.owner === undefined ? {} : { owner: m.owner }),
        ...(m.maxFids === undefined ? {} : { maxFids: m.maxFids }),
      }),
  });
}
