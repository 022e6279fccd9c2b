#!/usr/bin/env bash
# Prints where scripts/setup.sh keeps the bundled busybox root filesystem (a directory tree).
set -euo pipefail
cache="${SUPERMACHINE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/supermachine}"
echo "$cache/busybox-rootfs"
