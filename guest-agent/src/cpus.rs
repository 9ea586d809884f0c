//! vCPUs the host hot-plugs: the kernel registers each offline (an ACPI processor device),
//! and without udev nobody brings it online but the agent, when the host asks (OnlineCpus).

use std::io;
use std::path::Path;

const CPUS: &str = "/sys/devices/system/cpu";

/// Writes `1` to the `online` file of every CPU that has one and is offline; returns how many
/// CPUs are online afterwards. Blocking.
pub fn online_all() -> io::Result<u32> {
    online_all_in(Path::new(CPUS))
}

fn online_all_in(root: &Path) -> io::Result<u32> {
    let mut online = 0;
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(n) = name.to_str().and_then(|n| n.strip_prefix("cpu")) else {
            continue;
        };
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let state = entry.path().join("online");
        // cpu0 has no `online` file on x86: it is always online.
        match std::fs::read_to_string(&state) {
            Ok(s) if s.trim() == "0" => {
                std::fs::write(&state, "1")
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", state.display())))?;
                online += 1;
            }
            Ok(_) => online += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => online += 1,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{}: {e}", state.display()),
                ))
            }
        }
    }
    Ok(online)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_cpus_are_brought_online_and_counted() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("cpu0")).unwrap();
        for (cpu, state) in [("cpu1", "1\n"), ("cpu2", "0\n")] {
            std::fs::create_dir(root.path().join(cpu)).unwrap();
            std::fs::write(root.path().join(cpu).join("online"), state).unwrap();
        }
        // Not CPUs.
        std::fs::create_dir(root.path().join("cpufreq")).unwrap();
        std::fs::write(root.path().join("online"), "0-1\n").unwrap();
        assert_eq!(online_all_in(root.path()).unwrap(), 3);
        let cpu2 = std::fs::read_to_string(root.path().join("cpu2/online")).unwrap();
        assert_eq!(cpu2, "1");
    }
}
