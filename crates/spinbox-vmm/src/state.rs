//! The per-VM state directory and its record.
//!
//! `<paths.state_dir>/<id>/` (mode 0700) holds the QMP socket, the vsock sockets and
//! `vm.json`, which names every process and file the VM owns outside the runtime's memory. The
//! record is rewritten as each resource comes into existence, so whoever finds a directory
//! left by a crashed runtime can reclaim exactly what it holds ([`reclaim`]).

use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::process::ProcessRecord;

pub const RECORD_FILE: &str = "vm.json";

/// What a VM owns outside the runtime's memory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    pub id: String,
    /// The runtime process that created the VM (a shim). While it lives the VM is its own;
    /// once it is gone, what the record names is an orphan anyone may reclaim.
    #[serde(default)]
    pub owner: Option<ProcessRecord>,
    pub qemu: Option<ProcessRecord>,
    pub vsock_backend: Option<ProcessRecord>,
    /// Files outside the state directory (the console log).
    pub files: Vec<PathBuf>,
}

/// Validates a VM id: it becomes a directory name, so it must be one safe path component.
/// Same alphabet as containerd's identifiers.
pub fn validate_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 76 {
        return Err("must be 1 to 76 characters".into());
    }
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok {
        return Err("must start with a letter or digit".into());
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err("may hold only letters, digits, '_', '-' and '.'".into());
    }
    if id.contains("..") {
        return Err("must not contain \"..\"".into());
    }
    Ok(())
}

pub fn write_record(dir: &Path, record: &VmRecord) -> io::Result<()> {
    let tmp = dir.join(".vm.json.tmp");
    let data = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&data)?;
        f.sync_data()?;
    }
    std::fs::rename(&tmp, dir.join(RECORD_FILE))
}

pub fn read_record(dir: &Path) -> io::Result<VmRecord> {
    let data = std::fs::read(dir.join(RECORD_FILE))?;
    serde_json::from_slice(&data).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Creates the state directory owner-only. A directory left by an earlier VM of the same id
/// whose owner is gone is reclaimed first: an orphan must never block the next start. One
/// whose owner still runs belongs to a live VM, and is refused (`AlreadyExists`), never killed.
pub async fn create_dir(dir: &Path) -> io::Result<()> {
    if dir.exists() {
        if let Ok(VmRecord {
            owner: Some(owner), ..
        }) = read_record(dir)
        {
            if owner.is_alive() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "a VM of this id is running, owned by pid {} (state {})",
                        owner.pid,
                        dir.display()
                    ),
                ));
            }
        }
        tracing::warn!(dir = %dir.display(), "state directory exists: reclaiming an orphaned VM");
        reclaim(dir).await?;
    }
    if let Some(parent) = dir.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(parent)?;
    }
    std::fs::DirBuilder::new().mode(0o700).create(dir)
}

/// Kills what a record names (verified by start time) and removes the directory and its
/// files. Idempotent; returns what it found alive.
pub async fn reclaim(dir: &Path) -> io::Result<Vec<ProcessRecord>> {
    let mut killed = Vec::new();
    let record = match read_record(dir) {
        Ok(r) => Some(r),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "unreadable VM record; removing the directory only");
            None
        }
    };
    if let Some(record) = &record {
        for proc in [record.qemu, record.vsock_backend].into_iter().flatten() {
            if proc.signal(nix::sys::signal::Signal::SIGKILL)? {
                killed.push(proc);
                if !proc.wait_gone(Duration::from_secs(5)).await {
                    return Err(io::Error::other(format!(
                        "pid {} survived SIGKILL for 5s",
                        proc.pid
                    )));
                }
            }
        }
        for file in &record.files {
            remove_file_if_exists(file)?;
        }
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(killed)
}

pub fn remove_file_if_exists(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_single_safe_components() {
        for ok in ["a", "web-1", "x_y.z", "0123456789abcdef"] {
            assert!(validate_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "../etc",
            "a/b",
            ".hidden",
            "a..b",
            "sp ace",
            "-x",
            &"a".repeat(77),
        ] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn record_round_trip_and_reclaim_of_a_live_orphan() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("vm1");
        create_dir(&dir).await.unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );

        // An orphan: a process recorded by a "crashed" runtime (an owner that has exited).
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let gone_owner = ProcessRecord::of(gone.id()).unwrap();
        gone.wait().unwrap();
        let mut orphan = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let outside = root.path().join("console.log");
        std::fs::write(&outside, "x").unwrap();
        let rec = VmRecord {
            id: "vm1".into(),
            owner: Some(gone_owner),
            qemu: Some(ProcessRecord::of(orphan.id()).unwrap()),
            vsock_backend: None,
            files: vec![outside.clone()],
        };
        write_record(&dir, &rec).unwrap();
        assert_eq!(read_record(&dir).unwrap(), rec);

        // While the owner lives, the VM is not an orphan: refused, nothing killed.
        let live = VmRecord {
            owner: Some(ProcessRecord::of(std::process::id()).unwrap()),
            ..rec.clone()
        };
        write_record(&dir, &live).unwrap();
        let e = create_dir(&dir).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert!(rec.qemu.unwrap().is_alive());
        write_record(&dir, &rec).unwrap();

        // Creating the same id again heals: kills the orphan, removes its files.
        let reaper = std::thread::spawn(move || orphan.wait());
        create_dir(&dir).await.unwrap();
        assert!(dir.exists());
        assert!(!dir.join(RECORD_FILE).exists());
        assert!(!outside.exists());
        assert!(!reaper.join().unwrap().unwrap().success());
        // Idempotent.
        reclaim(&dir).await.unwrap();
        reclaim(&dir).await.unwrap();
        assert!(!dir.exists());
    }
}
