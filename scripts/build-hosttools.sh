#!/usr/bin/env bash
# Builds the host helpers written in C (hosttools/: the network allow-list relay `sm-net`, a static
# musl binary) and installs it into the cache. Needs no root. See docs/network.md.
#
# Installs $CACHE/sm-net/<key>/sm-net, where
#   CACHE = ${SUPERMACHINE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/supermachine}
#   key   = first 16 hex digits of sha256 over the manifest of lines "<sha256 of file>  <path>\n",
#           one per file, sorted by path (bytewise), paths relative to the repository root:
#           every regular file directly in hosttools/, scripts/asset-cache.sh (sourced) and
#           scripts/build-hosttools.sh
# (src/vmm/asset-paths.ts computes the same key). Does nothing when that file exists.
#
# Usage: scripts/build-hosttools.sh [--print-path]
#   --print-path  print the install path (built or not) and exit
# Prints the installed path on stdout; progress goes to stderr. Env: SUPERMACHINE_CACHE_DIR.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/asset-cache.sh
. scripts/asset-cache.sh
asset_start build-hosttools "$@"

key="$(
  {
    find hosttools -maxdepth 1 -type f -print
    printf '%s\n' scripts/asset-cache.sh scripts/build-hosttools.sh
  } | asset_key
)"
out_dir="$cache/sm-net/$key"
out="$out_dir/sm-net"
asset_cached "$out"

log "building the network relay: make -C hosttools"
make -C hosttools >&2 || die "make -C hosttools failed (it needs musl-gcc: apt-get install musl-tools)"
[[ -f hosttools/build/sm-net ]] || die "hosttools/build/sm-net is missing after make"

mkdir -p "$out_dir"
tmp="$(mktemp "$out_dir/.sm-net.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
cp hosttools/build/sm-net "$tmp"
# Everyone may run it: on a root host it runs as each VM's own unprivileged uid (it is exec'd
# through a descriptor, so the cache dir itself need not be reachable for them).
chmod 0755 "$tmp"
mv -f "$tmp" "$out"
log "installed $out ($(stat -c %s "$out") bytes)"
printf '%s\n' "$out"
