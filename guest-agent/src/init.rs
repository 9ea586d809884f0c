//! Early boot as PID 1: pseudo filesystems and kernel modules.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::path::Path;

use anyhow::{Context as _, Result};
use nix::errno::Errno;
use nix::mount::{mount, MsFlags};

use crate::log::{debug, info, warning};

/// The list of modules to load, one absolute path per line, in dependency order.
pub const MODULES_LIST: &str = "/lib/modules/spinbox-modules.list";
/// Modules loaded only when a container needs them (virtio-fs), in the same form.
pub const ONDEMAND_MODULES_LIST: &str = "/lib/modules/spinbox-modules-ondemand.list";

struct PseudoMount {
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// In mount order (parents before children).
const PSEUDO_MOUNTS: &[PseudoMount] = &[
    PseudoMount {
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    PseudoMount {
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    PseudoMount {
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    PseudoMount {
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("ptmxmode=0666,mode=0620"),
    },
    PseudoMount {
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    PseudoMount {
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("nsdelegate"),
    },
    PseudoMount {
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
    PseudoMount {
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
];

/// Moves the agent off the initramfs root. The initial rootfs can never be pivot_root()ed
/// away from (it has no parent mount), and every mount namespace cloned from it inherits that,
/// so containers could only chroot. Bind-mounting the root onto a directory, moving that mount
/// over `/` and chrooting into it gives a root that is a proper mount (with rootfs as its
/// parent): container namespaces cloned from here can pivot_root and detach the old root.
/// A failure is logged; the agent still serves (containers then fail at pivot_root).
pub fn leave_initramfs() {
    if let Err(e) = try_leave_initramfs() {
        warning!("leaving the initramfs root: {e:#}");
    }
}

fn try_leave_initramfs() -> Result<()> {
    const STAGE: &str = "/mnt";
    std::fs::create_dir_all(STAGE).with_context(|| format!("mkdir {STAGE}"))?;
    mount(
        Some("/"),
        STAGE,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .context("bind-mounting / on /mnt")?;
    nix::unistd::chdir(STAGE).context("chdir /mnt")?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .context("moving the bind mount over /")?;
    nix::unistd::chroot(".").context("chroot")?;
    nix::unistd::chdir("/").context("chdir /")?;
    debug!("root is now a bind mount of the initramfs");
    Ok(())
}

/// Mounts proc, sysfs, devtmpfs, devpts, /dev/shm, cgroup2, /run and /tmp. A failure is
/// logged and the rest still mounted: the agent can serve without, say, cgroup2.
pub fn mount_pseudo_filesystems() {
    for m in PSEUDO_MOUNTS {
        if let Err(e) = mount_one(m) {
            warning!("{e:#}");
        }
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        match std::os::unix::fs::symlink(target, link) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => warning!("symlink {link} -> {target}: {e}"),
        }
    }
}

fn mount_one(m: &PseudoMount) -> Result<()> {
    std::fs::create_dir_all(m.target).with_context(|| format!("mkdir {}", m.target))?;
    match mount(Some(m.fstype), m.target, Some(m.fstype), m.flags, m.data) {
        Ok(()) => {
            debug!("mounted {} on {}", m.fstype, m.target);
            Ok(())
        }
        // The kernel mounts devtmpfs itself with CONFIG_DEVTMPFS_MOUNT (not on an initramfs,
        // but be tolerant of a kernel that does).
        Err(Errno::EBUSY) if m.fstype == "devtmpfs" => {
            debug!("devtmpfs already mounted on {}", m.target);
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("mount {} on {}", m.fstype, m.target)),
    }
}

/// Loads the modules named in [`MODULES_LIST`] with `finit_module`, in order. Returns the
/// names of the modules actually loaded. A module that is already there (built in, or loaded)
/// is skipped silently; any other failure is logged and the next module tried.
pub fn load_modules() -> Vec<String> {
    load_module_list(MODULES_LIST)
}

/// [`load_modules`] for the list at `list_path` (blocking).
pub fn load_module_list(list_path: &str) -> Vec<String> {
    let list = match std::fs::read_to_string(list_path) {
        Ok(list) => list,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            debug!("no {list_path}; loading no modules");
            return Vec::new();
        }
        Err(e) => {
            warning!("reading {list_path}: {e}");
            return Vec::new();
        }
    };
    let mut loaded = Vec::new();
    for path in module_paths(&list) {
        let name = module_name(path);
        match load_module(Path::new(path)) {
            Ok(true) => {
                debug!("loaded module {name}");
                loaded.push(name.to_string());
            }
            Ok(false) => debug!("module {name} already present"),
            Err(e) => warning!("module {name}: {e:#}"),
        }
    }
    info!("loaded {} kernel modules", loaded.len());
    loaded
}

/// The non-empty, non-comment lines of a modules list.
fn module_paths(list: &str) -> impl Iterator<Item = &str> {
    list.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

/// `/lib/modules/x/kernel/net/vmw_vsock/vsock.ko` -> `vsock`.
fn module_name(path: &str) -> &str {
    let base = path.rsplit('/').next().unwrap_or(path);
    [".ko.xz", ".ko.zst", ".ko.gz", ".ko"]
        .iter()
        .find_map(|ext| base.strip_suffix(ext))
        .unwrap_or(base)
}

/// Returns Ok(false) when the module was already present (EEXIST).
fn load_module(path: &Path) -> Result<bool> {
    let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
    const NO_PARAMS: &CStr = c"";
    // SAFETY: finit_module takes an fd, a NUL-terminated parameter string and flags; the fd
    // stays open for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            NO_PARAMS.as_ptr(),
            0,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    match Errno::last() {
        Errno::EEXIST => Ok(false),
        e => Err(e).context("finit_module"),
    }
}

/// The guest's own vsock CID, or None when no guest-to-host transport (no virtio-vsock
/// device) is registered: then a listener binds fine but the host can never connect.
pub fn vsock_local_cid() -> Result<Option<u32>> {
    /// `IOCTL_VM_SOCKETS_GET_LOCAL_CID` from <linux/vm_sockets.h>.
    const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::c_ulong = 0x7b9;
    let dev = File::open("/dev/vsock").context("open /dev/vsock")?;
    let mut cid: u32 = 0;
    // SAFETY: the ioctl writes one u32 through the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), IOCTL_VM_SOCKETS_GET_LOCAL_CID, &mut cid) };
    if rc != 0 {
        return Err(Errno::last()).context("IOCTL_VM_SOCKETS_GET_LOCAL_CID");
    }
    Ok((cid != libc::VMADDR_CID_ANY).then_some(cid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names() {
        assert_eq!(
            module_name("/lib/modules/6.1.0-56-cloud-amd64/kernel/net/vmw_vsock/vsock.ko"),
            "vsock"
        );
        assert_eq!(module_name("/x/virtio_pci.ko.zst"), "virtio_pci");
        assert_eq!(module_name("evdev.ko"), "evdev");
    }

    #[test]
    fn module_list_skips_blanks_and_comments() {
        let list = "# load order\n/a/virtio.ko\n\n  /a/virtio_ring.ko  \n";
        assert_eq!(
            module_paths(list).collect::<Vec<_>>(),
            vec!["/a/virtio.ko", "/a/virtio_ring.ko"]
        );
    }

    #[test]
    fn pseudo_mounts_are_ordered_parents_first() {
        for (i, m) in PSEUDO_MOUNTS.iter().enumerate() {
            for later in &PSEUDO_MOUNTS[i + 1..] {
                assert!(
                    !m.target.starts_with(&format!("{}/", later.target)),
                    "{} must come after {}",
                    m.target,
                    later.target
                );
            }
        }
    }
}
