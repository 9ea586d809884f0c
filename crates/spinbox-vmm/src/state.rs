//! The per-VM state directory and its record.
//!
//! `<paths.state_dir>/<id>/` (mode 0700) holds the QMP socket, the vsock sockets, `vm.json`,
//! the VM's effective configuration `config.json` (while it runs) and, once a shutdown began,
//! `shutdown.json`. `vm.json` names every process, file and
//! directory the VM and its container own outside the runtime's memory, and is rewritten
//! *before* each of them comes into existence, so whoever finds a directory left by a crashed
//! runtime can reclaim exactly what it holds ([`reclaim`]).

use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::process::ProcessRecord;

pub const RECORD_FILE: &str = "vm.json";
/// The shutdown ladder's record ([`crate::ShutdownReport`]), rewritten at each step.
pub const SHUTDOWN_RECORD_FILE: &str = "shutdown.json";
/// The configuration the VM booted with (after the runtime sized it), written at boot.
pub const CONFIG_RECORD_FILE: &str = "config.json";
/// What `spinbox stop` asks of a VM's shim (written before it signals the shim with SIGUSR1).
pub const STOP_REQUEST_FILE: &str = "stop-request.json";

/// A stop asked from outside the shim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopRequest {
    /// Skip the graceful steps: QMP quit, then SIGKILL.
    pub force: bool,
    /// Who asked, for the record and the log.
    pub why: String,
    /// Each graceful step's grace instead of `timeouts.shutdown_grace`, in milliseconds.
    #[serde(default)]
    pub grace_ms: Option<u64>,
}

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
    /// The virtiofsd processes serving the VM's shares.
    #[serde(default)]
    pub fs_backends: Vec<ProcessRecord>,
    /// Files outside the state directory (the console log).
    pub files: Vec<PathBuf>,
    /// Directories outside the state directory (the container's data: its writable layer).
    #[serde(default)]
    pub dirs: Vec<PathBuf>,
    /// The VM's size: what it booted with and what was hot-plugged since (each resize is
    /// recorded before it is asked of QEMU, so the record never shows less than the VM has).
    #[serde(default)]
    pub shape: Option<VmShape>,
    /// The containerd namespace of the containers in the VM (for `spinbox ps`).
    #[serde(default)]
    pub namespace: Option<String>,
    /// The ids of the containers in the VM: the one that booted it first, then the pod's
    /// members in the order they joined (for `spinbox ps`).
    #[serde(default)]
    pub containers: Vec<String>,
}

/// A VM's vCPUs and memory as QEMU has them (a vCPU the guest took offline is still here).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmShape {
    /// vCPUs plugged (boot + hot-plugged).
    pub vcpus: u32,
    /// The most vCPUs the VM can have (`maxcpus`).
    pub max_vcpus: u32,
    /// Boot memory (MiB), which never shrinks.
    pub memory_base_mib: u32,
    /// Hot-plugged memory (MiB, virtio-mem), which can be given back.
    pub memory_plugged_mib: u32,
    /// The most memory the VM can have (MiB): boot plus the virtio-mem region.
    pub memory_max_mib: u32,
}

impl VmRecord {
    /// Every process the record names: QEMU, the vsock backend, the virtiofsd processes.
    pub fn processes(&self) -> Vec<ProcessRecord> {
        [self.qemu, self.vsock_backend]
            .into_iter()
            .flatten()
            .chain(self.fs_backends.iter().copied())
            .collect()
    }

    /// Whether the runtime that wrote this record still runs (pid and start time match).
    pub fn owner_alive(&self) -> bool {
        self.owner.is_some_and(|o| o.is_alive())
    }
}

/// A state directory in use, and its record. The record is written to disk on every change,
/// before the resource it names is created.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    record: tokio::sync::Mutex<VmRecord>,
}

