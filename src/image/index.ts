/** Images: pull, flatten, bake, start, pool; and the local store's administration. */
export { bakeCacheKey, bakeSnapshot } from "./bake.ts";
export { Image, ImageBuilder, type ImagePullOptions, type ImageStartConfig } from "./image.ts";
export { Store, type StorePruneResult } from "./store.ts";
