#!/usr/bin/env bash
# Assemble the spinbox guest initrd (newc cpio).
#
# usage: kernel/build-initrd.sh AGENT_BINARY KERNEL_DIR OUT_INITRD
#
#   AGENT_BINARY  the static spinbox-agent; becomes /init
#   KERNEL_DIR    output of fetch-debian-kernel.sh (kernel-release, modules/, modules.list),
#                 or a directory with only kernel-release (an all-built-in kernel: no modules)
#   OUT_INITRD    the archive to write
#
# SPINBOX_INITRD_COMPRESSION=none|gzip|lz4|zstd picks the compression (default: none, which
# boots fastest under TCG: the kernel's decompressor is emulated too, while the extra bytes
# only cost a memcpy by QEMU's loader). SOURCE_DATE_EPOCH sets the timestamps (default 0);
# the same inputs give the same bytes.
#
# SPINBOX_MODULE_SIGNATURES=strip|keep (default strip): the modules' appended signatures are
# cut off as they are packed. The kernel verifies a signed module on every load (SHA-256 of
# the whole module, emulated under TCG: ~60 ms per boot for the 17 modules); unsigned ones
# load at once (CONFIG_MODULE_SIG_FORCE is off in Debian's kernel; it logs "module
# verification failed" once and marks itself tainted 'E'). Their integrity was checked when
# apt verified the package they come from; `keep` restores the per-boot check.
set -euo pipefail

die() {
    echo "build-initrd: $*" >&2
    exit 1
}

[[ $# -eq 3 ]] || die "usage: $0 AGENT_BINARY KERNEL_DIR OUT_INITRD"
readonly AGENT=$1 KERNEL_DIR=$2 OUT=$3
readonly COMPRESSION=${SPINBOX_INITRD_COMPRESSION:-none}
readonly EPOCH=${SOURCE_DATE_EPOCH:-0}
readonly SIGNATURES=${SPINBOX_MODULE_SIGNATURES:-strip}

[[ -f $AGENT && -x $AGENT ]] || die "$AGENT: not an executable file"
[[ -f $KERNEL_DIR/kernel-release ]] || die "$KERNEL_DIR/kernel-release missing"
release=$(<"$KERNEL_DIR/kernel-release")

# The agent runs before anything else exists: it must not need a dynamic loader.
if LC_ALL=C readelf -l -- "$AGENT" 2>/dev/null | grep -q 'Requesting program interpreter'; then
    die "$AGENT is dynamically linked; build it with RUSTFLAGS='-C target-feature=+crt-static'"
fi

case $SIGNATURES in
strip | keep) ;;
*) die "SPINBOX_MODULE_SIGNATURES=$SIGNATURES: want strip or keep" ;;
esac

# Cuts a module's appended signature: the file ends with struct module_signature (12 bytes,
# the signature's length big-endian in its last 4) and the magic string; the signature
# precedes them. An unsigned module is left alone.
strip_signature() {
    local ko=$1 magic='~Module signature appended~'
    local size tail_magic sig_len
    size=$(stat -c %s -- "$ko")
    ((size > 40)) || return 0
    tail_magic=$(tail -c 28 -- "$ko" | head -c 27)
    [[ $tail_magic == "$magic" ]] || return 0
    sig_len=$(tail -c 32 -- "$ko" | head -c 4 | od -An -tu1 |
        awk '{ print (($1 * 256 + $2) * 256 + $3) * 256 + $4 }')
    ((sig_len > 0 && sig_len + 40 < size)) || die "$ko: implausible signature length $sig_len"
    truncate -s $((size - 40 - sig_len)) -- "$ko"
}

