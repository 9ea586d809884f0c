#!/usr/bin/env bash
# Fetches the containerd (+ ctr, + its runc shim) of another Debian suite without installing it:
# a private apt sources list and lists dir under DEST (the host's apt state, dpkg database and
# containerd stay untouched), `apt-get download containerd`, `dpkg -x` into DEST. Prints the
# folder holding the binaries (DEST/root/usr/bin). They run on bookworm's libc.
#   fetch-containerd.sh SUITE DEST        # SUITE: trixie (containerd 1.7) | sid (containerd 2.x)
#
# Cache: when DEST already holds binaries that run, nothing is fetched (no network): the version
# is whatever was fetched first (DEST/version says which). SPINBOX_CONTAINERD_REFRESH=1 asks the
# archive for the suite's current version and fetches again only if it differs.
#
# Signatures and mirror: tests/debian-deb.sh (the suite's InRelease checked against the host's
# debian-archive-keyring, the .deb against the signed index; SPINBOX_DEBIAN_KEYRING,
# SPINBOX_DEBIAN_MIRROR).
set -euo pipefail
suite=${1:?usage: $0 trixie|sid DEST}
dest=${2:?usage: $0 trixie|sid DEST}
# shellcheck source=tests/debian-deb.sh
. "$(dirname "$0")/debian-deb.sh"

fail() {
  echo "fetch-containerd ($suite): $*" >&2
  exit 1
}
trap 'echo "fetch-containerd ($suite): failed at line $LINENO: $BASH_COMMAND" >&2' ERR
# Each binary must run here (bookworm's libc); prints containerd's version line.
check_bins() {
  local bin=$1
  for b in containerd ctr containerd-shim-runc-v2; do
    [[ -x $bin/$b ]] || return 1
  done
  "$bin/containerd" --version >/dev/null 2>&1 && "$bin/ctr" --version >/dev/null 2>&1
}

mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
bin=$dest/root/usr/bin

if [[ ${SPINBOX_CONTAINERD_REFRESH:-0} != 1 ]] && check_bins "$bin"; then
  echo "fetch-containerd ($suite): cached $(cat "$dest/version" 2>/dev/null || echo '?') in $dest" >&2
  echo "$bin"
  exit 0
fi

deb_update "$dest" "$suite"
version=$(deb_version containerd)
[[ -n $version ]] || fail "no containerd package in $deb_mirror $suite"

if [[ -f $dest/version && $(cat "$dest/version") == "$version" ]] && check_bins "$bin"; then
  echo "fetch-containerd ($suite): containerd $version already in $dest" >&2
  echo "$bin"
  exit 0
fi

deb_unpack containerd "$version" "$dest/root"
for b in containerd ctr containerd-shim-runc-v2; do
  [[ -x $bin/$b ]] || fail "containerd $version has no usr/bin/$b"
done
"$bin/containerd" --version >&2 || fail "$bin/containerd does not run on this machine"
"$bin/ctr" --version >&2 || fail "$bin/ctr does not run on this machine"
echo "$version" >"$dest/version"
echo "fetch-containerd ($suite): containerd $version in $dest" >&2
echo "$bin"
