//! One microVM: start it (QEMU + vsock backend + QMP + agent readiness), talk to its agent,
//! shut it down along the ladder, and never leave anything behind on failure.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use spinbox_agent_api::agent::{HealthRequest, HealthResponse};
use spinbox_agent_api::agent_ttrpc::AgentClient;
use spinbox_agent_api::{output_port_name, StdioStream, MAX_SHARES};
use spinbox_config::Config;
use tokio::sync::watch;

use crate::accel::{resolve_accel, resolve_vsock, HostCaps, VsockKind};
use crate::cmdline::{self, AccelKind, QemuCommandLine};
use crate::process::{self, PassFd, ProcessRecord};
use crate::qmp::{Qmp, QmpError};
use crate::sockdir::SocketDir;
use crate::state::{self, StateDir};
use crate::vsock::{self, VsockTransport};

mod backend;
mod console;
mod floor;
mod resize;
mod shutdown;

pub use self::console::rotated as rotated_console_log;
use self::console::{tail, ConsoleSink};
pub use self::floor::{
    boot_floor, boot_floor_with, floor_command_line, FloorError, FLOOR_KERNEL_ARG,
};
use self::resize::boot_shape;

use self::backend::{
    share_file_names, start_virtiofsd, start_vsock_backend, stop_backend, Backend,
};

pub use self::shutdown::{ShutdownEvent, ShutdownReport, ShutdownStep};

