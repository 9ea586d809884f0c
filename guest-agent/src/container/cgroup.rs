//! cgroup v2 for containers: `/sys/fs/cgroup/spinbox/<id>`, limits from `linux.resources`,
//! and the process list / kill / removal the RPCs need.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use super::spec::Resources;
use crate::log::{debug, warning};

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Parent of every container's cgroup.
pub const SPINBOX_CGROUP: &str = "spinbox";
/// Controllers delegated to container cgroups (those the kernel has).
const CONTROLLERS: &[&str] = &["cpu", "memory", "pids", "io"];

/// OCI `cpu.shares` (cgroup v1, 2..262144) -> cgroup v2 `cpu.weight` (1..10000), as runc
/// converts it.
pub fn cpu_shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 0;
    }
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

/// OCI `memory.swap` is memory+swap; cgroup v2 `memory.swap.max` is swap alone. -1 = max,
/// 0 = unset (as runc converts it).
pub fn swap_to_v2(swap: i64, memory: i64) -> Result<i64> {
    if memory == -1 && swap == 0 {
        return Ok(-1);
    }
    if swap == -1 || swap == 0 {
        return Ok(swap);
    }
    if memory == 0 || memory == -1 {
        bail!("memory.swap set without memory.limit");
    }
    if memory < 0 {
        bail!("memory.limit {memory} is invalid");
    }
    if swap < memory {
        bail!("memory.swap {swap} (memory+swap) is below memory.limit {memory}");
    }
    Ok(swap - memory)
}

fn max_or(v: i64) -> String {
    if v < 0 {
        "max".to_string()
    } else {
        v.to_string()
    }
}

/// The cgroup v2 files to write for `linux.resources`, in order.
pub fn limits(r: &Resources) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    if let Some(m) = &r.memory {
        if let Some(limit) = m.limit {
            out.push(("memory.max".into(), max_or(limit)));
        }
        if let Some(res) = m.reservation {
            out.push(("memory.low".into(), max_or(res)));
        }
        if let Some(swap) = m.swap {
            let v = swap_to_v2(swap, m.limit.unwrap_or(0))?;
            if v != 0 {
                out.push(("memory.swap.max".into(), max_or(v)));
            }
        }
    }
    if let Some(c) = &r.cpu {
        let quota = c.quota.filter(|q| *q != 0);
        if quota.is_some() || c.period.is_some() {
            let period = c.period.filter(|p| *p != 0).unwrap_or(100_000);
            out.push((
                "cpu.max".into(),
                format!("{} {period}", max_or(quota.unwrap_or(-1))),
            ));
        }
        if let Some(shares) = c.shares.filter(|s| *s != 0) {
            out.push((
                "cpu.weight".into(),
                cpu_shares_to_weight(shares).to_string(),
            ));
        }
    }
    if let Some(p) = &r.pids {
        out.push((
            "pids.max".into(),
            if p.limit <= 0 {
                "max".into()
            } else {
                p.limit.to_string()
            },
        ));
    }
    for (k, v) in &r.unified {
        if k.contains('/') || k.starts_with('.') || k.is_empty() {
            bail!("unified: bad key {k:?}");
        }
        out.push((k.clone(), v.clone()));
    }
    Ok(out)
}

/// The parts of `linux.resources` the guest does not apply, for the log: block I/O
/// throttling and weights, hugepage limits, network classes and priorities, RDMA. An empty
/// list or object (what CRI sends) asks for nothing.
pub fn unapplied(r: &Resources) -> Vec<String> {
    let asks = |v: &Option<serde_json::Value>| match v {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Array(a)) => !a.is_empty(),
        Some(serde_json::Value::Object(o)) => !o.is_empty(),
        Some(_) => true,
    };
    [
        ("blockIO", &r.block_io),
        ("hugepageLimits", &r.hugepage_limits),
        ("network", &r.network),
        ("rdma", &r.rdma),
    ]
    .into_iter()
    .filter(|(_, v)| asks(v))
    .map(|(name, _)| format!("linux.resources.{name} ignored: the guest does not apply it"))
    .collect()
}

/// What the VM has, for checking limits against: memory hotplug and CPU hotplug are not
/// supported, so a limit above these can never be met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmCapacity {
    /// MemTotal, in bytes.
    pub memory_bytes: u64,
    /// Online CPUs.
    pub cpus: u64,
}