impl StateDir {
    /// Creates `<root>/<id>` owner-only (healing an orphan left there, refusing a live VM's,
    /// see [`create_dir`]) and writes a record naming this process as the owner.
    pub async fn create(root: &Path, id: &str) -> io::Result<StateDir> {
        validate_id(id).map_err(|r| io::Error::new(io::ErrorKind::InvalidInput, r))?;
        let path = root.join(id);
        create_dir(&path).await?;
        let record = VmRecord {
            id: id.to_owned(),
            owner: ProcessRecord::of(std::process::id()).ok(),
            ..Default::default()
        };
        let dir = StateDir {
            path,
            record: tokio::sync::Mutex::new(VmRecord::default()),
        };
        if let Err(e) = dir.update(|r| *r = record).await {
            let _ = tokio::fs::remove_dir_all(&dir.path).await;
            return Err(e);
        }
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub async fn record(&self) -> VmRecord {
        self.record.lock().await.clone()
    }

    /// Changes the record and writes it (atomically, synced) before returning.
    pub async fn update(&self, change: impl FnOnce(&mut VmRecord)) -> io::Result<()> {
        let mut guard = self.record.lock().await;
        let mut next = guard.clone();
        change(&mut next);
        let dir = self.path.clone();
        let written = next.clone();
        tokio::task::spawn_blocking(move || write_record(&dir, &written))
            .await
            .map_err(io::Error::other)??;
        *guard = next;
        Ok(())
    }

    /// Removes the directory with everything in it. Idempotent.
    pub async fn remove(&self) -> io::Result<()> {
        match tokio::fs::remove_dir_all(&self.path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
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
    write_json(dir, RECORD_FILE, record)
}

/// Writes `value` as `dir/name`, owner-only, atomically (temporary file + rename), synced.
pub fn write_json<T: Serialize>(dir: &Path, name: &str, value: &T) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let data = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
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
    std::fs::rename(&tmp, dir.join(name))
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

/// Creates (or truncates) `path` owner-only (0600), for a helper's stderr log.
pub async fn create_private_file(path: &Path) -> io::Result<std::fs::File> {
    let file = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .await?;
    Ok(file.into_std().await)
}

/// Creates `dir` (and missing parents) owner-only, and makes an existing `dir` owner-only:
/// the log directory holds every guest's console.
pub async fn create_private_dir_all(dir: &Path) -> io::Result<()> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || create_private_dir_all_blocking(&dir))
        .await
        .map_err(io::Error::other)?
}

/// [`create_private_dir_all`] for a blocking thread.
pub fn create_private_dir_all_blocking(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Kills what a record names (verified by start time: a pid now used by another process is
/// never signalled), removes the files and directories it names, then the state directory.
/// Idempotent; returns the processes it found alive and killed.
pub async fn reclaim(dir: &Path) -> io::Result<Vec<ProcessRecord>> {
    let killed = reclaim_contents(dir).await?;
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(killed)
}

/// [`reclaim`] without removing the directory itself: for callers that release more of what
/// the directory records (the network) before they remove it.
pub async fn reclaim_contents(dir: &Path) -> io::Result<Vec<ProcessRecord>> {
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
        for proc in record.processes() {
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
        for d in &record.dirs {
            match tokio::fs::remove_dir_all(d).await {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
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
        // An orphaned virtiofsd stand-in.
        let mut fs_orphan = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        // A live process whose pid the record names with another start time: a recycled
        // pid, which must never be signalled.
        let mut bystander = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let recycled = ProcessRecord {
            pid: bystander.id(),
            start_time: ProcessRecord::of(bystander.id()).unwrap().start_time + 1,
        };
        let outside = root.path().join("console.log");
        std::fs::write(&outside, "x").unwrap();
        let data = root.path().join("data");
        std::fs::create_dir_all(data.join("sub")).unwrap();
        let rec = VmRecord {
            id: "vm1".into(),
            owner: Some(gone_owner),
            qemu: Some(ProcessRecord::of(orphan.id()).unwrap()),
            vsock_backend: Some(recycled),
            fs_backends: vec![ProcessRecord::of(fs_orphan.id()).unwrap()],
            files: vec![outside.clone()],
            dirs: vec![data.clone()],
            // A VM resized after boot: the record round-trips its shape.
            shape: Some(VmShape {
                vcpus: 2,
                max_vcpus: 8,
                memory_base_mib: 640,
                memory_plugged_mib: 1024,
                memory_max_mib: 8192,
            }),
            namespace: Some("default".into()),
            containers: vec!["vm1".into(), "member".into()],
        };
        assert!(!rec.owner_alive());
        write_record(&dir, &rec).unwrap();
        assert_eq!(read_record(&dir).unwrap(), rec);
        // A record written before `namespace` and `containers` existed still reads.
        let old =
            r#"{"id": "vm0", "owner": null, "qemu": null, "vsock_backend": null, "files": []}"#;
        let old: VmRecord = serde_json::from_str(old).unwrap();
        assert_eq!((old.namespace, old.containers.len()), (None, 0));

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
        let fs_reaper = std::thread::spawn(move || fs_orphan.wait());
        create_dir(&dir).await.unwrap();
        assert!(dir.exists());
        assert!(!dir.join(RECORD_FILE).exists());
        assert!(!outside.exists());
        assert!(!data.exists());
        assert!(!reaper.join().unwrap().unwrap().success());
        assert!(
            !fs_reaper.join().unwrap().unwrap().success(),
            "the recorded virtiofsd was killed"
        );
        assert!(
            bystander.try_wait().unwrap().is_none(),
            "a pid whose start time differs from the record was killed"
        );
        bystander.kill().unwrap();
        bystander.wait().unwrap();
        // Idempotent.
        reclaim(&dir).await.unwrap();
        reclaim(&dir).await.unwrap();
        assert!(!dir.exists());
    }

    #[tokio::test]
    async fn state_dir_writes_its_record_before_returning() {
        let root = tempfile::tempdir().unwrap();
        let dir = StateDir::create(root.path(), "vm2").await.unwrap();
        let on_disk = read_record(dir.path()).unwrap();
        assert_eq!(on_disk.id, "vm2");
        assert!(on_disk.owner_alive());
        let extra = root.path().join("work");
        dir.update(|r| r.dirs.push(extra.clone())).await.unwrap();
        assert_eq!(read_record(dir.path()).unwrap().dirs, vec![extra]);
        // A second StateDir for the same id, while this process (the owner) lives: refused.
        let e = StateDir::create(root.path(), "vm2").await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert!(StateDir::create(root.path(), "../x").await.is_err());
        dir.remove().await.unwrap();
        dir.remove().await.unwrap();
        assert!(!root.path().join("vm2").exists());
    }
}
