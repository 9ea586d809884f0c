#!/usr/bin/env bash
# cleanup-cni.sh: lists, and removes, the host networking spinbox left behind for containers
# containerd no longer knows: nft rules tagged `spinbox:<id>` in tables `inet|bridge spinbox`, network
# namespaces `<netns_dir>/spinbox-<id>` with their `sbtap<N>` TAPs, host-local IPAM
# allocations whose owner is `<id>`, and `<state_dir>/<id>/network.json` records.
# See usage() below and docs/TROUBLESHOOTING.md.
set -euo pipefail

prog=cleanup-cni
script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd -- "$script_dir/.." && pwd)
id_re='^[A-Za-z0-9][A-Za-z0-9_.-]{0,75}$'

usage() {
  cat <<'EOF'
usage: cleanup-cni.sh [--status] [ID...]
       cleanup-cni.sh --help

Finds the host networking spinbox (io.containerd.spinbox.v2) created for containers:
  nft     rules in tables `inet spinbox` and `bridge spinbox` tagged with the comment spinbox:<ID>
  netns   network namespaces <network.netns_dir>/spinbox-<ID>
  tap     sbtap<N> TAPs inside them (and those a network.json names in another namespace)
  ipam    host-local allocations (<dataDir>/<network name>/<IP> whose first line is <ID>)
          of the configured conflist and of every conflist a network.json recorded
  record  <paths.state_dir>/<ID>/network.json
A container is `in-use` while containerd knows its id (any namespace) or while the shim its
vm.json names as owner still runs; otherwise it is `orphaned`.

  --status    print one line per thing found: KIND ID DETAIL STATUS; removes nothing
  (no flag)   remove what belongs to orphaned containers, never to in-use ones; per id:
              1. its nft rules, by handle;
              2. `spinbox gc ID` when its network.json exists and the spinbox CLI is found
                 (PATH, else the newer of target/release and target/debug here): it
                 releases the network from the record (CNI DEL included) and the VM;
              3. by hand, whatever is still there (all of it without the CLI, or when gc
                 failed): the TAPs and the namespace spinbox made; in a namespace it did not
                 make only the recorded TAPs, ingress qdiscs and CNI interface; host-local
                 allocation files; last network.json, only if all of that succeeded.
              No CNI DEL is run by hand: plugin state other than host-local files (a
              plugin's iptables rules, say) is not undone.
  ID...       limit either mode to these container ids

Environment:
  SPINBOX_CONFIG        spinbox's config file (else /etc/spinbox/config.json if it exists,
                        else the defaults); passed on to `spinbox gc`
  CONTAINERD_ADDRESS    containerd's socket (default /run/containerd/containerd.sock)
  SPINBOX_CLEANUP_KNOWN_IDS
                        test hook: when set, the space-separated ids containerd is taken
                        to know, instead of asking it with ctr

Exit status: 0 done; 1 something could not be removed or inspected; 2 containerd could not be
asked (nothing was removed); 64 bad usage.
EOF
}

say() { printf '%s\n' "$*"; }
warn() { printf '%s: %s\n' "$prog" "$*" >&2; }
usage_error() {
  warn "$*"
  warn "try --help"
  exit 64
}

# ---------------------------------------------------------------------------------------------
# Arguments.
status_only=0
declare -a wanted_ids=()
declare -A wanted=()
end_of_opts=0
for arg in "$@"; do
  if ((end_of_opts == 0)); then
    case "$arg" in
    --help | -h)
      usage
      exit 0
      ;;
    --status)
      status_only=1
      continue
      ;;
    --)
      end_of_opts=1
      continue
      ;;
    -*) usage_error "unknown option: $arg" ;;
    esac
  fi
  if ! [[ "$arg" =~ $id_re ]]; then
    usage_error "invalid container id '$arg': must match $id_re"
  fi
  if [[ -z "${wanted[$arg]+x}" ]]; then
    wanted[$arg]=1
    wanted_ids+=("$arg")
  fi
done

