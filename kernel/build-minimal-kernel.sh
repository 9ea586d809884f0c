#!/usr/bin/env bash
# Build the minimal all-built-in microVM kernel (the default guest kernel) from Debian's
# linux-source package, once per input, into a cache that `make clean` leaves alone.
#
# usage: kernel/build-minimal-kernel.sh OUTDIR
#
# Installs linux-source and the build tools with apt-get (root) if they are missing. The
# cache key is a hash of what decides the kernel: the linux-source package and its version,
# the compiler's version line, kernel/microvm.config, kernel/patches/*.patch and this script.
# A key already in the cache is copied out at once; otherwise the script unpacks the source
# (kept under the cache, one tree per source version and set of patches), applies the
# patches, configures allnoconfig + kernel/microvm.config (everything
# off, then only what the guest uses turned on, as Kata and Firecracker build theirs), checks
# that every option of the fragment is in the final .config, builds out of tree, stores the
# result under the key and copies it to OUTDIR:
#   OUTDIR/vmlinuz          bzImage
#   OUTDIR/vmlinux          the uncompressed ELF (QEMU boots it through its PVH entry point,
#                           skipping the emulated decompressor)
#   OUTDIR/kernel-release   `make kernelrelease`
#   OUTDIR/config           the final .config
#   OUTDIR/kernel-key       the cache key it came from
# and removes what fetch-debian-kernel.sh leaves there (modules/, modules.list, ...), so
# build-initrd.sh packs /init only. A build takes about 4 minutes with 2 jobs on a 2-core
# machine (6.1), plus about a minute to unpack the source the first time.
#
# SPINBOX_KERNEL_CACHE: the cache (default ${XDG_CACHE_HOME:-~/.cache}/spinbox/kernel; the
# newest 3 builds are kept). JOBS: the parallelism (default nproc).
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
# Applied in name order with `patch -p1` (kernel/patches/README.md says what each is for).
PATCHES=()
for p in "$(dirname -- "$FRAGMENT")"/patches/*.patch; do
    [[ -e $p ]] && PATCHES+=("$(realpath -- "$p")")
done
readonly PATCHES
readonly JOBS=${JOBS:-$(nproc)}

readonly PACKAGES=(
    linux-source build-essential bc bison flex libelf-dev libssl-dev cpio kmod xz-utils
    lz4 zstd patch
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
source_package=$(dpkg-query -S -- "$tarball" | cut -d: -f1)
source_version=$(dpkg-query -W -f='${Version}' -- "$source_package")
[[ -n $source_version ]] || die "no version for $source_package (owner of $tarball)"

patches_hash=$(cat -- /dev/null "${PATCHES[@]}" | sha256sum | cut -c1-12)
key=$({
    echo "$source_package $source_version"
    LC_ALL=C gcc --version | head -n 1
    cat -- "$FRAGMENT" "${PATCHES[@]}" "${BASH_SOURCE[0]}"
} | sha256sum | cut -c1-16)
readonly CACHE=${SPINBOX_KERNEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/spinbox/kernel}
entry=$CACHE/$key
mkdir -p -- "$CACHE"
# One build at a time per cache (a second `make guest` waits, then finds the entry).
exec 9>"$CACHE/lock"
flock 9

build() {
    local src=$CACHE/src/$srcname-$source_version-$patches_hash obj=$CACHE/obj
    local new=$CACHE/.new-$key p
    if [[ ! -f $src/.spinbox-patched ]]; then
        # Trees of other source versions or patches are of no more use.
        rm -rf -- "$CACHE/src" "$obj"
        mkdir -p -- "$src"
        log "unpacking $tarball ($source_version)"
        tar -xf "$tarball" -C "$src" --strip-components=1
        [[ -f $src/Makefile ]] || die "$tarball did not unpack to $src"
        for p in "${PATCHES[@]}"; do
            log "applying $(basename -- "$p")"
            patch -d "$src" -p1 --forward --batch <"$p" || die "$p does not apply to $srcname $source_version"
        done
        # Its presence marks a tree unpacked and patched to the end.
        : >"$src/.spinbox-patched"
    fi
    mkdir -p -- "$obj"
    local make_args=(-C "$src" O="$obj" ARCH=x86_64 -j"$JOBS")

    # allnoconfig with the fragment as KCONFIG_ALLCONFIG: the fragment's values are forced and
    # every other option that has a prompt is set to n, including the ones the fragment makes
    # visible (merging onto an allnoconfig .config and running olddefconfig would give those
    # their defaults instead: ACPI fan/battery/thermal, cpufreq, all NIC vendors, WLAN, ...).
    log "configuring: allnoconfig + $FRAGMENT"
    make "${make_args[@]}" KCONFIG_ALLCONFIG="$FRAGMENT" allnoconfig

    # Kconfig silently drops what it cannot satisfy; make that an error.
    local bad=() line
    while IFS= read -r line; do
        if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
            grep -qxF -- "$line" "$obj/.config" || bad+=("${BASH_REMATCH[1]}: want ${BASH_REMATCH[2]}")
        elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
            ! grep -qE "^${BASH_REMATCH[1]}=" "$obj/.config" || bad+=("${BASH_REMATCH[1]}: want unset")
        fi
    done <"$FRAGMENT"
    if [[ ${#bad[@]} -gt 0 ]]; then
        printf 'build-minimal-kernel: not in the final .config: %s\n' "${bad[@]}" >&2
        exit 1
    fi

    log "building with $JOBS jobs (cache key $key)"
    make "${make_args[@]}" bzImage

    rm -rf -- "$new"
    mkdir -p -- "$new"
    cp -- "$obj/arch/x86/boot/bzImage" "$new/vmlinuz"
    cp -- "$obj/vmlinux" "$new/vmlinux"
    cp -- "$obj/.config" "$new/config"
    make -s "${make_args[@]}" kernelrelease >"$new/kernel-release"
    echo "$key" >"$new/kernel-key"
    mv -T -- "$new" "$entry"
    # Keep the newest 3 builds.
    find "$CACHE" -mindepth 1 -maxdepth 1 -type d -regex '.*/[0-9a-f]\{16\}' -printf '%T@ %p\n' |
        sort -rn | tail -n +4 | cut -d' ' -f2- | xargs -r rm -rf --
}

if [[ -f $entry/kernel-release ]]; then
    log "cached: $entry ($source_package $source_version)"
    touch -- "$entry"
else
    build
fi

mkdir -p -- "$OUTDIR"
if [[ ! -f $OUTDIR/kernel-key || $(<"$OUTDIR/kernel-key") != "$key" ]]; then
    rm -rf -- "$OUTDIR/modules" "$OUTDIR/modules.list" "$OUTDIR/modules.ondemand.list" \
        "$OUTDIR/modules.wanted" "$OUTDIR/package" "$OUTDIR/kernel-release" "$OUTDIR/kernel-key"
    cp -- "$entry/vmlinuz" "$entry/vmlinux" "$entry/config" "$OUTDIR/"
    cp -- "$entry/kernel-release" "$OUTDIR/kernel-release"
    # Written last: its presence marks a complete copy.
    cp -- "$entry/kernel-key" "$OUTDIR/kernel-key"
fi
log "$OUTDIR: $(<"$OUTDIR/kernel-release") (cache key $key)"
