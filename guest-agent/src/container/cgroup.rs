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
}
