//! container-init's work inside the container's root before pivot_root: the spec's mounts,
//! the standard /dev nodes and links, and the spec's device nodes. Every path inside the root
//! is resolved by the kernel inside it ([`Root`]): a symlink in the image (or made by an
//! earlier mount) that points to `/`, `../../..` or a host path resolves inside the root, and
//! mount(2) gets the resolved object as `/proc/self/fd/N`.

use std::ffi::CString;
use std::os::fd::AsRawFd as _;
use std::path::Path;

use anyhow::{Context as _, Result};
use nix::mount::{mount, MsFlags};

use super::resolve::{fd_path, Root};
use super::spec::{DevicePlan, MountPlan};

pub fn flags(bits: u64) -> MsFlags {
    MsFlags::from_bits_retain(bits)
}

pub fn display_type(m: &MountPlan) -> &str {
    if m.is_bind() {
        "bind"
    } else {
        &m.fstype
    }
}

/// The error for a mount point that could not be created: on a read-only root (no writable
/// layer) it says so.
pub fn mount_point_error(e: anyhow::Error, destination: &str) -> anyhow::Error {
    let read_only = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::EROFS))
    });
    if read_only {
        e.context(format!(
            "the container's root is read-only (no writable layer), so the mount destination \
             {destination} missing from the image cannot be created"
        ))
    } else {
        e
    }
}

/// mount(2) onto `dest` inside the root, resolved afresh (after a mount, the path names the
/// new mount's root, which a remount or propagation change must act on).
fn mount_on(
    root: &Root,
    source: Option<&str>,
    dest: &str,
    fstype: Option<&str>,
    bits: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    let target = root.resolve(dest)?;
    mount(source, &fd_path(&target), fstype, bits, data)?;
    Ok(())
}

/// One spec mount, its mount point made in the root as needed (a file for a bind of a
/// non-directory, else a directory).
pub fn mount_one(root: &Root, m: &MountPlan) -> Result<()> {
    let dest = m.destination.as_str();
    let bits = flags(m.flags);
    if m.is_bind() {
        let source_is_dir = Path::new(&m.source).is_dir();
        root.ensure(dest, !source_is_dir, 0o755)
            .map_err(|e| mount_point_error(e, dest))?;
        mount_on(
            root,
            Some(m.source.as_str()),
            dest,
            None,
            bits & (MsFlags::MS_BIND | MsFlags::MS_REC),
            None,
        )?;
        // Flags other than bind/rec need a remount of the bind.
        let rest = bits & !(MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_REMOUNT);
        if !rest.is_empty() {
            mount_on(
                root,
                None,
                dest,
                None,
                rest | MsFlags::MS_BIND | MsFlags::MS_REMOUNT,
                None,
            )
            .context("remounting the bind with its flags")?;
        }
    } else {
        root.ensure(dest, false, 0o755)
            .map_err(|e| mount_point_error(e, dest))?;
        let data = (!m.data.is_empty()).then_some(m.data.as_str());
        mount_on(
            root,
            Some(m.source.as_str()),
            dest,
            Some(m.fstype.as_str()),
            bits,
            data,
        )?;
    }
    if m.propagation != 0 {
        mount_on(root, None, dest, None, flags(m.propagation), None)
            .context("setting propagation")?;
    }
    Ok(())
}

/// The standard device nodes, as runc makes them.
const STD_DEVICES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

fn cstring(s: &str) -> Result<CString> {
    CString::new(s).with_context(|| format!("{s:?} contains a NUL byte"))
}

