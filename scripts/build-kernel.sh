#!/usr/bin/env bash
# Builds the supermachine guest kernel (an uncompressed, PVH-bootable vmlinux) from Debian's
# linux-source-6.1 with kernel/patches/*.patch applied: `make tinyconfig` + kernel/supermachine.config,
# everything built in.
#
# Installs $CACHE/kernel/<key>/vmlinux, where
#   CACHE = ${SUPERMACHINE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/supermachine}
#   key   = first 16 hex digits of sha256 over the manifest
#             "<sha256 of kernel/supermachine.config>  kernel/supermachine.config\n"
#             "<sha256 of scripts/build-kernel.sh>  scripts/build-kernel.sh\n"
#             "<sha256 of kernel/patches/P>  kernel/patches/P\n" for each patch, in C-locale order
#             "linux-source-6.1 <dpkg version>\n"
# (src/vmm/asset-paths.ts computes the same key). Does nothing when that file exists.
#
# Usage: scripts/build-kernel.sh [--print-path]
#   --print-path  print the install path (built or not) and exit
# Prints the installed path on stdout; progress goes to stderr.
# Env: SUPERMACHINE_CACHE_DIR, SUPERMACHINE_LINUX_SOURCE_TAR (default /usr/src/linux-source-6.1.tar.xz),
#      SUPERMACHINE_VERBOSE=1 streams the make output to stderr.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fragment="$root/kernel/supermachine.config"
script="$root/scripts/build-kernel.sh"
src_pkg=linux-source-6.1
src_tar="${SUPERMACHINE_LINUX_SOURCE_TAR:-/usr/src/linux-source-6.1.tar.xz}"
cache="${SUPERMACHINE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/supermachine}"

log() { printf 'build-kernel: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}
sha256() { sha256sum <"$1" | cut -d' ' -f1; }

print_only=0
case "${1:-}" in
  --print-path) print_only=1 ;;
  "") ;;
  *) die "unknown argument: $1 (usage: $0 [--print-path])" ;;
esac

[[ -f $fragment ]] || die "missing $fragment"
patches=()
while IFS= read -r -d '' patch; do patches+=("$patch"); done < <(
  find "$root/kernel/patches" -maxdepth 1 -type f -name '*.patch' -print0 2>/dev/null | LC_ALL=C sort -z
)
version="$(dpkg-query -W -f='${Version}' "$src_pkg" 2>/dev/null)" ||
  die "$src_pkg is not installed: apt-get install $src_pkg"
[[ -n $version ]] || die "$src_pkg is not installed: apt-get install $src_pkg"

