//! Leaving the guest in order: unmounting data filesystems, powering off, and the panic hook
//! that makes sure PID 1 never just dies.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::log::{debug, error, info, warning};

/// Mount points the agent owns (its pseudo filesystems) or cannot unmount ("/"). Mounts at or
/// under `/proc`, `/sys`, `/dev`, and exactly at `/run` or `/tmp`, are left alone; anything
/// mounted under `/run` or `/tmp` (container root filesystems, volumes) is not.
fn is_agent_mount(mount_point: &str) -> bool {
    if matches!(mount_point, "/" | "/run" | "/tmp") {
        return true;
    }
    ["/proc", "/sys", "/dev"].iter().any(|p| {
        mount_point == *p
            || mount_point
                .strip_prefix(p)
                .is_some_and(|rest| rest.starts_with('/'))
    })
}

/// Decodes the octal escapes (`\040` for space, ...) the kernel uses in /proc/self/mounts.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if let Some(digits) = bytes.get(i + 1..i + 4) {
                if digits.iter().all(|b| (b'0'..=b'7').contains(b)) {
                    let value = digits
                        .iter()
                        .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                    if let Ok(byte) = u8::try_from(value) {
                        out.push(byte);
                        i += 4;
                        continue;
                    }
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount points of a /proc/self/mounts text that are not the agent's own, in the order
/// to unmount them: deepest first, and among equals the most recently mounted first.
fn data_mounts(mounts: &str) -> Vec<String> {
    let mut points: Vec<String> = mounts
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .map(unescape_mount_field)
        .filter(|p| !is_agent_mount(p))
        .collect();
    // A mount point can be stacked; each layer is unmounted in turn.
    points.reverse();
    // Stable: keeps most-recent-first among mounts of the same depth.
    points.sort_by_key(|p| std::cmp::Reverse(p.split('/').filter(|c| !c.is_empty()).count()));
    points
}

/// Syncs, then unmounts every mount that is not one of the agent's pseudo filesystems; one
/// that is busy is remounted read-only instead, and failing that detached. Returns the mount
/// points dealt with, innermost first. Blocking: call from a blocking thread.
pub fn unmount_data_filesystems() -> Vec<String> {
    sync();
    let table = match std::fs::read_to_string("/proc/self/mounts") {
        Ok(table) => table,
        Err(e) => {
            warning!("reading /proc/self/mounts: {e}");
            return Vec::new();
        }
    };
    let mut done = Vec::new();
    for point in data_mounts(&table) {
        match umount2(point.as_str(), MntFlags::empty()) {
            Ok(()) => {
                debug!("unmounted {point}");
                done.push(point);
                continue;
            }
            Err(e) => debug!("umount {point}: {e}; remounting read-only"),
        }
        let ro = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        match mount(None::<&str>, point.as_str(), None::<&str>, ro, None::<&str>) {
            Ok(()) => done.push(point),
            Err(e) => match umount2(point.as_str(), MntFlags::MNT_DETACH) {
                Ok(()) => done.push(point),
                Err(e2) => warning!("cannot unmount {point}: {e}, detach: {e2}"),
            },
        }
    }
    sync();
    done
}

pub fn sync() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

pub fn is_pid1() -> bool {
    std::process::id() == 1
}

static POWERING_OFF: AtomicBool = AtomicBool::new(false);

/// The one way out: stop the other processes, sync, unmount, power off. Blocking; a second
/// caller (power button and signal at once) waits for the first. Outside PID 1 (a developer
/// running the binary by hand) it exits the process instead of touching the machine.
pub fn power_off(reason: &str) -> ! {
    if POWERING_OFF.swap(true, Ordering::SeqCst) {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    info!("powering off: {reason}");
    if !is_pid1() {
        warning!("not PID 1; exiting instead of powering off");
        std::process::exit(1);
    }
    stop_all_processes(Duration::from_secs(2));
    let unmounted = unmount_data_filesystems();
    if !unmounted.is_empty() {
        info!("unmounted {}", unmounted.join(" "));
    }
    final_power_off()
}

/// The benchmark's boot floor (`spinbox_floor=1` on the kernel command line, which the
/// kernel hands init as an environment variable): power off before doing anything else.
pub fn power_off_if_floor() {
    if std::process::id() == 1 && std::env::var_os("spinbox_floor").is_some_and(|v| v == "1") {
        final_power_off();
    }
}

/// Sync and `reboot(RB_POWER_OFF)`, nothing else: for the panic hook and the last step.
fn final_power_off() -> ! {
    sync();
    let err = match reboot(RebootMode::RB_POWER_OFF) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    error!("reboot(RB_POWER_OFF) failed: {err}; aborting");
    // PID 1 dying panics the kernel; with panic=-1 that still ends the VM.
    std::process::abort()
}

/// SIGTERM to every process but PID 1, a bounded wait for them to go, then SIGKILL.
fn stop_all_processes(grace: Duration) {
    // kill(-1) reaches every process except init and kernel threads; ESRCH means none.
    if kill(Pid::from_raw(-1), Signal::SIGTERM).is_err() {
        return;
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(20)),
            Ok(_) => {}
            Err(Errno::EINTR) => {}
            Err(_) => return, // ECHILD: all gone (orphans are ours, so this is everyone)
        }
    }
    warning!("processes still running after {grace:?}; killing them");
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
}

