//! The shutdown records kept after a VM is gone.
//!
//! A VM's `shutdown.json` goes with its state directory. When the VM is released
//! ([`crate::Vm::release`]) its final report is copied to
//! `<paths.log_dir>/shutdown/<id>.<started_unix_ms>.json` (directory 0700, files 0600), and
//! only the newest `vm.shutdown_records_kept` of each id stay: a bounded history that
//! `spinbox inspect` reads once the VM is gone.

use std::io;
use std::path::{Path, PathBuf};

use crate::state;
use crate::vm::ShutdownReport;

/// The directory below `paths.log_dir` that holds the kept records.
pub const DIR: &str = "shutdown";

/// Where the kept records of every VM live.
pub fn dir(log_dir: &Path) -> PathBuf {
    log_dir.join(DIR)
}

/// The file name of the record of the shutdown of `id` that began at `started_unix_ms`.
pub fn file_name(id: &str, started_unix_ms: u64) -> String {
    format!("{id}.{started_unix_ms}.json")
}

/// The VM id and start (ms since the Unix epoch) a kept record's file name says; `None` for
/// any other name (a temporary file of a write in progress, something not ours).
pub fn parse_file_name(name: &str) -> Option<(&str, u64)> {
    let stem = name.strip_suffix(".json")?;
    let (id, ms) = stem.rsplit_once('.')?;
    if ms.is_empty() || !ms.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    state::validate_id(id).ok()?;
    Some((id, ms.parse().ok()?))
}

/// Every kept record in `log_dir` as (id, start, path), sorted by id, then oldest first. A
/// missing directory holds none.
pub fn list_all(log_dir: &Path) -> io::Result<Vec<(String, u64, PathBuf)>> {
    let dir = dir(log_dir);
    let read = match std::fs::read_dir(&dir) {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in read {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some((id, ms)) = parse_file_name(&name) {
            out.push((id.to_owned(), ms, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The kept records of `id`, oldest first.
pub fn list(log_dir: &Path, id: &str) -> io::Result<Vec<(u64, PathBuf)>> {
    Ok(list_all(log_dir)?
        .into_iter()
        .filter(|(i, _, _)| i == id)
        .map(|(_, ms, path)| (ms, path))
        .collect())
}

/// Writes `report` as the newest record of its VM (owner-only, atomically) and removes the
/// oldest of that id past `kept`; with `kept` 0 nothing is written and every record of the
/// id goes. Blocking: call it from a blocking thread.
pub fn keep(log_dir: &Path, report: &ShutdownReport, kept: usize) -> io::Result<()> {
    let dir = dir(log_dir);
    if kept > 0 {
        state::create_private_dir_all_blocking(&dir)?;
        let name = file_name(&report.vm_id, report.started_unix_ms);
        state::write_json(&dir, &name, report)?;
    }
    let records = list(log_dir, &report.vm_id)?;
    let surplus = records.len().saturating_sub(kept);
    for (_, path) in records.into_iter().take(surplus) {
        state::remove_file_if_exists(&path)?;
    }
    Ok(())
}

/// [`keep`] from async code; the error names the VM and the directory.
pub async fn keep_async(
    log_dir: &Path,
    report: &ShutdownReport,
    kept: usize,
) -> Result<(), String> {
    let (log, owned) = (log_dir.to_owned(), report.clone());
    tokio::task::spawn_blocking(move || keep(&log, &owned, kept))
        .await
        .map_err(io::Error::other)
        .and_then(|r| r)
        .map_err(|e| {
            format!(
                "keeping the shutdown record of {} in {}: {e}",
                report.vm_id,
                dir(log_dir).display()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn report(id: &str, started: u64) -> ShutdownReport {
        ShutdownReport {
            vm_id: id.into(),
            started_unix_ms: started,
            events: Vec::new(),
            complete: true,
            graceful: true,
            duration_ms: 12,
        }
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn names_round_trip_and_others_are_ignored() {
        assert_eq!(file_name("web.1", 42), "web.1.42.json");
        assert_eq!(parse_file_name("web.1.42.json"), Some(("web.1", 42)));
        assert_eq!(parse_file_name("a.7.json"), Some(("a", 7)));
        for other in [
            ".a.7.json.tmp",
            "a.json",
            "a.x7.json",
            "a..json",
            ".7.json",
            "a.7.txt",
            "../a.7.json",
        ] {
            assert_eq!(parse_file_name(other), None, "{other}");
        }
    }

    #[test]
    fn keeps_the_newest_per_id_owner_only() {
        let root = tempfile::tempdir().unwrap();
        let log = root.path().join("log");
        for started in [5, 1, 3, 2, 4] {
            keep(&log, &report("vm", started), 3).unwrap();
        }
        keep(&log, &report("vm.other", 9), 3).unwrap();
        assert_eq!(mode(&dir(&log)), 0o700);
        let kept: Vec<u64> = list(&log, "vm").unwrap().iter().map(|r| r.0).collect();
        assert_eq!(kept, vec![3, 4, 5]);
        for (_, path) in list(&log, "vm").unwrap() {
            assert_eq!(mode(&path), 0o600, "{}", path.display());
            let back: ShutdownReport =
                serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            assert_eq!(back.vm_id, "vm");
        }
        assert_eq!(list(&log, "vm.other").unwrap().len(), 1);
        assert_eq!(list_all(&log).unwrap().len(), 4);
        // 0 keeps none of the id, and leaves the others alone.
        keep(&log, &report("vm", 6), 0).unwrap();
        assert!(list(&log, "vm").unwrap().is_empty());
        assert_eq!(list(&log, "vm.other").unwrap().len(), 1);
        // Nothing kept and no directory: nothing to do.
        let fresh = root.path().join("fresh");
        keep(&fresh, &report("vm", 1), 0).unwrap();
        assert!(!fresh.exists());
        assert!(list_all(&fresh).unwrap().is_empty());
    }
}
