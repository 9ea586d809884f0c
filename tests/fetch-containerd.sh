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
# Signatures: the suite's InRelease is checked against Debian's archive keyring as installed on
# the host (debian-archive-keyring; bookworm's 2023.3+deb12u2 holds the trixie keys, which sign
# trixie and sid), `signed-by` that file, and the .deb against the SHA256 the signed index
# names, as apt always does. SPINBOX_DEBIAN_KEYRING names another keyring file. Nothing here
# turns verification off: a suite signed by keys the keyring lacks fails, naming the keyring.
set -euo pipefail
suite=${1:?usage: $0 trixie|sid DEST}
dest=${2:?usage: $0 trixie|sid DEST}
mirror=${SPINBOX_DEBIAN_MIRROR:-http://deb.debian.org/debian}
keyring=${SPINBOX_DEBIAN_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}

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
apt_dir=$dest/apt

if [[ ${SPINBOX_CONTAINERD_REFRESH:-0} != 1 ]] && check_bins "$bin"; then
  echo "fetch-containerd ($suite): cached $(cat "$dest/version" 2>/dev/null || echo '?') in $dest" >&2
  echo "$bin"
  exit 0
fi

command -v apt-get >/dev/null || fail "apt-get not found"
[[ -r $keyring ]] || fail "keyring $keyring not readable (Debian package debian-archive-keyring)"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/empty" "$apt_dir/debs"
: >"$apt_dir/status"
echo "deb [signed-by=$keyring] $mirror $suite main" >"$apt_dir/sources.list"
# The host's apt.conf.d still applies (proxies, timeouts); its sources, pins and dpkg state
# do not. No DEP-11/translation indexes: only Packages is needed.
apt_opts=(
  -o "Dir::Etc::SourceList=$apt_dir/sources.list"
  -o "Dir::Etc::SourceParts=$apt_dir/empty"
  -o "Dir::Etc::Preferences=$apt_dir/empty/none"
  -o "Dir::Etc::PreferencesParts=$apt_dir/empty"
  -o "Dir::State::Lists=$apt_dir/lists"
  -o "Dir::State::status=$apt_dir/status"
  -o "Dir::Cache=$apt_dir/cache"
  -o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false"
  -o "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false"
  -o "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false"
  -o "Acquire::Languages=none"
)
# apt downloads as _apt where it can; let it write our folders (else it warns and goes on).
if [[ $(id -u) == 0 ]] && id _apt >/dev/null 2>&1; then
  chown -R _apt "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/debs"
fi

log=$apt_dir/update.log
# apt-get update exits 0 when an index failed to download ("W: Failed to fetch"): read the log.
if ! apt-get "${apt_opts[@]}" update >"$log" 2>&1 ||
  grep -qE '^E: |^W: .*(Failed to fetch|GPG error|not signed|failed to download)' "$log"; then
  cat "$log" >&2
  if grep -qE 'NO_PUBKEY|GPG error|not signed|EXPKEYSIG' "$log"; then
    fail "apt-get update of $mirror $suite: signature not verified with $keyring (a newer debian-archive-keyring, e.g. from bookworm-updates, or SPINBOX_DEBIAN_KEYRING)"
  fi
  fail "apt-get update of $mirror $suite failed (log above)"
fi
version=$(apt-cache "${apt_opts[@]}" show containerd 2>/dev/null | awk '/^Version:/ && !v {v = $2} END {print v}')
[[ -n $version ]] || fail "no containerd package in $mirror $suite"

if [[ -f $dest/version && $(cat "$dest/version") == "$version" ]] && check_bins "$bin"; then
  echo "fetch-containerd ($suite): containerd $version already in $dest" >&2
  echo "$bin"
  exit 0
fi

rm -f "$apt_dir/debs/"*.deb
if ! (cd "$apt_dir/debs" && apt-get "${apt_opts[@]}" download "containerd=$version") >"$apt_dir/download.log" 2>&1; then
  cat "$apt_dir/download.log" >&2
  fail "apt-get download containerd=$version from $mirror $suite failed (log above)"
fi
deb=$(ls "$apt_dir/debs/"containerd_*.deb)
rm -rf "$dest/root"
dpkg -x "$deb" "$dest/root" || fail "dpkg -x $deb failed"
for b in containerd ctr containerd-shim-runc-v2; do
  [[ -x $bin/$b ]] || fail "$(basename "$deb") has no usr/bin/$b"
done
"$bin/containerd" --version >&2 || fail "$bin/containerd does not run on this machine"
"$bin/ctr" --version >&2 || fail "$bin/ctr does not run on this machine"
echo "$version" >"$dest/version"
rm -f "$deb"
echo "fetch-containerd ($suite): containerd $version in $dest" >&2
echo "$bin"
