//! Paths inside a container's root, resolved by the kernel: openat2(2) with RESOLVE_IN_ROOT
//! treats the root as `/` for every component, `..` and symlink of the path (an image's
//! `/etc/resolv.conf -> /run/x` or `-> ../../..` stays inside), and RESOLVE_NO_MAGICLINKS
//! refuses `/proc/*/fd`-style links. What container-init creates or mounts in the root before
//! pivot_root goes through a [`Root`]: directories and files are made relative to directory
//! fds resolved this way, and mount(2) gets the resolved object as `/proc/self/fd/N` (as runc
//! does), never a path the kernel would walk again.

use std::ffi::CString;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

/// `struct open_how` (openat2(2)).
#[repr(C)]
#[derive(Default)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_IN_ROOT: u64 = 0x10;

/// A container's root directory, held open.
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
}

fn cstring(s: &str) -> std::io::Result<CString> {
    CString::new(s).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `/proc/self/fd/N`: the object `fd` refers to, as a path for mount(2).
pub fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// The components of a container path, `.` and empty ones dropped (`..` is left to the
/// kernel, which keeps it inside the root).
fn components(path: &str) -> Vec<&str> {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect()
}

/// How many symlinks [`Root::mkdir_all`] and [`Root::ensure`] follow for a missing path, as
/// the kernel's limit.
const MAX_LINKS: u32 = 40;

/// The symlink `name` in `dir` (whose container path is `dir_path`) pointing to a missing
/// target: the container path `rest` names through it.
fn through_link(dir: &OwnedFd, dir_path: &str, name: &str, rest: &[&str]) -> Option<String> {
    let c = cstring(name).ok()?;
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: readlinkat(2) into a buffer of the size given, relative to a dir fd we hold.
    let n = unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            c.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let n = usize::try_from(n).ok()?;
    let target = String::from_utf8(buf[..n].to_vec()).ok()?;
    let mut out = if target.starts_with('/') {
        target
    } else {
        format!("{dir_path}/{target}")
    };
    for r in rest {
        out.push('/');
        out.push_str(r);
    }
    Some(out)
}

impl Root {
    /// Opens the directory at `path` (a path in the caller's mount namespace) as the root.
    pub fn open(path: &Path) -> Result<Root> {
        let c = cstring(&path.display().to_string())?;
        // SAFETY: a NUL-terminated path and flags; returns a new fd or -1.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("opening the root {}", path.display()));
        }
        Ok(Root {
            // SAFETY: a new fd, ours alone.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            path: path.to_owned(),
        })
    }

    /// openat2(2) of `path` (a container path; symlinks are followed, inside the root) with
    /// `flags` (O_CLOEXEC is added) and `mode` for O_CREAT.
    pub fn open_at(&self, path: &str, flags: libc::c_int, mode: u32) -> std::io::Result<OwnedFd> {
        let rel = path.trim_start_matches('/');
        let rel = cstring(if rel.is_empty() { "." } else { rel })?;
        let mut how = OpenHow {
            flags: (flags | libc::O_CLOEXEC) as u64,
            mode: u64::from(mode),
            resolve: RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
        };
        // SAFETY: openat2(2) with our dirfd, a NUL-terminated path and an open_how of the
        // size given; returns a new fd or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.fd.as_raw_fd(),
                rel.as_ptr(),
                &mut how as *mut OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = libc::c_int::try_from(fd).map_err(|_| std::io::Error::other("bad fd"))?;
        // SAFETY: a new fd, ours alone.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// An O_PATH fd of what `path` names inside the root.
    pub fn resolve(&self, path: &str) -> Result<OwnedFd> {
        self.open_at(path, libc::O_PATH, 0)
            .with_context(|| format!("resolving {path} in {}", self.path.display()))
    }

    /// The directory `path` inside the root, made (with `mode`) where missing, component by
    /// component, each relative to its parent's fd; a symlink to a missing directory is
    /// followed (inside the root) and its target made. An O_PATH fd of it.
    pub fn mkdir_all(&self, path: &str, mode: u32) -> Result<OwnedFd> {
        self.mkdir_following(path, mode, 0)
    }

    fn mkdir_following(&self, path: &str, mode: u32, links: u32) -> Result<OwnedFd> {
        if links > MAX_LINKS {
            bail!("{path}: too many levels of symbolic links");
        }
        let comps = components(path);
        let flags = libc::O_PATH | libc::O_DIRECTORY;
        let mut dir = self
            .open_at("/", flags, 0)
            .with_context(|| format!("opening {}", self.path.display()))?;
        let mut at = String::new();
        for (i, name) in comps.iter().enumerate() {
            let parent_path = at.clone();
            at.push('/');
            at.push_str(name);
            dir = match self.open_at(&at, flags, 0) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    let c = cstring(name)?;
                    // SAFETY: mkdirat(2) relative to a directory fd we hold.
                    match check(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode) }) {
                        Ok(()) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                            // A symlink to something missing: make its target instead.
                            if let Some(p) = through_link(&dir, &parent_path, name, &comps[i + 1..])
                            {
                                return self.mkdir_following(&p, mode, links + 1);
                            }
                        }
                        Err(e) => return Err(e).with_context(|| format!("mkdir {at}")),
                    }
                    self.open_at(&at, flags, 0)
                        .with_context(|| format!("opening {at} after mkdir"))?
                }
                Err(e) => return Err(e).with_context(|| format!("opening {at}")),
            };
        }
        Ok(dir)
    }

    /// The directory holding `path` (made where missing), its container path and the last
    /// component's name.
    fn parent_of<'a>(&self, path: &'a str) -> Result<(OwnedFd, String, &'a str)> {
        let comps = components(path);
        let Some((name, parents)) = comps.split_last() else {
            bail!("{path:?} names the root itself");
        };
        let parent_path = format!("/{}", parents.join("/"));
        let parent = self.mkdir_all(&parent_path, 0o755)?;
        Ok((parent, parent_path, name))
    }

    /// Makes sure `path` exists inside the root: a directory, or (`file`) an empty file with
    /// `mode`; a final symlink to something missing is followed (inside the root) and its
    /// target made, as runc does.
    pub fn ensure(&self, path: &str, file: bool, mode: u32) -> Result<()> {
        self.ensure_following(path, file, mode, 0)
    }

    fn ensure_following(&self, path: &str, file: bool, mode: u32, links: u32) -> Result<()> {
        if links > MAX_LINKS {
            bail!("{path}: too many levels of symbolic links");
        }
        match self.open_at(path, libc::O_PATH, 0) {
            Ok(_) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e).with_context(|| format!("opening {path}")),
        }
        if !file {
            self.mkdir_all(path, 0o755)?;
            return Ok(());
        }
        let (parent, parent_path, name) = self.parent_of(path)?;
        let c = cstring(name)?;
        // SAFETY: openat(2) relative to a directory fd we hold; never through a symlink.
        let fd = unsafe {
            libc::openat(
                parent.as_raw_fd(),
                c.as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_WRONLY | libc::O_CLOEXEC,
                mode,
            )
        };
        if fd >= 0 {
            // SAFETY: the new fd, ours alone, closed here.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) {
            if let Some(p) = through_link(&parent, &parent_path, name, &[]) {
                return self.ensure_following(&p, file, mode, links + 1);
            }
        }
        Err(e).with_context(|| format!("creating {path}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("spinbox-resolve-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("root/real")).unwrap();
        std::fs::create_dir_all(d.join("outside")).unwrap();
        Dir(d)
    }

    fn real(fd: &OwnedFd) -> PathBuf {
        std::fs::read_link(fd_path(fd)).unwrap()
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let d = scratch("links");
        let root_path = d.0.join("root");
        symlink("/real", root_path.join("abs")).unwrap();
        symlink("../../..", root_path.join("up")).unwrap();
        symlink("/", root_path.join("slash")).unwrap();
        symlink(d.0.join("outside"), root_path.join("host")).unwrap();
        let root = Root::open(&root_path).unwrap();
        let canon = root_path.canonicalize().unwrap();

        assert_eq!(real(&root.resolve("/abs").unwrap()), canon.join("real"));
        assert_eq!(real(&root.resolve("/up").unwrap()), canon);
        assert_eq!(real(&root.resolve("/slash").unwrap()), canon);
        // An absolute link to a host path means that path inside the root.
        assert!(root.resolve("/host").is_err(), "no /<outside> in the root");

        // Made through the links, inside.
        let made = root.mkdir_all("/up/etc/x", 0o755).unwrap();
        assert_eq!(real(&made), canon.join("etc/x"));
        root.ensure("/slash/etc/hosts", true, 0o644).unwrap();
        assert!(canon.join("etc/hosts").is_file());
        root.ensure("/host/file", true, 0o644).unwrap();
        assert!(!d.0.join("outside/file").exists());
        assert!(canon
            .join(d.0.join("outside/file").strip_prefix("/").unwrap())
            .is_file());
        let outside = std::fs::read_dir(d.0.join("outside")).unwrap().count();
        assert_eq!(outside, 0, "nothing made outside the root");

        // `..` stays inside too.
        let made = root.mkdir_all("/a/../../../b", 0o755).unwrap();
        assert_eq!(real(&made), canon.join("b"));
    }

    #[test]
    fn a_dangling_final_symlink_is_created_inside() {
        let d = scratch("dangling");
        let root_path = d.0.join("root");
        std::fs::create_dir_all(root_path.join("run")).unwrap();
        std::fs::create_dir_all(root_path.join("etc")).unwrap();
        symlink("../run/resolv.conf", root_path.join("etc/resolv.conf")).unwrap();
        symlink("/../../outside/f", root_path.join("etc/escape")).unwrap();
        let root = Root::open(&root_path).unwrap();
        root.ensure("/etc/resolv.conf", true, 0o644).unwrap();
        assert!(root_path.join("run/resolv.conf").is_file());
        root.ensure("/etc/escape", false, 0o755).unwrap();
        assert!(!d.0.join("outside/f").exists());
        assert!(root_path.join("outside/f").is_dir());
        // A loop of links ends.
        symlink("/loop2", root_path.join("loop1")).unwrap();
        symlink("/loop1", root_path.join("loop2")).unwrap();
        assert!(root.ensure("/loop1/x", true, 0o644).is_err());
    }

    #[test]
    fn magic_links_are_refused() {
        let d = scratch("magic");
        let root_path = d.0.join("root");
        symlink("/proc/self/root", root_path.join("p")).unwrap();
        // Through a real /proc bound in the root, /proc/self/root is a magic link.
        let root = Root::open(Path::new("/")).unwrap();
        let e = root
            .open_at("/proc/self/root", libc::O_PATH, 0)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");
        // In the scratch root there is no /proc: resolving stays inside and fails.
        let root = Root::open(&root_path).unwrap();
        assert!(root.resolve("/p").is_err());
    }
}
