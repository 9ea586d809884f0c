//! Starting a container's processes: clone3(2) into new namespaces (the init) or into the
//! pid namespace the calling thread set for its children (an exec, see [`spawn_exec`]),
//! straight into the container's cgroup; then, in the child, only dup2(2) and execve(2) of the
//! agent binary in its `__container-init` or `__container-exec` mode. No Rust code runs
//! between clone and exec: the agent is multithreaded, and the child of a multithreaded
//! process may only make async-signal-safe calls. Everything the child touches is prepared
//! before the clone.
//!
//! A namespace the child shares with another process (an exec with its container's init, a
//! pod's container with its sandbox's init) is entered by the spawning thread before the
//! clone, through that process's pidfd ([`enter_namespaces`]); the child inherits it. Such a
//! thread is changed for good: it is one of its own ([`on_own_thread`]) and ends with the
//! spawn.

use std::ffi::CString;
use std::io::{Seek as _, SeekFrom, Write as _};
use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd};

use anyhow::{Context as _, Result};

use crate::reaper::{self, ExitInfo};

/// argv[1] that makes the agent binary run as a container's init.
pub const CONTAINER_INIT_ARG: &str = "__container-init";
/// argv[1] that makes the agent binary run as an exec process (see `child::exec_main`).
pub const CONTAINER_EXEC_ARG: &str = "__container-exec";

/// The fds container-init and container-exec find open, by number.
pub const FD_CONFIG: RawFd = 3;
pub const FD_START: RawFd = 4;
pub const FD_STATUS: RawFd = 5;
/// container-exec only: a pidfd of the container's init, whose namespaces it joins.
pub const FD_INIT_PIDFD: RawFd = 6;
/// Most fds handed over: 0, 1, 2, config, start, status, init pidfd.
const MAX_HANDED_FDS: usize = 7;

/// The namespaces container-exec joins through the init's pidfd (setns(2) with a pidfd and
/// several flags, Linux 5.8+). The pid namespace is not among them: the process is born in it
/// (see [`spawn_exec`]).
pub const EXEC_JOIN_NAMESPACES: libc::c_int = libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP;

const CLONE_PIDFD: u64 = 0x1000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// What the child gets, each as the fd it becomes.
pub struct ChildFds {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub start: OwnedFd,
    pub status: OwnedFd,
}

pub struct Launched {
    pub pid: i32,
    pub pidfd: OwnedFd,
    pub exit: tokio::sync::oneshot::Receiver<ExitInfo>,
}

/// `struct clone_args` (CLONE_ARGS_SIZE_VER2).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

fn memfd_with(data: &[u8]) -> Result<OwnedFd> {
    // SAFETY: a NUL-terminated name and flags; returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"spinbox-init-config".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("memfd_create");
    }
    // SAFETY: fd is a fresh fd we own.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.write_all(data).context("writing the init config")?;
    file.seek(SeekFrom::Start(0))
        .context("rewinding the init config")?;
    Ok(file.into())
}

/// A close-on-exec duplicate numbered >= 10, so that dup2 onto 0..5 in the child can never
/// overwrite another source fd.
fn high_dup(fd: BorrowedFd<'_>) -> Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a valid fd returns a new fd or -1.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    if new < 0 {
        return Err(std::io::Error::last_os_error()).context("F_DUPFD_CLOEXEC");
    }
    // SAFETY: `new` is a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Namespaces of a running process for a new one to share: its pidfd and CLONE_NEW* flags.
pub struct Join {
    pub pidfd: OwnedFd,
    pub namespaces: libc::c_int,
}

