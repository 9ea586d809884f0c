#!/usr/bin/env bash
# The demo: boot a spinbox microVM from the freshly built guest, ask its agent for its version
# and the guest kernel release, and shut it down — all with a private state directory.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

work=$(mktemp -d /tmp/spinbox-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
guest=$PWD/build/guest
cat >"$work/config.json" <<JSON
{
  "paths": {
    "qemu": "$(command -v qemu-system-x86_64)",
    "kernel": "$guest/vmlinux",
    "initrd": "$guest/initrd.img",
    "state_dir": "$work/state",
    "log_dir": "$work/log",
    "vhost_device_vsock": "$(command -v vhost-device-vsock || echo /usr/local/bin/vhost-device-vsock)"
  }
}
JSON
echo "host kernel: $(uname -r)"
SPINBOX_CONFIG=$work/config.json RUST_LOG=${RUST_LOG:-warn} ./target/release/spinbox boot demo