is_wanted() { ((${#wanted_ids[@]} == 0)) || [[ -n "${wanted[$1]+x}" ]]; }

command -v python3 >/dev/null 2>&1 || {
  warn "python3 is needed to read spinbox's JSON files"
  exit 1
}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/spinbox-cleanup-cni.XXXXXX")
trap 'rm -rf -- "$tmp"' EXIT

declare -a tmo=()
command -v timeout >/dev/null 2>&1 && tmo=(timeout 30)

# ---------------------------------------------------------------------------------------------
# JSON, through python3. Output is tab-separated; values holding a tab or newline are dropped.
read -r -d '' PY <<'PYEOF' || true
import json, os, sys

def emit(*fields):
    fields = [str(f) for f in fields]
    if any(("\t" in f) or ("\n" in f) for f in fields):
        return
    print("\t".join(fields))

def load(path):
    with open(path, "rb") as fh:
        return json.load(fh)

def fail(msg):
    sys.stderr.write(msg + "\n")
    sys.exit(1)

mode = sys.argv[1]

if mode == "config":
    path = sys.argv[2]
    try:
        cfg = load(path) if path else {}
    except (OSError, ValueError) as e:
        fail("config %s: %s" % (path, e))
    if not isinstance(cfg, dict):
        fail("config %s: not a JSON object" % path)
    def section(name):
        v = cfg.get(name, {})
        if v is None:
            v = {}
        if not isinstance(v, dict):
            fail("config %s: %s: not an object" % (path, name))
        return v
    paths, net = section("paths"), section("network")
    def string(sec, secname, key, default):
        v = sec.get(key, default)
        if not isinstance(v, str) or not v:
            fail("config %s: %s.%s: not a non-empty string" % (path, secname, key))
        return v
    emit("state_dir", string(paths, "paths", "state_dir", "/run/spinbox"))
    emit("netns_dir", string(net, "network", "netns_dir", "/run/netns"))
    emit("cni_conflist", string(net, "network", "cni_conflist", "/etc/spinbox/cni/spinbox.conflist"))
    emit("nft", string(net, "network", "nft", "/usr/sbin/nft"))
    emit("lock_file", string(net, "network", "lock_file", "/run/spinbox/network.lock"))

elif mode == "networks":
    # (network name, host-local dataDir) of the configured conflist and of recorded ones.
    seen = set()
    def add(name, data_dir):
        if (name, data_dir) not in seen:
            seen.add((name, data_dir))
            emit(name, data_dir)
    def from_conflist(cl, where):
        if not isinstance(cl, dict):
            return
        name = cl.get("name")
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            sys.stderr.write("cleanup-cni: %s: no valid network name\n" % where)
            return
        for p in cl.get("plugins") or []:
            ipam = p.get("ipam") if isinstance(p, dict) else None
            if isinstance(ipam, dict) and ipam.get("type") == "host-local":
                d = ipam.get("dataDir") or "/var/lib/cni/networks"
                if isinstance(d, str) and d.startswith("/"):
                    add(name, d)
    add("spinbox", "/var/lib/cni/networks")
    conflist = sys.argv[2]
    if os.path.exists(conflist):
        try:
            from_conflist(load(conflist), conflist)
        except (OSError, ValueError) as e:
            sys.stderr.write("cleanup-cni: conflist %s: %s\n" % (conflist, e))
    for rec in sys.argv[3:]:
        try:
            r = load(rec)
        except (OSError, ValueError):
            continue
        cni = r.get("cni") if isinstance(r, dict) else None
        if isinstance(cni, dict):
            from_conflist(cni.get("conflist"), rec)

elif mode == "record":
    try:
        r = load(sys.argv[2])
    except (OSError, ValueError) as e:
        fail("%s: %s" % (sys.argv[2], e))
    if not isinstance(r, dict):
        fail("%s: not a JSON object" % sys.argv[2])
    if isinstance(r.get("netns"), str):
        emit("netns", r["netns"])
    emit("netns_created", "1" if r.get("netns_created") is True else "0")
    cni = r.get("cni")
    if isinstance(cni, dict):
        att = cni.get("attachment")
        if isinstance(att, dict) and isinstance(att.get("netns"), str) and isinstance(att.get("ifname"), str):
            emit("cni_attachment", att["netns"], att["ifname"])
    for pair in r.get("mirrored") or []:
        if isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair):
            emit("mirrored", pair[0], pair[1])

elif mode == "nft":
    try:
        doc = json.load(sys.stdin)
    except ValueError as e:
        fail("nft -j output: %s" % e)
    for item in doc.get("nftables") or []:
        rule = item.get("rule") if isinstance(item, dict) else None
        if not isinstance(rule, dict):
            continue
        comment, chain, handle = rule.get("comment"), rule.get("chain"), rule.get("handle")
        if isinstance(comment, str) and comment.startswith("spinbox:") and isinstance(chain, str) \
                and isinstance(handle, int):
            emit(comment[len("spinbox:"):], chain, handle)

elif mode == "owner":
    # Whether the process vm.json names as owner runs (same pid and start time, not a zombie).
    try:
        owner = load(sys.argv[2]).get("owner") or {}
        pid, start = int(owner["pid"]), int(owner["start_time"])
        with open("/proc/%d/stat" % pid) as fh:
            stat = fh.read()
        fields = stat[stat.rindex(")") + 2:].split()
        alive = fields[0] not in ("Z", "X") and int(fields[19]) == start
    except Exception:
        alive = False
    emit("alive %d" % pid if alive else "dead")
PYEOF
py() { python3 -c "$PY" "$@"; }

# ---------------------------------------------------------------------------------------------
# Configuration.
config_path=""
if [[ -n "${SPINBOX_CONFIG+x}" ]]; then
  config_path=$SPINBOX_CONFIG
  [[ -f "$config_path" ]] || {
    warn "SPINBOX_CONFIG=$config_path: no such file"
    exit 1
  }
  export SPINBOX_CONFIG
elif [[ -f /etc/spinbox/config.json ]]; then
  config_path=/etc/spinbox/config.json
fi
state_dir="" netns_dir="" cni_conflist="" nft_bin="" lock_file=""
config_out=$(py config "$config_path") || exit 1
while IFS=$'\t' read -r key value; do
  case "$key" in
  state_dir) state_dir=$value ;;
  netns_dir) netns_dir=$value ;;
  cni_conflist) cni_conflist=$value ;;
  nft) nft_bin=$value ;;
  lock_file) lock_file=$value ;;
  esac
