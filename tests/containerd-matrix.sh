#!/usr/bin/env bash
# The containerd version matrix: a smoke set of the end-to-end tests run against the containerd
# of other Debian suites (fetched, not installed: tests/fetch-containerd.sh into
# build/containerd/<suite>), each through the same harness as `make test` (tests/run.sh: a
# private containerd of that version, its own ctr on PATH for the tests, spinbox's debug shim).
#   containerd-matrix.sh [SUITE...]      # default: $SPINBOX_CONTAINERD_MATRIX, else trixie sid
# SPINBOX_CONTAINERD_MATRIX=none skips it (no network needed then). trixie brings containerd
# 1.7, sid 2.x. A fetch that fails, a test that fails, or a listed test that did not run (a
# renamed test) fails the run, naming it.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=tests/smoke-lib.sh
source tests/smoke-lib.sh

# What each suite runs, one variable per suite (tests_<suite>): TESTFILE:NAME, where TESTFILE
# is the test target (tests/<TESTFILE>.rs) and NAME the exact test name.
smoke=(
  # run --rm: output, exit code 42, stderr, task events in order, same output as runc
  e2e:echo_and_exit_codes_match_runc
  # run -d, task ls / ps, kill, task rm, containers rm
  e2e:detached_container_runs_lists_pids_and_is_killed
  # task exec: output, status, stdin, five at once, kill of one exec, exec events
  interactive:exec_runs_in_the_container_with_status_stdin_concurrency_and_events
  # a shim killed -9: containerd's `shim delete` reclaims the VM; the id runs again
  e2e:killed_shim_leaves_nothing_and_the_id_runs_again
  # kill --all SIGTERM: the status ctr reports is runc's (143)
  e2e:sigterm_status_matches_runc
  # a start that fails: the error names the command, nothing left
  e2e:missing_command_fails_naming_it_and_leaves_nothing
  # a tty: console I/O and ResizePty
  interactive:tty_shell_echoes_input_and_follows_resizes
  # task metrics: the stats type containerd decodes
  interactive:metrics_show_memory_growing_with_an_allocation
  # pause / resume and their events
  interactive:pause_stops_a_counter_and_resume_lets_it_go_on
)
# Every test above ends with the shared leak check (Ctr::assert_clean). Each costs ~3-10 s a
# version on a 2-core TCG machine (the nine: ~60 s a version, see the summary's tests column).
# Kubernetes pods through the CRI plugin of that version (1.7 calls the shim's start for
# every container of a pod, 2.x reuses the sandbox's shim): one VM per pod, a container that
# joins later and leaves, teardown and a killed shim, the VM sized by the pod's resources
# (the sandbox annotations of that version), each with the leak check.
pods=(
  pod:two_containers_share_one_pod::spinbox
  pod:a_late_container_joins_and_a_removed_one_leaves_its_sibling::spinbox
  pod:stop_and_remove_leave_nothing::spinbox
  pod:a_killed_shim_is_cleaned_up_and_the_pod_runs_again::spinbox
  pod:a_pods_vm_is_sized_by_the_pods_resources
)
tests_trixie="${smoke[*]} ${pods[*]}"
tests_sid="${smoke[*]} ${pods[*]}"

if (($#)); then
  suites=("$@")
else
  read -r -a suites <<<"${SPINBOX_CONTAINERD_MATRIX:-trixie sid}"
fi
if [[ ${suites[*]} == none ]]; then
  echo "containerd matrix: skipped (SPINBOX_CONTAINERD_MATRIX=none)"
  exit 0
fi

logs=$(mktemp -d /tmp/spinbox-matrix.XXXXXX)
trap 'rm -rf "$logs"' EXIT
summary=()
failed=()
for suite in "${suites[@]}"; do
  list_var=tests_$suite
  if [[ -z ${!list_var:-} ]]; then
    echo "containerd matrix: no test list for suite '$suite' (set $list_var in $0)" >&2
    exit 2
  fi
  read -r -a entries <<<"${!list_var}"
  echo "== containerd matrix: Debian $suite"
  started=$SECONDS
  if ! bin=$(bash tests/fetch-containerd.sh "$suite" "build/containerd/$suite"); then
    echo "containerd matrix: FAILED to fetch containerd of Debian $suite (tests/fetch-containerd.sh $suite build/containerd/$suite; messages above)" >&2
    exit 1
  fi
  fetch_s=$((SECONDS - started))
  version=$(cat "build/containerd/$suite/version")
  # What containerd --version and the server's Version say ("2.1.9+unknown").
  server=$("$bin/containerd" --version | awk '{print $3}')
  smoke_split "${entries[@]}"
  targets=("${smoke_targets[@]}")
  names=("${smoke_names[@]}")
  log=$logs/$suite.log
  started=$SECONDS
  rc=0
  SPINBOX_CONTAINERD_BIN_DIR=$bin SPINBOX_TESTS="${names[*]}" \
    bash tests/run.sh "${targets[@]}" 2>&1 | tee "$log" || rc=$?
  took=$((SECONDS - started))
  # The run drove this containerd with this ctr, not the host's.
  if ! grep -qF "tests/run.sh: containerd $server ($bin/ctr)" "$log"; then
    failed+=("$suite: tests/run.sh did not report containerd $server with $bin/ctr")
  fi
  smoke_check "$log" "${names[@]}"
  missing=("${smoke_missing[@]}")
  passed=$((${#names[@]} - ${#missing[@]}))
  summary+=("$(printf '%-7s containerd %-22s %2d/%-2d passed  fetch %3ds  tests %3ds' \
    "$suite" "$version" "$passed" "${#names[@]}" "$fetch_s" "$took")")
  if ((rc != 0 || ${#missing[@]})); then
    failed+=("$suite (containerd $version): not passed: ${missing[*]:-(tests/run.sh exit $rc)}")
  fi
done

echo "== containerd matrix"
printf '  %s\n' "${summary[@]}"
if ((${#failed[@]})); then
  printf 'containerd matrix: FAILED %s\n' "${failed[@]}" >&2
  exit 1
fi