/// Guest CID on the vhost-user path: each VM has its own backend, so the CID is private to it.
const HYBRID_GUEST_CID: u32 = 3;
/// Fd numbers QEMU finds its passed descriptors at.
const QMP_FD: i32 = 3;
const VHOST_FD: i32 = 4;
/// TAP fds of the NICs: FIRST_NIC_FD, FIRST_NIC_FD + 1, ...
const FIRST_NIC_FD: i32 = 5;
/// QEMU's ends of the output serial ports' socket pairs: stdout, then stderr.
const FIRST_PORT_FD: i32 = FIRST_NIC_FD + MAX_NICS as i32;
/// QEMU's end of the serial console's socket pair (after the two output ports).
const CONSOLE_FD: i32 = FIRST_PORT_FD + 2;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("invalid VM id {id:?}: {reason}")]
    InvalidId { id: String, reason: String },
    #[error("{count} network interfaces: a VM takes at most {max}", max = MAX_NICS)]
    TooManyNics { count: usize },
    #[error("config {key}: {path}: {reason}")]
    Path {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating the socket pair of an output serial port (vm.output_ports): {0}")]
    OutputPort(#[source] std::io::Error),
    #[error("claiming a guest CID on /dev/vhost-vsock: {0}")]
    Cid(#[source] std::io::Error),
    #[error("starting {what} ({program}): {source}")]
    Spawn {
        what: &'static str,
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: socket {path} did not appear within {after:?} (timeouts.device_detection)")]
    BackendTimeout {
        what: &'static str,
        path: PathBuf,
        after: Duration,
    },
    #[error("{what} exited before serving ({status}): {stderr}")]
    BackendExited {
        what: &'static str,
        status: String,
        stderr: String,
    },
    #[error("{count} writable directory binds: a VM takes at most {max}", max = MAX_SHARES)]
    TooManyShares { count: usize },
    #[error("QMP socket {path}: {source}")]
    QmpSocket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU exited during boot ({status}): {stderr}{console}")]
    QemuExited {
        status: String,
        stderr: String,
        console: String,
    },
    #[error("connecting QMP: {0}")]
    Qmp(#[from] QmpError),
    #[error("agent did not answer its health RPC on vsock port {port} within {after:?} (timeouts.vm_start); last error: {last_error}{console}")]
    AgentTimeout {
        port: u32,
        after: Duration,
        last_error: String,
        console: String,
    },
    #[error("agent RPC {rpc}: {message}")]
    Agent { rpc: &'static str, message: String },
}

/// What the VM reported when it became ready, and how long that took.
#[derive(Debug, Clone, Serialize)]
pub struct BootInfo {
    pub agent_version: String,
    pub kernel_release: String,
    /// Guest kernel start to agent serving, as the agent measured it.
    pub guest_boot_to_ready_ms: u64,
    /// Start of [`Vm::start_in`] to QEMU spawned: sockets, vhost-device-vsock, the command line.
    pub host_prepare_ms: u64,
    /// QEMU spawn to its QMP greeting answered (the VMM is up; the guest is booting).
    pub host_spawn_to_qmp_ms: u64,
    /// QEMU spawn to the first health answer, as the host measured it.
    pub host_spawn_to_ready_ms: u64,
    pub modules_loaded: Vec<String>,
    pub accel: &'static str,
    pub vsock: &'static str,
    pub qemu_version: String,
}

/// A disk to attach at boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskAttach {
    pub path: PathBuf,
    pub serial: String,
    pub read_only: bool,
}

/// A NIC to attach at boot: an open TAP queue fd (the caller keeps it open until the VM has
/// started; QEMU holds its own copy) and the MAC the guest device gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicAttach {
    pub tap_fd: RawFd,
    pub mac: String,
}

/// At most this many NICs (each takes one of the fds passed to QEMU).
pub const MAX_NICS: usize = 4;

/// What a VM gets beyond the configured defaults.
#[derive(Debug, Clone, Default)]
pub struct VmOptions {
    pub disks: Vec<DiskAttach>,
    pub nics: Vec<NicAttach>,
    pub shares: Vec<ShareAttach>,
    /// Free PCIe root ports to reserve for disks hot-plugged later ([`crate::hotplug`]).
    pub hotplug_ports: u32,
}

/// A host directory served to the guest through virtio-fs (a virtiofsd per share); the guest
/// mounts it by `tag`.
#[derive(Debug, Clone)]
pub struct ShareAttach {
    pub tag: String,
    pub source: PathBuf,
}

/// The host ends of a VM's output serial ports (`vm.output_ports`): connected sockets whose
/// peers are QEMU's chardevs of the `spinbox.stdout` and `spinbox.stderr` ports.
#[derive(Debug)]
pub struct OutputPorts {
    pub stdout: std::os::unix::net::UnixStream,
    pub stderr: std::os::unix::net::UnixStream,
}

/// A running microVM whose agent has answered.
pub struct Vm {
    id: String,
    state: Arc<StateDir>,
    /// Whether the VM created its state directory (and removes it on release) or was given
    /// one by its caller (who records more there, and removes it last).
    owns_state: bool,
    console_log: PathBuf,
    config: Config,
    qemu: ProcessRecord,
    qemu_exit: watch::Receiver<Option<ExitStatus>>,
    backend: Option<Backend>,
    /// The virtiofsd of each share.
    fs_backends: Vec<Backend>,
    qmp: Qmp,
    transport: VsockTransport,
    agent: AgentClient,
    boot: BootInfo,
    /// The shutdown's outcome: the first caller climbs the ladder, later and concurrent
    /// callers wait for it and get the same report.
    shutdown: tokio::sync::OnceCell<ShutdownReport>,
    /// The output ports' host ends, until the container's streams take them.
    output_ports: std::sync::Mutex<Option<OutputPorts>>,
    // Held so the kernel keeps the CID claimed for this VM until it is gone.
    _vhost_fd: Option<OwnedFd>,
    /// Held for the sockets' addresses (the vsock transport's, QMP's) while the VM lives.
    _sockets: SocketDir,
    /// The copy of the serial console into the log (stops with the VM).
    _console: ConsoleSink,
}

/// Files a VM creates in its state directory (besides `vm.json` and `shutdown.json`).
const VM_FILES: [&str; 6] = [
    state::CONFIG_RECORD_FILE,
    "qmp.sock",
    "vhost-vsock.sock",
    "vsock.sock",
    "qemu.stderr",
    "vhost-device-vsock.stderr",
];

/// Removes what a VM put in a state directory it does not own, and forgets its processes
/// and console log in the record.
async fn forget_vm_files(state: &StateDir, console_log: &Path) -> Vec<String> {
    let mut errors = Vec::new();
    let share_files = (0..MAX_SHARES).flat_map(share_file_names);
    for name in VM_FILES.map(str::to_owned).into_iter().chain(share_files) {
        if let Err(e) = state::remove_file_if_exists(&state.path().join(&name)) {
            errors.push(format!(
                "removing {name} from {}: {e}",
                state.path().display()
            ));
        }
    }
    if let Err(e) = state
        .update(|r| {
            r.qemu = None;
            r.shape = None;
            r.vsock_backend = None;
            r.fs_backends.clear();
            r.files
                .retain(|f| f != console_log && *f != console::rotated(console_log));
        })
        .await
    {
        errors.push(format!(
            "updating the record in {}: {e}",
            state.path().display()
        ));
    }
    errors
}

/// Resources acquired so far during start, released in reverse on failure.
#[derive(Default)]
struct Partial {
    console_log: Option<PathBuf>,
    qemu: Option<(ProcessRecord, watch::Receiver<Option<ExitStatus>>)>,
    backend: Option<Backend>,
    fs_backends: Vec<Backend>,
}

impl Partial {
    async fn rollback(self, state: &StateDir, owns_state: bool) {
        if let Some((rec, mut exit)) = self.qemu {
            kill_and_wait(&rec, &mut exit).await;
        }
        if let Some(mut b) = self.backend {
            kill_and_wait(&b.record, &mut b.exit).await;
        }
        for mut b in self.fs_backends {
            kill_and_wait(&b.record, &mut b.exit).await;
        }
        if let Some(log) = &self.console_log {
            let _ = state::remove_file_if_exists(log);
            let _ = state::remove_file_if_exists(&console::rotated(log));
        }
        if owns_state {
            if let Err(e) = state.remove().await {
                tracing::warn!(dir = %state.path().display(), error = %e, "rollback: removing state directory");
            }
        } else {
            let log = self.console_log.unwrap_or_default();
            for e in forget_vm_files(state, &log).await {
                tracing::warn!(error = %e, "rollback: VM files");
            }
        }
    }
}

async fn kill_and_wait(rec: &ProcessRecord, exit: &mut watch::Receiver<Option<ExitStatus>>) {
    if exit.borrow().is_some() {
        return;
    }
    let _ = rec.signal(nix::sys::signal::Signal::SIGKILL);
    let _ = tokio::time::timeout(Duration::from_secs(5), exit.wait_for(|s| s.is_some())).await;
}

/// Spawns a task that owns the child and publishes its exit status.
fn watch_exit(mut child: tokio::process::Child) -> watch::Receiver<Option<ExitStatus>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let status = child.wait().await;
        let _ = tx.send(status.ok().or(Some(ExitStatus::default())));
    });
    rx
}

