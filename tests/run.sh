#!/usr/bin/env bash
# Runs the whole suite (`make test`): unit tests, VM tests, and the end-to-end tests against
# one private containerd shared by all of them, with spinbox configured as a runtime.
# Arguments go to `cargo test`, e.g. `bash tests/run.sh --test lifecycle`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
guest=$PWD/build/guest

cargo build -p spinbox-shim
root=$(mktemp -d /tmp/spinbox-test.XXXXXX)
cleanup() {
  bash deploy/private-containerd.sh stop "$root/containerd" || true
  rm -rf "$root"
}
trap cleanup EXIT

cat >"$root/spinbox.json" <<JSON
{
  "paths": {
    "qemu": "$(command -v qemu-system-x86_64)",
    "kernel": "$guest/vmlinux",
    "initrd": "$guest/initrd.img",
    "state_dir": "$root/sb/state",
    "log_dir": "$root/sb/log",
    "data_dir": "$root/sb/data",
    "vhost_device_vsock": "$(command -v vhost-device-vsock || echo /usr/local/bin/vhost-device-vsock)"
  }
}
JSON
address=$(bash deploy/private-containerd.sh start "$root/containerd" "$PWD/target/debug" "$root/spinbox.json")
bash tests/image/build-busybox-image.sh "$root/busybox.tar" >/dev/null
ctr --address "$address" images import "$root/busybox.tar" >/dev/null

SPINBOX_REQUIRE_VM=1 SPINBOX_GUEST_DIR=$guest \
SPINBOX_CONTAINERD_ADDRESS=$address SPINBOX_E2E_ROOT=$root/sb SPINBOX_E2E_CONFIG=$root/spinbox.json \
  cargo test --workspace "$@" -- --test-threads="${TEST_THREADS:-2}"
