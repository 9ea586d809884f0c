//! `ctr task metrics`: the cgroup v2 files the agent read in the guest, turned into the type
//! containerd expects for cgroup v2 (`io.containerd.cgroups.v2.Metrics`).

use std::collections::HashMap;

use containerd_shim_protos::cgroups_v2::metrics::{
    CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};

/// The type URL containerd decodes cgroup v2 metrics by.
pub const METRICS_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

/// `key value` lines (cpu.stat, memory.stat, memory.events) as a map.
fn flat_keyed(text: &str) -> HashMap<&str, u64> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let k = it.next()?;
            let v = it.next()?.parse().ok()?;
            Some((k, v))
        })
        .collect()
}

/// A single-value file; `max` (no limit) is `u64::MAX`, as containerd reports it.
fn single(files: &HashMap<String, String>, name: &str) -> u64 {
    match files.get(name).map(|s| s.trim()) {
        Some("max") => u64::MAX,
        Some(v) => v.parse().unwrap_or(0),
        None => 0,
    }
}

/// io.stat lines: `MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=.. ...`.
fn io_entries(text: &str) -> Vec<IOEntry> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (maj, min) = it.next()?.split_once(':')?;
            let mut e = IOEntry::new();
            e.major = maj.parse().ok()?;
            e.minor = min.parse().ok()?;
            for kv in it {
                let Some((k, v)) = kv.split_once('=') else {
                    continue;
                };
                let v = v.parse().unwrap_or(0);
                match k {
                    "rbytes" => e.rbytes = v,
                    "wbytes" => e.wbytes = v,
                    "rios" => e.rios = v,
                    "wios" => e.wios = v,
                    _ => {}
                }
            }
            Some(e)
        })
        .collect()
}

pub fn from_files(files: &HashMap<String, String>) -> Metrics {
    let mut m = Metrics::new();
    let empty = String::new();
    let file = |name: &str| files.get(name).unwrap_or(&empty);

    let cpu = flat_keyed(file("cpu.stat"));
    let mut c = CPUStat::new();
    c.usage_usec = cpu.get("usage_usec").copied().unwrap_or(0);
    c.user_usec = cpu.get("user_usec").copied().unwrap_or(0);
    c.system_usec = cpu.get("system_usec").copied().unwrap_or(0);
    c.nr_periods = cpu.get("nr_periods").copied().unwrap_or(0);
    c.nr_throttled = cpu.get("nr_throttled").copied().unwrap_or(0);
    c.throttled_usec = cpu.get("throttled_usec").copied().unwrap_or(0);
    m.cpu = MessageField::some(c);

    let stat = flat_keyed(file("memory.stat"));
    let g = |k: &str| stat.get(k).copied().unwrap_or(0);
    let mut mem = MemoryStat::new();
    mem.anon = g("anon");
    mem.file = g("file");
    mem.kernel_stack = g("kernel_stack");
    mem.slab = g("slab");
    mem.sock = g("sock");
    mem.shmem = g("shmem");
    mem.file_mapped = g("file_mapped");
    mem.file_dirty = g("file_dirty");
    mem.file_writeback = g("file_writeback");
    mem.anon_thp = g("anon_thp");
    mem.inactive_anon = g("inactive_anon");
    mem.active_anon = g("active_anon");
    mem.inactive_file = g("inactive_file");
    mem.active_file = g("active_file");
    mem.unevictable = g("unevictable");
    mem.slab_reclaimable = g("slab_reclaimable");
    mem.slab_unreclaimable = g("slab_unreclaimable");
    mem.pgfault = g("pgfault");
    mem.pgmajfault = g("pgmajfault");
    mem.workingset_refault = g("workingset_refault");
    mem.workingset_activate = g("workingset_activate");
    mem.workingset_nodereclaim = g("workingset_nodereclaim");
    mem.pgrefill = g("pgrefill");
    mem.pgscan = g("pgscan");
    mem.pgsteal = g("pgsteal");
    mem.pgactivate = g("pgactivate");
    mem.pgdeactivate = g("pgdeactivate");
    mem.pglazyfree = g("pglazyfree");
    mem.pglazyfreed = g("pglazyfreed");
    mem.thp_fault_alloc = g("thp_fault_alloc");
    mem.thp_collapse_alloc = g("thp_collapse_alloc");
    mem.usage = single(files, "memory.current");
    mem.usage_limit = single(files, "memory.max");
    mem.swap_usage = single(files, "memory.swap.current");
    mem.swap_limit = single(files, "memory.swap.max");
    mem.max_usage = single(files, "memory.peak");
    m.memory = MessageField::some(mem);

    let ev = flat_keyed(file("memory.events"));
    let mut e = MemoryEvents::new();
    e.low = ev.get("low").copied().unwrap_or(0);
    e.high = ev.get("high").copied().unwrap_or(0);
    e.max = ev.get("max").copied().unwrap_or(0);
    e.oom = ev.get("oom").copied().unwrap_or(0);
    e.oom_kill = ev.get("oom_kill").copied().unwrap_or(0);
    e.oom_group_kill = ev.get("oom_group_kill").copied().unwrap_or(0);
    m.memory_events = MessageField::some(e);

    let mut p = PidsStat::new();
    p.current = single(files, "pids.current");
    p.limit = single(files, "pids.max");
    m.pids = MessageField::some(p);

    let mut io = IOStat::new();
    io.usage = io_entries(file("io.stat"));
    m.io = MessageField::some(io);
    m
}