fn check_file(key: &'static str, path: &Path) -> Result<(), VmError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(VmError::Path {
            key,
            path: path.to_owned(),
            reason: "is not a regular file".into(),
        }),
        Err(e) => Err(VmError::Path {
            key,
            path: path.to_owned(),
            reason: e.to_string(),
        }),
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The machine every spinbox VM is: QEMU basics, machine and accelerator, CPU, memory, kernel
/// + initrd with `kernel_cmdline`, the serial console (`serial`), the firmware.
fn base_command_line(
    config: &Config,
    accel: AccelKind,
    vsock_kind: VsockKind,
    shares: bool,
    serial: cmdline::Serial,
    kernel_cmdline: String,
) -> QemuCommandLine {
    let paths = &config.paths;
    // vhost-user backends (vhost-device-vsock, virtiofsd) map guest RAM, hot-plugged too.
    let shared = vsock_kind == VsockKind::VhostUser || shares;
    let region_mib = cmdline::hotplug_region_mib(config.vm.memory_mib, config.vm.max_memory_mib);
    let mut cmd = QemuCommandLine::new();
    cmd.push(cmdline::Basics)
        .push(cmdline::Machine {
            accel,
            memory_backend: "mem".into(),
        })
        .push(cmdline::Cpu { accel })
        .push(cmdline::Smp {
            vcpus: config.vm.vcpus,
            max_vcpus: config.vm.max_vcpus.max(config.vm.vcpus),
        })
        .push(cmdline::Memory {
            id: "mem".into(),
            mib: config.vm.memory_mib,
            max_mib: config.vm.memory_mib + region_mib,
            shared,
        })
        .push(cmdline::KernelBoot {
            kernel: paths.kernel.clone(),
            initrd: paths.initrd.clone(),
            cmdline: kernel_cmdline,
        })
        .push(serial);
    if region_mib > 0 {
        cmd.push(cmdline::VirtioMem { region_mib, shared });
    }
    if let Some(fw) = &paths.firmware {
        cmd.push(cmdline::Firmware { path: fw.clone() });
    }
    cmd
}

impl Vm {
    /// Boots a VM for `id` with `config` and waits until its agent answers.
    pub async fn start(id: &str, config: &Config) -> Result<Vm, VmError> {
        Vm::start_with(id, config, &VmOptions::default(), &HostCaps::probe()).await
    }

