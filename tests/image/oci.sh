# Packs a root filesystem into an OCI image archive for `ctr images import` (there is no
# registry to pull from). Sourced by the build-*-image.sh scripts:
#   oci_pack ROOTFS IMAGE_CONFIG_JSON NAME OUT.tar [as-is]
# IMAGE_CONFIG_JSON is the image config's "config" object (Entrypoint, Cmd, Env, User...).
# The layer's files are root's with mtime 0 (the same archive from the same files), unless
# `as-is`: then each keeps its numeric owner, group and mtime from ROOTFS (a Debian root
# filesystem: /etc/shadow's group shadow, and Python's .pyc files, which are valid only while
# their source keeps the mtime they record).

oci_pack() {
  local root=$1 image_config=$2 name=$3 out=$4
  local work normalize=(--mtime=@0 --owner=0 --group=0)
  [[ ${5:-} == as-is ]] && normalize=()
  work=$(mktemp -d)
  mkdir -p "$work/oci/blobs/sha256"
  blob() { # file -> prints digest, moves it into blobs
    local d; d=$(sha256sum "$1" | cut -d' ' -f1); mv "$1" "$work/oci/blobs/sha256/$d"; echo "$d"
  }
  size() { stat -c %s "$work/oci/blobs/sha256/$1"; }

  tar --sort=name "${normalize[@]}" --numeric-owner -C "$root" -cf "$work/layer.tar" .
  local diff_id layer config manifest
  diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
  gzip -n -1 "$work/layer.tar"
  layer=$(blob "$work/layer.tar.gz")

  cat >"$work/config.json" <<JSON
{"architecture":"amd64","os":"linux","config":$image_config,"rootfs":{"type":"layers","diff_ids":["sha256:$diff_id"]},"history":[{"created_by":"spinbox tests/image/$(basename "$0")"}]}
JSON
  config=$(blob "$work/config.json")

  cat >"$work/manifest.json" <<JSON
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:$config","size":$(size "$config")},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:$layer","size":$(size "$layer")}]}
JSON
  manifest=$(blob "$work/manifest.json")

  cat >"$work/oci/index.json" <<JSON
{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:$manifest","size":$(size "$manifest"),"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":"$name","org.opencontainers.image.ref.name":"latest"}}]}
JSON
  echo '{"imageLayoutVersion":"1.0.0"}' >"$work/oci/oci-layout"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$work/oci" -cf "$out" .
  rm -rf "$work"
}
