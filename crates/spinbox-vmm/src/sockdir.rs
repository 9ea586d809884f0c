//! Unix socket paths in a VM's state directory, whatever the directory's length.
//!
//! A socket's address holds at most 107 bytes (`sun_path`), and a state directory named by a
//! Kubernetes id (64 characters) under a long `paths.state_dir` does not fit. Where a socket's
//! full path fits it is used as it is. Where it does not: this process reaches the socket
//! through a descriptor it holds on the directory (`/proc/self/fd/<fd>/<name>`, resolved by
//! the kernel like any path), and a child (QEMU, vhost-device-vsock, virtiofsd) runs in the
//! directory and names the socket relative to it.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Longest path a unix socket address holds (sun_path, less the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug)]
pub struct SocketDir {
    dir: PathBuf,
    /// An `O_PATH` descriptor on `dir`, for this process's own binds and connects.
    fd: OwnedFd,
}

impl SocketDir {
    pub fn open(dir: &Path) -> std::io::Result<SocketDir> {
        let fd = nix::fcntl::open(
            dir,
            nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(std::io::Error::from)?;
        // SAFETY: `open` returned a new descriptor that nothing else owns.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(SocketDir {
            dir: dir.to_owned(),
            fd,
        })
    }

    /// The directory itself (a child's working directory).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The socket's full path (for everything but bind and connect: stat, unlink, messages).
    pub fn full(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn fits(&self, name: &str) -> bool {
        self.full(name).as_os_str().len() <= MAX_SOCKET_PATH
    }

    /// The address this process binds or connects to. Valid while `self` lives.
    pub fn local(&self, name: &str) -> PathBuf {
        if self.fits(name) {
            self.full(name)
        } else {
            PathBuf::from(format!("/proc/self/fd/{}/{name}", self.fd.as_raw_fd()))
        }
    }

    /// The address a child started in [`SocketDir::dir`] binds or connects to.
    pub fn for_child(&self, name: &str) -> PathBuf {
        if self.fits(name) {
            self.full(name)
        } else {
            PathBuf::from(name)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_directories_are_reached_through_a_descriptor_or_relative_names() {
        let short = tempfile::tempdir().unwrap();
        let s = SocketDir::open(short.path()).unwrap();
        assert_eq!(s.local("a.sock"), short.path().join("a.sock"));
        assert_eq!(s.for_child("a.sock"), short.path().join("a.sock"));

        let long = short.path().join("x".repeat(100));
        std::fs::create_dir(&long).unwrap();
        let s = SocketDir::open(&long).unwrap();
        let local = s.local("a.sock");
        assert!(local.as_os_str().len() <= MAX_SOCKET_PATH, "{local:?}");
        assert_eq!(s.for_child("a.sock"), PathBuf::from("a.sock"));
        // Bound and connected through the descriptor; the socket is in the long directory.
        let listener = std::os::unix::net::UnixListener::bind(&local).unwrap();
        assert!(long.join("a.sock").exists());
        std::os::unix::net::UnixStream::connect(&local).unwrap();
        drop(listener);
    }
}
