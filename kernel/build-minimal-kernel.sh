#!/usr/bin/env bash
# Build the minimal all-built-in microVM kernel from Debian's linux-source package.
#
# usage: kernel/build-minimal-kernel.sh OUTDIR
#
# Installs linux-source and the build tools with apt-get (root), unpacks the source under
# OUTDIR/src, configures allnoconfig + kernel/microvm.config (everything off, then only what
# the guest uses turned on, as Kata and Firecracker build theirs), checks that every option of
# the fragment is in the final .config, builds, and writes:
#   OUTDIR/vmlinuz          bzImage
#   OUTDIR/vmlinux          the uncompressed ELF (QEMU boots it through its PVH entry point,
#                           skipping the emulated decompressor)
#   OUTDIR/kernel-release   `make kernelrelease`
#   OUTDIR/config           the final .config
# No modules.list: build-initrd.sh then packs /init only. About 4 minutes with JOBS=2 on a
# 2-core machine (6.1); not run in CI.
# JOBS overrides the parallelism (default: nproc).
set -euo pipefail

die() {
    echo "build-minimal-kernel: $*" >&2
    exit 1
}
log() { echo "build-minimal-kernel: $*" >&2; }

[[ $# -eq 1 ]] || die "usage: $0 OUTDIR"
OUTDIR=$(realpath -m -- "$1")
readonly OUTDIR
FRAGMENT=$(realpath -- "$(dirname -- "${BASH_SOURCE[0]}")/microvm.config")
readonly FRAGMENT
readonly JOBS=${JOBS:-$(nproc)}

readonly PACKAGES=(
    linux-source build-essential bc bison flex libelf-dev libssl-dev cpio kmod xz-utils
    lz4 zstd
)
missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' ||
        missing+=("$pkg")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    [[ $(id -u) -eq 0 ]] || die "need root to install: ${missing[*]}"
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Newest linux-source tarball (the package drops /usr/src/linux-source-<ver>.tar.xz).
tarball=$(find /usr/src -maxdepth 1 -name 'linux-source-*.tar.xz' -print | sort -V | tail -n 1)
[[ -n $tarball ]] || die "no /usr/src/linux-source-*.tar.xz (is linux-source installed?)"
srcname=$(basename -- "$tarball" .tar.xz)
src=$OUTDIR/src/$srcname

mkdir -p "$OUTDIR/src"
if [[ ! -f $src/Makefile ]]; then
    log "unpacking $tarball"
    rm -rf -- "$src"
    tar -xf "$tarball" -C "$OUTDIR/src"
fi
[[ -f $src/Makefile ]] || die "$tarball did not unpack to $src"

make_args=(-C "$src" ARCH=x86_64 -j"$JOBS")

# allnoconfig with the fragment as KCONFIG_ALLCONFIG: the fragment's values are forced and
# every other option that has a prompt is set to n, including the ones the fragment makes
# visible (merging onto an allnoconfig .config and running olddefconfig would give those
# their defaults instead: ACPI fan/battery/thermal, cpufreq, all NIC vendors, WLAN, ...).
log "configuring: allnoconfig + $FRAGMENT"
make "${make_args[@]}" KCONFIG_ALLCONFIG="$FRAGMENT" allnoconfig

# Kconfig silently drops what it cannot satisfy; make that an error.
bad=()
while IFS= read -r line; do
    if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        grep -qxF -- "$line" "$src/.config" || bad+=("${BASH_REMATCH[1]}: want ${BASH_REMATCH[2]}")
    elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        ! grep -qE "^${BASH_REMATCH[1]}=" "$src/.config" || bad+=("${BASH_REMATCH[1]}: want unset")
    fi
done <"$FRAGMENT"
if [[ ${#bad[@]} -gt 0 ]]; then
    printf 'build-minimal-kernel: not in the final .config: %s\n' "${bad[@]}" >&2
    exit 1
fi

log "building with $JOBS jobs"
make "${make_args[@]}" bzImage

release=$(make -s -C "$src" ARCH=x86_64 kernelrelease)
mkdir -p "$OUTDIR"
cp -- "$src/arch/x86/boot/bzImage" "$OUTDIR/vmlinuz"
cp -- "$src/vmlinux" "$OUTDIR/vmlinux"
cp -- "$src/.config" "$OUTDIR/config"
rm -f -- "$OUTDIR/modules.list"
rm -rf -- "$OUTDIR/modules"
echo "$release" >"$OUTDIR/kernel-release"
log "wrote $OUTDIR: $release"
