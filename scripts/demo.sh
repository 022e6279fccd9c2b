#!/usr/bin/env bash
# Installs what is missing (scripts/setup.sh), then runs an OCI image — the bundled busybox, packed
# as an OCI layout by scripts/build-busybox-oci.sh — in a microVM: pulled into the local store,
# flattened into a root filesystem, booted, the command run. Extra arguments replace the command.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
image="$(bash "$root/scripts/build-busybox-oci.sh" "${XDG_CACHE_HOME:-$HOME/.cache}/supermachine/busybox-oci")"
if [ "$#" -eq 0 ]; then set -- sh -c 'echo "hello from $(uname -sr) in a microVM"'; fi
exec "$root/bin/supermachine" run --rm "oci:$image" -- "$@"
