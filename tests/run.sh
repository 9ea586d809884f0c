#!/usr/bin/env bash
# Runs the whole suite (`make test`): unit tests, VM tests, and the end-to-end tests against
# one private containerd shared by all of them, with spinbox configured as a runtime.
# Arguments go to `cargo test`, e.g. `bash tests/run.sh --test lifecycle`.
# `bash tests/run.sh --bench` (make bench) runs the benchmark instead, with release binaries.
# SPINBOX_CONTAINERD_BIN_DIR: run against the containerd + ctr in that folder (another version,
# tests/containerd-matrix.sh); SPINBOX_TESTS: only these tests (exact names, space-separated).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
[[ -n ${SPINBOX_CONTAINERD_BIN_DIR:-} ]] && export PATH="$SPINBOX_CONTAINERD_BIN_DIR:$PATH"
# The guest: build/guest, or the one SPINBOX_GUEST_DIR names (tests/kernel-smoke.sh).
guest=$(realpath -- "${SPINBOX_GUEST_DIR:-build/guest}")

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
# The CRI plugin's pods (tests/pod.rs) get a CNI network of their own too.
cri_bridge=spbcri0
cleanup() {
  cleanup_cri_pods
  bash deploy/private-containerd.sh stop "$root/containerd" || true
  cleanup_cri_netns
  # Shims killed by the stop leave their VMs' records: reclaim them (VM, network) by record.
  SPINBOX_CONFIG=$root/spinbox.json "target/$profile_dir/spinbox" gc >/dev/null || true
  ip link del "$test_bridge" 2>/dev/null || true
  ip link del "$cri_bridge" 2>/dev/null || true
  rm -rf "$root"
}
# Pods a failed test left (tests/pod.rs removes its own): their tasks are killed through
# containerd, as runc's containers outlive a killed shim.
cleanup_cri_pods() {
  local sock=$root/containerd/containerd.sock task
  [[ -S $sock ]] || return 0
  for task in $(ctr --address "$sock" -n k8s.io task ls -q 2>/dev/null); do
    ctr --address "$sock" -n k8s.io task rm -f "$task" >/dev/null 2>&1 || true
  done
}
# Their network namespaces (CRI's cni-*, containerd's to remove), found by their veths on
# the suite's bridge.
cleanup_cri_netns() {
  local nsid ns
  for nsid in $(ip -d -o link show master "$cri_bridge" 2>/dev/null | grep -o 'link-netnsid [0-9]*' | cut -d' ' -f2); do
    ns=$(ip netns list | awk -v id="$nsid)" '$3 == id {print $1}')
    [[ -n $ns ]] && ip netns del "$ns"
  done
  return 0
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
mkdir -p "$root/cri/net.d"
cat >"$root/cri/net.d/10-spinbox-cri-test.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "spinbox-cri-test",
  "plugins": [
    {
      "type": "bridge", "bridge": "$cri_bridge", "isGateway": true, "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local", "dataDir": "$root/cri/ipam",
        "ranges": [[{ "subnet": "10.87.251.0/24" }]]
      }
    },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}
JSON
# The same config with one hotplug slot, for the CRI handler `spinbox-tight` (tests/pod.rs).
sed 's/^  "network": {$/  "vm": { "hotplug_slots": 1 },\n  "network": {/' "$root/spinbox.json" >"$root/spinbox-tight.json"
grep -q '"hotplug_slots": 1' "$root/spinbox-tight.json"
address=$(SPINBOX_CRI_CNI_CONF_DIR=$root/cri/net.d SPINBOX_CRI_TIGHT_CONFIG=$root/spinbox-tight.json \
  bash deploy/private-containerd.sh start "$root/containerd" "$PWD/target/$profile_dir" "$root/spinbox.json")
bash tests/image/build-busybox-image.sh "$root/busybox.tar" >/dev/null
bash tests/image/build-pause-image.sh "$root/pause.tar" >/dev/null
ctr --address "$address" images import "$root/busybox.tar" >/dev/null
# CRI sees the k8s.io namespace only; there is no registry to pull the sandbox image from.
ctr --address "$address" -n k8s.io images import "$root/busybox.tar" >/dev/null
ctr --address "$address" -n k8s.io images import "$root/pause.tar" >/dev/null
if $bench; then
  # The other guest kernel, for its boot floor beside this one's (make guest-other).
  for other in build/guest-debian build/guest-minimal; do
    if [[ $(realpath -- "$other") != "$guest" && -f $other/kernel-release && -f $other/initrd.img ]]; then
      SPINBOX_BENCH_OTHER_GUEST=$(realpath -- "$other")
      export SPINBOX_BENCH_OTHER_GUEST
      break
    fi
  done
  # The bench's peers (tests/src/bin/bench/peers.rs): gVisor's runsc as Debian trixie
  # packages it (bookworm's predates the systrap platform), and a Debian bookworm image with
  # python3, both cached across runs (build/runsc, ~/.cache/spinbox/images). Either missing
  # (no network on a first run): the bench leaves its rows out, saying so.
  if runsc_dir=$(bash tests/fetch-runsc.sh trixie build/runsc/trixie); then
    export SPINBOX_BENCH_RUNSC=$runsc_dir/runsc
  else
    echo "tests/run.sh: no runsc: the bench runs without gVisor" >&2
  fi
  debian_image=localhost/spinbox-bench/debian-python:bookworm
  if bash tests/image/build-debian-image.sh "$root/debian-python.tar" "$debian_image" >&2; then
    ctr --address "$address" images import "$root/debian-python.tar" >/dev/null
    rm -f "$root/debian-python.tar"
    export SPINBOX_BENCH_DEBIAN_IMAGE=$debian_image
  else
    echo "tests/run.sh: no Debian image: the bench runs without the python3 row" >&2
  fi
fi
# Which containerd this run drives (tests/containerd-matrix.sh checks it is the one it chose).
echo "tests/run.sh: containerd $(ctr --address "$address" version | awk '/^Server:/ {s = 1} s && /Version:/ {v = $2} END {print v}') ($(command -v ctr))" >&2

export SPINBOX_REQUIRE_VM=1 SPINBOX_GUEST_DIR=$guest \
  SPINBOX_CONTAINERD_ADDRESS=$address SPINBOX_E2E_ROOT=$root/sb SPINBOX_E2E_CONFIG=$root/spinbox.json \
  SPINBOX_CRI_ADDRESS=$address SPINBOX_CRI_IPAM_DIR=$root/cri/ipam
if $bench; then
  target/release/bench "$@"
else
  # shellcheck disable=SC2086 # SPINBOX_TESTS is a list of names
  cargo test --workspace "$@" -- --test-threads="${TEST_THREADS:-2}" ${SPINBOX_TESTS:+--exact $SPINBOX_TESTS}
fi