    /// Boots a VM with extra disks, on a host described by `host`, in a state directory of its
    /// own (`<paths.state_dir>/<id>`, removed by [`Vm::release`]).
    pub async fn start_with(
        id: &str,
        config: &Config,
        options: &VmOptions,
        host: &HostCaps,
    ) -> Result<Vm, VmError> {
        state::validate_id(id).map_err(|reason| VmError::InvalidId {
            id: id.to_owned(),
            reason,
        })?;
        Vm::check_paths(config, options, host)?;
        let dir = config.paths.state_dir.join(id);
        let state = StateDir::create(&config.paths.state_dir, id)
            .await
            .map_err(|source| VmError::StateDir { path: dir, source })?;
        Vm::start_in(Arc::new(state), true, config, options, host).await
    }

    /// Boots a VM in a state directory its caller created (and records more in). With
    /// `owns_state` the VM removes the directory on release or failure; without, it removes
    /// only its own files from it.
    pub async fn start_in(
        state: Arc<StateDir>,
        owns_state: bool,
        config: &Config,
        options: &VmOptions,
        host: &HostCaps,
    ) -> Result<Vm, VmError> {
        let id = state.record().await.id;
        let mut partial = Partial::default();
        match Vm::start_inner(&id, &state, owns_state, config, options, host, &mut partial).await {
            Ok(vm) => Ok(vm),
            Err(e) => {
                tracing::warn!(vm = %id, error = %e, "VM start failed; rolling back");
                partial.rollback(&state, owns_state).await;
                Err(e)
            }
        }
    }

    /// Checks every configured file the VM needs, naming the config key that is wrong.
    pub fn check_paths(
        config: &Config,
        options: &VmOptions,
        host: &HostCaps,
    ) -> Result<(), VmError> {
        let paths = &config.paths;
        check_file("paths.qemu", &paths.qemu)?;
        check_file("paths.kernel", &paths.kernel)?;
        check_file("paths.initrd", &paths.initrd)?;
        if let Some(fw) = &paths.firmware {
            check_file("paths.firmware", fw)?;
        }
        if resolve_vsock(config.vm.vsock, host) == VsockKind::VhostUser {
            check_file("paths.vhost_device_vsock", &paths.vhost_device_vsock)?;
        }
        if options.nics.len() > MAX_NICS {
            return Err(VmError::TooManyNics {
                count: options.nics.len(),
            });
        }
        if options.shares.len() > MAX_SHARES {
            return Err(VmError::TooManyShares {
                count: options.shares.len(),
            });
        }
        if !options.shares.is_empty() {
            check_file("paths.virtiofsd", &paths.virtiofsd)?;
        }
        for share in &options.shares {
            if !share.source.is_absolute() || !share.source.is_dir() {
                return Err(VmError::Path {
                    key: "share",
                    path: share.source.clone(),
                    reason: "not an absolute path of a directory".into(),
                });
            }
            if !spinbox_agent_api::valid_share_tag(&share.tag) {
                return Err(VmError::Path {
                    key: "share",
                    path: share.source.clone(),
                    reason: format!("bad tag {:?}", share.tag),
                });
            }
        }
        for disk in &options.disks {
            if !disk.path.exists() {
                return Err(VmError::Path {
                    key: "disk",
                    path: disk.path.clone(),
                    reason: "does not exist".into(),
                });
            }
            if disk.serial.is_empty() || disk.serial.len() > 20 {
                return Err(VmError::Path {
                    key: "disk",
                    path: disk.path.clone(),
                    reason: format!("serial {:?} must be 1 to 20 bytes", disk.serial),
                });
            }
        }
        Ok(())
    }

