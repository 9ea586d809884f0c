#!/usr/bin/env bash
# The demo: a private containerd with spinbox as a runtime, a locally built busybox image,
# and `ctr run --runtime io.containerd.spinbox.v2` printing a greeting and the kernel release
# from inside the microVM. Everything lives in a temp dir and is removed afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

work=$(mktemp -d /tmp/spinbox-demo.XXXXXX)
# The shipped conflist's bridge: removed afterwards if the demo is what created it.
bridge_existed=false
ip link show spinbox0 >/dev/null 2>&1 && bridge_existed=true
cleanup() {
  bash deploy/private-containerd.sh stop "$work/containerd" >/dev/null 2>&1 || true
  $bridge_existed || ip link del spinbox0 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
guest=$PWD/build/guest
cat >"$work/config.json" <<JSON
{
  "paths": {
    "qemu": "$(command -v qemu-system-x86_64)",
    "kernel": "$guest/vmlinux",
    "initrd": "$guest/initrd.img",
    "state_dir": "$work/sb/state",
    "log_dir": "$work/sb/log",
    "data_dir": "$work/sb/data",
    "vhost_device_vsock": "$(command -v vhost-device-vsock || echo /usr/local/bin/vhost-device-vsock)"
  },
  "network": {
    "cni_conflist": "$PWD/deploy/cni/spinbox.conflist",
    "lock_file": "$work/sb/network.lock"
  }
}
JSON
echo "== starting a private containerd with spinbox configured"
address=$(bash deploy/private-containerd.sh start "$work/containerd" "$PWD/target/release" "$work/config.json")
echo "== importing a locally built busybox image"
bash tests/image/build-busybox-image.sh "$work/busybox.tar" >/dev/null
ctr --address "$address" images import "$work/busybox.tar"
echo "== ctr run --runtime io.containerd.spinbox.v2 (host kernel: $(uname -r))"
time ctr --address "$address" run --rm --runtime io.containerd.spinbox.v2 \
  docker.io/library/spinbox-busybox:latest spinbox-demo \
  sh -c 'echo "Hello from a spinbox microVM!"; echo "guest kernel: $(uname -r)"
         echo "network (CNI bridge spinbox0): $(ip -4 -o addr show eth0 | awk "{print \$4}")"'