/// The metrics as the `Any` a StatsResponse carries.
pub fn to_any(m: &Metrics) -> Result<Any, String> {
    let mut any = Any::new();
    any.type_url = METRICS_TYPE_URL.to_owned();
    any.value = m.write_to_bytes().map_err(|e| e.to_string())?;
    Ok(any)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_files_become_v2_metrics() {
        let files: HashMap<String, String> = [
            (
                "cpu.stat",
                "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 3\nnr_throttled 1\nthrottled_usec 20\n",
            ),
            ("memory.current", "4194304\n"),
            ("memory.max", "max\n"),
            ("memory.stat", "anon 1048576\nfile 2097152\npgfault 77\n"),
            ("memory.events", "low 0\nhigh 0\nmax 4\noom 2\noom_kill 1\n"),
            ("pids.current", "3\n"),
            ("pids.max", "100\n"),
            ("io.stat", "254:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let m = from_files(&files);
        assert_eq!(m.cpu.usage_usec, 1500);
        assert_eq!(m.cpu.nr_throttled, 1);
        assert_eq!(m.memory.usage, 4 << 20);
        assert_eq!(m.memory.usage_limit, u64::MAX);
        assert_eq!(m.memory.anon, 1 << 20);
        assert_eq!(m.memory.pgfault, 77);
        assert_eq!(m.memory_events.oom_kill, 1);
        assert_eq!(m.memory_events.max, 4);
        assert_eq!(m.pids.current, 3);
        assert_eq!(m.pids.limit, 100);
        assert_eq!(m.io.usage.len(), 1);
        assert_eq!((m.io.usage[0].major, m.io.usage[0].wbytes), (254, 8192));
        let any = to_any(&m).unwrap();
        assert_eq!(any.type_url, METRICS_TYPE_URL);
        let back = Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(back.memory.usage, 4 << 20);
    }

    #[test]
    fn missing_files_are_zero_not_errors() {
        let m = from_files(&HashMap::new());
        assert_eq!(m.memory.usage, 0);
        assert!(m.io.usage.is_empty());
    }
}

#[cfg(test)]
mod proptests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    /// The cgroup files the guest reports, named as the parser looks them up.
    fn file_name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("cpu.stat".to_owned()),
            Just("memory.stat".to_owned()),
            Just("memory.current".to_owned()),
            Just("memory.max".to_owned()),
            Just("memory.events".to_owned()),
            Just("pids.current".to_owned()),
            Just("pids.max".to_owned()),
            Just("io.stat".to_owned()),
            ".{0,20}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever an untrusted guest sends as its cgroup files, the metrics are built
        /// (numbers that do not parse count as 0) and encode, without a panic.
        #[test]
        fn arbitrary_cgroup_files_never_panic(
            files in proptest::collection::hash_map(
                file_name(),
                "([a-z_]{0,12} [0-9-]{0,22}\n|[0-9]{1,3}:[0-9]{1,3} [a-z]+=[0-9]{0,20} ?|max\n|.{0,16}){0,12}",
                0..10,
            )
        ) {
            let files: HashMap<String, String> = files;
            let m = from_files(&files);
            prop_assert!(to_any(&m).is_ok());
        }
    }
}