key="$(
  {
    printf '%s  %s\n' "$(sha256 "$fragment")" kernel/supermachine.config
    printf '%s  %s\n' "$(sha256 "$script")" scripts/build-kernel.sh
    for patch in "${patches[@]}"; do printf '%s  %s\n' "$(sha256 "$patch")" "${patch#"$root"/}"; done
    printf '%s %s\n' "$src_pkg" "$version"
  } | sha256sum | cut -c1-16
)"
# The patched source and its build dir are kept per patch set (the pristine tree is never patched).
patch_set=""
if ((${#patches[@]})); then
  patch_set="+$(for patch in "${patches[@]}"; do sha256 "$patch"; done | sha256sum | cut -c1-12)"
fi
out_dir="$cache/kernel/$key"
out="$out_dir/vmlinux"

if ((print_only)); then
  printf '%s\n' "$out"
  exit 0
fi
if [[ -f $out ]]; then
  log "cached: $out"
  printf '%s\n' "$out"
  exit 0
fi

mkdir -p "$cache/kernel" "$cache/src"
# One build at a time per cache (the source tree and build dir are shared).
exec 9>"$cache/kernel/.lock"
if ! flock -n 9; then
  log "waiting for another kernel build in $cache ..."
  flock 9
fi
if [[ -f $out ]]; then
  log "cached: $out"
  printf '%s\n' "$out"
  exit 0
fi

start=$SECONDS
[[ -f $src_tar ]] || die "missing $src_tar: apt-get install $src_pkg"
srcdir="$cache/src/${src_pkg}_$version$patch_set"
if [[ ! -f $srcdir/.supermachine-extracted ]]; then
  log "extracting $src_tar -> $srcdir"
  rm -rf "$srcdir" "$srcdir.tmp"
  mkdir -p "$srcdir.tmp"
  tar -xJf "$src_tar" -C "$srcdir.tmp" --strip-components=1
  for patch in "${patches[@]}"; do
    log "applying ${patch#"$root"/}"
    patch -d "$srcdir.tmp" -p1 --forward --batch --silent <"$patch" || die "${patch#"$root"/} does not apply to $src_pkg $version"
  done
  touch "$srcdir.tmp/.supermachine-extracted"
  mv "$srcdir.tmp" "$srcdir"
fi

# Out-of-tree build dir shared by every key of this source version: a changed fragment rebuilds
# incrementally. Safe to delete at any time.
builddir="$cache/kernel-build/${src_pkg}_$version$patch_set"
mkdir -p "$builddir"
buildlog="$builddir/build.log"
: >"$buildlog"

kmake() {
  if [[ ${SUPERMACHINE_VERBOSE:-} == 1 ]]; then
    make -C "$srcdir" O="$builddir" ARCH=x86_64 "$@" 2>&1 | tee -a "$buildlog" >&2
  else
    make -C "$srcdir" O="$builddir" ARCH=x86_64 "$@" >>"$buildlog" 2>&1
  fi
}
fail_with_log() {
  tail -n 40 "$buildlog" >&2 || true
  die "$1 (full log: $buildlog)"
}

log "configuring: tinyconfig + ${fragment#"$root"/}"
kmake tinyconfig || fail_with_log "make tinyconfig failed"
"$srcdir/scripts/kconfig/merge_config.sh" -m -O "$builddir" "$builddir/.config" "$fragment" \
  >>"$buildlog" 2>&1 || fail_with_log "merge_config.sh failed"
kmake olddefconfig || fail_with_log "make olddefconfig failed"

# Every assignment in the fragment must have survived olddefconfig (a dependency missing from
# the fragment silently drops an option otherwise).
missing=()
while IFS= read -r line; do
  if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
    grep -qxF -- "$line" "$builddir/.config" || missing+=("$line (got: $(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" "$builddir/.config" || echo 'absent'))")
  elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
    ! grep -qE "^${BASH_REMATCH[1]}=" "$builddir/.config" || missing+=("$line (got: $(grep -E "^${BASH_REMATCH[1]}=" "$builddir/.config"))")
  fi
done <"$fragment"
if ((${#missing[@]})); then
  log "error: these options from ${fragment#"$root"/} did not survive olddefconfig (missing dependencies?):"
  printf '  %s\n' "${missing[@]}" >&2
  exit 1
fi
log "config verified: every option of the fragment is set"

jobs="$(nproc)"
log "building vmlinux with -j$jobs (log: $buildlog; takes ~15 min on 2 cores)"
kmake -j"$jobs" vmlinux || fail_with_log "kernel build failed"

mkdir -p "$out_dir"
tmp="$(mktemp "$out_dir/.vmlinux.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
# Strip symbols and debug sections; the PVH entry point lives in an ELF note, which strip keeps.
strip --strip-all -o "$tmp" "$builddir/vmlinux"
readelf -n "$tmp" | grep -A1 -E '^ +Xen ' | grep -q '0x00000012' ||
  die "stripped vmlinux lost its PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)"
chmod 0644 "$tmp"
cp "$builddir/.config" "$out_dir/config"
mv -f "$tmp" "$out"
trap - EXIT
log "installed $out ($(stat -c %s "$out") bytes) in $((SECONDS - start)) s"
printf '%s\n' "$out"
