//! The QEMU command line, one typed value per option or device.
//!
//! Every piece implements [`QemuArg`]; [`QemuCommandLine`] collects them in order. Nothing here
//! touches a shell: the result is an argument vector for `execve`. Values that end up inside
//! QEMU's `key=value,...` option syntax are escaped (`,` doubles), so a path cannot inject an
//! option.

use std::path::{Path, PathBuf};

/// One QEMU option (or a group of options that only make sense together).
pub trait QemuArg {
    fn to_args(&self) -> Vec<String>;
}

/// Escapes a value for QEMU's option syntax, where `,` separates keys.
pub fn escape_opt(value: &str) -> String {
    value.replace(',', ",,")
}

fn path_opt(p: &Path) -> String {
    escape_opt(&p.to_string_lossy())
}

/// Resolved accelerator (what `auto` became).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelKind {
    Kvm,
    Tcg,
}

impl AccelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AccelKind::Kvm => "kvm",
            AccelKind::Tcg => "tcg",
        }
    }
}

/// `-machine q35,...` plus `-accel`. The guest RAM comes from the named memory backend.
#[derive(Debug, Clone)]
pub struct Machine {
    pub accel: AccelKind,
    pub memory_backend: String,
}

impl QemuArg for Machine {
    fn to_args(&self) -> Vec<String> {
        let accel = match self.accel {
            AccelKind::Kvm => "kvm".to_owned(),
            // Multi-threaded TCG: one host thread per vCPU.
            AccelKind::Tcg => "tcg,thread=multi".to_owned(),
        };
        vec![
            "-machine".into(),
            format!(
                "q35,memory-backend={},vmport=off,sata=off,smbus=off,usb=off,graphics=off",
                escape_opt(&self.memory_backend)
            ),
            "-accel".into(),
            accel,
        ]
    }
}

/// Under TCG: QEMU's richest model without ERMS and FSRM. With them the guest kernel copies
/// with `rep movsb`, which TCG emulates one byte per iteration; without them it uses its
/// unrolled 8-byte copy loops. Measured on the project's 2-core TCG machines: a guest pipe
/// moves 2.5x the bytes per second and container stdout through vsock 2x.
pub const TCG_CPU_MODEL: &str = "max,erms=off,fsrm=off";

/// `-cpu`: the host's CPU under KVM, [`TCG_CPU_MODEL`] under TCG.
#[derive(Debug, Clone)]
pub struct Cpu {
    pub accel: AccelKind,
}

impl QemuArg for Cpu {
    fn to_args(&self) -> Vec<String> {
        let model = match self.accel {
            AccelKind::Kvm => "host",
            AccelKind::Tcg => TCG_CPU_MODEL,
        };
        vec!["-cpu".into(), model.into()]
    }
}

#[derive(Debug, Clone)]
pub struct Smp {
    pub vcpus: u32,
    /// Room to grow: vCPUs that can be hot-plugged later (`maxcpus`), at least `vcpus`.
    pub max_vcpus: u32,
}

impl QemuArg for Smp {
    fn to_args(&self) -> Vec<String> {
        let smp = if self.max_vcpus > self.vcpus {
            format!("{},maxcpus={}", self.vcpus, self.max_vcpus)
        } else {
            self.vcpus.to_string()
        };
        vec!["-smp".into(), smp]
    }
}

/// Guest RAM: `-m` plus a memfd backend. `share=on` is what lets a vhost-user backend
/// (vhost-device-vsock) map guest RAM; it is harmless for kernel vhost. With `max_mib` above
/// `mib`, `maxmem` leaves the address space a [`VirtioMem`] device needs.
#[derive(Debug, Clone)]
pub struct Memory {
    pub id: String,
    pub mib: u32,
    /// The most the VM may ever have: boot memory plus hot-pluggable memory.
    pub max_mib: u32,
    pub shared: bool,
}

impl QemuArg for Memory {
    fn to_args(&self) -> Vec<String> {
        let size = if self.max_mib > self.mib {
            format!("{}M,maxmem={}M", self.mib, self.max_mib)
        } else {
            format!("{}M", self.mib)
        };
        vec![
            "-m".into(),
            size,
            "-object".into(),
            format!(
                "memory-backend-memfd,id={},size={}M,share={}",
                escape_opt(&self.id),
                self.mib,
                if self.shared { "on" } else { "off" }
            ),
        ]
    }
}

/// The QOM id of the VM's virtio-mem device (`/machine/peripheral/<id>`).
pub const VIRTIO_MEM_ID: &str = "vmem0";
/// The guest's memory block (x86 sections): the hot-pluggable region is a multiple of it.
pub const MEMORY_BLOCK_MIB: u32 = 128;
/// The virtio-mem device block: what is plugged or unplugged is a multiple of it.
pub const VIRTIO_MEM_BLOCK_MIB: u32 = 2;

