#!/usr/bin/env bash
# Fetches gVisor's runsc as Debian packages it (package runsc) from SUITE without installing
# it, for `make bench` (tests/src/bin/bench/peers.rs): a private apt state under DEST (the
# host's apt state and dpkg database stay untouched), `apt-get download runsc`, `dpkg -x` into
# DEST/root. Prints the folder holding the runsc binary (DEST/root/usr/bin).
#   fetch-runsc.sh SUITE DEST        # SUITE: trixie (runsc 0.0~20240729: has systrap)
# bookworm's runsc (20221219) predates the systrap platform (gVisor 2023-04); the bench runs
# runsc with --platform=systrap, hence trixie. runsc is a static Go binary.
#
# Cache: when DEST already holds a runsc that runs and SUITE's version is the one DEST/version
# names, nothing is downloaded; when the archive cannot be read the cached one is used as is
# (saying so).
# Signatures and mirror: tests/debian-deb.sh.
set -euo pipefail
suite=${1:?usage: $0 SUITE DEST}
dest=${2:?usage: $0 SUITE DEST}
# shellcheck source=tests/debian-deb.sh
. "$(dirname "$0")/debian-deb.sh"

# Until the suite's version is known, a failure (no network, mirror down) falls back on a
# cached runsc that runs, saying so.
fallback=true
fail() {
  if $fallback && [[ -n $cached ]] && check_bin "$bin"; then
    echo "fetch-runsc ($suite): $*; using the cached runsc $cached in $dest" >&2
    echo "$bin"
    exit 0
  fi
  echo "fetch-runsc ($suite): $*" >&2
  exit 1
}
trap 'echo "fetch-runsc ($suite): failed at line $LINENO: $BASH_COMMAND" >&2' ERR
check_bin() {
  [[ -x $1/runsc ]] && "$1/runsc" --version >/dev/null 2>&1
}

mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
bin=$dest/root/usr/bin
cached=$(cat "$dest/version" 2>/dev/null || true)

deb_update "$dest" "$suite"
version=$(deb_version runsc)
fallback=false
[[ -n $version ]] || fail "no runsc package in $deb_mirror $suite"

if [[ $cached == "$version" ]] && check_bin "$bin"; then
  echo "fetch-runsc ($suite): runsc $version already in $dest" >&2
  echo "$bin"
  exit 0
fi

deb_unpack runsc "$version" "$dest/root"
[[ -x $bin/runsc ]] || fail "runsc $version has no usr/bin/runsc"
"$bin/runsc" --version >&2 || fail "$bin/runsc does not run on this machine"
echo "$version" >"$dest/version"
echo "fetch-runsc ($suite): runsc $version in $dest" >&2
echo "$bin"