compressor=()
case $COMPRESSION in
none) ;;
gzip) compressor=(gzip -n -9) config_key=CONFIG_RD_GZIP ;;
lz4) compressor=(lz4 -l -9 -q) config_key=CONFIG_RD_LZ4 ;;
zstd) compressor=(zstd -q -19 --no-check) config_key=CONFIG_RD_ZSTD ;;
*) die "SPINBOX_INITRD_COMPRESSION=$COMPRESSION: want none, gzip, lz4 or zstd" ;;
esac
if [[ ${#compressor[@]} -gt 0 && -f $KERNEL_DIR/config ]] &&
    ! grep -qx "$config_key=y" "$KERNEL_DIR/config"; then
    die "the kernel cannot unpack a $COMPRESSION initrd ($config_key is not y)"
fi

work=$(mktemp -d)
tmp_out=$OUT.tmp.$$
trap 'rm -rf -- "$work" "$tmp_out"' EXIT
tree=$work/tree
mkdir -p "$tree"/{proc,sys,dev,run,tmp,mnt,etc,lib/modules}
install -m 0755 -- "$AGENT" "$tree/init"

if [[ -f $KERNEL_DIR/modules.list ]]; then
    [[ -d $KERNEL_DIR/modules ]] || die "$KERNEL_DIR/modules missing"
    mkdir -p "$tree/lib/modules/$release"
    cp -R -- "$KERNEL_DIR/modules/." "$tree/lib/modules/$release/"
    while IFS= read -r path; do
        [[ -z $path ]] || [[ -f $tree$path ]] || die "modules.list names $path, not in $KERNEL_DIR/modules"
    done <"$KERNEL_DIR/modules.list"
    install -m 0644 -- "$KERNEL_DIR/modules.list" "$tree/lib/modules/spinbox-modules.list"
    if [[ -f $KERNEL_DIR/modules.ondemand.list ]]; then
        while IFS= read -r path; do
            [[ -z $path ]] || [[ -f $tree$path ]] || die "modules.ondemand.list names $path, not in $KERNEL_DIR/modules"
        done <"$KERNEL_DIR/modules.ondemand.list"
        install -m 0644 -- "$KERNEL_DIR/modules.ondemand.list" \
            "$tree/lib/modules/spinbox-modules-ondemand.list"
    fi
    if [[ $SIGNATURES == strip ]]; then
        while IFS= read -r -d '' ko; do
            strip_signature "$ko"
        done < <(find "$tree/lib/modules" -name '*.ko' -print0)
    fi
fi

# Same bytes whatever the umask and the source files' modes.
find "$tree" -type d -exec chmod 0755 {} +
find "$tree" -type f -exec chmod 0644 {} +
chmod 0755 "$tree/init"
find "$tree" -exec touch -h -d "@$EPOCH" {} +

# newc header + name (NUL-terminated, padded to 4 bytes) for an entry without data.
# args: inode mode(octal) nlink rdev-major rdev-minor name
newc_entry() {
    local ino=$1 mode=$2 nlink=$3 rmajor=$4 rminor=$5 name=$6
    local namesize=$((${#name} + 1))
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        "$ino" "$((8#$mode))" 0 0 "$nlink" "$EPOCH" 0 0 0 "$rmajor" "$rminor" "$namesize" 0
    printf '%s\0' "$name"
    head -c $(((4 - (110 + namesize) % 4) % 4)) /dev/zero
}

# The tree, then a second archive with /dev/console (char 5,1), written by hand so that no
# mknod (root) or fakeroot is needed. The kernel unpacks concatenated archives in order and
# opens /dev/console for PID 1's stdio before running /init.
archive=$work/initrd.cpio
(
    cd "$tree"
    find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
        cpio --quiet -o -H newc -R 0:0 --reproducible
    newc_entry 1 20600 1 5 1 dev/console
    newc_entry 0 0 1 0 0 'TRAILER!!!'
) >"$archive"

mkdir -p "$(dirname -- "$OUT")"
if [[ ${#compressor[@]} -gt 0 ]]; then
    "${compressor[@]}" <"$archive" >"$tmp_out"
else
    cp -- "$archive" "$tmp_out"
fi
mv -f -- "$tmp_out" "$OUT"
echo "build-initrd: wrote $OUT ($COMPRESSION, $(stat -c %s -- "$OUT") bytes, kernel $release)" >&2