done <<<"$config_out"
state_dir=${state_dir%/}
netns_dir=${netns_dir%/}

# ---------------------------------------------------------------------------------------------
# Helpers for namespaces.
is_netns() { [[ "$(stat -f -c %t -- "$1" 2>/dev/null)" == 6e736673 ]]; }

# `ip netns` only knows /var/run/netns; elsewhere nsenter enters a namespace by path.
iproute_netns_dir=$(realpath -m -- /var/run/netns)
in_ipnetns_dir() { [[ "$(realpath -m -- "$(dirname -- "$1")")" == "$iproute_netns_dir" ]]; }
have_nsenter=0
command -v nsenter >/dev/null 2>&1 && have_nsenter=1

# Runs a command inside the namespace at $1.
in_netns() {
  local ns=$1
  shift
  if ((have_nsenter)); then
    nsenter --net="$ns" -- "$@"
  elif [[ "$1" == ip || "$1" == tc ]] && in_ipnetns_dir "$ns"; then
    "$1" -n "$(basename -- "$ns")" "${@:2}"
  else
    warn "nsenter is missing: cannot enter $ns"
    return 1
  fi
}

# The names of the links in the namespace at $1, one a line.
links_in() {
  local line name
  in_netns "$1" ip -o link show | while IFS= read -r line; do
    name=${line#*: }
    name=${name%%: *}
    printf '%s\n' "${name%%@*}"
  done
}

remove_netns() {
  local ns=$1
  if in_ipnetns_dir "$ns" && command -v ip >/dev/null 2>&1; then
    ip netns del "$(basename -- "$ns")" || return 1
  else
    umount -l -- "$ns" 2>/dev/null || true
    rm -f -- "$ns" || return 1
  fi
  [[ ! -e "$ns" ]]
}

# First line of a host-local allocation file, without the CR host-local writes.
alloc_owner() {
  local line=""
  IFS= read -r line <"$1" || true
  line=${line%$'\r'}
  line=${line//[[:space:]]/}
  printf '%s' "$line"
}

# ---------------------------------------------------------------------------------------------
# Scan. Each thing found: KIND ID DETAIL plus what removing it needs (A1, A2).
declare -a R_KIND=() R_ID=() R_DETAIL=() R_A1=() R_A2=()
scan_errors=0
add() {
  R_KIND+=("$1")
  R_ID+=("$2")
  R_DETAIL+=("$3")
  R_A1+=("${4:-}")
  R_A2+=("${5:-}")
}

# Records.
declare -a record_files=()
if [[ -d "$state_dir" ]]; then
  for dir in "$state_dir"/*/; do
    [[ -d "$dir" ]] || continue
    dir=${dir%/}
    id=$(basename -- "$dir")
    [[ "$id" =~ $id_re ]] || continue
    [[ -f "$dir/network.json" ]] || continue
    record_files+=("$dir/network.json")
    is_wanted "$id" || continue
    add record "$id" "$dir/network.json" "$dir/network.json"
    # TAPs the record names in a namespace spinbox did not make (mirror mode).
    rec=$(py record "$dir/network.json" 2>/dev/null) || continue
    rec_ns="" rec_created=0
    declare -a rec_taps=()
    while IFS=$'\t' read -r key a b; do
      case "$key" in
      netns) rec_ns=$a ;;
      netns_created) rec_created=$a ;;
      mirrored) rec_taps+=("$b") ;;
      esac
    done <<<"$rec"
    if [[ -n "$rec_ns" && "$rec_created" != 1 && "$rec_ns" != "$netns_dir/spinbox-$id" ]] &&
      is_netns "$rec_ns" && ((${#rec_taps[@]} > 0)); then
      if present=$(links_in "$rec_ns"); then
        for tap in "${rec_taps[@]}"; do
          if grep -qxF -- "$tap" <<<"$present"; then
            add tap "$id" "$rec_ns:$tap" "$rec_ns" "$tap"
          fi
        done
      else
        warn "cannot list the links of $rec_ns"
        scan_errors=$((scan_errors + 1))
      fi
    fi
    unset rec_taps
  done
fi

# Namespaces spinbox made, and their TAPs.
if [[ -d "$netns_dir" ]]; then
  for ns in "$netns_dir"/spinbox-*; do
    [[ -e "$ns" ]] || continue
    id=${ns##*/spinbox-}
    [[ "$id" =~ $id_re ]] || continue
    is_wanted "$id" || continue
    if is_netns "$ns"; then
      add netns "$id" "$ns" "$ns"
      if present=$(links_in "$ns"); then
        while IFS= read -r tap; do
          [[ "$tap" == sbtap* ]] && add tap "$id" "$ns:$tap" "$ns" "$tap"
        done <<<"$present"
      else
        warn "cannot list the links of $ns"
        scan_errors=$((scan_errors + 1))
      fi
    else
      add netns "$id" "$ns(not-mounted)" "$ns"
    fi
  done
fi

# nft rules: NAT in `inet spinbox`, isolation in `bridge spinbox`.
if [[ -x "$nft_bin" ]]; then
  for family in inet bridge; do
    if "${tmo[@]}" "$nft_bin" -j list table "$family" spinbox >"$tmp/nft.json" 2>"$tmp/nft.err"; then
      if rules=$(py nft <"$tmp/nft.json"); then
        while IFS=$'\t' read -r id chain handle; do
          [[ -n "$id" ]] || continue
          [[ "$id" =~ $id_re ]] || continue
          is_wanted "$id" || continue
          add nft "$id" "$family/$chain/handle=$handle" "$family/$chain" "$handle"
        done <<<"$rules"
      else
        scan_errors=$((scan_errors + 1))
      fi
    elif ! grep -q 'No such file or directory' "$tmp/nft.err"; then
      warn "$nft_bin -j list table $family spinbox: $(tr '\n' ' ' <"$tmp/nft.err")"
      scan_errors=$((scan_errors + 1))
    fi
  done
else
  warn "nft not found at $nft_bin (network.nft): nft rules not checked"
fi

# host-local allocations.
declare -a net_names=() net_dirs=()
networks=$(py networks "$cni_conflist" "${record_files[@]}") || true
while IFS=$'\t' read -r name data_dir; do
  [[ -n "$name" ]] || continue
  net_names+=("$name")
  net_dirs+=("${data_dir%/}/$name")
done <<<"$networks"
for dir in "${net_dirs[@]}"; do
  [[ -d "$dir" ]] || continue
  for f in "$dir"/*; do
    [[ -f "$f" ]] || continue
    case "${f##*/}" in lock | last_reserved_ip*) continue ;; esac
    owner=$(alloc_owner "$f") || continue
    [[ "$owner" =~ $id_re ]] || continue
    is_wanted "$owner" || continue
    add ipam "$owner" "$f" "$f"
  done
