#!/usr/bin/env bash
# Builds a Debian image with Python for `make bench` (the python3 rows,
# tests/src/bin/bench/peers.rs) as an OCI image archive for `ctr images import`:
# `debootstrap --variant=minbase --include=python3-minimal` of bookworm from the mirror apt
# uses, documentation, locales and apt's caches dropped, the rest as debootstrap left it
# (owners, modes and mtimes kept: Python's .pyc files are valid only while their sources keep
# the mtimes they record). Usage: build-debian-image.sh OUT.tar [NAME]
# NAME defaults to localhost/spinbox-bench/debian-python:bookworm.
#
# Cache: the archive is built once and kept in ${XDG_CACHE_HOME:-~/.cache}/spinbox/images/,
# named by a hash of what makes it (this script, tests/image/oci.sh, suite, mirror, packages,
# NAME); later runs copy it (no network). A changed input builds a new one. The first build
# takes a few minutes (debootstrap downloads ~40 MB) and installs debootstrap if missing.
# SPINBOX_DEBIAN_MIRROR: another mirror (default http://deb.debian.org/debian).
set -euo pipefail
out=${1:?usage: $0 OUT.tar [NAME]}
name=${2:-localhost/spinbox-bench/debian-python:bookworm}
here=$(cd "$(dirname "$0")" && pwd)
. "$here/oci.sh"
suite=bookworm
mirror=${SPINBOX_DEBIAN_MIRROR:-http://deb.debian.org/debian}
packages=python3-minimal

cache_dir=${XDG_CACHE_HOME:-$HOME/.cache}/spinbox/images
mkdir -p "$cache_dir"
key=$(cat "$here/build-debian-image.sh" "$here/oci.sh" <(echo "$suite $mirror $packages $name") |
  sha256sum | cut -c1-16)
cached=$cache_dir/debian-python-$suite-$key.tar

# One build at a time (two bench runs starting together wait for the first's archive).
exec 9>"$cache_dir/.debian-python.lock"
flock 9
if [[ -s $cached ]]; then
  cp "$cached" "$out"
  echo "cached $cached -> $out ($name)"
  exit 0
fi

if ! command -v debootstrap >/dev/null; then
  [[ $(id -u) == 0 ]] || { echo "debootstrap not found (apt-get install debootstrap)" >&2; exit 1; }
  echo "installing debootstrap" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y debootstrap >&2
fi

# On disk beside the cache, not in /tmp (the root filesystem is ~150 MB before trimming).
work=$(mktemp -d "$cache_dir/build.XXXXXX")
root=$work/rootfs
# debootstrap mounts /proc and /sys in the target while it configures and unmounts them when
# it ends; if it fails midway they stay: unmount whatever is left below $work before removing.
cleanup() {
  awk -v w="$work/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r |
    while read -r m; do umount -l "$m" || true; done
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

started=$SECONDS
echo "debootstrap $suite ($packages) from $mirror" >&2
if ! debootstrap --variant=minbase --include="$packages" --components=main \
  "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1; then
  tail -20 "$work/debootstrap.log" >&2
  [[ -f $root/debootstrap/debootstrap.log ]] && tail -20 "$root/debootstrap/debootstrap.log" >&2
  echo "debootstrap of $suite failed (log above)" >&2
  exit 1
fi
if awk -v r="$root/" 'index($2, r) == 1 {found = 1; print} END {exit !found}' /proc/mounts >&2; then
  echo "debootstrap left mounts in $root" >&2
  exit 1
fi

got=$(chroot "$root" /usr/bin/python3 -c 'print(sum(range(1000)))')
[[ $got == 499500 ]] || { echo "python3 in the image printed '$got', not 499500" >&2; exit 1; }

# What a container image does without: the host's device nodes (the runtime provides /dev),
# the host's name and resolver, documentation, locales, apt's package lists and caches.
rm -rf "${root:?}"/dev/* "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* \
  "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
  "$root"/var/log/*.log "$root"/var/log/apt/*
find "$root/usr/share/doc" -type f ! -name copyright -delete
find "$root/usr/share/doc" -type l -delete
rm -f "$root/etc/hostname"
: >"$root/etc/resolv.conf"
echo "rootfs $(du -sh --apparent-size "$root" | cut -f1) after $((SECONDS - started)) s" >&2

oci_pack "$root" \
  '{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin","LANG=C.UTF-8"],"Cmd":["bash"],"WorkingDir":"/"}' \
  "$name" "$work/image.tar" as-is
mv "$work/image.tar" "$cached"
# Archives of earlier inputs go.
find "$cache_dir" -maxdepth 1 -name "debian-python-$suite-*.tar" ! -name "$(basename "$cached")" -delete
cp "$cached" "$out"
echo "built $out ($name, $(du -h "$cached" | cut -f1), $((SECONDS - started)) s; cached as $cached)"