    async fn start_inner(
        id: &str,
        state: &Arc<StateDir>,
        owns_state: bool,
        config: &Config,
        options: &VmOptions,
        host: &HostCaps,
        partial: &mut Partial,
    ) -> Result<Vm, VmError> {
        let begun = Instant::now();
        let paths = &config.paths;
        let timeouts = &config.timeouts;
        let accel = resolve_accel(config.vm.accel, host);
        let vsock_kind = resolve_vsock(config.vm.vsock, host);
        Vm::check_paths(config, options, host)?;

        let dir = state.path().to_owned();
        let sockets = SocketDir::open(&dir).map_err(|source| VmError::StateDir {
            path: dir.clone(),
            source,
        })?;
        let qmp_path = sockets.local("qmp.sock");
        let vsock_uds = sockets.local("vsock.sock");

        state::create_private_dir_all(&paths.log_dir)
            .await
            .map_err(|source| VmError::StateDir {
                path: paths.log_dir.clone(),
                source,
            })?;
        let console_log = paths.log_dir.join(format!("{id}.console.log"));
        let record_err = |source| VmError::StateDir {
            path: dir.clone(),
            source,
        };
        // Recorded before they exist: the log and its rotated predecessor.
        state
            .update(|r| {
                r.files.push(console_log.clone());
                r.files.push(console::rotated(&console_log));
            })
            .await
            .map_err(record_err)?;
        for f in [console_log.clone(), console::rotated(&console_log)] {
            state::remove_file_if_exists(&f).map_err(|source| VmError::StateDir {
                path: f.clone(),
                source,
            })?;
        }
        partial.console_log = Some(console_log.clone());
        // The configuration in force for this VM (as its runtime sized it), for operators.
        let (record_dir, effective) = (dir.clone(), config.clone());
        tokio::task::spawn_blocking(move || {
            state::write_json(&record_dir, state::CONFIG_RECORD_FILE, &effective)
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(|source| VmError::StateDir {
            path: dir.join(state::CONFIG_RECORD_FILE),
            source,
        })?;
        // The serial console: a socket pair, QEMU's end passed; ours copied into the log,
        // bounded by vm.console_log_max_kib.
        let (console_ours, console_qemu) =
            std::os::unix::net::UnixStream::pair().map_err(|source| VmError::StateDir {
                path: console_log.clone(),
                source,
            })?;
        let console = console::spawn(
            console_ours,
            console_log.clone(),
            config.vm.console_log_max_kib.saturating_mul(1024),
            spinbox_agent_api::READY_MARKER.as_bytes(),
        )
        .map_err(|source| VmError::StateDir {
            path: console_log.clone(),
            source,
        })?;

        // The vsock device and how the host reaches it.
        let mut vhost_fd: Option<OwnedFd> = None;
        let transport = match vsock_kind {
            VsockKind::Kernel => {
                let (cid, fd) =
                    vsock::claim_guest_cid(vsock::cid_hint(), 4096).map_err(VmError::Cid)?;
                vhost_fd = Some(fd);
                VsockTransport::Kernel { cid }
            }
            VsockKind::VhostUser => {
                let backend = start_vsock_backend(config, &sockets).await;
                let backend = match backend {
                    Ok(b) => b,
                    Err((e, b)) => {
                        partial.backend = b;
                        return Err(e);
                    }
                };
                let rec = backend.record;
                partial.backend = Some(backend);
                state
                    .update(|r| r.vsock_backend = Some(rec))
                    .await
                    .map_err(record_err)?;
                VsockTransport::Hybrid {
                    uds_path: vsock_uds.clone(),
                }
            }
        };

        // A virtiofsd per share, recorded before QEMU connects to it.
        let mut fs_sockets = Vec::new();
        for (i, share) in options.shares.iter().enumerate() {
            let [sock_name, stderr_name] = share_file_names(i);
            let started = start_virtiofsd(
                config,
                &share.source,
                &sockets,
                &sock_name,
                dir.join(stderr_name),
            )
            .await;
            let backend = match started {
                Ok(b) => b,
                Err((e, b)) => {
                    partial.fs_backends.extend(b);
                    return Err(e);
                }
            };
            let rec = backend.record;
            partial.fs_backends.push(backend);
            state
                .update(|r| r.fs_backends.push(rec))
                .await
                .map_err(record_err)?;
            fs_sockets.push((share.tag.clone(), sockets.for_child(&sock_name)));
        }

        // QMP: bound here, passed to QEMU as a listening fd, so it is up when QEMU is.
        let qmp_listener = std::os::unix::net::UnixListener::bind(&qmp_path).map_err(|source| {
            VmError::QmpSocket {
                path: qmp_path.clone(),
                source,
            }
        })?;

        let mut cmd = base_command_line(
            config,
            accel,
            vsock_kind,
            !options.shares.is_empty(),
            cmdline::Serial::Fd(CONSOLE_FD),
            cmdline::guest_kernel_cmdline(accel, config.vm.agent_port, &config.vm.kernel_args),
        );
        cmd.push(cmdline::QmpFd { fd: QMP_FD });
        for i in 0..options.hotplug_ports {
            cmd.push(cmdline::PcieRootPort {
                id: crate::hotplug::port_id(i),
                chassis: i + 1,
            });
        }
        for (i, disk) in options.disks.iter().enumerate() {
            cmd.push(cmdline::VirtioBlk {
                node: format!("disk{i}"),
                path: disk.path.clone(),
                serial: disk.serial.clone(),
                read_only: disk.read_only,
            });
        }
        let mut fds = vec![
            PassFd {
                src: qmp_listener.as_raw_fd(),
                dst: QMP_FD,
            },
            PassFd {
                src: console_qemu.as_raw_fd(),
                dst: CONSOLE_FD,
            },
        ];
        for (i, nic) in options.nics.iter().enumerate() {
            let dst = FIRST_NIC_FD + i as i32;
            fds.push(PassFd {
                src: nic.tap_fd,
                dst,
            });
            cmd.push(cmdline::VirtioNetTap {
                id: format!("net{i}"),
                fd: dst,
                mac: nic.mac.clone(),
            });
        }
        for (i, (tag, socket)) in fs_sockets.into_iter().enumerate() {
            cmd.push(cmdline::VhostUserFs {
                id: format!("fs{i}"),
                socket,
                tag,
            });
        }
        // The output ports: socket pairs, QEMU's ends passed, ours kept for the container.
        let mut output_ports = None;
        let mut qemu_port_ends = Vec::new();
        if config.vm.output_ports {
            let pair = || std::os::unix::net::UnixStream::pair().map_err(VmError::OutputPort);
            let (stdout, qemu_stdout) = pair()?;
            let (stderr, qemu_stderr) = pair()?;
            let mut ports = Vec::new();
            for (i, (stream, end)) in [
                (StdioStream::Stdout, qemu_stdout),
                (StdioStream::Stderr, qemu_stderr),
            ]
            .into_iter()
            .enumerate()
            {
                let dst = FIRST_PORT_FD + i as i32;
                fds.push(PassFd {
                    src: end.as_raw_fd(),
                    dst,
                });
                ports.push(cmdline::SerialPort {
                    name: output_port_name(stream).unwrap_or_default().to_owned(),
                    fd: dst,
                });
                qemu_port_ends.push(end);
            }
            cmd.push(cmdline::VirtioSerialPorts { ports });
            output_ports = Some(OutputPorts { stdout, stderr });
        }
        match &transport {
            VsockTransport::Kernel { cid } => {
                if let Some(fd) = &vhost_fd {
                    fds.push(PassFd {
                        src: fd.as_raw_fd(),
                        dst: VHOST_FD,
                    });
                }
                cmd.push(cmdline::VhostVsockPci {
                    guest_cid: *cid,
                    vhostfd: VHOST_FD,
                });
            }
            VsockTransport::Hybrid { .. } => {
                cmd.push(cmdline::VhostUserVsockPci {
                    backend_socket: sockets.for_child("vhost-vsock.sock"),
                });
            }
        }
        let args = cmd.args();
        tracing::debug!(vm = id, qemu = %paths.qemu.display(), args = ?args, "spawning QEMU");

        let stderr_log = dir.join("qemu.stderr");
        let stderr_file = state::create_private_file(&stderr_log)
            .await
            .map_err(|source| VmError::StateDir {
                path: stderr_log.clone(),
                source,
            })?;
        let spawned_at = Instant::now();
        let mut qemu_cmd = process::command(&paths.qemu, &args, fds);
        process::without_capabilities(&mut qemu_cmd);
        let child = qemu_cmd
            .current_dir(sockets.dir())
            .stdout(std::process::Stdio::null())
            .stderr(stderr_file)
            .spawn()
            .map_err(|source| VmError::Spawn {
                what: "QEMU",
                program: paths.qemu.clone(),
                source,
            })?;
        let qemu_pid = child.id().unwrap_or(0);
        let qemu_rec = ProcessRecord::of(qemu_pid);
        let mut qemu_exit = watch_exit(child);
        let qemu_rec = match qemu_rec {
            Ok(r) => r,
            Err(_) => {
                // Already gone: report why.
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    qemu_exit.wait_for(|s| s.is_some()),
                )
                .await;
                return Err(qemu_exited(&qemu_exit, &stderr_log, &console_log).await);
            }
        };
        partial.qemu = Some((qemu_rec, qemu_exit.clone()));
        state
            .update(|r| {
                r.qemu = Some(qemu_rec);
                r.shape = Some(boot_shape(config));
            })
            .await
            .map_err(record_err)?;
        // QEMU holds the listener and its port ends now; our copies are not needed.
        drop(qmp_listener);
        drop(qemu_port_ends);
        drop(console_qemu);

        let qmp_stream = tokio::net::UnixStream::connect(&qmp_path)
            .await
            .map_err(|source| VmError::QmpSocket {
                path: qmp_path.clone(),
                source,
            })?;
        let handshake = tokio::select! {
            r = Qmp::handshake(qmp_stream, timeouts.qmp_command) => r,
            _ = exited(qemu_exit.clone()) => {
                return Err(qemu_exited(&qemu_exit, &stderr_log, &console_log).await);
            }
        };
        let qmp = match handshake {
            Ok(qmp) => qmp,
            Err(e) => {
                // QEMU that rejects its configuration greets and then exits: say why.
                if tokio::time::timeout(Duration::from_secs(1), exited(qemu_exit.clone()))
                    .await
                    .is_ok()
                {
                    return Err(qemu_exited(&qemu_exit, &stderr_log, &console_log).await);
                }
                return Err(e.into());
            }
        };
        let qmp_after = spawned_at.elapsed();

        // Readiness: first the agent's ready line on the console, then its health answer,
        // retried, all within timeouts.vm_start.
        let deadline = spawned_at + timeouts.vm_start;
        let port = config.vm.agent_port;
        let mut last_error = String::from("no attempt finished");
        let mut ready = console.ready.clone();
        let marker = tokio::select! {
            seen = tokio::time::timeout_at(
                deadline.into(),
                async { ready.wait_for(|r| *r).await.is_ok() },
            ) => seen.unwrap_or(false),
            _ = exited(qemu_exit.clone()) => {
                return Err(qemu_exited(&qemu_exit, &stderr_log, &console_log).await);
            }
        };
        if !marker {
            return Err(VmError::AgentTimeout {
                port,
                after: timeouts.vm_start,
                last_error: format!(
                    "the agent never wrote {:?} to the console",
                    spinbox_agent_api::READY_MARKER
                ),
                console: console::suffix(&console_log).await,
            });
        }
        // Each attempt is bounded, 2 s at first, doubling: a CONNECT the vsock backend or the
        // guest dropped under load (seen with 8 VMs booting at once on 2 cores: the agent
        // ready, one CONNECT never answered) is retried instead of waited on until
        // timeouts.vm_start runs out; a slow, loaded guest still gets long attempts.
        let mut attempt_bound = Duration::from_secs(2);
        let (agent, health) = loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(VmError::AgentTimeout {
                    port,
                    after: timeouts.vm_start,
                    last_error,
                    console: console::suffix(&console_log).await,
                });
            }
            // The agent listens by now, so a CONNECT is answered at once on an idle host.
            let attempt_limit = (deadline - now).min(attempt_bound);
            attempt_bound = attempt_bound.saturating_mul(2);
            let attempt = tokio::select! {
                r = health_once(&transport, port, attempt_limit) => r,
                _ = exited(qemu_exit.clone()) => {
                    return Err(qemu_exited(&qemu_exit, &stderr_log, &console_log).await);
                }
            };
            match attempt {
                Ok(ok) => break ok,
                Err(e) => last_error = e,
            }
            tokio::time::sleep(timeouts.task_client_retry).await;
        };
        let ready_after = spawned_at.elapsed();

