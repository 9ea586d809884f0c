//! Choosing the accelerator and the vsock transport from what the host offers.

use std::path::Path;

use spinbox_config::{Accel, VsockMode};

use crate::cmdline::AccelKind;

/// Host facts the choices depend on; read once with [`HostCaps::probe`], injectable in tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCaps {
    /// `/dev/kvm` opens read-write.
    pub kvm_opens: bool,
    /// `/proc/cpuinfo` advertises vmx or svm.
    pub cpu_virt: bool,
    /// `/dev/vhost-vsock` exists.
    pub vhost_vsock: bool,
}

impl HostCaps {
    pub fn probe() -> HostCaps {
        let kvm_opens = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        let cpu_virt = std::fs::read_to_string("/proc/cpuinfo")
            .map(|s| cpuinfo_has_virt(&s))
            .unwrap_or(false);
        HostCaps {
            kvm_opens,
            cpu_virt,
            vhost_vsock: Path::new("/dev/vhost-vsock").exists(),
        }
    }
}

/// True when any `flags` line lists `vmx` (Intel VT-x) or `svm` (AMD-V).
pub fn cpuinfo_has_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// `auto` becomes KVM only when both `/dev/kvm` opens and the CPU has virtualization.
pub fn resolve_accel(wanted: Accel, host: &HostCaps) -> AccelKind {
    match wanted {
        Accel::Kvm => AccelKind::Kvm,
        Accel::Tcg => AccelKind::Tcg,
        Accel::Auto if host.kvm_opens && host.cpu_virt => AccelKind::Kvm,
        Accel::Auto => AccelKind::Tcg,
    }
}

/// Which vsock device the VM gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VsockKind {
    Kernel,
    VhostUser,
}

pub fn resolve_vsock(wanted: VsockMode, host: &HostCaps) -> VsockKind {
    match wanted {
        VsockMode::Vhost => VsockKind::Kernel,
        VsockMode::VhostUser => VsockKind::VhostUser,
        VsockMode::Auto if host.vhost_vsock => VsockKind::Kernel,
        VsockMode::Auto => VsockKind::VhostUser,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: HostCaps = HostCaps {
        kvm_opens: false,
        cpu_virt: false,
        vhost_vsock: false,
    };

    #[test]
    fn auto_needs_both_kvm_device_and_cpu_flag() {
        assert_eq!(resolve_accel(Accel::Auto, &NONE), AccelKind::Tcg);
        let dev_only = HostCaps {
            kvm_opens: true,
            ..NONE
        };
        assert_eq!(resolve_accel(Accel::Auto, &dev_only), AccelKind::Tcg);
        let flag_only = HostCaps {
            cpu_virt: true,
            ..NONE
        };
        assert_eq!(resolve_accel(Accel::Auto, &flag_only), AccelKind::Tcg);
        let both = HostCaps {
            kvm_opens: true,
            cpu_virt: true,
            ..NONE
        };
        assert_eq!(resolve_accel(Accel::Auto, &both), AccelKind::Kvm);
        assert_eq!(resolve_accel(Accel::Tcg, &both), AccelKind::Tcg);
        assert_eq!(resolve_accel(Accel::Kvm, &NONE), AccelKind::Kvm);
    }

    #[test]
    fn vsock_auto_follows_the_device() {
        assert_eq!(resolve_vsock(VsockMode::Auto, &NONE), VsockKind::VhostUser);
        let vhost = HostCaps {
            vhost_vsock: true,
            ..NONE
        };
        assert_eq!(resolve_vsock(VsockMode::Auto, &vhost), VsockKind::Kernel);
        assert_eq!(
            resolve_vsock(VsockMode::VhostUser, &vhost),
            VsockKind::VhostUser
        );
        assert_eq!(resolve_vsock(VsockMode::Vhost, &NONE), VsockKind::Kernel);
    }

    #[test]
    fn cpuinfo_flags() {
        assert!(cpuinfo_has_virt(
            "processor : 0\nflags\t\t: fpu vme vmx sse\n"
        ));
        assert!(cpuinfo_has_virt("flags : fpu svm\n"));
        assert!(!cpuinfo_has_virt("flags : fpu vmxx hypervisor\n"));
        assert!(!cpuinfo_has_virt("model name : vmx\n"));
    }
}
