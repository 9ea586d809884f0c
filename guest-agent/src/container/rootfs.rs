//! Assembling a container's root filesystem from virtio-blk disks found by serial:
//! EROFS lowers + an ext4 upper under overlayfs, or one disk that is the whole root.
//!
//! The root is mounted writable whenever its disks allow, even for a read-only root
//! (`Rootfs.read_only`, `root.readonly`): container-init creates the spec's mount points in it
//! and makes it read-only last, as runc does (see `child::Step::ReadonlyRoot`). Without a
//! writable layer (lowers only, or a disk attached read-only) it is read-only from the start.
//!
//! Layout: `/run/spinbox/containers/<id>/{lower0,lower1,...,upper,rootfs}`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use spinbox_agent_api::agent::Rootfs;

use crate::log::{debug, warning};

pub const CONTAINERS_DIR: &str = "/run/spinbox/containers";
/// How long to wait for a disk's serial to show up in sysfs.
const DISK_WAIT: Duration = Duration::from_secs(5);

/// A container id is one safe path component: `[A-Za-z0-9][A-Za-z0-9_.-]*`, at most 128
/// bytes (it names a directory and a cgroup).
pub fn validate_id(id: &str) -> Result<()> {
    let mut chars = id.chars();
    let ok_first = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let ok_rest = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !ok_first || !ok_rest || id.len() > 128 || id.contains("..") {
        bail!("invalid container id {id:?}: want [A-Za-z0-9][A-Za-z0-9_.-]*, at most 128 bytes, no \"..\"");
    }
    Ok(())
}

/// The overlay mount data for the given lower dirs (topmost first) and optional upper mount.
pub fn overlay_data(lowers: &[PathBuf], upper: Option<&Path>) -> String {
    let lower: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    let mut data = format!("lowerdir={}", lower.join(":"));
    if let Some(u) = upper {
        data.push_str(&format!(
            ",upperdir={},workdir={}",
            u.join("upper").display(),
            u.join("work").display()
        ));
    }
    data
}

/// The `/dev/vdX` whose `/sys/block/vdX/serial` is `serial`, if present now.
fn find_disk_now(serial: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir("/sys/block").ok()?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("vd") {
            continue;
        }
        if let Ok(s) = std::fs::read_to_string(e.path().join("serial")) {
            if s.trim() == serial {
                return Some(Path::new("/dev").join(name));
            }
        }
    }
    None
}

/// Whether the block device was attached read-only (`/sys/block/vdX/ro`).
fn device_read_only(dev: &Path) -> bool {
    let Some(name) = dev.file_name() else {
        return false;
    };
    std::fs::read_to_string(Path::new("/sys/block").join(name).join("ro"))
        .is_ok_and(|s| s.trim() == "1")
}