        let boot = BootInfo {
            agent_version: health.agent_version.clone(),
            kernel_release: health.kernel_release.clone(),
            guest_boot_to_ready_ms: health.boot_to_ready_ms,
            host_prepare_ms: ms(spawned_at.duration_since(begun)),
            host_spawn_to_qmp_ms: ms(qmp_after),
            host_spawn_to_ready_ms: ms(ready_after),
            modules_loaded: health.modules_loaded.clone(),
            accel: accel.as_str(),
            vsock: match vsock_kind {
                VsockKind::Kernel => "vhost-vsock",
                VsockKind::VhostUser => "vhost-user",
            },
            qemu_version: qmp.qemu_version().to_owned(),
        };
        tracing::info!(
            vm = id,
            accel = boot.accel,
            vsock = boot.vsock,
            agent_version = %boot.agent_version,
            kernel = %boot.kernel_release,
            guest_boot_to_ready_ms = boot.guest_boot_to_ready_ms,
            host_spawn_to_ready_ms = boot.host_spawn_to_ready_ms,
            "VM ready"
        );
        let backend = partial.backend.take();
        let fs_backends = std::mem::take(&mut partial.fs_backends);
        partial.qemu = None;
        partial.console_log = None;
        Ok(Vm {
            id: id.to_owned(),
            state: Arc::clone(state),
            owns_state,
            console_log,
            config: config.clone(),
            qemu: qemu_rec,
            qemu_exit,
            backend,
            fs_backends,
            qmp,
            transport,
            agent,
            boot,
            shutdown: tokio::sync::OnceCell::new(),
            output_ports: std::sync::Mutex::new(output_ports),
            _vhost_fd: vhost_fd,
            _sockets: sockets,
            _console: console,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The output ports' host ends, once (None: `vm.output_ports` is off, or they were
    /// taken).
    pub fn take_output_ports(&self) -> Option<OutputPorts> {
        self.output_ports
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }
    pub fn boot_info(&self) -> &BootInfo {
        &self.boot
    }
    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }
    pub fn console_log(&self) -> &Path {
        &self.console_log
    }
    pub fn qemu_process(&self) -> ProcessRecord {
        self.qemu
    }
    pub fn vsock_backend_process(&self) -> Option<ProcessRecord> {
        self.backend.as_ref().map(|b| b.record)
    }
    pub fn transport(&self) -> &VsockTransport {
        &self.transport
    }
    /// The config the VM booted with (its size as the runtime chose it).
    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// A receiver that turns `Some(status)` when QEMU exits, for whoever must react to VM death.
    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitStatus>> {
        self.qemu_exit.clone()
    }

    /// Asks the agent for its health again (a liveness probe).
    pub async fn health(&self) -> Result<HealthResponse, VmError> {
        let ctx =
            ttrpc::context::with_timeout(ms(self.config.timeouts.qmp_command) as i64 * 1_000_000);
        self.agent
            .health(ctx, &HealthRequest::new())
            .await
            .map_err(|e| VmError::Agent {
                rpc: "Health",
                message: e.to_string(),
            })
    }

    async fn wait_qemu_exit(&self, limit: Duration) -> bool {
        let mut rx = self.qemu_exit.clone();
        let exited = tokio::time::timeout(limit, rx.wait_for(|s| s.is_some()))
            .await
            .is_ok();
        exited
    }

    fn qemu_gone(&self) -> bool {
        self.qemu_exit.borrow().is_some()
    }

    /// Releases the host side once the VM is down (shutting it down first if nobody did): keeps
    /// the shutdown record in the log directory ([`crate::history`]), stops the vsock
    /// backend, removes the console log and the VM's files — the whole state directory when
    /// the VM created it. Returns what could not be released.
    pub async fn release(self) -> Vec<String> {
        let report = self.shutdown().await;
        let mut errors = Vec::new();
        let kept = self.config.vm.shutdown_records_kept as usize;
        if let Err(e) = crate::history::keep_async(&self.config.paths.log_dir, &report, kept).await
        {
            errors.push(e);
        }
        // Side by side: each may take its SIGTERM grace.
        let mut stopping = tokio::task::JoinSet::new();
        for mut b in self.backend.into_iter().chain(self.fs_backends) {
            stopping.spawn(async move { stop_backend(&mut b).await });
        }
        while let Some(stopped) = stopping.join_next().await {
            match stopped {
                Ok(error) => errors.extend(error),
                Err(e) => errors.push(format!("stopping a VM helper: {e}")),
            }
        }
        for log in [
            self.console_log.clone(),
            console::rotated(&self.console_log),
        ] {
            if let Err(e) = state::remove_file_if_exists(&log) {
                errors.push(format!("removing {}: {e}", log.display()));
            }
        }
        if self.owns_state {
            if let Err(e) = self.state.remove().await {
                errors.push(format!("removing {}: {e}", self.state.path().display()));
            }
        } else {
            errors.extend(forget_vm_files(&self.state, &self.console_log).await);
        }
        errors
    }
}

/// Resolves once the watched process has exited.
async fn exited(mut rx: watch::Receiver<Option<ExitStatus>>) {
    let _ = rx.wait_for(|s| s.is_some()).await;
}

async fn qemu_exited(
    exit: &watch::Receiver<Option<ExitStatus>>,
    stderr_log: &Path,
    console_log: &Path,
) -> VmError {
    let status = match *exit.borrow() {
        Some(s) => s.to_string(),
        None => "still running".into(),
    };
    VmError::QemuExited {
        status,
        stderr: tail(stderr_log, 10).await.trim().to_owned(),
        console: console::suffix(console_log).await,
    }
}

async fn health_once(
    transport: &VsockTransport,
    port: u32,
    limit: Duration,
) -> Result<(AgentClient, HealthResponse), String> {
    let started = Instant::now();
    let socket = transport
        .connect(port, limit)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let client = AgentClient::new(ttrpc::r#async::Client::new(socket));
    let left = limit
        .saturating_sub(started.elapsed())
        .max(Duration::from_millis(100));
    let ctx = ttrpc::context::with_timeout(ms(left) as i64 * 1_000_000);
    match client.health(ctx, &HealthRequest::new()).await {
        Ok(h) => Ok((client, h)),
        Err(e) => Err(format!("health: {e}")),
    }
}
