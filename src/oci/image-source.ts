/** What every image source (registry, OCI layout, docker archive) resolves to before blobs are stored. */

import type { BlobWriter, ImageSource } from "./content-store.ts";
import type { Descriptor, ImageManifest } from "./manifest.ts";
import type { Platform } from "./platform.ts";

/** Streams the blobs of one image into the store's writers. */
export interface BlobFetcher {
  fetch(
    descriptor: Descriptor,
    writer: BlobWriter,
    options: { signal: AbortSignal; onBytes: (bytesDone: number) => void },
  ): Promise<void>;
}

export interface ResolvedImage {
  /** Canonical reference or local source string recorded in the store. */
  readonly reference: string;
  readonly source: ImageSource;
  /** The index the manifest was chosen from, stored alongside when present. */
  readonly index?: { readonly digest: string; readonly bytes: Uint8Array } | undefined;
  /** Platform the index claimed for the chosen manifest. */
  readonly indexPlatform?: Platform | undefined;
  readonly manifestDigest: string;
  readonly manifestBytes: Uint8Array;
  readonly manifest: ImageManifest;
  readonly blobs: BlobFetcher;
  /** Error for content that is malformed (wording and code depend on the source). */
  readonly malformed: (message: string) => Error;
  /** Runs once everything is stored (closes files, removes temp copies). */
  readonly close?: (() => Promise<void>) | undefined;
}
