/** OCI images: references, registry pulls, local layouts and archives, the content store. */

export {
  BlobSizeError,
  BlobWriter,
  ContentStore,
  defaultDataDir,
  type ImageRecord,
  type ImageSource,
  type LayerRecord,
  type PruneResult,
} from "./content-store.ts";
export { isDigest, parseDigest } from "./digest.ts";
export {
  dockerConfigPath,
  loadDockerCredentials,
  type RegistryCredentials,
  registryKey,
} from "./docker-config.ts";
export {
  dockerCommand,
  EMPTY_IMAGE_CONFIG,
  type ImageConfig,
  imageExecDefaults,
  parseImageConfig,
} from "./image-config.ts";
export { MediaType } from "./media-types.ts";
export { DEFAULT_PLATFORM, formatPlatform, type Platform, parsePlatform } from "./platform.ts";
export { PULL_PROGRESS_CHANNEL, type PullProgress } from "./progress.ts";
export {
  listImages,
  type PulledImage,
  type PulledLayer,
  type PullOptions,
  pruneImages,
  pullImage,
  removeImage,
  resolveLocalImage,
  type StoreOptions,
} from "./pull.ts";
export { DEFAULT_REGISTRY, type ImageReference, parseReference } from "./reference.ts";
export { type CredentialsOption, RegistryClient, type RegistryClientOptions } from "./registry-client.ts";