/// Enters `namespaces` (CLONE_NEW* flags) of the process behind `pidfd` for the calling
/// thread (setns(2) with a pidfd and several flags, Linux 5.8+): uts, ipc and net for the
/// thread and its future children, pid for its future children only. Never the mount
/// namespace (a thread of a multithreaded process cannot change it). Only from a thread
/// that ends after the spawn ([`on_own_thread`]).
fn enter_namespaces(pidfd: BorrowedFd<'_>, namespaces: libc::c_int) -> std::io::Result<()> {
    // SAFETY: setns(2) on a pidfd we hold, with namespace flags.
    if unsafe { libc::setns(pidfd.as_raw_fd(), namespaces) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a thread of its own that ends with it, for a spawn that enters namespaces
/// first: no pooled thread is left changed. Errors only when the thread cannot start or dies.
pub async fn on_own_thread<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let _ = tx.send(f());
        })?;
    rx.await
        .map_err(|_| std::io::Error::other(format!("the {name} thread died")))
}

/// Clones the container's init and registers it with the reaper. `namespaces` are CLONE_NEW*
/// flags of the new namespaces; `join` the namespaces shared with the pod's sandbox container
/// instead (then call it from [`on_own_thread`]); `cgroup` the container's cgroup directory.
pub fn spawn(
    config_json: &[u8],
    fds: ChildFds,
    namespaces: libc::c_int,
    join: Option<Join>,
    cgroup: Option<BorrowedFd<'_>>,
) -> Result<Launched> {
    if let Some(j) = &join {
        if j.namespaces & (libc::CLONE_NEWNS | libc::CLONE_NEWUSER) != 0 {
            anyhow::bail!("the mount and user namespaces cannot be shared");
        }
        enter_namespaces(j.pidfd.as_fd_ref(), j.namespaces).with_context(|| {
            format!(
                "entering the sandbox container's {} namespaces (setns)",
                namespace_names(j.namespaces)
            )
        })?;
    }
    drop(join);
    let namespaces = u64::try_from(namespaces).context("namespace flags")?;
    spawn_mode(
        CONTAINER_INIT_ARG,
        config_json,
        fds,
        None,
        namespaces,
        cgroup,
    )
}

/// `pid+ipc+uts` for CLONE_NEW* flags, for messages.
pub fn namespace_names(flags: libc::c_int) -> String {
    let names: Vec<&str> = [
        (libc::CLONE_NEWPID, "pid"),
        (libc::CLONE_NEWIPC, "ipc"),
        (libc::CLONE_NEWUTS, "uts"),
        (libc::CLONE_NEWNET, "net"),
        (libc::CLONE_NEWNS, "mount"),
        (libc::CLONE_NEWCGROUP, "cgroup"),
        (libc::CLONE_NEWUSER, "user"),
    ]
    .into_iter()
    .filter(|(f, _)| flags & f != 0)
    .map(|(_, n)| n)
    .collect();
    names.join("+")
}

/// Starts an exec process of a running container, from a dedicated thread (which ends with
/// it, see [`on_own_thread`]): the thread enters the init's pid namespace for its children
/// (setns(2) with CLONE_NEWPID changes only where the caller's future children are born, and
/// only for this thread), then clones container-exec into it and into the container's cgroup. The child is
/// the agent's, so the reaper collects it. container-exec joins the init's other namespaces
/// itself (a multithreaded process may not change its mount namespace), from the pidfd it
/// gets as fd 6. Blocks the calling thread only briefly; call it from a fresh thread.
pub fn spawn_exec(
    config_json: &[u8],
    fds: ChildFds,
    init_pidfd: OwnedFd,
    cgroup: BorrowedFd<'_>,
) -> Result<Launched> {
    enter_namespaces(init_pidfd.as_fd_ref(), libc::CLONE_NEWPID)
        .context("entering the init's pid namespace (setns CLONE_NEWPID)")?;
    spawn_mode(
        CONTAINER_EXEC_ARG,
        config_json,
        fds,
        Some(init_pidfd),
        0,
        Some(cgroup),
    )
}

