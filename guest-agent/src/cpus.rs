//! vCPUs the host hot-plugs: the kernel registers each offline (an ACPI processor device),
//! and without udev nobody brings it online but the agent, when the host asks (OnlineCpus).
//! The host shrinks a VM's CPUs the same way: the agent takes the highest-numbered offline
//! (the kernel moves their tasks), and QEMU keeps the vCPU, idle, for the next growth.

use std::io;
use std::path::Path;

const CPUS: &str = "/sys/devices/system/cpu";

/// Brings CPUs online or takes them offline until `want` are online (0: all of them);
/// returns how many are online afterwards. Blocking.
pub fn set_online(want: u32) -> io::Result<u32> {
    set_online_in(Path::new(CPUS), want)
}

/// The CPUs under `root`, by number, with their `online` file (None for one that cannot go
/// offline: cpu0 on x86) and whether they are online.
fn cpus_in(root: &Path) -> io::Result<Vec<(u32, Option<std::path::PathBuf>, bool)>> {
    let mut cpus = Vec::new();
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix("cpu"))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let state = entry.path().join("online");
        match std::fs::read_to_string(&state) {
            Ok(s) => cpus.push((n, Some(state), s.trim() != "0")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => cpus.push((n, None, true)),
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{}: {e}", state.display()),
                ))
            }
        }
    }
    cpus.sort_by_key(|c| c.0);
    Ok(cpus)
}

fn set_online_in(root: &Path, want: u32) -> io::Result<u32> {
    let cpus = cpus_in(root)?;
    let want = if want == 0 {
        usize::MAX
    } else {
        usize::try_from(want).unwrap_or(usize::MAX)
    };
    let write = |path: &Path, value: &str| {
        std::fs::write(path, value)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
    };
    // The ones that cannot go offline count first, then the lowest numbers.
    let fixed = cpus.iter().filter(|c| c.1.is_none()).count();
    let mut online = fixed;
    for (_, state, is_online) in cpus.iter().filter(|c| c.1.is_some()) {
        let Some(state) = state else { continue };
        if online < want {
            if !is_online {
                write(state, "1")?;
            }
            online += 1;
        } else if *is_online {
            write(state, "0")?;
        }
    }
    Ok(u32::try_from(online).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(states: &[(&str, Option<&str>)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for (cpu, state) in states {
            std::fs::create_dir(root.path().join(cpu)).unwrap();
            if let Some(state) = state {
                std::fs::write(root.path().join(cpu).join("online"), state).unwrap();
            }
        }
        // Not CPUs.
        std::fs::create_dir(root.path().join("cpufreq")).unwrap();
        std::fs::write(root.path().join("online"), "0-1\n").unwrap();
        root
    }

    fn state(root: &Path, cpu: &str) -> String {
        std::fs::read_to_string(root.join(cpu).join("online"))
            .unwrap()
            .trim()
            .to_owned()
    }

    #[test]
    fn offline_cpus_are_brought_online_and_counted() {
        let root = fake(&[("cpu0", None), ("cpu1", Some("1\n")), ("cpu2", Some("0\n"))]);
        assert_eq!(set_online_in(root.path(), 0).unwrap(), 3);
        assert_eq!(state(root.path(), "cpu2"), "1");
    }

    #[test]
    fn shrinking_takes_the_highest_numbered_offline_and_never_cpu0() {
        let root = fake(&[
            ("cpu0", None),
            ("cpu1", Some("1\n")),
            ("cpu10", Some("1\n")),
            ("cpu2", Some("1\n")),
        ]);
        assert_eq!(set_online_in(root.path(), 2).unwrap(), 2);
        assert_eq!(state(root.path(), "cpu1"), "1");
        assert_eq!(state(root.path(), "cpu2"), "0");
        assert_eq!(state(root.path(), "cpu10"), "0");
        // Asked for none but one that cannot go: it stays.
        assert_eq!(set_online_in(root.path(), 1).unwrap(), 1);
        assert_eq!(state(root.path(), "cpu1"), "0");
        // Growing again brings the lowest back first.
        assert_eq!(set_online_in(root.path(), 3).unwrap(), 3);
        assert_eq!(state(root.path(), "cpu1"), "1");
        assert_eq!(state(root.path(), "cpu2"), "1");
        assert_eq!(state(root.path(), "cpu10"), "0");
    }
}
