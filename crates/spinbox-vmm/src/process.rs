//! Spawning and identifying the processes a VM consists of (QEMU, vhost-device-vsock).
//!
//! Children get a parent-death signal, their own session (a terminal's Ctrl-C reaches the
//! runtime, which then shuts the VM down in order, not QEMU directly), and exactly the fds they
//! are given. Each is identified by pid *and* start time, so a recorded pid that the kernel has
//! since reused for another process is never signalled.
//!
//! Note on the parent-death signal: Linux sends it when the *thread* that forked the child
//! exits. Spawn from a runtime worker thread or the main thread, never from a short-lived
//! thread such as tokio's blocking pool.

use std::ffi::OsStr;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A process as recorded in a VM's state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat`: clock ticks after boot when it started.
    pub start_time: u64,
}

impl ProcessRecord {
    pub fn of(pid: u32) -> io::Result<ProcessRecord> {
        Ok(ProcessRecord {
            pid,
            start_time: start_time(pid)?,
        })
    }

    /// True while the recorded process (same pid, same start time) exists and is not a zombie.
    pub fn is_alive(&self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            Ok(stat) => match parse_stat(&stat) {
                Some((state, start)) => start == self.start_time && state != 'Z' && state != 'X',
                None => false,
            },
            Err(_) => false,
        }
    }

    /// Sends `signal` only if the pid still belongs to the recorded process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> io::Result<bool> {
        if !self.is_alive() {
            return Ok(false);
        }
        let pid = i32::try_from(self.pid)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal) {
            Ok(()) => Ok(true),
            Err(nix::errno::Errno::ESRCH) => Ok(false),
            Err(e) => Err(io::Error::from(e)),
        }
    }

    /// Waits (polling /proc, for processes that are not our children) until it is gone.
    pub async fn wait_gone(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if !self.is_alive() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Reads the start time of `pid`.
pub fn start_time(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&stat)
        .map(|(_, start)| start)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unparsable /proc/<pid>/stat"))
}

/// Returns (state, starttime) from a `/proc/<pid>/stat` line. The command name may hold spaces
/// and parentheses, so fields are counted from the last `)`.
pub fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // After the state come fields 4..; starttime is field 22, i.e. the 19th after the state.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// A file descriptor the child gets at a fixed number.
#[derive(Debug, Clone, Copy)]
pub struct PassFd {
    pub src: RawFd,
    pub dst: RawFd,
}

/// A tokio command with the parent-death signal, a new session, and `fds` placed at their
/// target numbers (inheritable), all other fds staying close-on-exec as Rust opens them.
pub fn command<S: AsRef<OsStr>>(
    program: &std::path::Path,
    args: &[S],
    fds: Vec<PassFd>,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls
    // (prctl, getppid, fcntl, dup2, setsid); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before the prctl took effect.
            // (An error from an OS code: `io::Error::other` would allocate after fork.)
            if libc::getppid() as u32 != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            place_fds(&fds)
        });
    }
    cmd
}

