#!/usr/bin/env bash
# Packs the bundled busybox root filesystem (scripts/build-busybox-rootfs.sh) as a one-layer OCI
# image layout, so that the quick start runs an OCI image without a registry:
#   supermachine run oci:OUTDIR -- echo hi
# Deterministic (sorted names, numeric owners, fixed mtimes, gzip -n): the same busybox gives the
# same manifest digest. Prints OUTDIR.
#
# Usage: scripts/build-busybox-oci.sh OUTDIR
set -euo pipefail
export LC_ALL=C
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:?usage: $0 OUTDIR}"

rootfs="$(bash "$root/scripts/busybox-rootfs-path.sh")"
bash "$root/scripts/build-busybox-rootfs.sh" "$rootfs" >/dev/null
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/blobs/sha256"

put() { # FILE -> prints "sha256:<hex> <size>", stores the file as a blob
  local hex
  hex="$(sha256sum <"$1" | cut -d' ' -f1)"
  mv "$1" "$work/blobs/sha256/$hex"
  printf 'sha256:%s %s\n' "$hex" "$(stat -c %s "$work/blobs/sha256/$hex")"
}

tar --sort=name --numeric-owner --owner=0 --group=0 --mtime=@1704067200 --format=posix \
  --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
  -C "$rootfs" -cf "$work/layer.tar" .
diff_id="sha256:$(sha256sum <"$work/layer.tar" | cut -d' ' -f1)"
gzip -n -9 "$work/layer.tar"
read -r layer layer_size < <(put "$work/layer.tar.gz")

printf '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["%s"]}}' \
  "$diff_id" >"$work/config.json"
read -r config config_size < <(put "$work/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"%s","size":%s}]}' \
  "$config" "$config_size" "$layer" "$layer_size" >"$work/manifest.json"
read -r manifest manifest_size < <(put "$work/manifest.json")
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"latest"}}]}' \
  "$manifest" "$manifest_size" >"$work/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' >"$work/oci-layout"

rm -rf "$out"
mkdir -p "$(dirname "$out")"
mv "$work" "$out"
trap - EXIT
chmod 0755 "$out"
printf '%s\n' "$out"