/// Makes every panic end the VM: log it, sync, power off. The release profile aborts on panic
/// anyway; this hook runs first.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        error!("panic: {info}");
        if is_pid1() {
            final_power_off();
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "\
rootfs / rootfs rw 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
devtmpfs /dev devtmpfs rw,nosuid,size=1k,mode=755 0 0
devpts /dev/pts devpts rw,nosuid,noexec,relatime,mode=620,ptmxmode=666 0 0
tmpfs /dev/shm tmpfs rw,nosuid,nodev 0 0
cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0
tmpfs /run tmpfs rw,nosuid,nodev,mode=755 0 0
tmpfs /tmp tmpfs rw,nosuid,nodev 0 0
/dev/vda /run/layers/a erofs ro,relatime 0 0
/dev/vdb /run/upper ext4 rw,relatime 0 0
overlay /run/c1/rootfs overlay rw,lowerdir=/run/layers/a 0 0
proc /run/c1/rootfs/proc proc rw,nosuid,nodev,noexec,relatime 0 0
/dev/vdc /mnt/my\\040vol ext4 rw,relatime 0 0
";

    #[test]
    fn nothing_to_unmount_on_a_fresh_guest() {
        let fresh: String = MOUNTS.lines().take(9).map(|l| format!("{l}\n")).collect();
        assert!(data_mounts(&fresh).is_empty());
    }

    #[test]
    fn data_mounts_deepest_first() {
        assert_eq!(
            data_mounts(MOUNTS),
            vec![
                "/run/c1/rootfs/proc",
                "/run/c1/rootfs",
                "/run/layers/a",
                "/mnt/my vol",
                "/run/upper",
            ]
        );
    }

    #[test]
    fn agent_mounts() {
        for p in [
            "/",
            "/proc",
            "/sys/fs/cgroup",
            "/dev",
            "/dev/pts",
            "/run",
            "/tmp",
        ] {
            assert!(is_agent_mount(p), "{p}");
        }
        for p in ["/run/x", "/tmp/y", "/procx", "/mnt", "/devices"] {
            assert!(!is_agent_mount(p), "{p}");
        }
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape_mount_field("/a\\040b\\011c\\134d"), "/a b\tc\\d");
        assert_eq!(unescape_mount_field("/trailing\\04"), "/trailing\\04");
        assert_eq!(unescape_mount_field("/bad\\999"), "/bad\\999");
    }
}