/// How much memory a VM booted with `base_mib` can hot-plug below `max_mib`: whole guest
/// memory blocks (none when less than one fits).
pub fn hotplug_region_mib(base_mib: u32, max_mib: u32) -> u32 {
    max_mib.saturating_sub(base_mib) / MEMORY_BLOCK_MIB * MEMORY_BLOCK_MIB
}

/// Hot-pluggable memory: a `virtio-mem-pci` device over a memfd backend of its own,
/// `region_mib` large, nothing plugged at boot. The guest's virtio_mem driver plugs and
/// unplugs device blocks as the device's `requested-size` moves; the memfd is sparse, so
/// the region costs the host nothing until the guest uses it, and unplugged blocks are
/// given back.
#[derive(Debug, Clone)]
pub struct VirtioMem {
    pub region_mib: u32,
    pub shared: bool,
}

impl QemuArg for VirtioMem {
    fn to_args(&self) -> Vec<String> {
        vec![
            "-object".into(),
            format!(
                "memory-backend-memfd,id={VIRTIO_MEM_ID}-mem,size={}M,share={}",
                self.region_mib,
                if self.shared { "on" } else { "off" }
            ),
            "-device".into(),
            format!(
                "virtio-mem-pci,id={VIRTIO_MEM_ID},memdev={VIRTIO_MEM_ID}-mem,block-size={VIRTIO_MEM_BLOCK_MIB}M,requested-size=0"
            ),
        ]
    }
}

/// Direct kernel boot: `-kernel`, `-initrd`, `-append`.
#[derive(Debug, Clone)]
pub struct KernelBoot {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
}

impl QemuArg for KernelBoot {
    fn to_args(&self) -> Vec<String> {
        vec![
            "-kernel".into(),
            self.kernel.to_string_lossy().into_owned(),
            "-initrd".into(),
            self.initrd.to_string_lossy().into_owned(),
            "-append".into(),
            self.cmdline.clone(),
        ]
    }
}

/// `-bios`, when the operator configured a firmware.
#[derive(Debug, Clone)]
pub struct Firmware {
    pub path: PathBuf,
}

impl QemuArg for Firmware {
    fn to_args(&self) -> Vec<String> {
        vec!["-bios".into(), self.path.to_string_lossy().into_owned()]
    }
}

/// No default devices, no user config, no display; a reboot request ends QEMU instead.
#[derive(Debug, Clone, Default)]
pub struct Basics;

