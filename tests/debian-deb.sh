# One package of another Debian suite, fetched without installing it: a private apt sources
# list, lists dir and cache under DEST/apt (the host's apt state, dpkg database and installed
# packages stay untouched), `apt-get download`, `dpkg -x`. Sourced by tests/fetch-containerd.sh
# and tests/fetch-runsc.sh, which define `fail MESSAGE` (print, exit 1) before calling:
#   deb_update DEST SUITE         # the suite's indexes into DEST/apt, verified
#   deb_version PACKAGE           # prints the suite's version of PACKAGE (empty: none)
#   deb_unpack PACKAGE VERSION ROOT   # downloads PACKAGE=VERSION, unpacks it into ROOT (replaced)
#
# Signatures: the suite's InRelease is checked against Debian's archive keyring as installed on
# the host (debian-archive-keyring; bookworm's 2023.3+deb12u2 holds the trixie keys, which sign
# trixie and sid), `signed-by` that file, and the .deb against the SHA256 the signed index
# names, as apt always does. SPINBOX_DEBIAN_KEYRING names another keyring file,
# SPINBOX_DEBIAN_MIRROR another mirror. Nothing here turns verification off: a suite signed by
# keys the keyring lacks fails, naming the keyring.

deb_mirror=${SPINBOX_DEBIAN_MIRROR:-http://deb.debian.org/debian}
deb_keyring=${SPINBOX_DEBIAN_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}
deb_apt_dir=
deb_apt_opts=()

deb_update() {
  local dest=$1 suite=$2
  command -v apt-get >/dev/null || fail "apt-get not found"
  [[ -r $deb_keyring ]] || fail "keyring $deb_keyring not readable (Debian package debian-archive-keyring)"
  deb_apt_dir=$dest/apt
  mkdir -p "$deb_apt_dir/lists/partial" "$deb_apt_dir/cache/archives/partial" "$deb_apt_dir/empty" "$deb_apt_dir/debs"
  : >"$deb_apt_dir/status"
  echo "deb [signed-by=$deb_keyring] $deb_mirror $suite main" >"$deb_apt_dir/sources.list"
  # The host's apt.conf.d still applies (proxies, timeouts); its sources, pins and dpkg state
  # do not. No DEP-11/translation indexes: only Packages is needed.
  deb_apt_opts=(
    -o "Dir::Etc::SourceList=$deb_apt_dir/sources.list"
    -o "Dir::Etc::SourceParts=$deb_apt_dir/empty"
    -o "Dir::Etc::Preferences=$deb_apt_dir/empty/none"
    -o "Dir::Etc::PreferencesParts=$deb_apt_dir/empty"
    -o "Dir::State::Lists=$deb_apt_dir/lists"
    -o "Dir::State::status=$deb_apt_dir/status"
    -o "Dir::Cache=$deb_apt_dir/cache"
    -o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false"
    -o "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false"
    -o "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false"
    -o "Acquire::Languages=none"
  )
  # apt downloads as _apt where it can; let it write our folders (else it warns and goes on).
  if [[ $(id -u) == 0 ]] && id _apt >/dev/null 2>&1; then
    chown -R _apt "$deb_apt_dir/lists/partial" "$deb_apt_dir/cache/archives/partial" "$deb_apt_dir/debs"
  fi

  local log=$deb_apt_dir/update.log
  # apt-get update exits 0 when an index failed to download ("W: Failed to fetch"): read the log.
  if ! apt-get "${deb_apt_opts[@]}" update >"$log" 2>&1 ||
    grep -qE '^E: |^W: .*(Failed to fetch|GPG error|not signed|failed to download)' "$log"; then
    cat "$log" >&2
    if grep -qE 'NO_PUBKEY|GPG error|not signed|EXPKEYSIG' "$log"; then
      fail "apt-get update of $deb_mirror $suite: signature not verified with $deb_keyring (a newer debian-archive-keyring, e.g. from bookworm-updates, or SPINBOX_DEBIAN_KEYRING)"
    fi
    fail "apt-get update of $deb_mirror $suite failed (log above)"
  fi
}

deb_version() {
  apt-cache "${deb_apt_opts[@]}" show "$1" 2>/dev/null | awk '/^Version:/ && !v {v = $2} END {print v}'
}

deb_unpack() {
  local package=$1 version=$2 root=$3 deb
  rm -f "$deb_apt_dir/debs/"*.deb
  if ! (cd "$deb_apt_dir/debs" && apt-get "${deb_apt_opts[@]}" download "$package=$version") >"$deb_apt_dir/download.log" 2>&1; then
    cat "$deb_apt_dir/download.log" >&2
    fail "apt-get download $package=$version from $deb_mirror failed (log above)"
  fi
  deb=$(ls "$deb_apt_dir/debs/${package}_"*.deb)
  rm -rf "$root"
  dpkg -x "$deb" "$root" || fail "dpkg -x $deb failed"
  rm -f "$deb"
}
