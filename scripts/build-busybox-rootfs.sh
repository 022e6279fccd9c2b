#!/usr/bin/env bash
# Builds the tiny busybox root filesystem used by the quick start and the VM tests.
#
#   scripts/build-busybox-rootfs.sh [--busybox PATH] [--applets-from PATH] OUTDIR
#
# OUTDIR becomes a plain directory tree:
#   /bin/busybox (static, from Debian's busybox-static) and one symlink per applet
#   (`busybox --list-full`, pointing at /bin/busybox), /etc/passwd (root, nobody, app uid 1000),
#   /etc/group, /etc/hostname, /tmp (1777), /root (0700), /home/app (1000:1000 when run as root),
#   /proc, /sys, /dev, /run.
#
# --busybox PATH       the binary to install (default /bin/busybox); may be of another architecture
# --applets-from PATH  the binary asked for the applet list (default: --busybox if it runs here,
#                      else /bin/busybox)
#
# Deterministic: every mtime is set to SOURCE_DATE_EPOCH (default 2024-01-01T00:00:00Z). Idempotent:
# a tree already built from the same inputs (recorded in .OUTDIR.key beside it) is left as it is;
# otherwise the tree is built next to OUTDIR and swapped in; an existing OUTDIR that is not a busybox root
# filesystem is refused rather than deleted. Ownership is set (0:0, and 1000:1000 for /home/app)
# only when running as root; otherwise files keep the caller's ownership.
set -euo pipefail
umask 022
export LC_ALL=C

die() {
  echo "build-busybox-rootfs: $*" >&2
  exit 1
}

busybox=/bin/busybox
applets_from=""
out=""
while [ $# -gt 0 ]; do
  case "$1" in
  --busybox)
    busybox=${2:?--busybox needs a path}
    shift 2
    ;;
  --applets-from)
    applets_from=${2:?--applets-from needs a path}
    shift 2
    ;;
  -h | --help)
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  -*) die "unknown option $1" ;;
  *)
    [ -z "$out" ] || die "only one OUTDIR may be given"
    out=$1
    shift
    ;;
  esac
done
[ -n "$out" ] || die "usage: build-busybox-rootfs.sh [--busybox PATH] [--applets-from PATH] OUTDIR"

if [ ! -x "$busybox" ]; then
  if [ "$busybox" = /bin/busybox ]; then
    die "/bin/busybox not found: install Debian's static busybox (apt-get install busybox-static)"
  fi
  die "$busybox is not an executable file"
fi

epoch=${SOURCE_DATE_EPOCH:-1704067200}

if [ -z "$applets_from" ]; then
  if "$busybox" true >/dev/null 2>&1; then
    applets_from=$busybox
  else
    applets_from=/bin/busybox
  fi
fi
[ -x "$applets_from" ] || die "cannot list applets: $applets_from is not executable (apt-get install busybox-static)"
applets=$("$applets_from" --list-full) || die "$applets_from --list-full failed"
[ -n "$applets" ] || die "$applets_from --list-full printed nothing"

out=${out%/}
# What the tree is made of: when OUTDIR was built from the same busybox, applets and script, it is
# left alone (other processes may be reading it: a swap would pull files from under them).
key=$({ sha256sum <"$busybox"; printf '%s\n' "$applets" "$epoch"; sha256sum <"$0"; } | sha256sum | cut -d' ' -f1)
keyfile="$(dirname "$out")/.$(basename "$out").key"
if [ -d "$out" ] && [ -e "$out/bin/busybox" ] && [ "$(cat "$keyfile" 2>/dev/null)" = "$key" ]; then
  exit 0
fi
if [ -e "$out" ]; then
  [ -d "$out" ] || die "$out exists and is not a directory"
  if [ -n "$(ls -A "$out")" ] && [ ! -e "$out/bin/busybox" ]; then
    die "$out is not empty and is not a busybox root filesystem; refusing to replace it"
  fi
fi
parent=$(dirname "$out")
mkdir -p "$parent"
tmp=$(mktemp -d "$parent/.busybox-rootfs.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

cd "$tmp"
mkdir -p bin sbin usr/bin usr/sbin etc root home/app tmp proc sys dev run var
install -m 0755 "$busybox" bin/busybox
# One process for all links: a fork costs ~10 ms on a loaded machine and there are ~270 applets.
links=()
while IFS= read -r applet; do
  case "$applet" in
  "" | bin/busybox) continue ;;
  /* | *..* | *[!A-Za-z0-9_./[-]*) die "unexpected applet path from --list-full: $applet" ;;
  esac
  links+=("$applet")
done <<<"$applets"
perl -e 'for (@ARGV) { symlink("/bin/busybox", $_) or die "symlink $_: $!\n" }' -- "${links[@]}"

cat >etc/passwd <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
app:x:1000:1000:app:/home/app:/bin/sh
EOF
cat >etc/group <<'EOF'
root:x:0:
nobody:x:65534:
app:x:1000:
EOF
echo supermachine >etc/hostname
chmod 0644 etc/passwd etc/group etc/hostname
chmod 0700 root
chmod 1777 tmp
chmod 0755 home/app

if [ "$(id -u)" = 0 ]; then
  chown -hR 0:0 .
  chown 1000:1000 home/app
fi
find . -exec touch -h -d "@$epoch" {} +
chmod 0755 .

if [ -e "$out" ]; then
  old="$parent/.busybox-rootfs-old.$$"
  mv "$out" "$old"
  mv "$tmp" "$out"
  rm -rf "$old"
else
  mv "$tmp" "$out"
fi
touch -h -d "@$epoch" "$out"
printf '%s\n' "$key" >"$keyfile.tmp.$$"
mv "$keyfile.tmp.$$" "$keyfile"
trap - EXIT
