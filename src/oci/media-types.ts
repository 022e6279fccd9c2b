/** Media types of manifests, indexes, configs and layers this library understands. */

export const MediaType = {
  ociIndex: "application/vnd.oci.image.index.v1+json",
  ociManifest: "application/vnd.oci.image.manifest.v1+json",
  ociConfig: "application/vnd.oci.image.config.v1+json",
  ociLayerTar: "application/vnd.oci.image.layer.v1.tar",
  ociLayerGzip: "application/vnd.oci.image.layer.v1.tar+gzip",
  ociLayerZstd: "application/vnd.oci.image.layer.v1.tar+zstd",
  ociLayerNondistributableTar: "application/vnd.oci.image.layer.nondistributable.v1.tar",
  ociLayerNondistributableGzip: "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
  ociLayerNondistributableZstd: "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
  dockerManifestList: "application/vnd.docker.distribution.manifest.list.v2+json",
  dockerManifest: "application/vnd.docker.distribution.manifest.v2+json",
  dockerConfig: "application/vnd.docker.container.image.v1+json",
  dockerLayerGzip: "application/vnd.docker.image.rootfs.diff.tar.gzip",
  dockerLayerTar: "application/vnd.docker.image.rootfs.diff.tar",
  dockerForeignLayerGzip: "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
  dockerSchema1: "application/vnd.docker.distribution.manifest.v1+json",
  dockerSchema1Signed: "application/vnd.docker.distribution.manifest.v1+prettyjws",
} as const;

/** Everything a manifest request accepts, most preferred first. Schema 1 is deliberately absent. */
export const MANIFEST_ACCEPT = [
  MediaType.ociIndex,
  MediaType.ociManifest,
  MediaType.dockerManifestList,
  MediaType.dockerManifest,
].join(", ");

export type LayerCompression = "gzip" | "zstd" | "none";

const LAYER_COMPRESSION: Readonly<Record<string, LayerCompression>> = {
  [MediaType.ociLayerTar]: "none",
  [MediaType.ociLayerGzip]: "gzip",
  [MediaType.ociLayerZstd]: "zstd",
  [MediaType.ociLayerNondistributableTar]: "none",
  [MediaType.ociLayerNondistributableGzip]: "gzip",
  [MediaType.ociLayerNondistributableZstd]: "zstd",
  [MediaType.dockerLayerGzip]: "gzip",
  [MediaType.dockerLayerTar]: "none",
  [MediaType.dockerForeignLayerGzip]: "gzip",
};

export function isIndexMediaType(t: string | undefined): boolean {
  return t === MediaType.ociIndex || t === MediaType.dockerManifestList;
}

export function isManifestMediaType(t: string | undefined): boolean {
  return t === MediaType.ociManifest || t === MediaType.dockerManifest;
}

export function isSchema1MediaType(t: string | undefined): boolean {
  return t === MediaType.dockerSchema1 || t === MediaType.dockerSchema1Signed;
}

export function isConfigMediaType(t: string | undefined): boolean {
  return t === MediaType.ociConfig || t === MediaType.dockerConfig;
}

/** Compression of a layer media type, or undefined when the type is not a layer we can unpack. */
export function layerCompression(t: string): LayerCompression | undefined {
  return LAYER_COMPRESSION[t];
}

/** Compression from the first bytes of a blob (gzip and zstd magic numbers), else "none". */
export function sniffCompression(head: Uint8Array): LayerCompression {
  if (head.length >= 2 && head[0] === 0x1f && head[1] === 0x8b) return "gzip";
  if (head.length >= 4 && head[0] === 0x28 && head[1] === 0xb5 && head[2] === 0x2f && head[3] === 0xfd)
    return "zstd";
  return "none";
}

/** The OCI layer media type for a compression. */
export function ociLayerMediaType(compression: LayerCompression): string {
  if (compression === "gzip") return MediaType.ociLayerGzip;
  if (compression === "zstd") return MediaType.ociLayerZstd;
  return MediaType.ociLayerTar;
}

/** Strip parameters and whitespace from a Content-Type header value. */
export function bareMediaType(contentType: string | null | undefined): string | undefined {
  if (!contentType) return undefined;
  const t = contentType.split(";")[0]?.trim().toLowerCase();
  return t === "" ? undefined : t;
}
