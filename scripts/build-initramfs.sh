#!/usr/bin/env bash
# Builds the supermachine initramfs: the guest init/agent (guest/build/sm-init, from `make -C guest`)
# packed as /init into an uncompressed newc cpio. Needs no root: the archive holds one regular file
# (the kernel's built-in initramfs already provides /dev/console; the init mounts devtmpfs itself).
# The archive is deterministic: fixed mtime, owner 0:0, renumbered inodes, no device numbers.
#
# Installs $CACHE/initramfs/<key>/initramfs.cpio, where
#   CACHE = ${SUPERMACHINE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/supermachine}
#   key   = first 16 hex digits of sha256 over the manifest of lines "<sha256 of file>  <path>\n",
#           one per file, sorted by path (bytewise), paths relative to the repository root:
#           guest/Makefile, every regular file under guest/src/ and guest/include/,
#           scripts/asset-cache.sh (sourced) and scripts/build-initramfs.sh
# (src/vmm/asset-paths.ts computes the same key). Does nothing when that file exists.
#
# Usage: scripts/build-initramfs.sh [--print-path]
#   --print-path  print the install path (built or not) and exit
# Prints the installed path on stdout; progress goes to stderr. Env: SUPERMACHINE_CACHE_DIR.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/asset-cache.sh
. scripts/asset-cache.sh
asset_start build-initramfs "$@"

key="$(
  {
    [[ -f guest/Makefile ]] && printf '%s\n' guest/Makefile
    for d in guest/src guest/include; do
      [[ -d $d ]] && find "$d" -type f -print
    done
    printf '%s\n' scripts/asset-cache.sh scripts/build-initramfs.sh
  } | asset_key
)"
out_dir="$cache/initramfs/$key"
out="$out_dir/initramfs.cpio"
asset_cached "$out"

if [[ -f guest/Makefile ]]; then
  log "building the guest agent: make -C guest"
  make -C guest >&2 || die "make -C guest failed"
fi
init="guest/build/sm-init"
[[ -f $init ]] || die "$init is missing (and guest/Makefile did not produce it)"

mkdir -p "$out_dir"
stage="$(mktemp -d "$out_dir/.stage.XXXXXX")"
tmp="$(mktemp "$out_dir/.initramfs.XXXXXX")"
trap 'rm -rf "$stage" "$tmp"' EXIT
cp "$init" "$stage/init"
chmod 0755 "$stage/init"
touch -h -d @0 "$stage/init"
(cd "$stage" && printf '%s\n' init |
  cpio --quiet -o -H newc --reproducible --owner=0:0) >"$tmp" ||
  die "cpio failed"
chmod 0644 "$tmp"
mv -f "$tmp" "$out"
log "installed $out ($(stat -c %s "$out") bytes)"
printf '%s\n' "$out"