/// Makes `cmd`'s child run without capabilities although it runs as root: its bounding set
/// is emptied (an exec as uid 0 then grants none), its ambient set cleared, and
/// no_new_privs set (no setuid binary or file capability gives any back). For QEMU, which
/// needs none: every fd it needs is passed, every file it opens is root's own.
pub fn without_capabilities(cmd: &mut tokio::process::Command) {
    // SAFETY: the closure runs between fork and exec and makes only prctl calls
    // (async-signal-safe); it allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // Kernels without ambient capabilities have none to clear.
            let _ = libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            );
            for cap in 0..64 {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                    // EINVAL: past the last capability this kernel knows.
                    if *libc::__errno_location() == libc::EINVAL {
                        break;
                    }
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Most fds [`place_fds`] places.
pub const MAX_PLACED_FDS: usize = 8;

/// For a `pre_exec` closure: puts each `src` at its `dst` number, inheritable. Two passes —
/// every source first to a close-on-exec duplicate numbered 100 or more, then onto its target
/// — so that a source numbered like another entry's target is not clobbered before it is
/// placed. Only fcntl and dup2 (async-signal-safe); allocates nothing. At most
/// [`MAX_PLACED_FDS`] (more fail with EMFILE).
pub fn place_fds(fds: &[PassFd]) -> io::Result<()> {
    let mut moved = [0 as RawFd; MAX_PLACED_FDS];
    if fds.len() > moved.len() {
        return Err(io::Error::from_raw_os_error(libc::EMFILE));
    }
    for (i, f) in fds.iter().enumerate() {
        // SAFETY: fcntl on an fd number; no memory is passed.
        let tmp = unsafe { libc::fcntl(f.src, libc::F_DUPFD_CLOEXEC, 100) };
        if tmp < 0 {
            return Err(io::Error::last_os_error());
        }
        moved[i] = tmp;
    }
    for (i, f) in fds.iter().enumerate() {
        // dup2 clears close-on-exec on the target.
        // SAFETY: dup2 on fd numbers.
        if unsafe { libc::dup2(moved[i], f.dst) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The second entry's source has the number the first entry is placed at: it still
    /// arrives intact (one dup2 pass would have overwritten it with the first pipe).
    #[test]
    fn fds_are_placed_without_clobbering_each_other() {
        use std::io::Write as _;
        use std::os::fd::AsRawFd as _;
        use std::os::unix::process::CommandExt as _;
        let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
        let (a_r, a_w) = nix::unistd::pipe2(cloexec).unwrap();
        let (b_r, b_w) = nix::unistd::pipe2(cloexec).unwrap();
        // SAFETY: duplicating an fd we own; the duplicate is closed below.
        let b_fd = unsafe { libc::fcntl(b_r.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 20) };
        assert!(b_fd >= 20);
        drop(b_r);
        let y = 90;
        let fds = [
            PassFd {
                src: a_r.as_raw_fd(),
                dst: b_fd,
            },
            PassFd { src: b_fd, dst: y },
        ];
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c")
            .arg(format!(
                "cat /proc/self/fd/{b_fd}; echo; cat /proc/self/fd/{y}"
            ))
            .stdout(std::process::Stdio::piped());
        // SAFETY: place_fds only calls fcntl and dup2.
        unsafe {
            cmd.pre_exec(move || place_fds(&fds));
        }
        let child = cmd.spawn().unwrap();
        // SAFETY: closing our duplicate; the child has its own.
        unsafe { libc::close(b_fd) };
        drop(a_r);
        std::fs::File::from(a_w).write_all(b"A").unwrap();
        std::fs::File::from(b_w).write_all(b"B").unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "A\nB");
        let too_many = [PassFd { src: 0, dst: 0 }; MAX_PLACED_FDS + 1];
        assert_eq!(
            place_fds(&too_many).unwrap_err().raw_os_error(),
            Some(libc::EMFILE)
        );
    }

    #[test]
    fn parses_stat_with_odd_command_names() {
        let line = "4242 (qemu (x) 1) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 3 0 987654 1000 200 18446744073709551615";
        assert_eq!(parse_stat(line), Some(('S', 987654)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
    }

    #[test]
    fn own_process_record_is_alive_and_a_wrong_start_time_is_not() {
        let me = ProcessRecord::of(std::process::id()).unwrap();
        assert!(me.is_alive());
        let impostor = ProcessRecord {
            pid: me.pid,
            start_time: me.start_time + 1,
        };
        assert!(!impostor.is_alive());
        // A pid that does not match is never signalled.
        assert!(!impostor.signal(nix::sys::signal::Signal::SIGTERM).unwrap());
    }

    #[tokio::test]
    async fn child_gets_passed_fd_and_its_own_session() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::os::fd::AsRawFd;
        // The child writes to fd 5, which is our socket `b`.
        let child = command(
            std::path::Path::new("/bin/sh"),
            &["-c", "echo hello >&5; ps -o sid= -p $$"],
            vec![PassFd {
                src: b.as_raw_fd(),
                dst: 5,
            }],
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
        let pid = child.id().unwrap();
        let rec = ProcessRecord::of(pid).unwrap();
        assert!(rec.is_alive());
        let out = child.wait_with_output().await.unwrap();
        assert!(out.status.success());
        let sid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        assert_eq!(sid, pid, "child leads its own session");
        drop(b);
        let mut got = String::new();
        use std::io::Read;
        (&a).read_to_string(&mut got).unwrap();
        assert_eq!(got, "hello\n");
        assert!(!rec.is_alive());
    }
}
