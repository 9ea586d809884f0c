#!/usr/bin/env bash
# Installs what spinbox needs to build, test and run on a Debian (bookworm) host.
# Idempotent: installs only what is missing. Needs root (apt-get).
set -euo pipefail

VHOST_DEVICE_VSOCK_VERSION=0.3.0

packages=(
  qemu-system-x86      # the VMM
  containerd runc      # the runtime host and the comparison runtime
  containernetworking-plugins nftables iproute2
  erofs-utils e2fsprogs
  busybox-static cpio xz-utils kmod zstd   # guest image assembly, test images
  protobuf-compiler    # protoc, for the CRI client (k8s-cri) of the pod tests
  procps psmisc util-linux
  tmux                 # the TTY end-to-end test drives `ctr run -t` in a real terminal
  ca-certificates
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  extra=()
  # Some images carry a newer qemu-utils from backports, which conflicts with bookworm's
  # qemu-system-x86; take the matching qemu-utils from the same release.
  if [[ " ${missing[*]} " == *" qemu-system-x86 "* ]] &&
     dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null | grep -q bpo; then
    extra+=("qemu-utils/$(. /etc/os-release && echo "$VERSION_CODENAME")")
  fi
  apt-get install -y -qq --no-install-recommends --allow-downgrades "${missing[@]}" "${extra[@]}"
fi

# Without the kernel's vhost-vsock, vsock comes from vhost-device-vsock (vhost-user).
export PATH="$HOME/.cargo/bin:$PATH"
have_version=$(vhost-device-vsock --version 2>/dev/null | awk '{print $2}' || true)
if [[ ! -e /dev/vhost-vsock || -n "${SPINBOX_FORCE_VHOST_USER:-}" ]] &&
   [[ "$have_version" != "$VHOST_DEVICE_VSOCK_VERSION" ]]; then
  echo "install-deps: cargo install vhost-device-vsock $VHOST_DEVICE_VSOCK_VERSION"
  cargo install --locked --version "$VHOST_DEVICE_VSOCK_VERSION" vhost-device-vsock
fi
echo "install-deps: all present"
