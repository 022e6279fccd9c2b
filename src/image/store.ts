/**
 * The local store, administered in one place: pulled images (blobs, manifests, configs), their
 * flattened root filesystems, and baked snapshots, all under the data dir.
 */

import { dataDir, typedErrors } from "../internal/index.ts";
import { type ImageRecord, listImages, type PruneResult, pruneImages, removeImage } from "../oci/index.ts";
import { listSnapshots, removeSnapshot, type SnapshotInfo, snapshotBackingFiles } from "../snapshot/index.ts";
import { imageRootfsPath, pruneRootfsCache } from "../vm/index.ts";

/** What {@link Store.prune} removed. */
export interface StorePruneResult extends PruneResult {
  /** Cached root filesystems removed (of images no longer stored, and of directory trees). */
  removedRootfs: number;
}

/**
 * The local store of images and snapshots (`SUPERMACHINE_DATA_DIR`, else
 * `$XDG_DATA_HOME/supermachine`, else `~/.local/share/supermachine`).
 *
 * ```ts
 * const store = new Store();
 * for (const image of await store.images()) console.log(image.reference);
 * await store.prune();
 * ```
 */
export class Store {
  /** The data dir this store lives in. */
  readonly dataDir: string;

  constructor(options: { dataDir?: string } = {}) {
    this.dataDir = options.dataDir ?? dataDir();
  }

  /** The images in the store. */
  images(): Promise<ImageRecord[]> {
    return typedErrors("STORE_ERROR", "listing images", () => listImages({ dataDir: this.dataDir }));
  }

  /**
   * Forget a stored image (every platform unless one is given) and its flattened root filesystem.
   * Its blobs stay until {@link prune}. Throws `IMAGE_NOT_FOUND` when nothing matched.
   */
  removeImage(reference: string, options: { platform?: string } = {}): Promise<number> {
    return typedErrors("STORE_ERROR", `removing ${reference}`, async () => {
      const removed = await removeImage(reference, { ...options, dataDir: this.dataDir });
      await this.#pruneRootfs();
      return removed;
    });
  }

  /** Delete blobs and cached root filesystems that no stored image or snapshot uses any more. */
  prune(options: { signal?: AbortSignal } = {}): Promise<StorePruneResult> {
    return typedErrors("STORE_ERROR", "pruning the store", async () => {
      const result = await pruneImages({ ...options, dataDir: this.dataDir });
      const removedRootfs = await this.#pruneRootfs();
      return { ...result, removedRootfs };
    });
  }

  /** The snapshots in the store (`<dataDir>/snapshots`). */
  snapshots(): Promise<SnapshotInfo[]> {
    return typedErrors("STORE_ERROR", "listing snapshots", () => listSnapshots({ dataDir: this.dataDir }));
  }

  /**
   * Delete a stored snapshot by name. Refuses (`INVALID_ARGUMENT`) when another stored snapshot is
   * layered on it, unless `force`. Running VMs restored from it are not affected.
   */
  removeSnapshot(name: string, options: { force?: boolean } = {}): Promise<void> {
    return typedErrors("STORE_ERROR", `removing snapshot ${name}`, () =>
      removeSnapshot(name, { ...options, dataDir: this.dataDir }),
    );
  }

  /** Removes cached root filesystems that no stored image or snapshot uses. */
  async #pruneRootfs(): Promise<number> {
    const keep = new Set(
      (await listImages({ dataDir: this.dataDir })).map((r) =>
        imageRootfsPath(r.manifestDigest, this.dataDir),
      ),
    );
    // Snapshots' disks are layered on cached root filesystems: those stay while a snapshot needs them.
    for (const path of await snapshotBackingFiles({ dataDir: this.dataDir })) keep.add(path);
    return pruneRootfsCache(keep, this.dataDir);
  }
}
