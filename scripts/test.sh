#!/usr/bin/env bash
# Installs what is missing (scripts/setup.sh), then runs the whole test suite: lint, types, unit,
# contract (the guest agent as a host process) and integration tests (real QEMU VMs).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
. "$root/scripts/env.sh"
cd "$root"
npm test
