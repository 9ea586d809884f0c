# Shared by the smoke sets (tests/containerd-matrix.sh, tests/kernel-smoke.sh); sourced.
# A smoke entry is TESTFILE:NAME: the test target (tests/<TESTFILE>.rs) and the exact name.

# Sets the arrays smoke_targets (--test TESTFILE, each once) and smoke_names from entries.
smoke_split() {
  smoke_targets=()
  smoke_names=()
  local e
  for e in "$@"; do
    smoke_names+=("${e#*:}")
    [[ " ${smoke_targets[*]} " == *" --test ${e%%:*} "* ]] || smoke_targets+=(--test "${e%%:*}")
  done
}

# Sets the array smoke_missing to the names that LOG does not show as passed: --exact with a
# name that no longer exists runs nothing and passes, so count what ran.
smoke_check() {
  local log=$1 n
  shift
  smoke_missing=()
  for n in "$@"; do
    grep -qE "^test $n \.\.\. ok$" "$log" || smoke_missing+=("$n")
  done
}
