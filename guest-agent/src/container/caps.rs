//! Linux capabilities: names, and applying a [`CapsPlan`] in container-init (capset(2) and
//! prctl(2) directly; the sets are small bit masks).

use anyhow::{Context as _, Result};
use nix::errno::Errno;

use super::spec::CapsPlan;

/// Capability names by number (`include/uapi/linux/capability.h`).
const NAMES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// `CAP_NET_RAW` (or `net_raw`) -> 13.
pub fn from_name(name: &str) -> Option<u8> {
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    NAMES
        .iter()
        .position(|n| *n == bare)
        .and_then(|i| u8::try_from(i).ok())
}

/// A set as capset(2)'s two 32-bit words.
fn mask(caps: &[u8]) -> u64 {
    caps.iter()
        .filter(|&&c| c < 64)
        .fold(0u64, |m, &c| m | (1u64 << c))
}

/// The highest capability the running kernel knows.
fn last_cap() -> u8 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

fn prctl(option: libc::c_int, arg2: libc::c_ulong, arg3: libc::c_ulong) -> Result<(), Errno> {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(option, arg2, arg3, 0 as libc::c_ulong, 0 as libc::c_ulong) };
    if rc < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

/// Drops from the bounding set every capability the plan does not list. Needs CAP_SETPCAP,
/// so it runs before the user switch.
pub fn apply_bounding(plan: &CapsPlan) -> Result<()> {
    let keep = mask(&plan.bounding);
    for cap in 0..=last_cap() {
        if keep & (1u64 << cap) == 0 {
            match prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0) {
                Ok(()) | Err(Errno::EINVAL) => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("dropping {} from the bounding set", name(cap)))
                }
            }
        }
    }
    Ok(())
}

fn name(cap: u8) -> String {
    NAMES
        .get(usize::from(cap))
        .map(|n| format!("CAP_{n}"))
        .unwrap_or_else(|| format!("capability {cap}"))
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Sets effective, permitted and inheritable, then the ambient set. Runs after the user
/// switch (with PR_SET_KEEPCAPS held across it, permitted survives until here).
pub fn apply_sets(plan: &CapsPlan) -> Result<()> {
    let (e, p, i) = (
        mask(&plan.effective),
        mask(&plan.permitted),
        mask(&plan.inheritable),
    );
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    // The low and high 32 bits of each set; truncation is the point.
    #[allow(clippy::cast_possible_truncation)]
    let data = [
        CapData {
            effective: e as u32,
            permitted: p as u32,
            inheritable: i as u32,
        },
        CapData {
            effective: (e >> 32) as u32,
            permitted: (p >> 32) as u32,
            inheritable: (i >> 32) as u32,
        },
    ];
    // SAFETY: header and a two-element data array, as _LINUX_CAPABILITY_VERSION_3 wants.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    if rc != 0 {
        return Err(Errno::last()).context("capset");
    }
    prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
        0,
    )
    .or_else(|e| if e == Errno::EINVAL { Ok(()) } else { Err(e) })
    .context("clearing the ambient set")?;
    for &cap in &plan.ambient {
        prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
            libc::c_ulong::from(cap),
        )
        .with_context(|| format!("raising ambient {}", name(cap)))?;
    }
    Ok(())
}

pub fn set_keepcaps(on: bool) -> Result<()> {
    prctl(libc::PR_SET_KEEPCAPS, libc::c_ulong::from(on), 0).context("PR_SET_KEEPCAPS")
}

pub fn set_no_new_privs() -> Result<()> {
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0).context("PR_SET_NO_NEW_PRIVS")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(from_name("CAP_CHOWN"), Some(0));
        assert_eq!(from_name("CAP_NET_RAW"), Some(13));
        assert_eq!(from_name("sys_admin"), Some(21));
        assert_eq!(from_name("CAP_CHECKPOINT_RESTORE"), Some(40));
        assert_eq!(from_name("CAP_NOPE"), None);
        assert_eq!(name(5), "CAP_KILL");
    }

    #[test]
    fn masks() {
        assert_eq!(mask(&[0, 5]), 0b100001);
        assert_eq!(mask(&[40]), 1u64 << 40);
    }
}
