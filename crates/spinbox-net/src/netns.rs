//! Network namespaces: run work inside one, create and remove named ones.
//!
//! A netlink socket and a TAP belong to the network namespace of the thread that opened
//! them. Work for another namespace therefore runs on a dedicated OS thread that enters it
//! with setns(2) and drives its own single-threaded tokio runtime; the thread ends with the
//! work, so no pooled thread is ever left in a foreign namespace.

use std::fs::File;
use std::future::Future;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

use crate::NetError;

/// Runs `work` on a new thread inside the network namespace at `netns` and returns its
/// result. The caller's async runtime is never blocked: the thread reports back through a
/// channel.
pub async fn run_in<F, Fut, T>(netns: &Path, work: F) -> Result<T, NetError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetError>>,
    T: Send + 'static,
{
    let path = netns.to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("spinbox-netns".into())
        .spawn(move || {
            let result = enter(&path).and_then(|()| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| NetError::io("starting a runtime for netns work", e))?;
                rt.block_on(work())
            });
            let _ = tx.send(result);
        })
        .map_err(|e| NetError::io("spawning the netns thread", e))?;
    rx.await
        .map_err(|_| NetError::Other(format!("netns work in {} panicked", netns.display())))?
}

fn enter(path: &Path) -> Result<(), NetError> {
    let file = File::open(path).map_err(|e| NetError::Netns {
        path: path.to_path_buf(),
        reason: format!("open: {e}"),
    })?;
    setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| NetError::Netns {
        path: path.to_path_buf(),
        reason: format!("setns: {e}"),
    })
}

/// Creates a named network namespace the way `ip netns add` does: a new namespace bind
/// mounted on `dir/name`, with `dir` a shared mount so other mount namespaces see it.
pub async fn create(dir: &Path, name: &str) -> Result<PathBuf, NetError> {
    let dir = dir.to_path_buf();
    let path = dir.join(name);
    let target = path.clone();
    tokio::task::spawn_blocking(move || create_blocking(&dir, &target))
        .await
        .map_err(|e| NetError::Other(format!("netns create task: {e}")))??;
    Ok(path)
}

fn create_blocking(dir: &Path, path: &Path) -> Result<(), NetError> {
    let fail = |reason: String| NetError::Netns {
        path: path.to_path_buf(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| fail(format!("creating {}: {e}", dir.display())))?;
    make_shared(dir).map_err(|e| fail(format!("making {} a shared mount: {e}", dir.display())))?;
    // The mount point: a new empty file, never an existing one (that would be someone's).
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| fail(format!("creating the mount point: {e}")))?;
    // unshare() changes the calling thread's namespace: do it on a thread of its own.
    let target = path.to_path_buf();
    let result = std::thread::spawn(move || -> Result<(), String> {
        unshare(CloneFlags::CLONE_NEWNET).map_err(|e| format!("unshare: {e}"))?;
        let tid = nix::unistd::gettid();
        let own = format!("/proc/self/task/{tid}/ns/net");
        mount(
            Some(own.as_str()),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| format!("bind mount of {own}: {e}"))
    })
    .join()
    .map_err(|_| "the unshare thread panicked".to_string())
    .and_then(|r| r);
    if let Err(reason) = result {
        let _ = std::fs::remove_file(path);
        return Err(fail(reason));
    }
    Ok(())
}

fn make_shared(dir: &Path) -> nix::Result<()> {
    let shared = || {
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared() {
        Ok(()) => Ok(()),
        // Not a mount point yet: bind it onto itself first, as iproute2 does.
        Err(nix::errno::Errno::EINVAL) => {
            mount(
                Some(dir),
                dir,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )?;
            shared()
        }
        Err(e) => Err(e),
    }
}

/// Removes a named network namespace created by [`create`]; a missing one is not an error.
pub async fn remove(path: &Path) -> Result<(), NetError> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        match umount2(&path, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => {
                return Err(NetError::Netns {
                    path: path.clone(),
                    reason: format!("umount: {e}"),
                })
            }
        }
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(NetError::Netns {
                path,
                reason: format!("unlink: {e}"),
            }),
        }
    })
    .await
    .map_err(|e| NetError::Other(format!("netns remove task: {e}")))?
}

/// Whether `path` is a network namespace file (nsfs), not a leftover mount point.
pub fn is_netns(path: &Path) -> bool {
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    // The field is i64 on x86_64, another width elsewhere.
    #[allow(clippy::unnecessary_cast)]
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 as i64 == NSFS_MAGIC)
}