/// Finds a disk by serial, waiting up to [`DISK_WAIT`] for virtio_blk to probe it.
async fn find_disk(serial: &str) -> Result<PathBuf> {
    let deadline = Instant::now() + DISK_WAIT;
    loop {
        if let Some(dev) = find_disk_now(serial) {
            if dev.exists() {
                return Ok(dev);
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "no virtio-blk disk with serial {serial:?} after {}s",
                DISK_WAIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A mounted root and what it took, so it can be undone.
#[derive(Debug)]
pub struct MountedRootfs {
    /// `/run/spinbox/containers/<id>`.
    pub dir: PathBuf,
    /// The root to give the container.
    pub rootfs: PathBuf,
    /// Mount points in mount order.
    mounts: Vec<PathBuf>,
    /// Directories created, in creation order.
    dirs: Vec<PathBuf>,
}

impl MountedRootfs {
    /// Unmounts (reverse order) and removes the directories. Never removes a directory that
    /// still has something mounted on it. Returns the problems. Blocking.
    pub fn teardown(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        let mut stuck = Vec::new();
        for point in self.mounts.drain(..).rev() {
            if let Err(e) = umount2(&point, MntFlags::empty()) {
                debug!("umount {}: {e}; detaching", point.display());
                if let Err(e) = umount2(&point, MntFlags::MNT_DETACH) {
                    errors.push(format!("umount {}: {e}", point.display()));
                    stuck.push(point);
                }
            }
        }
        for d in self.dirs.drain(..).rev() {
            if stuck.contains(&d) {
                continue;
            }
            if let Err(e) = std::fs::remove_dir(&d) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    errors.push(format!("rmdir {}: {e}", d.display()));
                }
            }
        }
        errors
    }
}

/// Mounts the container's root as `rootfs` describes. On failure everything done is undone.
pub async fn assemble(id: &str, rootfs: &Rootfs) -> Result<MountedRootfs> {
    validate_id(id)?;
    let layered = !rootfs.lower_serials.is_empty();
    let block = !rootfs.block_serial.is_empty();
    if layered == block {
        bail!("rootfs: give either lower_serials or block_serial");
    }
    if block && rootfs.block_fstype.is_empty() {
        bail!("rootfs: block_serial without block_fstype");
    }
    // Find every disk first (async, may wait), then mount (blocking).
    let mut lowers = Vec::new();
    for s in &rootfs.lower_serials {
        lowers.push(find_disk(s).await?);
    }
    let upper = if rootfs.upper_serial.is_empty() {
        None
    } else {
        Some(find_disk(&rootfs.upper_serial).await?)
    };
    let block_dev = if block {
        Some(find_disk(&rootfs.block_serial).await?)
    } else {
        None
    };
    let dir = Path::new(CONTAINERS_DIR).join(id);
    let block_fstype = rootfs.block_fstype.clone();
    tokio::task::spawn_blocking(move || {
        let mut m = MountedRootfs {
            rootfs: dir.join("rootfs"),
            dir,
            mounts: Vec::new(),
            dirs: Vec::new(),
        };
        match mount_all(
            &mut m,
            &lowers,
            upper.as_deref(),
            block_dev.as_deref(),
            &block_fstype,
        ) {
            Ok(()) => Ok(m),
            Err(e) => {
                for problem in m.teardown() {
                    warning!("rolling back rootfs: {problem}");
                }
                Err(e)
            }
        }
    })
    .await
    .context("rootfs task failed")?
}

fn mkdir(m: &mut MountedRootfs, d: &Path) -> Result<()> {
    match std::fs::create_dir(d) {
        Ok(()) => {
            m.dirs.push(d.to_owned());
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("mkdir {}", d.display())),
    }
}

fn do_mount(
    m: &mut MountedRootfs,
    source: &Path,
    target: &Path,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    mount(Some(source), target, Some(fstype), flags, data).with_context(|| {
        format!(
            "mount {} ({fstype}) on {}{}",
            source.display(),
            target.display(),
            data.map(|d| format!(" with {d}")).unwrap_or_default()
        )
    })?;
    debug!(
        "mounted {} ({fstype}) on {}",
        source.display(),
        target.display()
    );
    m.mounts.push(target.to_owned());
    Ok(())
}

fn mount_all(
    m: &mut MountedRootfs,
    lowers: &[PathBuf],
    upper: Option<&Path>,
    block: Option<&Path>,
    block_fstype: &str,
) -> Result<()> {
    std::fs::create_dir_all(CONTAINERS_DIR).with_context(|| format!("mkdir {CONTAINERS_DIR}"))?;
    let dir = m.dir.clone();
    mkdir(m, &dir).map_err(|e| {
        if dir.exists() {
            e.context("a container with this id already has a rootfs")
        } else {
            e
        }
    })?;
    let root = m.rootfs.clone();
    mkdir(m, &root)?;
    if let Some(dev) = block {
        // A disk the host attached read-only can only be mounted read-only; a writable one is
        // mounted writable even for a read-only root (made read-only in the container, last).
        let flags = if device_read_only(dev) {
            MsFlags::MS_RDONLY
        } else {
            MsFlags::empty()
        };
        return do_mount(m, dev, &root, block_fstype, flags, None);
    }
    let mut lower_dirs = Vec::new();
    for (i, dev) in lowers.iter().enumerate() {
        let d = dir.join(format!("lower{i}"));
        mkdir(m, &d)?;
        do_mount(m, dev, &d, "erofs", MsFlags::MS_RDONLY, None)?;
        lower_dirs.push(d);
    }
    let upper_dir = match upper {
        Some(dev) => {
            let d = dir.join("upper");
            mkdir(m, &d)?;
            do_mount(m, dev, &d, "ext4", MsFlags::empty(), None)?;
            for sub in ["upper", "work"] {
                if !d.join(sub).is_dir() {
                    bail!(
                        "upper disk {}: no {sub}/ directory at its root",
                        dev.display()
                    );
                }
            }
            Some(d)
        }
        None => None,
    };
    if upper_dir.is_none() && lower_dirs.len() == 1 {
        // overlayfs wants two lowers without an upper; one read-only layer is just a bind.
        do_mount(m, &lower_dirs[0], &root, "none", MsFlags::MS_BIND, None)?;
        mount(
            None::<&str>,
            &root,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .with_context(|| format!("remounting {} read-only", root.display()))?;
        return Ok(());
    }
    let data = overlay_data(&lower_dirs, upper_dir.as_deref());
    do_mount(
        m,
        Path::new("overlay"),
        &root,
        "overlay",
        MsFlags::empty(),
        Some(&data),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["c1", "a", "A.b_c-d", "0abc", "x".repeat(128).as_str()] {
            assert!(validate_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "-a",
            "_a",
            ".a",
            "a..b",
            "a b",
            "a\n",
            "é",
            &"x".repeat(129),
        ] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn overlay_options() {
        let lowers = vec![PathBuf::from("/r/c/lower0"), PathBuf::from("/r/c/lower1")];
        assert_eq!(
            overlay_data(&lowers, None),
            "lowerdir=/r/c/lower0:/r/c/lower1"
        );
        assert_eq!(
            overlay_data(&lowers[..1], Some(Path::new("/r/c/upper"))),
            "lowerdir=/r/c/lower0,upperdir=/r/c/upper/upper,workdir=/r/c/upper/work"
        );
    }
}
