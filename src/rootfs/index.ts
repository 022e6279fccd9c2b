/**
 * Root filesystems: layers applied to a model of the tree (whiteouts, links, ownership, hostile
 * input refused) and written by our own ext4 writer; directory trees made into images; the cache
 * of both under the data dir. See docs/rootfs.md.
 */

export type { RootfsLimits } from "./apply-layer.ts";
export {
  type BuildImageFromDirectoryOptions,
  buildImageFromDirectory,
  type FlattenLayersOptions,
  flattenLayers,
  type ImageOptions,
  type LayerSource,
  ROOTFS_FORMAT_VERSION,
  ROOTFS_LABEL,
  type RootfsImage,
  type RootfsProgress,
} from "./build.ts";
export {
  type CachedRootfs,
  fingerprintTree,
  flattenedImageRootfs,
  imageRootfsPath,
  pruneRootfsCache,
  resolveRootfs,
} from "./cache.ts";
export type { TarEntry, TarEntryType, TarLimits } from "./tar-reader.ts";
