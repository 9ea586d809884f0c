//! Reaping children as PID 1: every exited child is collected by `waitpid(-1)`; the exit of a
//! registered pid (a container's init) is handed to whoever registered it, everything else
//! (orphans re-parented to PID 1) is just reaped.
//!
//! A child is registered while the registry lock is held across its creation, so the reaper
//! (which takes the same lock) can never collect it before its waiter exists.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::oneshot;

use crate::log::{debug, warning};

/// How a process ended, as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// The exit code, or 128 + the signal for a signal death (as runc reports it).
    pub status: u32,
    /// CLOCK_REALTIME when it was reaped, nanoseconds since the epoch.
    pub at_unix_nanos: u64,
}

/// runc's encoding of a wait status; None for statuses that are not an exit.
pub fn exit_status(ws: &WaitStatus) -> Option<u32> {
    match *ws {
        WaitStatus::Exited(_, code) => Some(u32::try_from(code).unwrap_or(255) & 0xff),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as u32),
        _ => None,
    }
}

fn now_unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

static WAITERS: Mutex<Option<HashMap<i32, oneshot::Sender<ExitInfo>>>> = Mutex::new(None);

fn lock() -> MutexGuard<'static, Option<HashMap<i32, oneshot::Sender<ExitInfo>>>> {
    // A panic powers the VM off, so a poisoned lock cannot be observed in practice; recover
    // the data anyway rather than panic again.
    WAITERS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `spawn` (which creates one child and returns its pid) with the registry locked, and
/// registers the pid. The receiver yields the child's exit.
pub fn spawn_registered<T>(
    spawn: impl FnOnce() -> std::io::Result<(i32, T)>,
) -> std::io::Result<(i32, T, oneshot::Receiver<ExitInfo>)> {
    let mut guard = lock();
    let (pid, extra) = spawn()?;
    let (tx, rx) = oneshot::channel();
    guard.get_or_insert_with(HashMap::new).insert(pid, tx);
    Ok((pid, extra, rx))
}

/// Collects every exited child and routes registered exits. Call on SIGCHLD.
pub fn reap_all() {
    let mut guard = lock();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(ws) => {
                let (Some(pid), Some(status)) = (ws.pid(), exit_status(&ws)) else {
                    continue;
                };
                let waiter = guard.as_mut().and_then(|m| m.remove(&pid.as_raw()));
                match waiter {
                    Some(tx) => {
                        debug!("container process {pid} exited with status {status}");
                        let _ = tx.send(ExitInfo {
                            status,
                            at_unix_nanos: now_unix_nanos(),
                        });
                    }
                    None => debug!("reaped {ws:?}"),
                }
            }
            Err(Errno::EINTR) => {}
            Err(e) => {
                warning!("waitpid: {e}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn runc_exit_encoding() {
        let p = Pid::from_raw(7);
        assert_eq!(exit_status(&WaitStatus::Exited(p, 0)), Some(0));
        assert_eq!(exit_status(&WaitStatus::Exited(p, 42)), Some(42));
        assert_eq!(
            exit_status(&WaitStatus::Signaled(p, Signal::SIGKILL, false)),
            Some(137)
        );
        assert_eq!(
            exit_status(&WaitStatus::Signaled(p, Signal::SIGTERM, true)),
            Some(143)
        );
        assert_eq!(exit_status(&WaitStatus::Stopped(p, Signal::SIGSTOP)), None);
        assert_eq!(exit_status(&WaitStatus::StillAlive), None);
    }

    #[test]
    fn registered_exit_is_routed() {
        let (pid, (), mut rx) = spawn_registered(|| {
            // SAFETY: the child only calls _exit.
            match unsafe { libc::fork() } {
                0 => unsafe { libc::_exit(3) },
                -1 => Err(std::io::Error::last_os_error()),
                pid => Ok((pid, ())),
            }
        })
        .unwrap();
        assert!(pid > 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            // Other tests' children may be reaped here too; that is what PID 1 does.
            reap_all();
            if let Ok(info) = rx.try_recv() {
                assert_eq!(info.status, 3);
                assert!(info.at_unix_nanos > 0);
                break;
            }
            assert!(std::time::Instant::now() < deadline, "child never reaped");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