impl VmCapacity {
    /// Reads /proc/meminfo and the online CPUs. Blocking.
    pub fn read() -> Result<VmCapacity> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
        let memory_bytes = meminfo_total(&meminfo).context("no MemTotal in /proc/meminfo")?;
        let cpus = std::fs::read_to_string("/sys/devices/system/cpu/online")
            .ok()
            .and_then(|s| count_cpu_list(&s))
            .or_else(|| {
                // SAFETY: sysconf has no memory-safety preconditions.
                let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
                u64::try_from(n).ok().filter(|n| *n > 0)
            })
            .context("cannot tell how many CPUs are online")?;
        Ok(VmCapacity { memory_bytes, cpus })
    }
}

/// MemTotal from /proc/meminfo's text, in bytes.
pub fn meminfo_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

/// How many CPUs a kernel CPU list (`0-3,5`) names.
pub fn count_cpu_list(list: &str) -> Option<u64> {
    let list = list.trim();
    if list.is_empty() {
        return None;
    }
    let mut n = 0u64;
    for part in list.split(',') {
        n += match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
                b.checked_sub(a)? + 1
            }
            None => {
                part.parse::<u64>().ok()?;
                1
            }
        };
    }
    Some(n)
}

fn mib(bytes: u64) -> u64 {
    bytes / (1024 * 1024)
}

