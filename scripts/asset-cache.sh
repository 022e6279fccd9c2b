# Shared by the builds of cached host assets (scripts/build-initramfs.sh,
# scripts/build-hosttools.sh): their argument, their key and the cache check. Sourced, never run;
# it is one of the inputs of both keys (src/vmm/asset-paths.ts computes the same keys). The
# sourcing script sets `set -euo pipefail` and runs in the repository root.

export LC_ALL=C
cache="${SUPERMACHINE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/supermachine}"

# asset_start NAME ARG...: log and die say NAME; sets print_only from the only argument,
# `--print-path` (print the install path, built or not, and exit).
asset_start() {
  asset_name=$1
  shift
  print_only=0
  case "${1:-}" in
    --print-path) print_only=1 ;;
    "") ;;
    *) die "unknown argument: $1 (usage: $0 [--print-path])" ;;
  esac
}
log() { printf '%s: %s\n' "$asset_name" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# asset_key PATH... (one a line on stdin): the first 16 hex digits of sha256 over the manifest of
# lines "<sha256 of file>  <path>\n", one per path, sorted by path (bytewise).
asset_key() {
  sort | while IFS= read -r f; do
    printf '%s  %s\n' "$(sha256sum <"$f" | cut -d' ' -f1)" "$f"
  done | sha256sum | cut -c1-16
}

# asset_cached OUT: with --print-path prints OUT and exits; when OUT is built, prints it and
# exits; else takes the lock of OUT's kind (the directory above OUT's) so that one build runs at
# a time, and exits if another made OUT meanwhile.
asset_cached() {
  local out=$1 kind
  kind=$(dirname "$(dirname "$out")")
  if ((print_only)); then
    printf '%s\n' "$out"
    exit 0
  fi
  if [[ ! -f $out ]]; then
    mkdir -p "$kind"
    exec 9>"$kind/.lock"
    flock 9
  fi
  if [[ -f $out ]]; then
    log "cached: $out"
    printf '%s\n' "$out"
    exit 0
  fi
}
