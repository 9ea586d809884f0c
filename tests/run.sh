#!/usr/bin/env bash
# Runs the whole suite (`make test`): unit tests, VM tests, and the end-to-end tests against
# one private containerd shared by all of them, with spinbox configured as a runtime.
# Arguments go to `cargo test`, e.g. `bash tests/run.sh --test lifecycle`.
# `bash tests/run.sh --bench` (make bench) runs the benchmark instead, with release binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
guest=$PWD/build/guest

bench=false
profile_dir=debug
if [[ ${1:-} == --bench ]]; then
  bench=true
  profile_dir=release
  shift
  cargo build --release -p spinbox-shim -p spinbox-cli
  cargo build --release -p spinbox-tests --bin bench
else
  cargo build -p spinbox-shim -p spinbox-cli
fi
root=$(mktemp -d /tmp/spinbox-test.XXXXXX)
# CNI for the e2e containers: a bridge and subnet of the suite's own (the shipped conflist's
# spinbox0 / 10.87.0.0/16 stay untouched), host-local allocations kept under the test root.
test_bridge=spbtest0
cleanup() {
  bash deploy/private-containerd.sh stop "$root/containerd" || true
  # Shims killed by the stop leave their VMs' records: reclaim them (VM, network) by record.
  SPINBOX_CONFIG=$root/spinbox.json "target/$profile_dir/spinbox" gc >/dev/null || true
  ip link del "$test_bridge" 2>/dev/null || true
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
  },
  "network": {
    "cni_conflist": "$root/spinbox-test.conflist",
    "lock_file": "$root/sb/network.lock"
  }
}
JSON
cat >"$root/spinbox-test.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "spinbox-test",
  "plugins": [
    {
      "type": "bridge", "bridge": "$test_bridge", "isGateway": true, "isDefaultGateway": true,
      "ipMasq": false, "hairpinMode": true,
      "ipam": {
        "type": "host-local", "dataDir": "$root/sb/ipam",
        "ranges": [[{ "subnet": "10.87.250.0/24" }]]
      }
    },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}
JSON
address=$(bash deploy/private-containerd.sh start "$root/containerd" "$PWD/target/$profile_dir" "$root/spinbox.json")
bash tests/image/build-busybox-image.sh "$root/busybox.tar" >/dev/null
ctr --address "$address" images import "$root/busybox.tar" >/dev/null

export SPINBOX_REQUIRE_VM=1 SPINBOX_GUEST_DIR=$guest \
  SPINBOX_CONTAINERD_ADDRESS=$address SPINBOX_E2E_ROOT=$root/sb SPINBOX_E2E_CONFIG=$root/spinbox.json
if $bench; then
  target/release/bench "$@"
else
  cargo test --workspace "$@" -- --test-threads="${TEST_THREADS:-2}"
fi