done

# ---------------------------------------------------------------------------------------------
# Nothing at all: say so without asking containerd.
if ((${#R_KIND[@]} == 0)); then
  if ((${#wanted_ids[@]} > 0)); then
    say "$prog: nothing of spinbox's on this host for ${wanted_ids[*]}"
  else
    say "$prog: nothing of spinbox's on this host"
  fi
  ((scan_errors == 0)) || exit 1
  exit 0
fi

# ---------------------------------------------------------------------------------------------
# What containerd knows.
declare -A known=()
if [[ -n "${SPINBOX_CLEANUP_KNOWN_IDS+x}" ]]; then
  read -r -a test_ids <<<"$SPINBOX_CLEANUP_KNOWN_IDS" || true
  for id in "${test_ids[@]}"; do known[$id]=1; done
else
  address=${CONTAINERD_ADDRESS:-/run/containerd/containerd.sock}
  if ! command -v ctr >/dev/null 2>&1; then
    warn "ctr not found: cannot ask containerd which containers exist; nothing was removed"
    exit 2
  fi
  if ! "${tmo[@]}" ctr --address "$address" namespaces ls -q >"$tmp/ns" 2>"$tmp/ctr.err"; then
    warn "cannot reach containerd at $address ($(tr '\n' ' ' <"$tmp/ctr.err")); nothing was removed"
    exit 2
  fi
  while IFS= read -r ns; do
    [[ -n "$ns" ]] || continue
    if ! "${tmo[@]}" ctr --address "$address" -n "$ns" containers ls -q >"$tmp/ids" 2>"$tmp/ctr.err"; then
      warn "cannot list containerd's containers in namespace $ns ($(tr '\n' ' ' <"$tmp/ctr.err")); nothing was removed"
      exit 2
    fi
    while IFS= read -r id; do
      [[ -n "$id" ]] && known[$id]=1
    done <"$tmp/ids"
  done <"$tmp/ns"
fi

# Ids in the order found, and whether each is in use.
declare -a ids=()
declare -A id_status=() owner_note=()
for i in "${!R_ID[@]}"; do
  id=${R_ID[$i]}
  [[ -z "${id_status[$id]+x}" ]] || continue
  ids+=("$id")
  if [[ -n "${known[$id]+x}" ]]; then
    id_status[$id]=in-use
  else
    id_status[$id]=orphaned
    vm_json="$state_dir/$id/vm.json"
    if [[ -f "$vm_json" ]]; then
      owner=$(py owner "$vm_json" 2>/dev/null) || owner=dead
      if [[ "$owner" == alive* ]]; then
        # containerd does not know it, but its shim runs (another containerd?): hands off.
        id_status[$id]=in-use
        owner_note[$id]="shim pid ${owner#alive } runs"
      fi
    fi
  fi
done

if ((status_only)); then
  for i in "${!R_KIND[@]}"; do
    printf '%-6s %-24s %-60s %s\n' "${R_KIND[$i]}" "${R_ID[$i]}" "${R_DETAIL[$i]}" "${id_status[${R_ID[$i]}]}"
  done
  for id in "${ids[@]}"; do
    [[ -z "${owner_note[$id]+x}" ]] || warn "$id: unknown to containerd but in-use: ${owner_note[$id]}"
  done
  ((scan_errors == 0)) || exit 1
  exit 0
fi

# ---------------------------------------------------------------------------------------------
# Removal.
failures=0 gc_failures=0
failed() {
  warn "FAILED: $*"
  failures=$((failures + 1))
}

declare -a lock=()
if command -v flock >/dev/null 2>&1 && [[ -d "$(dirname -- "$lock_file")" ]]; then
  lock=(flock -w 30 "$lock_file")
fi

spinbox_cli=""
if command -v spinbox >/dev/null 2>&1; then
  spinbox_cli=$(command -v spinbox)
else
  # A build of this repository; the newer of the two when both exist.
  for cand in "$repo_root/target/release/spinbox" "$repo_root/target/debug/spinbox"; do
    [[ -x "$cand" ]] || continue
    if [[ -z "$spinbox_cli" || "$cand" -nt "$spinbox_cli" ]]; then
      spinbox_cli=$cand
    fi
  done
fi

removed=0
for id in "${ids[@]}"; do
  if [[ "${id_status[$id]}" != orphaned ]]; then
    say "kept    $id (in-use${owner_note[$id]+: ${owner_note[$id]}})"
    continue
  fi
  id_failures=$failures

  # 1. nft rules, by handle.
  for i in "${!R_KIND[@]}"; do
    [[ "${R_KIND[$i]}" == nft && "${R_ID[$i]}" == "$id" ]] || continue
    family=${R_A1[$i]%%/*} chain=${R_A1[$i]#*/} handle=${R_A2[$i]}
    if "${lock[@]}" "${tmo[@]}" "$nft_bin" delete rule "$family" spinbox "$chain" handle "$handle" 2>"$tmp/err"; then
      say "removed nft    $id $family/$chain/handle=$handle"
      removed=$((removed + 1))
    elif grep -q 'No such file or directory' "$tmp/err"; then
      : # gone meanwhile
    else
      failed "nft $id $family/$chain/handle=$handle: $(tr '\n' ' ' <"$tmp/err")"
    fi
  done

  # What the record says, read before `spinbox gc` may remove it.
  record="$state_dir/$id/network.json"
  rec_ns="" rec_created=0 cni_ns="" cni_if=""
  declare -a mir_ifs=() mir_taps=()
  if [[ -f "$record" ]]; then
    if rec=$(py record "$record" 2>"$tmp/err"); then
      while IFS=$'\t' read -r key a b; do
        case "$key" in
        netns) rec_ns=$a ;;
        netns_created) rec_created=$a ;;
        cni_attachment) cni_ns=$a cni_if=$b ;;
        mirrored) mir_ifs+=("$a") mir_taps+=("$b") ;;
        esac
      done <<<"$rec"
    else
      failed "record $id $record unreadable: $(tr '\n' ' ' <"$tmp/err")"
    fi
  fi

  # 2. spinbox gc, which releases the network from the record (CNI DEL included) and the VM.
  if [[ -f "$record" && -n "$spinbox_cli" ]]; then
    if RUST_BACKTRACE=0 RUST_LIB_BACKTRACE=0 "$spinbox_cli" gc "$id" >"$tmp/gc" 2>&1; then
      gc_ok=1
    else
      gc_ok=0
    fi
    while IFS= read -r line; do say "  spinbox gc: $line"; done <"$tmp/gc"
    if ((gc_ok)) && [[ -f "$record" ]]; then
      failed "record $id: $spinbox_cli gc $id left $record in place (see above); nothing more done for $id"
      continue
    fi
    if ((gc_ok)); then
      say "removed record $id $record (spinbox gc)"
      removed=$((removed + 1))
    else
      # Counted, but it does not keep the record: what gc could not release (a CNI plugin
      # gone, say) would fail again on every run. Its VM part can be rerun: spinbox gc ID.
      warn "FAILED: $spinbox_cli gc $id (see above); removing its network by hand"
      gc_failures=$((gc_failures + 1))
    fi
  fi

  # 3. By hand, whatever is still there.
  # 3a. Namespaces spinbox made: their TAPs, then the namespace.
  declare -a made=("$netns_dir/spinbox-$id")
  if [[ "$rec_created" == 1 && -n "$rec_ns" && "$rec_ns" != "${made[0]}" ]]; then
    made+=("$rec_ns")
  fi
  for ns in "${made[@]}"; do
    [[ -e "$ns" ]] || continue
    if is_netns "$ns" && present=$(links_in "$ns"); then
      while IFS= read -r tap; do
        [[ "$tap" == sbtap* ]] || continue
        if in_netns "$ns" ip link del "$tap" 2>"$tmp/err"; then
          say "removed tap    $id $ns:$tap"
          removed=$((removed + 1))
        else
          failed "tap $id $ns:$tap: $(tr '\n' ' ' <"$tmp/err")"
        fi
      done <<<"$present"
    fi
    if remove_netns "$ns" 2>"$tmp/err"; then
      say "removed netns  $id $ns"
      removed=$((removed + 1))
    else
      failed "netns $id $ns: $(tr '\n' ' ' <"$tmp/err")"
    fi
  done
  unset made

  # 3b. A namespace spinbox did not make: only what spinbox put there.
  if [[ -n "$rec_ns" && "$rec_created" != 1 ]] && is_netns "$rec_ns"; then
    if present=$(links_in "$rec_ns"); then
      for j in "${!mir_taps[@]}"; do
        tap=${mir_taps[$j]} iface=${mir_ifs[$j]}
        if grep -qxF -- "$tap" <<<"$present"; then
          if in_netns "$rec_ns" ip link del "$tap" 2>"$tmp/err"; then
            say "removed tap    $id $rec_ns:$tap"
            removed=$((removed + 1))
          else
            failed "tap $id $rec_ns:$tap: $(tr '\n' ' ' <"$tmp/err")"
          fi
        fi
        if grep -qxF -- "$iface" <<<"$present" &&
          [[ -n "$(in_netns "$rec_ns" tc qdisc show dev "$iface" ingress 2>/dev/null)" ]]; then
          if in_netns "$rec_ns" tc qdisc del dev "$iface" ingress 2>"$tmp/err"; then
            say "removed qdisc  $id $rec_ns:$iface(ingress)"
            removed=$((removed + 1))
          else
            failed "ingress qdisc $id $rec_ns:$iface: $(tr '\n' ' ' <"$tmp/err")"
          fi
        fi
      done
      # The interface CNI ADD put there (what the plugin's DEL would remove).
      if [[ -n "$cni_if" && "$cni_ns" == "$rec_ns" ]] && grep -qxF -- "$cni_if" <<<"$present"; then
        if in_netns "$rec_ns" ip link del "$cni_if" 2>"$tmp/err"; then
          say "removed link   $id $rec_ns:$cni_if (CNI)"
          removed=$((removed + 1))
        else
          failed "link $id $rec_ns:$cni_if: $(tr '\n' ' ' <"$tmp/err")"
        fi
      fi
    else
      failed "cannot list the links of $rec_ns"
    fi
  fi
  unset mir_ifs mir_taps

  # 3c. host-local allocations still naming the id.
  for dir in "${net_dirs[@]}"; do
    [[ -d "$dir" ]] || continue
    for f in "$dir"/*; do
      [[ -f "$f" ]] || continue
      case "${f##*/}" in lock | last_reserved_ip*) continue ;; esac
      [[ "$(alloc_owner "$f")" == "$id" ]] || continue
      declare -a dirlock=()
      if command -v flock >/dev/null 2>&1 && [[ -f "$dir/lock" ]]; then
        dirlock=(flock -w 30 "$dir/lock")
      fi
      if "${dirlock[@]}" rm -f -- "$f" 2>"$tmp/err"; then
        say "removed ipam   $id $f"
        removed=$((removed + 1))
      else
        failed "ipam $id $f: $(tr '\n' ' ' <"$tmp/err")"
      fi
      unset dirlock
    done
  done

  # 3d. The record, last, only when everything above went well.
  if [[ -f "$record" ]]; then
    if ((failures == id_failures)); then
      if rm -f -- "$record" 2>"$tmp/err"; then
        say "removed record $id $record"
        removed=$((removed + 1))
      else
        failed "record $id $record: $(tr '\n' ' ' <"$tmp/err")"
      fi
    else
      warn "kept $record: not everything of $id could be removed"
    fi
  fi
done

# A spinbox table left without rules goes too (as spinbox itself does when it removes the
# last container's rules).
if [[ -x "$nft_bin" ]]; then
  for family in inet bridge; do
    if "${tmo[@]}" "$nft_bin" -j list table "$family" spinbox >"$tmp/nft.json" 2>/dev/null &&
      ! grep -q '"rule"' "$tmp/nft.json"; then
      if "${lock[@]}" "${tmo[@]}" "$nft_bin" delete table "$family" spinbox 2>"$tmp/err"; then
        say "removed table  $family spinbox (empty)"
      else
        failed "table $family spinbox: $(tr '\n' ' ' <"$tmp/err")"
      fi
    fi
  done
fi

if ((removed == 0 && failures == 0 && gc_failures == 0)); then
  say "$prog: nothing orphaned to remove"
fi
if ((scan_errors > 0)); then
  warn "$scan_errors thing(s) could not be inspected (see above)"
fi
if ((failures > 0)); then
  warn "$failures removal(s) failed"
fi
((failures == 0 && gc_failures == 0 && scan_errors == 0))
