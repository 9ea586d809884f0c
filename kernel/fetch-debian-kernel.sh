#!/usr/bin/env bash
# Fetch the Debian cloud kernel and the module subset a spinbox guest needs.
#
# usage: kernel/fetch-debian-kernel.sh OUTDIR
#
# Resolves the kernel package behind the linux-image-cloud-amd64 metapackage, downloads it
# with apt-get, and writes:
#   OUTDIR/vmlinuz          the kernel (bzImage)
#   OUTDIR/vmlinux          the bzImage's payload, uncompressed (only if CONFIG_PVH=y): an ELF
#                           QEMU boots through its PVH entry point, which skips the
#                           decompressor (~0.4 s under TCG)
#   OUTDIR/kernel-release   e.g. 6.1.0-56-cloud-amd64
#   OUTDIR/package          "<package> <version>" it came from
#   OUTDIR/config           the kernel's .config
#   OUTDIR/modules/         like /lib/modules/<release>/: modules.dep + the subset's .ko files
#                           (uncompressed)
#   OUTDIR/modules.list     load order, as paths inside the initrd
#                           (/lib/modules/<release>/kernel/...)
#   OUTDIR/modules.ondemand.list  the same for modules the agent loads only when needed
#   OUTDIR/modules.wanted   the module names asked for (a changed list fetches again)
# Does nothing when OUTDIR already holds the resolved package with the same modules.
set -euo pipefail

readonly META_PACKAGE=linux-image-cloud-amd64

# Modules the guest needs; their dependencies are added from modules.dep. Built-in ones
# (listed in modules.builtin) are skipped.
readonly WANTED_MODULES=(
    virtio virtio_ring virtio_pci virtio_blk virtio_net
    vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport
    overlay erofs
    button evdev
    # the serial ports that carry a container's stdout and stderr (docs/ARCHITECTURE.md)
    virtio_console
    # memory the shim hot-plugs and unplugs (vm.max_memory_mib, docs/LIFECYCLE.md)
    virtio_mem
)
# Modules the agent loads only when a container needs them (in this order, dependencies
# first): virtio-fs for writable host directory binds.
readonly ONDEMAND_MODULES=(fuse virtiofs)

die() {
    echo "fetch-debian-kernel: $*" >&2
    exit 1
}
log() { echo "fetch-debian-kernel: $*" >&2; }

