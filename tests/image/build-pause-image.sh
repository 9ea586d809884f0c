#!/usr/bin/env bash
# Builds the pod sandbox ("pause") image for the CRI tests as an OCI image archive, shaped
# like Kubernetes' own: one static /pause (pause.c beside this script) as the entrypoint,
# run as 65535, nothing else in the image. Usage: build-pause-image.sh OUT.tar [NAME]
# The archive names itself NAME (default docker.io/library/spinbox-pause:latest).
set -euo pipefail
out=$1
name=${2:-docker.io/library/spinbox-pause:latest}
here=$(cd "$(dirname "$0")" && pwd)
. "$here/oci.sh"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root"
chmod 0755 "$root"
${CC:-cc} -static -Os -s -o "$root/pause" "$here/pause.c"

oci_pack "$root" '{"Entrypoint":["/pause"],"User":"65535:65535","WorkingDir":"/"}' "$name" "$out"
echo "built $out ($name)"
