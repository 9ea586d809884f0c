#!/usr/bin/env bash
# Builds a small OCI image archive from Debian's busybox-static, for tests and the demo
# (there is no registry to pull from). Usage: build-busybox-image.sh OUT.tar [NAME]
# The archive names itself NAME (default docker.io/library/spinbox-busybox:latest) for
# `ctr images import`.
set -euo pipefail
out=$1
name=${2:-docker.io/library/spinbox-busybox:latest}
. "$(dirname "$0")/oci.sh"
busybox=$(command -v busybox)
[[ -x "$busybox" ]] || { echo "busybox not found (apt-get install busybox-static)" >&2; exit 1; }
file -L "$busybox" 2>/dev/null | grep -q "statically linked" || ldd "$busybox" 2>&1 | grep -q "not a dynamic" ||
  { echo "$busybox is not static (install busybox-static)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root"/{bin,etc,tmp,root,home,proc,sys,dev,run,var/tmp}
chmod 0755 "$root"
chmod 1777 "$root/tmp" "$root/var/tmp"
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
  [[ -e "$root/bin/$applet" ]] || ln -s busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\nextra:x:1234:\n' >"$root/etc/group"
echo "spinbox test image" >"$root/etc/motd"

oci_pack "$root" \
  '{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"],"WorkingDir":"/"}' \
  "$name" "$out"
echo "built $out ($name)"
