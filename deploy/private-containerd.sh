#!/usr/bin/env bash
# A private containerd for the demo and the end-to-end tests: its own root, state and sockets
# under DIR, spinbox's shim found on its PATH, nothing shared with a system containerd.
#   private-containerd.sh start DIR SHIM_DIR [SPINBOX_CONFIG]   # prints the socket address
#   private-containerd.sh stop DIR
# CRI is off unless SPINBOX_CRI_CNI_CONF_DIR names a CNI conf dir: then the CRI plugin serves
# on the same socket with runtime handlers `spinbox` and `runc` (the baseline), CNI plugins
# from /usr/lib/cni, and the sandbox image SPINBOX_CRI_SANDBOX_IMAGE (default
# docker.io/library/spinbox-pause:latest, tests/image/build-pause-image.sh), which must be
# imported into the k8s.io namespace (there is no registry to pull it from).
# SPINBOX_CRI_TIGHT_CONFIG: a spinbox config for a third handler, `spinbox-tight`.
# SPINBOX_CONTAINERD_BIN_DIR: a folder with the containerd, ctr and containerd-shim-runc-v2 to
# use (another version, tests/fetch-containerd.sh); default: those on PATH. containerd 2.x
# takes this version 2 config and migrates it (one warning in its log).
# SPINBOX_CONTAINERD_LOG_LEVEL: containerd's log level (default info; debug raises the shims' too).
set -euo pipefail
cmd=${1:?start|stop}
dir=${2:?directory}
bin_dir=${SPINBOX_CONTAINERD_BIN_DIR:-}
containerd_bin=${bin_dir:+$bin_dir/}containerd
ctr_bin=${bin_dir:+$bin_dir/}ctr

# The CRI part of the config (containerd 1.6/1.7, config version 2), or CRI disabled.
cri_config() {
  if [[ -z "${SPINBOX_CRI_CNI_CONF_DIR:-}" ]]; then
    echo 'disabled_plugins = ["io.containerd.grpc.v1.cri"]'
    return
  fi
  local cri='plugins."io.containerd.grpc.v1.cri"'
  # These machines drop CAP_SYS_RESOURCE even for root: without restrict_oom_score_adj runc
  # fails to give the sandbox its -998 oom_score_adj. No AppArmor on them either.
  cat <<TOML
[$cri]
  sandbox_image = "${SPINBOX_CRI_SANDBOX_IMAGE:-docker.io/library/spinbox-pause:latest}"
  restrict_oom_score_adj = true
  disable_apparmor = true
[$cri.cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "$SPINBOX_CRI_CNI_CONF_DIR"
[$cri.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[$cri.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[$cri.containerd.runtimes.spinbox]
  runtime_type = "io.containerd.spinbox.v2"
TOML
  [[ -n "$spinbox_config" ]] && cat <<TOML
[$cri.containerd.runtimes.spinbox.options]
  ConfigPath = "$spinbox_config"
TOML
  # A second spinbox handler with a config of its own (tests: a pod VM with one hotplug slot).
  [[ -n "${SPINBOX_CRI_TIGHT_CONFIG:-}" ]] && cat <<TOML
[$cri.containerd.runtimes.spinbox-tight]
  runtime_type = "io.containerd.spinbox.v2"
[$cri.containerd.runtimes.spinbox-tight.options]
  ConfigPath = "$SPINBOX_CRI_TIGHT_CONFIG"
TOML
  return 0
}

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
$(cri_config)
[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd.sock.ttrpc"
[debug]
  level = "${SPINBOX_CONTAINERD_LOG_LEVEL:-info}"
TOML
  env_args=(PATH="$shim_dir:${bin_dir:+$bin_dir:}$PATH")
  [[ -n "$spinbox_config" ]] && env_args+=(SPINBOX_CONFIG="$spinbox_config")
  # Only stdio: a descriptor the caller holds (a lock, a pipe) must not live on in a daemon.
  setsid env "${env_args[@]}" "$containerd_bin" --config "$dir/config.toml" >"$dir/containerd.log" 2>&1 </dev/null \
    3>&- 4>&- 5>&- 6>&- 7>&- 8>&- 9>&- &
  echo $! >"$dir/containerd.pid"
  for _ in $(seq 1 100); do
    if "$ctr_bin" --address "$dir/containerd.sock" version >/dev/null 2>&1; then
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
  # (awk, not grep: with pipefail, a grep that finds nothing would end the script here.)
  awk -v d=" $dir/" 'index($0, d) {print $2}' /proc/mounts | sort -r | while read -r m; do umount -l "$m" || true; done
  rm -rf "$dir"
  ;;
*) echo "usage: $0 start DIR SHIM_DIR [SPINBOX_CONFIG] | stop DIR" >&2; exit 2 ;;
esac