impl QemuArg for Basics {
    fn to_args(&self) -> Vec<String> {
        [
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-msg",
            "timestamp=on",
            // QEMU's seccomp filter: no obsolete syscalls, no setuid/setgid, no fork/exec,
            // no scheduler or affinity changes. A guest escape into QEMU meets it first.
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

/// The guest's serial console (ttyS0): into a file QEMU writes itself (the short-lived
/// boot floor), or onto a connected socket passed as `fd`, whose other end the runtime reads
/// into a bounded log (every VM: the guest cannot fill the host's disk).
#[derive(Debug, Clone)]
pub enum Serial {
    File(PathBuf),
    Fd(i32),
}

impl QemuArg for Serial {
    fn to_args(&self) -> Vec<String> {
        let chardev = match self {
            Serial::File(path) => format!("file,id=serial0,path={}", path_opt(path)),
            Serial::Fd(fd) => format!("socket,id=serial0,fd={fd}"),
        };
        vec![
            "-chardev".into(),
            chardev,
            "-serial".into(),
            "chardev:serial0".into(),
        ]
    }
}

/// The QMP monitor on a listening unix socket the runtime bound and passes as `fd`: QMP is
/// reachable the moment QEMU starts, without polling for a socket file to appear.
#[derive(Debug, Clone)]
pub struct QmpFd {
    pub fd: i32,
}

impl QemuArg for QmpFd {
    fn to_args(&self) -> Vec<String> {
        vec![
            "-chardev".into(),
            format!("socket,id=qmp,fd={},server=on,wait=off", self.fd),
            "-mon".into(),
            "chardev=qmp,mode=control".into(),
        ]
    }
}

/// Kernel vhost-vsock: `vhost-vsock-pci` with the CID already claimed on `vhostfd`.
#[derive(Debug, Clone)]
pub struct VhostVsockPci {
    pub guest_cid: u32,
    pub vhostfd: i32,
}

impl QemuArg for VhostVsockPci {
    fn to_args(&self) -> Vec<String> {
        vec![
            "-device".into(),
            format!(
                "vhost-vsock-pci,id=vsock0,guest-cid={},vhostfd={}",
                self.guest_cid, self.vhostfd
            ),
        ]
    }
}

/// vhost-user vsock: `vhost-user-vsock-pci` talking to a vhost-device-vsock backend socket.
#[derive(Debug, Clone)]
pub struct VhostUserVsockPci {
    pub backend_socket: PathBuf,
}

impl QemuArg for VhostUserVsockPci {
    fn to_args(&self) -> Vec<String> {
        vec![
            "-chardev".into(),
            format!(
                "socket,id=vsock0-chr,path={}",
                path_opt(&self.backend_socket)
            ),
            "-device".into(),
            "vhost-user-vsock-pci,id=vsock0,chardev=vsock0-chr".into(),
        ]
    }
}

/// A virtio-blk disk backed by a raw image file or block device, found in the guest by its
/// serial (at most 20 bytes, virtio's limit).
#[derive(Debug, Clone)]
pub struct VirtioBlk {
    pub node: String,
    pub path: PathBuf,
    pub serial: String,
    pub read_only: bool,
}

impl QemuArg for VirtioBlk {
    fn to_args(&self) -> Vec<String> {
        let ro = if self.read_only { "on" } else { "off" };
        vec![
            "-blockdev".into(),
            format!(
                "node-name={node},driver=raw,read-only={ro},file.driver=file,file.filename={path},file.aio=threads,file.read-only={ro}",
                node = escape_opt(&self.node),
                path = path_opt(&self.path),
            ),
            "-device".into(),
            format!(
                "virtio-blk-pci,drive={},serial={}",
                escape_opt(&self.node),
                escape_opt(&self.serial)
            ),
        ]
    }
}

/// A free PCIe root port on the q35 root bus, reserved at boot so that a disk can be
/// hot-plugged behind it later (one device per port). `chassis` must be unique per port.
#[derive(Debug, Clone)]
pub struct PcieRootPort {
    pub id: String,
    pub chassis: u32,
}

impl QemuArg for PcieRootPort {
    fn to_args(&self) -> Vec<String> {
        vec![
            "-device".into(),
            format!(
                "pcie-root-port,id={},bus=pcie.0,chassis={}",
                escape_opt(&self.id),
                self.chassis
            ),
        ]
    }
}

/// A virtio-net NIC on a TAP the runtime opened and passes as `fd`; the guest sees `mac`.
/// No option ROM (nothing boots from the network), no vhost-net (not with TCG).
#[derive(Debug, Clone)]
pub struct VirtioNetTap {
    pub id: String,
    pub fd: i32,
    pub mac: String,
}

impl QemuArg for VirtioNetTap {
    fn to_args(&self) -> Vec<String> {
        vec![
            "-netdev".into(),
            format!("tap,id={},fd={},vhost=off", escape_opt(&self.id), self.fd),
            "-device".into(),
            format!(
                "virtio-net-pci,netdev={},mac={},romfile=",
                escape_opt(&self.id),
                escape_opt(&self.mac)
            ),
        ]
    }
}

/// A virtio-fs share: `vhost-user-fs-pci` talking to a virtiofsd on `socket`; the guest
/// mounts it by `tag`. Needs guest RAM shared with the backend (`Memory::shared`).
#[derive(Debug, Clone)]
pub struct VhostUserFs {
    pub id: String,
    pub socket: PathBuf,
    pub tag: String,
}

impl QemuArg for VhostUserFs {
    fn to_args(&self) -> Vec<String> {
        let id = escape_opt(&self.id);
        vec![
            "-chardev".into(),
            format!("socket,id={id}-chr,path={}", path_opt(&self.socket)),
            "-device".into(),
            format!(
                "vhost-user-fs-pci,id={id},chardev={id}-chr,tag={}",
                escape_opt(&self.tag)
            ),
        ]
    }
}

/// One `virtserialport` on a connected socket the runtime passes as `fd` (QEMU uses it as a
/// client chardev: no socket file, no listener).
#[derive(Debug, Clone)]
pub struct SerialPort {
    /// The name the guest finds it by (`/sys/class/virtio-ports/*/name`).
    pub name: String,
    pub fd: i32,
}

/// A `virtio-serial-pci` controller with its ports (numbered from 1; 0 is the console's).
#[derive(Debug, Clone)]
pub struct VirtioSerialPorts {
    pub ports: Vec<SerialPort>,
}

impl QemuArg for VirtioSerialPorts {
    fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "-device".into(),
            format!(
                "virtio-serial-pci,id=serial0,max_ports={}",
                self.ports.len() + 1
            ),
        ];
        for (i, port) in self.ports.iter().enumerate() {
            args.push("-chardev".into());
            args.push(format!("socket,id=port{i},fd={}", port.fd));
            args.push("-device".into());
            args.push(format!(
                "virtserialport,bus=serial0.0,nr={},chardev=port{i},name={}",
                i + 1,
                escape_opt(&port.name)
            ));
        }
        args
    }
}

/// An ordered QEMU command line.
#[derive(Default)]
pub struct QemuCommandLine {
    parts: Vec<Box<dyn QemuArg + Send + Sync>>,
}

impl QemuCommandLine {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, arg: impl QemuArg + Send + Sync + 'static) -> &mut Self {
        self.parts.push(Box::new(arg));
        self
    }

