#!/usr/bin/env bash
# Installs what is missing (scripts/setup.sh), then boots the bundled busybox image in a microVM
# and runs a command in it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
rootfs="$(bash "$root/scripts/busybox-rootfs-path.sh")"
if [ "$#" -eq 0 ]; then set -- sh -c 'echo "hello from $(uname -sr) in a microVM"; cat /etc/os-release 2>/dev/null | head -1 || true'; fi
exec "$root/bin/supermachine" run --rootfs "$rootfs" -- "$@"