[[ $# -eq 1 ]] || die "usage: $0 OUTDIR"
readonly OUTDIR=$1

# Prints the versioned kernel package the metapackage depends on, or nothing.
resolve_package() {
    apt-cache depends "$META_PACKAGE" 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }'
}

package=$(resolve_package)
if [[ -z $package ]]; then
    log "$META_PACKAGE unknown to apt; running apt-get update"
    apt-get update -qq
    package=$(resolve_package)
fi
[[ -n $package ]] || die "cannot resolve $META_PACKAGE to a kernel package"
release=${package#linux-image-}
version=$(apt-cache show --no-all-versions "$package" | awk '$1 == "Version:" { print $2; exit }')
[[ -n $version ]] || die "no version for $package"

# Whether OUTDIR holds a complete fetch of this package.
up_to_date() {
    [[ -f $OUTDIR/kernel-release && -f $OUTDIR/package && -f $OUTDIR/vmlinuz &&
        -f $OUTDIR/config && -f $OUTDIR/modules.list ]] || return 1
    [[ $(<"$OUTDIR/kernel-release") == "$release" &&
        $(<"$OUTDIR/package") == "$package $version" ]] || return 1
    [[ -f $OUTDIR/modules.wanted && $(<"$OUTDIR/modules.wanted") == "${WANTED_MODULES[*]} / ${ONDEMAND_MODULES[*]}" ]] || return 1
    [[ -f $OUTDIR/vmlinux ]] || ! grep -qx 'CONFIG_PVH=y' "$OUTDIR/config"
}
if up_to_date; then
    log "$OUTDIR already holds $package $version"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf -- "$work"' EXIT
# apt-get download drops privileges to _apt when run as root; let it write here.
chmod 0777 "$work"

log "downloading $package $version"
(cd "$work" && apt-get download -q "$package=$version")
debs=("$work"/*.deb)
[[ -f ${debs[0]} ]] || die "apt-get download left no .deb"
root=$work/root
dpkg-deb -x "${debs[0]}" "$root"

[[ -f $root/boot/vmlinuz-$release ]] || die "no boot/vmlinuz-$release in $package"
moddir=
for base in "$root" "$root/usr"; do
    if [[ -d $base/lib/modules/$release ]]; then
        moddir=$base/lib/modules/$release
        modbase=$base
        break
    fi
done
[[ -n $moddir ]] || die "no lib/modules/$release in $package"

# The package carries no modules.dep (its postinst runs depmod); make one.
if [[ ! -f $moddir/modules.dep ]]; then
    depmod -b "$modbase" "$release"
fi

# Writes the uncompressed kernel ELF inside a bzImage (boot protocol >= 2.08: the setup
# header's payload_offset/payload_length locate it).
extract_vmlinux() {
    local bzimage=$1 out=$2 version setup_sects offset length start magic
    version=$(od -An -tu2 -j $((0x206)) -N2 -- "$bzimage" | tr -d ' ')
    ((version >= 0x208)) || die "$bzimage: boot protocol $version has no payload fields"
    setup_sects=$(od -An -tu1 -j $((0x1f1)) -N1 -- "$bzimage" | tr -d ' ')
    ((setup_sects != 0)) || setup_sects=4
    read -r offset length < <(od -An -tu4 -j $((0x248)) -N8 -- "$bzimage")
    start=$(((setup_sects + 1) * 512 + offset))
    magic=$(od -An -tx1 -j "$start" -N4 -- "$bzimage" | tr -d ' \n')
    local decompress
    case $magic in
    02214c18) decompress=(lz4 -dc) ;;
    fd377a58) decompress=(xz -dc) ;;
    28b52ffd) decompress=(zstd -dc) ;;
    1f8b*) decompress=(gzip -dc) ;;
    *) die "$bzimage: unknown payload compression (magic $magic)" ;;
    esac
    # The payload ends with the uncompressed size (4 bytes) that some decompressors call
    # trailing garbage; the ELF header check below is what counts.
    tail -c +$((start + 1)) -- "$bzimage" | head -c "$length" | "${decompress[@]}" 2>/dev/null >"$out" || true
    [[ $(od -An -c -N4 -- "$out" | tr -d ' ') == '177ELF' ]] || die "$bzimage: payload is not an ELF"
}

# module name (dashes as underscores, no extension) of a modules.dep path
modname() {
    local base=${1##*/}
    base=${base%%.ko*}
    echo "${base//-/_}"
}

# path without the compression extension (.ko.xz -> .ko)
uncompressed() { echo "${1%.ko*}.ko"; }

declare -A DEPS=() PATH_OF=() BUILTIN=() SEEN=()
while IFS= read -r line; do
    key=${line%%:*}
    DEPS[$key]=${line#*:}
    PATH_OF[$(modname "$key")]=$key
done <"$moddir/modules.dep"
if [[ -f $moddir/modules.builtin ]]; then
    while IFS= read -r line; do
        BUILTIN[$(modname "$line")]=1
    done <"$moddir/modules.builtin"
fi

ORDER=()
# Depth-first: a module's dependencies before it. modules.dep lists them so that loading
# from the last to the first works, so walk them backwards.
visit() {
    local mod=$1 deps i
    [[ -z ${SEEN[$mod]:-} ]] || return 0
    SEEN[$mod]=1
    read -r -a deps <<<"${DEPS[$mod]}"
    for ((i = ${#deps[@]} - 1; i >= 0; i--)); do
        visit "${deps[i]}"
    done
    ORDER+=("$mod")
}

# Appends the named modules, with what they depend on and ORDER lacks, to ORDER.
add_modules() {
    local name
    for name in "$@"; do
        if [[ -n ${PATH_OF[$name]:-} ]]; then
            visit "${PATH_OF[$name]}"
        elif [[ -n ${BUILTIN[$name]:-} ]]; then
            log "$name is built in"
        else
            die "module $name is neither in modules.dep nor built in"
        fi
    done
}
add_modules "${WANTED_MODULES[@]}"
boot_count=${#ORDER[@]}
add_modules "${ONDEMAND_MODULES[@]}"

mkdir -p "$OUTDIR"
rm -rf -- "$OUTDIR/modules" "$OUTDIR/modules.list" "$OUTDIR/kernel-release" "$OUTDIR/package" \
    "$OUTDIR/vmlinux" "$OUTDIR/modules.wanted" "$OUTDIR/modules.ondemand.list"
mkdir -p "$OUTDIR/modules"
list=()
for mod in "${ORDER[@]}"; do
    dest=$OUTDIR/modules/$(uncompressed "$mod")
    mkdir -p "${dest%/*}"
    case $mod in
    *.ko) cp -- "$moddir/$mod" "$dest" ;;
    *.ko.xz) xz -dc -- "$moddir/$mod" >"$dest" ;;
    *.ko.zst) zstd -qdc -- "$moddir/$mod" >"$dest" ;;
    *.ko.gz) gzip -dc -- "$moddir/$mod" >"$dest" ;;
    *) die "unknown module format: $mod" ;;
    esac
    list+=("/lib/modules/$release/$(uncompressed "$mod")")
done

# modules.dep of the subset (uncompressed names), for reference and for modprobe users.
for mod in "${ORDER[@]}"; do
    read -r -a deps <<<"${DEPS[$mod]}"
    line="$(uncompressed "$mod"):"
    for dep in "${deps[@]}"; do
        line+=" $(uncompressed "$dep")"
    done
    echo "$line"
done >"$OUTDIR/modules/modules.dep"

printf '%s\n' "${list[@]:0:boot_count}" >"$OUTDIR/modules.list"
if ((${#list[@]} > boot_count)); then
    printf '%s\n' "${list[@]:boot_count}" >"$OUTDIR/modules.ondemand.list"
else
    : >"$OUTDIR/modules.ondemand.list"
fi
cp -- "$root/boot/vmlinuz-$release" "$OUTDIR/vmlinuz"
cp -- "$root/boot/config-$release" "$OUTDIR/config"
if grep -qx 'CONFIG_PVH=y' "$OUTDIR/config"; then
    extract_vmlinux "$OUTDIR/vmlinuz" "$OUTDIR/vmlinux"
fi
echo "$package $version" >"$OUTDIR/package"
echo "${WANTED_MODULES[*]} / ${ONDEMAND_MODULES[*]}" >"$OUTDIR/modules.wanted"
# Written last: its presence marks a complete fetch.
echo "$release" >"$OUTDIR/kernel-release"
log "wrote $OUTDIR: $release, ${#ORDER[@]} modules"
