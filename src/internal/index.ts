/** Small helpers every module uses: paths, cancellation, diagnostics, memos. */
export { raceAbort, throwIfAborted } from "./abort.ts";
export { debug, publish } from "./diagnostics.ts";
export { hostError, typedErrors } from "./host-error.ts";
export { memoize, once } from "./memo.ts";
export { cacheDir, dataDir, runtimeDir } from "./paths.ts";