fn spawn_mode(
    mode: &str,
    config_json: &[u8],
    fds: ChildFds,
    init_pidfd: Option<OwnedFd>,
    namespaces: u64,
    cgroup: Option<BorrowedFd<'_>>,
) -> Result<Launched> {
    let config = memfd_with(config_json)?;
    let mut sources = vec![
        high_dup(fds.stdin.as_fd_ref())?,
        high_dup(fds.stdout.as_fd_ref())?,
        high_dup(fds.stderr.as_fd_ref())?,
        high_dup(config.as_fd_ref())?,
        high_dup(fds.start.as_fd_ref())?,
        high_dup(fds.status.as_fd_ref())?,
    ];
    if let Some(p) = &init_pidfd {
        sources.push(high_dup(p.as_fd_ref())?);
    }
    let mut raw: [RawFd; MAX_HANDED_FDS] = [-1; MAX_HANDED_FDS];
    for (slot, src) in raw.iter_mut().zip(&sources) {
        *slot = src.as_raw_fd();
    }
    // Sliced before the clone: the child must not run anything that could panic.
    let handed = &raw[..sources.len()];
    let exe = c"/proc/self/exe";
    let arg0 = c"spinbox-agent";
    let arg1 = CString::new(mode).context("argv")?;
    let argv: [*const libc::c_char; 3] = [arg0.as_ptr(), arg1.as_ptr(), std::ptr::null()];
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let mut pidfd: libc::c_int = -1;
    let mut args = CloneArgs {
        flags: namespaces | CLONE_PIDFD,
        pidfd: &mut pidfd as *mut libc::c_int as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    if let Some(cg) = cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = u64::try_from(cg.as_raw_fd()).context("cgroup fd")?;
    }

    let (pid, (), exit) = reaper::spawn_registered(|| {
        // SAFETY: clone3 with no stack behaves like fork: the child continues here on a copy
        // of this thread's stack. From then on the child only calls dup2, execve and _exit,
        // all async-signal-safe, on memory prepared above.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &mut args as *mut CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        };
        if rc == 0 {
            // The child.
            for (target, src) in handed.iter().enumerate() {
                // SAFETY: plain syscalls on fds that exist; target < 7 <= 10 <= src.
                if unsafe { libc::dup2(*src, target as libc::c_int) } < 0 {
                    unsafe { libc::_exit(126) };
                }
            }
            // SAFETY: NUL-terminated strings and NULL-terminated arrays, prepared before the
            // clone. execve only returns on failure.
            unsafe {
                libc::execve(exe.as_ptr(), argv.as_ptr(), envp.as_ptr());
                libc::_exit(127);
            }
        }
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let pid =
            i32::try_from(rc).map_err(|_| std::io::Error::other("clone3: pid out of range"))?;
        Ok((pid, ()))
    })
    .with_context(|| {
        if namespaces != 0 {
            "clone3 (new namespaces, into the container cgroup)"
        } else {
            "clone3 (into the container's pid namespace and cgroup)"
        }
    })?;
    drop(sources);
    drop(init_pidfd);
    // SAFETY: with CLONE_PIDFD the kernel stored a new (close-on-exec) pidfd here.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    Ok(Launched { pid, pidfd, exit })
}

/// Small helper: `OwnedFd` -> `BorrowedFd` without importing AsFd everywhere.
trait AsFdRef {
    fn as_fd_ref(&self) -> BorrowedFd<'_>;
}

impl AsFdRef for OwnedFd {
    fn as_fd_ref(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(self)
    }
}

/// Sends a signal through a pidfd (no pid-reuse race). ESRCH once the process was reaped.
pub fn pidfd_signal(pidfd: BorrowedFd<'_>, signal: i32) -> std::io::Result<()> {
    // SAFETY: pidfd_send_signal(pidfd, sig, NULL, 0).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_flags_by_name() {
        assert_eq!(
            namespace_names(libc::CLONE_NEWUTS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC),
            "pid+ipc+uts"
        );
        assert_eq!(namespace_names(libc::CLONE_NEWNS), "mount");
        assert_eq!(namespace_names(0), "");
    }
}
