#!/usr/bin/env bash
# Builds (or finds in the cache) both guest assets: the initramfs with the guest agent, then the
# kernel; and the host's network relay (sm-net, docs/network.md). Idempotent; fast when all are
# cached. See docs/guest-assets.md.
#
# Usage: scripts/build-assets.sh [--print-paths]
#   --print-paths  print where the assets are (or would be) installed, build nothing
# Prints, on stdout:
#   SUPERMACHINE_KERNEL=<path to vmlinux>
#   SUPERMACHINE_INITRAMFS=<path to initramfs.cpio>
#   SUPERMACHINE_NET_RELAY=<path to sm-net>
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

arg=()
case "${1:-}" in
  --print-paths) arg=(--print-path) ;;
  "") ;;
  *)
    printf 'build-assets: error: unknown argument: %s (usage: %s [--print-paths])\n' "$1" "$0" >&2
    exit 1
    ;;
esac

initramfs="$(bash "$here/build-initramfs.sh" "${arg[@]}")"
kernel="$(bash "$here/build-kernel.sh" "${arg[@]}")"
relay="$(bash "$here/build-hosttools.sh" "${arg[@]}")"
printf 'SUPERMACHINE_KERNEL=%s\n' "$kernel"
printf 'SUPERMACHINE_INITRAMFS=%s\n' "$initramfs"
printf 'SUPERMACHINE_NET_RELAY=%s\n' "$relay"
