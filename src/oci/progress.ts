/** Pull progress: typed events for `onProgress` and the `supermachine:pull:progress` channel. */

import diagnosticsChannel from "node:diagnostics_channel";

export const PULL_PROGRESS_CHANNEL = "supermachine:pull:progress";

export type PullProgress =
  /**
   * The manifest is known and the image config passed its checks: what will be fetched. A layer's
   * first `downloading` events can come before it (layers download while the config is checked;
   * none is `done` before it).
   */
  | {
      readonly type: "resolved";
      readonly reference: string;
      readonly manifestDigest: string;
      readonly platform: string;
      readonly layerCount: number;
      /** Config plus layers, compressed. */
      readonly totalBytes: number;
    }
  /**
   * One blob (the config or a layer). `state`: `cached` (already in the store, nothing fetched),
   * `downloading` (first event has `bytesDone` 0, then at most one every 100 ms; `bytesDone` can
   * go back to 0 if a server ignores a resume request), `done` (verified and stored).
   */
  | {
      readonly type: "blob";
      readonly reference: string;
      readonly kind: "config" | "layer";
      readonly digest: string;
      readonly bytesDone: number;
      readonly totalBytes: number;
      readonly state: "cached" | "downloading" | "done";
    }
  /** Everything is stored and the image record written. */
  | {
      readonly type: "done";
      readonly reference: string;
      readonly manifestDigest: string;
      /** Bytes actually transferred (cached blobs excluded). */
      readonly downloadedBytes: number;
      readonly durationMs: number;
    };

const channel = diagnosticsChannel.channel(PULL_PROGRESS_CHANNEL);

export type ProgressSink = (event: PullProgress) => void;

/** A sink that feeds both the caller's callback and the diagnostics channel. Callback errors are ignored. */
export function progressSink(onProgress: ProgressSink | undefined): ProgressSink {
  return (event) => {
    if (onProgress) {
      try {
        onProgress(event);
      } catch {
        // A throwing progress callback must not break the pull.
      }
    }
    if (channel.hasSubscribers) channel.publish(event);
  };
}

export const PROGRESS_INTERVAL_MS = 100;
