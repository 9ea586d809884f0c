#!/usr/bin/env bash
# A private containerd for the demo and the end-to-end tests: its own root, state and sockets
# under DIR, spinbox's shim found on its PATH, nothing shared with a system containerd.
#   private-containerd.sh start DIR SHIM_DIR [SPINBOX_CONFIG]   # prints the socket address
#   private-containerd.sh stop DIR
set -euo pipefail
cmd=${1:?start|stop}
dir=${2:?directory}

case "$cmd" in
start)
  shim_dir=${3:?directory holding containerd-shim-spinbox-v2}
  spinbox_config=${4:-}
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  cat >"$dir/config.toml" <<TOML
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd.sock.ttrpc"
[debug]
  level = "info"
TOML
  env_args=(PATH="$shim_dir:$PATH")
  [[ -n "$spinbox_config" ]] && env_args+=(SPINBOX_CONFIG="$spinbox_config")
  setsid env "${env_args[@]}" containerd --config "$dir/config.toml" >"$dir/containerd.log" 2>&1 </dev/null &
  echo $! >"$dir/containerd.pid"
  for _ in $(seq 1 100); do
    if ctr --address "$dir/containerd.sock" version >/dev/null 2>&1; then
      echo "$dir/containerd.sock"
      exit 0
    fi
    sleep 0.1
  done
  echo "containerd did not come up; log:" >&2
  tail -20 "$dir/containerd.log" >&2
  exit 1
  ;;
stop)
  [[ -d "$dir" ]] || exit 0
  if [[ -f "$dir/containerd.pid" ]]; then
    pid=$(cat "$dir/containerd.pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
  fi
  # Shims outlive containerd by design; a run that ends with tasks left (a failed test) must not
  # leave them, nor their VMs, which die with their shim (parent-death signal).
  if pkill -KILL -f -- "-address $dir/containerd.sock" 2>/dev/null; then
    echo "private-containerd: killed shims left by $dir" >&2
    sleep 1
  fi
  # Snapshot mounts containerd may still hold under its root.
  grep -F " $dir/" /proc/mounts | awk '{print $2}' | sort -r | while read -r m; do umount -l "$m" || true; done
  rm -rf "$dir"
  ;;
*) echo "usage: $0 start DIR SHIM_DIR [SPINBOX_CONFIG] | stop DIR" >&2; exit 2 ;;
esac
