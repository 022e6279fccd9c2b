#!/usr/bin/env bash
# Fills packages/guest-linux-x64/ — the per-platform npm package that ships the prebuilt guest kernel
# and initramfs, and the host's network relay sm-net (docs/network.md) — from the assets
# scripts/build-assets.sh builds (or finds in the cache), and records
# their provenance and sha256 in its assets.json. `npm pack` of the main package copies that file to
# dist/guest-assets.json, so an installed supermachine only accepts guest files with those hashes.
# See docs/guest-assets.md.
#
# Usage: scripts/build-guest-package.sh [--pack DIR]
#   --pack DIR  also `npm pack` the guest package into DIR
# Prints the package directory (and with --pack, the tarball's path) on stdout.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pkg="$root/packages/guest-linux-x64"
log() { printf 'build-guest-package: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

pack_dir=""
case "${1:-}" in
  --pack)
    [[ -n ${2:-} ]] || die "--pack needs a directory"
    pack_dir="$2"
    ;;
  "") ;;
  *) die "unknown argument: $1 (usage: $0 [--pack DIR])" ;;
esac

# shellcheck source=scripts/env.sh
. "$root/scripts/env.sh"
version="$(node -p 'require(process.argv[1]).version' "$root/package.json")"
guest_version="$(node -p 'require(process.argv[1]).version' "$pkg/package.json")"
[[ $version == "$guest_version" ]] ||
  die "packages/guest-linux-x64/package.json has version $guest_version, package.json $version: make them equal"

paths="$(bash "$root/scripts/build-assets.sh")"
kernel="$(sed -n 's/^SUPERMACHINE_KERNEL=//p' <<<"$paths")"
initramfs="$(sed -n 's/^SUPERMACHINE_INITRAMFS=//p' <<<"$paths")"
relay="$(sed -n 's/^SUPERMACHINE_NET_RELAY=//p' <<<"$paths")"
[[ -f $kernel && -f $initramfs && -f $relay ]] || die "scripts/build-assets.sh did not produce all three assets"

cp "$kernel" "$pkg/vmlinux.tmp" && mv -f "$pkg/vmlinux.tmp" "$pkg/vmlinux"
cp "$initramfs" "$pkg/initramfs.cpio.tmp" && mv -f "$pkg/initramfs.cpio.tmp" "$pkg/initramfs.cpio"
cp "$relay" "$pkg/sm-net.tmp" && mv -f "$pkg/sm-net.tmp" "$pkg/sm-net"
chmod 0644 "$pkg/vmlinux" "$pkg/initramfs.cpio"
chmod 0755 "$pkg/sm-net"

linux_source="$(dpkg-query -W -f='${Version}' linux-source-6.1)"
kernel_sha="$(sha256sum <"$pkg/vmlinux" | cut -d' ' -f1)"
initramfs_sha="$(sha256sum <"$pkg/initramfs.cpio" | cut -d' ' -f1)"
relay_sha="$(sha256sum <"$pkg/sm-net" | cut -d' ' -f1)"
cat >"$pkg/assets.json.tmp" <<EOF
{
  "package": "@supermachine/guest-linux-x64",
  "version": "$version",
  "kernel": {
    "file": "vmlinux",
    "sha256": "$kernel_sha",
    "sizeBytes": $(stat -c %s "$pkg/vmlinux"),
    "source": "linux-source-6.1 $linux_source",
    "cacheKey": "$(basename "$(dirname "$kernel")")"
  },
  "initramfs": {
    "file": "initramfs.cpio",
    "sha256": "$initramfs_sha",
    "sizeBytes": $(stat -c %s "$pkg/initramfs.cpio"),
    "source": "guest/ (sm-init)",
    "cacheKey": "$(basename "$(dirname "$initramfs")")"
  },
  "netRelay": {
    "file": "sm-net",
    "sha256": "$relay_sha",
    "sizeBytes": $(stat -c %s "$pkg/sm-net"),
    "source": "hosttools/ (sm-net)",
    "cacheKey": "$(basename "$(dirname "$relay")")"
  }
}
EOF
mv -f "$pkg/assets.json.tmp" "$pkg/assets.json"
log "filled $pkg (kernel $kernel_sha, initramfs $initramfs_sha, sm-net $relay_sha)"
printf '%s\n' "$pkg"

if [[ -n $pack_dir ]]; then
  mkdir -p "$pack_dir"
  tarball="$(cd "$pkg" && npm pack --silent --pack-destination "$(cd "$pack_dir" && pwd)")"
  printf '%s\n' "$(cd "$pack_dir" && pwd)/$tarball"
fi