    pub fn args(&self) -> Vec<String> {
        self.parts.iter().flat_map(|p| p.to_args()).collect()
    }
}

/// The input clock of QEMU's emulated local APIC timer (1 GHz: `APIC_BUS_CYCLE_NS` 1), in kHz.
pub const TCG_APIC_BUS_KHZ: u32 = 1_000_000;

/// Builds the guest kernel command line for a VM run under `accel`. The agent's port is
/// passed so both sides agree; operator extras come last so they win (the agent takes the
/// last occurrence of a key).
pub fn guest_kernel_cmdline(accel: AccelKind, agent_port: u32, extra: &[String]) -> String {
    guest_kernel_cmdline_with(
        accel,
        agent_port,
        spinbox_agent_api::DEFAULT_STDIO_PORT,
        extra,
    )
}

/// [`guest_kernel_cmdline`] with an explicit stdio port.
pub fn guest_kernel_cmdline_with(
    accel: AccelKind,
    agent_port: u32,
    stdio_port: u32,
    extra: &[String],
) -> String {
    // Measured under TCG (docs/ARCHITECTURE.md): cryptomgr.notests skips the kernel's crypto
    // self-tests (~0.6 s), noreplace-smp (~0.4 s) and no_timer_check (~0.2 s) skip work a VM
    // does not need. panic=-1 with QEMU's -no-reboot turns a guest panic into QEMU exiting.
    let mut args: Vec<String> = [
        "console=ttyS0",
        "quiet",
        "panic=-1",
        "reboot=acpi",
        "no_timer_check",
        "noreplace-smp",
        "cryptomgr.notests",
        "8250.nr_uarts=1",
        "i8042.noaux",
        "random.trust_cpu=on",
        // Hot-plugged memory (virtio-mem) comes online by itself, in ZONE_MOVABLE as far as
        // the kernel's auto-movable ratio allows, so that it can be unplugged again.
        "memhp_default_state=online",
        "memory_hotplug.online_policy=auto-movable",
        // Room to grow above 4 GiB would make the kernel reserve a 64 MiB bounce buffer; no
        // device here needs one (virtio without ACCESS_PLATFORM addresses all of RAM).
        "swiotlb=noforce",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if accel == AccelKind::Tcg {
        // TCG's CPU has no TSC-deadline timer, so the kernel would calibrate the local APIC
        // timer against the PIT for 100 ms of every boot (LAPIC_CAL_LOOPS). QEMU's emulated
        // APIC counts at 1 GHz; the minimal kernel takes that from `lapic_timer_khz=`
        // (kernel/patches/0001) and skips the calibration: the boot floor ~130 ms shorter.
        // (`noapictimer` skipped it too, but put every timer on the HPET broadcast, which
        // cost container stdout 40 % of its throughput.) Debian's kernel passes the unknown
        // argument to init, which ignores it. Under KVM the host CPU's TSC-deadline timer
        // needs no calibration.
        args.push(format!("lapic_timer_khz={TCG_APIC_BUS_KHZ}"));
    }
    args.push(format!(
        "{}={}",
        spinbox_agent_api::CMDLINE_STDIO_PORT,
        stdio_port
    ));
    args.push(format!(
        "{}={}",
        spinbox_agent_api::CMDLINE_AGENT_PORT,
        agent_port
    ));
    // The host's name, which a container that names none sees under runc (its new UTS
    // namespace starts as a copy of the host's); a name that cannot travel here is left out.
    if let Some(name) = nix::unistd::gethostname()
        .ok()
        .and_then(|n| n.into_string().ok())
        .filter(|n| spinbox_agent_api::valid_hostname(n))
    {
        args.push(format!("{}={name}", spinbox_agent_api::CMDLINE_HOSTNAME));
    }
    args.extend(extra.iter().cloned());
    args.join(" ")
}

#[cfg(test)]
mod tests;
