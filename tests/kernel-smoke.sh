#!/usr/bin/env bash
# The other guest kernel's smoke set: `make test` runs the whole suite on the default guest
# (build/guest: the minimal kernel unless GUEST_KERNEL=debian) and then these tests on the
# other one (build/guest-<kernel>, `make guest-other`), through the same harness
# (tests/run.sh with SPINBOX_GUEST_DIR). What differs between the kernels is what is chosen
# here: modules loaded at boot (vsock, virtio_mem) and on demand (fuse, virtiofs) on Debian's
# kernel, built in on the minimal one; hotplug of disks, vCPUs and memory; cgroup BPF device
# rules; the network; the shutdown ladder's first rung (ctrl-alt-del).
#   kernel-smoke.sh GUEST_DIR
# A test that fails, or a listed test that did not run (a renamed test), fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=tests/smoke-lib.sh
source tests/smoke-lib.sh
[[ $# -eq 1 ]] || { echo "usage: $0 GUEST_DIR" >&2; exit 2; }
guest=$(realpath -- "$1")
[[ -f $guest/vmlinux && -f $guest/initrd.img && -f $guest/kernel-release ]] ||
  { echo "kernel-smoke: $guest holds no guest (vmlinux, initrd.img, kernel-release)" >&2; exit 2; }
smoke=(
  # boots, answers over vsock, shuts down at ctrl-alt-del; the modules of modules.list loaded
  vm:boots_answers_health_over_vhost_user_vsock_and_shuts_down_clean
  # run --rm: output, exit codes, stderr, events, as runc
  e2e:echo_and_exit_codes_match_runc
  # virtio-fs (fuse + virtiofs, on demand on Debian's kernel)
  e2e:writable_directory_binds_are_shared_live_like_runc
  # vCPU and virtio-mem hotplug and unplug
  sizing:an_update_grows_and_shrinks_the_running_vm_and_a_killed_shim_leaves_nothing
  # CNI: addresses, the gateway, each other, published ports
  network:cni_containers_get_addresses_reach_the_gateway_each_other_and_published_ports
  # a pod's member disks hot-plugged and unplugged on PCIe root ports
  pod:a_late_container_joins_and_a_removed_one_leaves_its_sibling::spinbox
  # the cgroup v2 BPF device program
  devices:default_container_device_rules_match_runc
)
smoke_split "${smoke[@]}"
log=$(mktemp /tmp/spinbox-kernel-smoke.XXXXXX)
trap 'rm -f "$log"' EXIT
echo "== guest kernel smoke set: $(<"$guest/kernel-release") ($guest)"
started=$SECONDS
rc=0
SPINBOX_GUEST_DIR=$guest SPINBOX_TESTS="${smoke_names[*]}" \
  bash tests/run.sh "${smoke_targets[@]}" 2>&1 | tee "$log" || rc=$?
smoke_check "$log" "${smoke_names[@]}"
echo "== guest kernel smoke set: $(<"$guest/kernel-release"): $((${#smoke_names[@]} - ${#smoke_missing[@]}))/${#smoke_names[@]} passed in $((SECONDS - started)) s"
if ((rc != 0 || ${#smoke_missing[@]})); then
  echo "kernel-smoke: FAILED on $(<"$guest/kernel-release"): ${smoke_missing[*]:-(tests/run.sh exit $rc)}" >&2
  exit 1
fi