/// `quota / period` as a CPU count for messages (`2`, `2.5`).
fn cpu_count(quota: u64, period: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let n = quota as f64 / period as f64;
    let s = format!("{n:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn check_memory(what: &str, limit: u64, vm: VmCapacity) -> Result<()> {
    if limit > vm.memory_bytes {
        bail!(
            "{what} {limit} exceeds the VM's {} MiB (the host grows the VM before it applies \
             a limit; this VM was not grown to it)",
            mib(vm.memory_bytes)
        );
    }
    Ok(())
}

fn check_cpu(what: &str, quota: u64, period: u64, vm: VmCapacity) -> Result<()> {
    if period > 0 && u128::from(quota) > u128::from(vm.cpus) * u128::from(period) {
        bail!(
            "{what} {quota} / period {period} ({} CPUs) exceeds the VM's {} CPUs (the host \
             grows the VM before it applies a limit; this VM was not grown to it)",
            cpu_count(quota, period),
            vm.cpus
        );
    }
    Ok(())
}

/// Checks `linux.resources` against what the VM has now: a memory limit above its memory or
/// a CPU quota above its CPUs can never be met (the host grows the VM before it applies
/// such limits), so it is refused rather than silently meaning "unlimited". Also checks the `unified` memory.max and cpu.max.
pub fn check_fits(r: &Resources, vm: VmCapacity) -> Result<()> {
    if let Some(limit) = r.memory.as_ref().and_then(|m| m.limit) {
        if let Ok(limit) = u64::try_from(limit) {
            check_memory("linux.resources.memory.limit", limit, vm)?;
        }
    }
    if let Some(c) = &r.cpu {
        if let Some(quota) = c
            .quota
            .and_then(|q| u64::try_from(q).ok())
            .filter(|q| *q > 0)
        {
            let period = c.period.filter(|p| *p != 0).unwrap_or(100_000);
            check_cpu("linux.resources.cpu.quota", quota, period, vm)?;
        }
    }
    if let Some(v) = r.unified.get("memory.max") {
        if let Ok(limit) = v.trim().parse::<u64>() {
            check_memory("linux.resources.unified[\"memory.max\"]", limit, vm)?;
        }
    }
    if let Some(v) = r.unified.get("cpu.max") {
        let mut words = v.split_whitespace();
        if let Some(Ok(quota)) = words.next().map(str::parse::<u64>) {
            let period = words.next().and_then(|p| p.parse().ok()).unwrap_or(100_000);
            check_cpu(
                "linux.resources.unified[\"cpu.max\"] quota",
                quota,
                period,
                vm,
            )?;
        }
    }
    Ok(())
}

/// A container's cgroup directory.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

/// Enables the wanted controllers in `dir`'s subtree_control (those it has).
fn enable_controllers(dir: &Path) {
    let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let enabled = std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    for c in CONTROLLERS {
        let has = |list: &str| list.split_whitespace().any(|x| x == *c);
        if has(&available) && !has(&enabled) {
            if let Err(e) = std::fs::write(dir.join("cgroup.subtree_control"), format!("+{c}")) {
                warning!("enabling the {c} controller in {}: {e}", dir.display());
            }
        }
    }
}

impl Cgroup {
    /// Creates `/sys/fs/cgroup/spinbox/<id>` and writes the limits. Blocking.
    pub fn create(id: &str, limits: &[(String, String)]) -> Result<Cgroup> {
        let root = Path::new(CGROUP_ROOT);
        if !root.join("cgroup.controllers").exists() {
            bail!("no cgroup v2 hierarchy at {CGROUP_ROOT}");
        }
        let parent = root.join(SPINBOX_CGROUP);
        enable_controllers(root);
        match std::fs::create_dir(&parent) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("mkdir {}", parent.display())),
        }
        enable_controllers(&parent);
        let path = parent.join(id);
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            // Left by a container of the same name that is gone (RemoveContainer could not
            // remove it): start afresh if it is empty, so no old limit lingers.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if !(Cgroup { path: path.clone() }).procs().is_empty() {
                    bail!("cgroup {} exists and has processes", path.display());
                }
                std::fs::remove_dir(&path)
                    .and_then(|()| std::fs::create_dir(&path))
                    .with_context(|| format!("recreating {}", path.display()))?;
            }
            Err(e) => return Err(e).with_context(|| format!("mkdir {}", path.display())),
        }
        let cg = Cgroup { path };
        for (file, value) in limits {
            let p = cg.path.join(file);
            if let Err(e) = std::fs::write(&p, value) {
                let err = anyhow::Error::new(e)
                    .context(format!("setting {file} = {value} ({})", p.display()));
                if !p.exists() && file == "memory.swap.max" {
                    // A kernel without swap accounting: nothing to limit.
                    warning!("{err:#}; ignored");
                    continue;
                }
                cg.remove(Duration::ZERO);
                return Err(err);
            }
        }
        debug!("created cgroup {}", cg.path.display());
        Ok(cg)
    }

    /// The directory: `/sys/fs/cgroup/spinbox/<id>`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory, opened for clone3's CLONE_INTO_CGROUP.
    pub fn open_dir(&self) -> Result<File> {
        File::open(&self.path).with_context(|| format!("opening {}", self.path.display()))
    }

    /// Pids in the cgroup (guest-global numbers).
    pub fn procs(&self) -> Vec<u32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// SIGKILLs everything in the cgroup (cgroup.kill, else one by one).
    pub fn kill(&self) {
        if std::fs::write(self.path.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        for pid in self.procs() {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    /// Removes the directory, waiting up to `grace` for it to empty. Blocking.
    pub fn remove(&self, grace: Duration) -> Option<String> {
        let deadline = Instant::now() + grace;
        loop {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return None,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
                Err(e) if Instant::now() < deadline => {
                    debug!("rmdir {}: {e}; retrying", self.path.display());
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Some(format!("rmdir {}: {e}", self.path.display())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::spec::{Cpu, Memory, Pids};
    use super::*;

    #[test]
    fn unapplied_resources_are_named() {
        let r: Resources = serde_json::from_str(
            r#"{"devices": [{"allow": false, "access": "rwm"}], "hugepageLimits": [],
                "blockIO": {"weight": 10}, "network": null, "rdma": {}}"#,
        )
        .unwrap();
        assert_eq!(
            unapplied(&r),
            vec!["linux.resources.blockIO ignored: the guest does not apply it".to_string()]
        );
        assert!(unapplied(&Resources::default()).is_empty());
    }

    #[test]
    fn shares_to_weight() {
        assert_eq!(cpu_shares_to_weight(0), 0);
        assert_eq!(cpu_shares_to_weight(2), 1);
        assert_eq!(cpu_shares_to_weight(1024), 39);
        assert_eq!(cpu_shares_to_weight(262_144), 10_000);
        assert_eq!(cpu_shares_to_weight(1_000_000), 10_000);
    }

    #[test]
    fn swap_conversion() {
        assert_eq!(swap_to_v2(0, -1).unwrap(), -1);
        assert_eq!(swap_to_v2(-1, 100).unwrap(), -1);
        assert_eq!(swap_to_v2(0, 100).unwrap(), 0);
        assert_eq!(swap_to_v2(300, 100).unwrap(), 200);
        assert!(swap_to_v2(50, 100).is_err());
        assert!(swap_to_v2(50, 0).is_err());
    }

    #[test]
    fn resources_to_files() {
        let r = Resources {
            memory: Some(Memory {
                limit: Some(-1),
                reservation: None,
                swap: Some(0),
            }),
            cpu: Some(Cpu {
                shares: None,
                quota: None,
                period: Some(50_000),
            }),
            pids: Some(Pids { limit: 0 }),
            unified: [("io.weight".to_string(), "50".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(
            limits(&r).unwrap(),
            vec![
                ("memory.max".into(), "max".into()),
                ("memory.swap.max".into(), "max".into()),
                ("cpu.max".into(), "max 50000".into()),
                ("pids.max".into(), "max".into()),
                ("io.weight".into(), "50".into()),
            ]
        );
        let bad = Resources {
            unified: [("../x".to_string(), "1".to_string())].into(),
            ..Default::default()
        };
        assert!(limits(&bad).is_err());
    }

    const VM: VmCapacity = VmCapacity {
        memory_bytes: 512 * 1024 * 1024,
        cpus: 2,
    };

    fn memory(limit: i64) -> Resources {
        Resources {
            memory: Some(Memory {
                limit: Some(limit),
                reservation: None,
                swap: None,
            }),
            ..Default::default()
        }
    }

    fn cpu(quota: i64, period: Option<u64>) -> Resources {
        Resources {
            cpu: Some(Cpu {
                shares: None,
                quota: Some(quota),
                period,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn limits_fit_the_vm() {
        assert!(check_fits(&Resources::default(), VM).is_ok());
        assert!(check_fits(&memory(-1), VM).is_ok());
        assert!(check_fits(&memory(0), VM).is_ok());
        assert!(check_fits(&memory(512 * 1024 * 1024), VM).is_ok());
        assert_eq!(
            check_fits(&memory(1_073_741_824), VM)
                .unwrap_err()
                .to_string(),
            "linux.resources.memory.limit 1073741824 exceeds the VM's 512 MiB (the host grows \
             the VM before it applies a limit; this VM was not grown to it)"
        );
        assert!(check_fits(&cpu(-1, None), VM).is_ok());
        assert!(check_fits(&cpu(0, Some(100_000)), VM).is_ok());
        assert!(check_fits(&cpu(200_000, None), VM).is_ok());
        assert!(check_fits(&cpu(100_000, Some(50_000)), VM).is_ok());
        assert_eq!(
            check_fits(&cpu(250_000, Some(100_000)), VM)
                .unwrap_err()
                .to_string(),
            "linux.resources.cpu.quota 250000 / period 100000 (2.5 CPUs) exceeds the VM's 2 \
             CPUs (the host grows the VM before it applies a limit; this VM was not grown to it)"
        );
        assert!(check_fits(&cpu(300_000, None), VM)
            .unwrap_err()
            .to_string()
            .contains("(3 CPUs)"));
        assert!(check_fits(&cpu(i64::MAX, Some(u64::MAX)), VM).is_ok());
        let unified = |k: &str, v: &str| Resources {
            unified: [(k.to_string(), v.to_string())].into(),
            ..Default::default()
        };
        assert!(check_fits(&unified("memory.max", "max"), VM).is_ok());
        assert!(check_fits(&unified("memory.max", "1073741824"), VM)
            .unwrap_err()
            .to_string()
            .contains("unified[\"memory.max\"] 1073741824 exceeds the VM's 512 MiB"));
        assert!(check_fits(&unified("cpu.max", "max 100000"), VM).is_ok());
        assert!(check_fits(&unified("cpu.max", "150000 100000"), VM).is_ok());
        assert!(check_fits(&unified("cpu.max", "300000 100000"), VM).is_err());
        assert!(check_fits(&unified("cpu.max", "300000"), VM).is_err());
    }

    #[test]
    fn vm_capacity_parsing() {
        let meminfo = "MemTotal:         498212 kB\nMemFree:  1000 kB\n";
        assert_eq!(meminfo_total(meminfo), Some(498_212 * 1024));
        assert_eq!(meminfo_total("MemFree: 1 kB\n"), None);
        assert_eq!(meminfo_total("MemTotal: x kB\n"), None);
        assert_eq!(count_cpu_list("0\n"), Some(1));
        assert_eq!(count_cpu_list("0-3\n"), Some(4));
        assert_eq!(count_cpu_list("0-3,5,7-8"), Some(7));
        assert_eq!(count_cpu_list(""), None);
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("a"), None);
        let here = VmCapacity::read().unwrap();
        assert!(here.cpus >= 1 && here.memory_bytes > 0);
    }
}