/// The standard nodes and links in the root's /dev.
pub fn populate_dev(root: &Root) -> Result<()> {
    for (name, major, minor) in STD_DEVICES {
        let node = DevicePlan {
            path: format!("/dev/{name}"),
            kind: libc::S_IFCHR,
            major: *major,
            minor: *minor,
            mode: 0o666,
            uid: 0,
            gid: 0,
        };
        make_device(root, &node)?;
    }
    let dev = root.mkdir_all("/dev", 0o755)?;
    let mut links = vec![
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ];
    if Path::new("/proc/kcore").exists() {
        links.push(("core", "/proc/kcore"));
    }
    for (link, target) in links {
        let (l, t) = (cstring(link)?, cstring(target)?);
        // SAFETY: symlinkat(2) relative to the /dev fd we hold.
        if unsafe { libc::symlinkat(t.as_ptr(), dev.as_raw_fd(), l.as_ptr()) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(e).with_context(|| format!("symlink /dev/{link}"));
            }
        }
    }
    Ok(())
}

/// A device node inside the root: mknod, or (where that is refused) a bind of the guest's
/// node with the same name.
pub fn make_device(root: &Root, d: &DevicePlan) -> Result<()> {
    let path = d.path.as_str();
    let (parent, name) = {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        (root.mkdir_all(dir, 0o755)?, name)
    };
    let c = cstring(name)?;
    // SAFETY: unlinkat(2) of a name in a directory fd we hold (never a directory).
    unsafe { libc::unlinkat(parent.as_raw_fd(), c.as_ptr(), 0) };
    let dev = libc::makedev(
        u32::try_from(d.major).context("major out of range")?,
        u32::try_from(d.minor).context("minor out of range")?,
    );
    // SAFETY: mknodat(2) relative to a directory fd we hold.
    let rc = unsafe { libc::mknodat(parent.as_raw_fd(), c.as_ptr(), d.kind | d.mode, dev) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        let guest = Path::new("/dev").join(name);
        if err.raw_os_error() != Some(libc::EPERM) || !guest.exists() {
            return Err(err).with_context(|| format!("mknod {path}"));
        }
        root.ensure(path, true, 0o666)?;
        let target = root.resolve(path)?;
        mount(
            Some(&guest),
            &fd_path(&target),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| format!("binding {} on {path}", guest.display()))?;
        return Ok(());
    }
    // SAFETY: fchownat(2) of the node just made, never following a symlink.
    let rc = unsafe {
        libc::fchownat(
            parent.as_raw_fd(),
            c.as_ptr(),
            d.uid,
            d.gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("chown {path}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mount_point_refused_by_a_read_only_root_says_so() {
        let erofs = anyhow::Error::new(std::io::Error::from_raw_os_error(libc::EROFS))
            .context("creating /r/etc/resolv.conf");
        let e = format!("{:#}", mount_point_error(erofs, "/etc/resolv.conf"));
        assert!(
            e.contains("root is read-only") && e.contains("/etc/resolv.conf missing"),
            "{e}"
        );
        let other = anyhow::Error::new(std::io::Error::from_raw_os_error(libc::ENOSPC));
        let e = format!("{:#}", mount_point_error(other, "/etc/hosts"));
        assert!(!e.contains("read-only"), "{e}");
    }

    /// /dev links and fifo nodes land inside the root, through an image's symlinks.
    #[test]
    fn dev_entries_stay_inside_the_root() {
        let d = std::env::temp_dir().join(format!("spinbox-mounts-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("root")).unwrap();
        std::fs::create_dir_all(d.join("outside")).unwrap();
        // The image's /dev is a link out of the root.
        std::os::unix::fs::symlink("../../outside", d.join("root/dev")).unwrap();
        let root = Root::open(&d.join("root")).unwrap();
        let fifo = DevicePlan {
            path: "/dev/sub/fifo".into(),
            kind: libc::S_IFIFO,
            major: 0,
            minor: 0,
            mode: 0o600,
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
        };
        make_device(&root, &fifo).unwrap();
        let inside = std::fs::read_link(d.join("root/dev")).unwrap();
        assert_eq!(inside, Path::new("../../outside"));
        assert!(d.join("root/outside/sub/fifo").exists(), "made inside");
        assert_eq!(std::fs::read_dir(d.join("outside")).unwrap().count(), 0);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
