/**
 * The snapshot format: a dir with `manifest.json`, guest memory, device state and disk state;
 * opening one (checked against this host before anything starts); the snapshot store. Making
 * snapshots is the VM's business (`vm.snapshot()`, and the image's bake).
 */

export { cachedFileDigest, type HostFacts, hostFacts } from "./host-facts.ts";
export {
  type BackingFileEntry,
  buildManifest,
  type ImageIdentity,
  type ManifestInput,
  parseManifest,
  SNAPSHOT_FILES,
  SNAPSHOT_FORMAT_VERSION,
  type SnapshotFileEntry,
  type SnapshotManifest,
  type SnapshotNetwork,
  sha256File,
  writeManifest,
} from "./manifest.ts";
export { qcow2BackingFile, Snapshot, type SnapshotOpenOptions, snapshotNameOf } from "./snapshot.ts";
export {
  assertSnapshotName,
  defaultSnapshotName,
  listSnapshots,
  moveSnapshotIntoPlace,
  removeSnapshot,
  type SnapshotInfo,
  snapshotBackingFiles,
  snapshotDirOf,
  snapshotsRoot,
  snapshotTempName,
  sweepSnapshotTemps,
} from "./store.ts";
