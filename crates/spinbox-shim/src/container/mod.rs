//! One container and its microVM, in plain Rust types (containerd's protobuf types stay in
//! `service.rs`).
//!
//! Create runs in named phases — validate → bundle → state → mounts → network → vm →
//! container → stdio
//! — and a failure in any of them is reported with the phase's name and rolled back through
//! the same cleanup orchestrator a delete uses, so a failed create leaves no trace. The state
//! directory and its record come first: everything created after it is recorded there before
//! it exists, for `shim delete` and `spinbox gc` to reclaim after a crash.
//!
//! Ownership: the exit watcher task owns the wait on the guest process and is the only writer
//! of the exit state; RPC handlers read it through a watch channel.

use std::collections::HashMap;
use std::fmt;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use spinbox_agent_api::agent::{
    CreateContainerRequest, FileCopy, IpAddress, NetworkConfig, NetworkInterface, NetworkRoute,
    ProcessRequest, Rootfs, Share, SignalProcessRequest,
};
use spinbox_agent_api::agent_ttrpc::AgentClient;
use spinbox_config::Config;
use spinbox_storage::{LayerCache, MountSpec, PrepareOptions, PreparedRootfs};
use spinbox_vmm::accel::HostCaps;
use spinbox_vmm::state::StateDir;
use spinbox_vmm::vsock::VsockTransport;
use spinbox_vmm::{DiskAttach, NicAttach, ShareAttach, Vm, VmError, VmOptions};
use tokio::sync::watch;

use crate::cleanup::{Cleanup, CleanupReport, Phase};
use crate::exec::Exec;
use crate::lifecycle::LifecycleError;
use crate::stdio::{self, StdioPaths, StdioPumps};

/// Waits until the exit watch has a value; a dropped sender (the watcher gone with the VM)
/// counts as a VM death.
pub(crate) async fn wait_exit(mut rx: watch::Receiver<Option<ExitInfo>>) -> ExitInfo {
    loop {
        if let Some(info) = *rx.borrow_and_update() {
            return info;
        }
        if rx.changed().await.is_err() {
            return ExitInfo {
                status: VM_DIED_STATUS,
                at: SystemTime::now(),
            };
        }
    }
}

/// Exit code reported when the VM died under a running container (as for SIGKILL).
pub const VM_DIED_STATUS: u32 = 128 + 9;
/// How long output may still arrive after the VM died: only what is already in host buffers.
const VM_DEATH_DRAIN: Duration = Duration::from_millis(250);

/// The phases of a create, in order; a failed create names the one that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreatePhase {
    Validate,
    Bundle,
    State,
    Mounts,
    Network,
    Vm,
    Container,
    Stdio,
}

impl fmt::Display for CreatePhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CreatePhase::Validate => "validate",
            CreatePhase::Bundle => "bundle",
            CreatePhase::State => "state",
            CreatePhase::Mounts => "mounts",
            CreatePhase::Network => "network",
            CreatePhase::Vm => "vm",
            CreatePhase::Container => "container",
            CreatePhase::Stdio => "stdio",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("create failed in the {phase} phase: {source}")]
    Create {
        phase: CreatePhase,
        #[source]
        source: Box<ContainerError>,
    },
    #[error("invalid container id {id:?}: {reason}")]
    InvalidId { id: String, reason: String },
    #[error("bundle {path}: {reason}")]
    Bundle { path: PathBuf, reason: String },
    #[error("state directory {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("preparing rootfs: {0}")]
    Rootfs(#[from] spinbox_storage::StorageError),
    #[error("starting microVM: {0}")]
    Vm(#[from] VmError),
    #[error("network: {0}")]
    Network(#[from] spinbox_net::NetError),
    #[error("agent {rpc}: {message}")]
    Agent {
        rpc: &'static str,
        code: ttrpc::Code,
        message: String,
    },
    #[error("stdio: {0}")]
    Stdio(std::io::Error),
    #[error("container {id}: {error}")]
    Lifecycle { id: String, error: LifecycleError },
    #[error("container {0}: process already started")]
    AlreadyStarted(String),
    #[error("exec {0:?} already exists")]
    ExecExists(String),
    #[error("exec {0:?} not found")]
    ExecNotFound(String),
    #[error("{0}")]
    InvalidRequest(String),
}

impl ContainerError {
    /// The ttrpc code containerd acts on.
    pub fn code(&self) -> ttrpc::Code {
        use ttrpc::Code;
        match self {
            ContainerError::Create { source, .. } => source.code(),
            ContainerError::InvalidId { .. } | ContainerError::Bundle { .. } => {
                Code::INVALID_ARGUMENT
            }
            ContainerError::State { source, .. }
                if source.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                LifecycleError::VmAlreadyExists.code()
            }
            ContainerError::State { .. } | ContainerError::Stdio(_) => Code::INTERNAL,
            ContainerError::Rootfs(e) => LifecycleError::MountSetup(e.to_string()).code(),
            ContainerError::Vm(e) => match e {
                VmError::Path { .. } | VmError::InvalidId { .. } => Code::INVALID_ARGUMENT,
                VmError::Cid(e) => LifecycleError::CidExhausted(e.to_string()).code(),
                VmError::BackendTimeout { .. } | VmError::AgentTimeout { .. } => {
                    LifecycleError::DeviceTimeout(e.to_string()).code()
                }
                _ => Code::UNAVAILABLE,
            },
            ContainerError::Network(spinbox_net::NetError::Unsupported(_))
            | ContainerError::Network(spinbox_net::NetError::Publish { .. }) => {
                Code::INVALID_ARGUMENT
            }
            ContainerError::Network(e) => LifecycleError::NetworkSetup(e.to_string()).code(),
            ContainerError::Agent { code, .. } => *code,
            ContainerError::Lifecycle { error, .. } => error.code(),
            ContainerError::AlreadyStarted(_) => Code::FAILED_PRECONDITION,
            ContainerError::ExecExists(_) => Code::ALREADY_EXISTS,
            ContainerError::ExecNotFound(_) => Code::NOT_FOUND,
            ContainerError::InvalidRequest(_) => Code::INVALID_ARGUMENT,
        }
    }
}

fn failed(phase: CreatePhase, e: impl Into<ContainerError>) -> ContainerError {
    ContainerError::Create {
        phase,
        source: Box::new(e.into()),
    }
}

pub(crate) fn agent_err(rpc: &'static str, e: ttrpc::Error) -> ContainerError {
    match e {
        ttrpc::Error::RpcStatus(s) => ContainerError::Agent {
            rpc,
            code: s.code(),
            message: s.message().to_owned(),
        },
        other => ContainerError::Agent {
            rpc,
            code: ttrpc::Code::UNAVAILABLE,
            message: other.to_string(),
        },
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    pub status: u32,
    pub at: SystemTime,
}

/// What containerd passed to Create, as plain values.
#[derive(Debug, Clone)]
pub struct CreateOpts {
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: Vec<MountSpec>,
    pub stdio: StdioPaths,
    /// containerd namespace (for loggers' environment).
    pub namespace: String,
}

pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub stdio: StdioPaths,
    pub pid: u32,
    agent: AgentClient,
    transport: VsockTransport,
    namespace: String,
    execs: tokio::sync::Mutex<HashMap<String, Arc<Exec>>>,
    paused: AtomicBool,
    /// The task forwarding the guest's OOM events.
    oom_watch: Mutex<Option<tokio::task::AbortHandle>>,
    vm: tokio::sync::Mutex<Option<Vm>>,
    vm_exit: watch::Receiver<Option<ExitStatus>>,
    pumps: Arc<tokio::sync::Mutex<StdioPumps>>,
    rootfs: PreparedRootfs,
    work_dir: PathBuf,
    state: Arc<StateDir>,
    status: Mutex<Status>,
    exit: watch::Receiver<Option<ExitInfo>>,
    exit_tx: Mutex<Option<watch::Sender<Option<ExitInfo>>>>,
    /// Set once teardown began: QEMU exiting after this is our doing, not a VM death.
    tearing_down: AtomicBool,
    cleanup: tokio::sync::OnceCell<CleanupReport>,
    config: Config,
}

pub(crate) fn ctx(limit: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(i64::try_from(limit.as_nanos()).unwrap_or(i64::MAX))
}

fn process(id: &str) -> ProcessRequest {
    ProcessRequest {
        container_id: id.to_owned(),
        ..Default::default()
    }
}

/// The per-container data directory (writable layer image).
pub fn work_dir(config: &Config, id: &str) -> PathBuf {
    config.paths.data_dir.join("containers").join(id)
}

/// Where a create's time went: each step's duration, logged as one `create timeline` line
/// (the benchmark's boot breakdown reads it from containerd's log).
pub struct Timeline {
    pub started: std::time::Instant,
    last: std::time::Instant,
    steps: Vec<(&'static str, u64)>,
}

impl Timeline {
    fn start() -> Timeline {
        let now = std::time::Instant::now();
        Timeline {
            started: now,
            last: now,
            steps: Vec::new(),
        }
    }

    /// Ends the step named `step` now.
    fn mark(&mut self, step: &'static str) {
        let now = std::time::Instant::now();
        let ms = u64::try_from(now.duration_since(self.last).as_millis()).unwrap_or(u64::MAX);
        self.steps.push((step, ms));
        self.last = now;
    }

    fn log(&self, id: &str, boot: &spinbox_vmm::BootInfo) {
        let steps: Vec<String> = self
            .steps
            .iter()
            .map(|(step, ms)| format!("{step}_ms={ms}"))
            .collect();
        let total = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        tracing::info!(
            id = %id,
            steps = %steps.join(" "),
            vm_prepare_ms = boot.host_prepare_ms,
            qemu_spawn_to_qmp_ms = boot.host_spawn_to_qmp_ms,
            qemu_spawn_to_ready_ms = boot.host_spawn_to_ready_ms,
            guest_boot_to_ready_ms = boot.guest_boot_to_ready_ms,
            total_ms = total,
            "create timeline"
        );
    }
}

/// What a create has acquired so far; released through the cleanup phases on failure.
struct Acquired {
    state: Arc<StateDir>,
    work_dir: PathBuf,
    rootfs: Option<PreparedRootfs>,
    vm: Option<Vm>,
    network: spinbox_net::Settings,
}

impl Acquired {
    async fn rollback(self, id: &str) {
        let mut c = Cleanup::new(id);
        c.phase(Phase::Vm, release_vm(self.vm)).await;
        c.phase(Phase::Network, release_network(&self.network, &self.state))
            .await;
        let ok = c.ok_so_far();
        c.phase(
            Phase::Mounts,
            release_mounts(self.rootfs.as_ref(), &self.work_dir, &self.state, ok),
        )
        .await;
        let report = c.finish();
        if !report.ok() {
            tracing::warn!(id, errors = %report.summary(), "rollback of a failed create is incomplete");
        }
    }
}

impl Container {
    pub async fn create(opts: CreateOpts, config: &Config) -> Result<Container, ContainerError> {
        use CreatePhase as P;
        spinbox_vmm::state::validate_id(&opts.id).map_err(|reason| {
            failed(
                P::Validate,
                ContainerError::InvalidId {
                    id: opts.id.clone(),
                    reason,
                },
            )
        })?;
        let mut timeline = Timeline::start();
        let bundle = load_bundle(&opts).await.map_err(|e| failed(P::Bundle, e))?;
        timeline.mark("bundle");

        // The record first: everything after it is written there before it exists.
        let state_path = config.paths.state_dir.join(&opts.id);
        let state = StateDir::create(&config.paths.state_dir, &opts.id)
            .await
            .map_err(|source| {
                failed(
                    P::State,
                    ContainerError::State {
                        path: state_path.clone(),
                        source,
                    },
                )
            })?;
        let state = Arc::new(state);
        let work_dir = work_dir(config, &opts.id);
        let mut acquired = Acquired {
            state: Arc::clone(&state),
            work_dir: work_dir.clone(),
            rootfs: None,
            vm: None,
            network: spinbox_net::Settings::from_config(config),
        };
        timeline.mark("state");
        match Container::create_in(opts, config, bundle, &mut acquired, timeline).await {
            Ok(c) => Ok(c),
            Err(e) => {
                tracing::warn!(error = %e, "create failed; rolling back");
                acquired.rollback(&state.record().await.id).await;
                Err(e)
            }
        }
    }

    async fn create_in(
        opts: CreateOpts,
        config: &Config,
        bundle: Bundle,
        acquired: &mut Acquired,
        mut timeline: Timeline,
    ) -> Result<Container, ContainerError> {
        use CreatePhase as P;
        let Bundle {
            spec,
            source,
            read_only,
            netns,
            publish,
            files,
            shares,
        } = bundle;
        let state = Arc::clone(&acquired.state);
        let work_dir = acquired.work_dir.clone();
        let record_err = |source| ContainerError::State {
            path: state.path().to_owned(),
            source,
        };

        // Mounts: the rootfs as block images (the layer cache is shared and not ours; the
        // work directory with the writable layer is).
        state
            .update(|r| r.dirs.push(work_dir.clone()))
            .await
            .map_err(|e| failed(P::Mounts, record_err(e)))?;
        let _ = tokio::fs::remove_dir_all(&work_dir).await;
        tokio::fs::create_dir_all(&work_dir).await.map_err(|e| {
            failed(
                P::Mounts,
                ContainerError::Bundle {
                    path: work_dir.clone(),
                    reason: format!("creating container data dir: {e}"),
                },
            )
        })?;
        let cache = LayerCache::new(config.paths.data_dir.join("layers"));
        let prepared = spinbox_storage::prepare(
            &source,
            &PrepareOptions {
                cache: &cache,
                work_dir: &work_dir,
                upper_size_mib: config.vm.rootfs_upper_mib,
                read_only,
            },
        )
        .await
        .map_err(|e| failed(P::Mounts, e))?;
        tracing::info!(
            id = %opts.id,
            layers_cached = prepared.cache_hits,
            layers_built = prepared.cache_misses,
            "rootfs prepared"
        );
        let guest = prepared.guest.clone();
        let disks = prepared
            .disks
            .iter()
            .map(|d| DiskAttach {
                path: d.path.clone(),
                serial: d.serial.clone(),
                read_only: d.read_only,
            })
            .collect();
        acquired.rootfs = Some(prepared);
        timeline.mark("mounts");

        // Network: the TAPs QEMU gets, mirroring the container's network namespace.
        let attached = spinbox_net::setup(
            &acquired.network,
            &spinbox_net::Request {
                id: opts.id.clone(),
                spec_netns: netns,
                publish,
                record_path: state.path().join(spinbox_net::RECORD_FILE),
            },
        )
        .await
        .map_err(|e| failed(P::Network, e))?;
        if let Some(ns) = &attached.netns {
            tracing::info!(
                id = %opts.id,
                mode = attached.mode.unwrap_or("none"),
                netns = %ns.display(),
                interfaces = attached.interfaces.len(),
                "network ready"
            );
        }
        let vm_options = VmOptions {
            shares: shares
                .iter()
                .map(|s| ShareAttach {
                    tag: s.tag.clone(),
                    source: s.source.clone().into(),
                })
                .collect(),
            disks,
            nics: attached
                .nics
                .iter()
                .map(|n| NicAttach {
                    tap_fd: n.tap.as_raw_fd(),
                    mac: n.mac.clone(),
                })
                .collect(),
        };

        // VM.
        timeline.mark("network");
        let vm = Vm::start_in(
            Arc::clone(&state),
            false,
            config,
            &vm_options,
            &HostCaps::probe(),
        )
        .await
        .map_err(|e| failed(P::Vm, e))?;
        // QEMU holds the TAPs now; ours close, so a dead QEMU takes them along.
        let share_vm_network = !attached.interfaces.is_empty();
        let network_config = guest_network(&attached);
        drop(attached);
        timeline.mark("vm");
        let boot = vm.boot_info().clone();
        let agent = vm.agent().clone();
        let transport = vm.transport().clone();
        let vm_exit = vm.exit_watch();
        let output_ports = vm.take_output_ports();
        acquired.vm = Some(vm);

        if share_vm_network {
            agent
                .configure_network(ctx(config.timeouts.vm_start), &network_config)
                .await
                .map_err(|e| failed(P::Network, agent_err("ConfigureNetwork", e)))?;
        }

        // Container in the guest.
        let req = CreateContainerRequest {
            container_id: opts.id.clone(),
            oci_spec: spec,
            rootfs: protobuf::MessageField::some(Rootfs {
                lower_serials: guest.lower_serials.clone(),
                upper_serial: guest.upper_serial.clone(),
                block_serial: guest.block_serial.clone(),
                block_fstype: guest.block_fstype.clone(),
                read_only: guest.read_only,
                ..Default::default()
            }),
            stdin: !opts.stdio.stdin.is_empty(),
            stdout: !opts.stdio.stdout.is_empty(),
            stderr: !opts.stdio.stderr.is_empty(),
            terminal: opts.stdio.terminal,
            share_vm_network,
            files,
            shares,
            ..Default::default()
        };
        timeline.mark("configure_network");
        let created = agent
            .create_container(ctx(config.timeouts.vm_start), &req)
            .await
            .map_err(|e| failed(P::Container, agent_err("CreateContainer", e)))?;
        tracing::info!(id = %opts.id, pid = created.pid, "container created in the guest");
        for warning in &created.warnings {
            tracing::warn!(id = %opts.id, "spec not applied as written: {warning}");
        }

        // Stdio.
        timeline.mark("container");
        let pumps = stdio::connect(
            &transport,
            spinbox_agent_api::DEFAULT_STDIO_PORT,
            &stdio::ProcessRef {
                container_id: &opts.id,
                exec_id: "",
                namespace: &opts.namespace,
            },
            &opts.stdio,
            config.timeouts.device_detection,
            Some(stdio::FirstOutput::new(&opts.id, timeline.started)),
            output_ports,
        )
        .await
        .map_err(|e| failed(P::Stdio, ContainerError::Stdio(e)))?;

        timeline.mark("stdio");
        timeline.log(&opts.id, &boot);
        let (exit_tx, exit) = watch::channel(None);
        let rootfs = acquired.rootfs.take().unwrap_or_default();
        Ok(Container {
            id: opts.id,
            bundle: opts.bundle,
            stdio: opts.stdio,
            pid: created.pid,
            agent,
            transport,
            namespace: opts.namespace,
            execs: tokio::sync::Mutex::new(HashMap::new()),
            paused: AtomicBool::new(false),
            oom_watch: Mutex::new(None),
            vm: tokio::sync::Mutex::new(acquired.vm.take()),
            vm_exit,
            pumps: Arc::new(tokio::sync::Mutex::new(pumps)),
            rootfs,
            work_dir,
            state,
            status: Mutex::new(Status::Created),
            exit,
            exit_tx: Mutex::new(Some(exit_tx)),
            tearing_down: AtomicBool::new(false),
            cleanup: tokio::sync::OnceCell::new(),
            config: config.clone(),
        })
    }

    pub fn status(&self) -> Status {
        *self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_status(&self, s: Status) {
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    pub fn exit_info(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    fn not_running(&self) -> ContainerError {
        ContainerError::Lifecycle {
            id: self.id.clone(),
            error: LifecycleError::VmNotRunning,
        }
    }

    /// Resolves when QEMU exits without us tearing it down (a VM death: guest panic, QEMU
    /// killed or crashed). Never resolves for our own shutdown.
    pub async fn vm_died(&self) {
        let mut rx = self.vm_exit.clone();
        let _ = rx.wait_for(|s| s.is_some()).await;
        if self.tearing_down.load(Ordering::Acquire) {
            std::future::pending::<()>().await;
        }
        let status = (*rx.borrow()).map(|s| s.to_string()).unwrap_or_default();
        tracing::error!(id = %self.id, qemu = %status, "microVM exited on its own");
        // A process that never started cannot report; its exit is the VM's.
        if let Some(tx) = self
            .exit_tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            self.set_status(Status::Stopped);
            let _ = tx.send(Some(ExitInfo {
                status: VM_DIED_STATUS,
                at: SystemTime::now(),
            }));
        }
    }

    /// Runs the process and starts the watcher that turns its exit (or the VM's death) into
    /// the exit state; `on_exit` runs once, after all output reached containerd.
    pub async fn start<F>(self: &Arc<Self>, on_exit: F) -> Result<u32, ContainerError>
    where
        F: FnOnce(ExitInfo) + Send + 'static,
    {
        let exit_tx = self
            .exit_tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| {
                if self.status() == Status::Stopped {
                    self.not_running()
                } else {
                    ContainerError::AlreadyStarted(self.id.clone())
                }
            })?;
        let resp = self
            .agent
            .start_process(ctx(self.config.timeouts.vm_start), &process(&self.id))
            .await
            .map_err(|e| agent_err("StartProcess", e));
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                // The process will never run: it counts as exited (runc reports 127-ish
                // failures the same way), so Wait and Delete behave.
                let info = ExitInfo {
                    status: 127,
                    at: SystemTime::now(),
                };
                self.set_status(Status::Stopped);
                let _ = exit_tx.send(Some(info));
                return Err(e);
            }
        };
        self.set_status(Status::Running);
        tracing::info!(id = %self.id, pid = resp.pid, "process started");
        let me = Arc::clone(self);
        let mut vm_exit = self.vm_exit.clone();
        tokio::spawn(async move {
            let waited = async {
                me.agent
                    .wait_process(ttrpc::context::Context::default(), &process(&me.id))
                    .await
            };
            let (info, drain) = tokio::select! {
                r = waited => match r {
                    Ok(w) => (ExitInfo {
                        status: w.exit_status,
                        at: SystemTime::UNIX_EPOCH + Duration::from_nanos(w.exited_at_unix_nanos),
                    }, me.config.timeouts.io_wait),
                    Err(e) => {
                        tracing::warn!(id = %me.id, error = %e, "WaitProcess failed; treating as VM death");
                        (ExitInfo { status: VM_DIED_STATUS, at: SystemTime::now() }, VM_DEATH_DRAIN)
                    }
                },
                _ = vm_exit.wait_for(|s| s.is_some()) => {
                    tracing::warn!(id = %me.id, "microVM exited under a running container");
                    (ExitInfo { status: VM_DIED_STATUS, at: SystemTime::now() }, VM_DEATH_DRAIN)
                }
            };
            tracing::info!(id = %me.id, status = info.status, "process exited");
            // Every byte the process wrote reaches containerd before the exit is published
            // (after a VM death: what already reached the host).
            me.pumps.lock().await.drain_output(drain).await;
            me.set_status(Status::Stopped);
            let _ = exit_tx.send(Some(info));
            on_exit(info);
        });
        Ok(resp.pid)
    }

    /// Waits for the exit (of a started process; a never-started one never exits by itself).
    pub async fn wait(&self) -> ExitInfo {
        wait_exit(self.exit.clone()).await
    }

    pub async fn kill(&self, signal: u32, all: bool) -> Result<(), ContainerError> {
        if self.status() == Status::Stopped || self.vm_exit.borrow().is_some() {
            return Err(self.not_running());
        }
        let req = SignalProcessRequest {
            container_id: self.id.clone(),
            signal,
            all,
            ..Default::default()
        };
        self.agent
            .signal_process(ctx(self.config.timeouts.qmp_command), &req)
            .await
            .map(|_| ())
            .map_err(|e| agent_err("SignalProcess", e))
    }

    pub async fn pids(&self) -> Result<Vec<u32>, ContainerError> {
        if self.status() == Status::Stopped {
            return Ok(Vec::new());
        }
        self.agent
            .list_pids(ctx(self.config.timeouts.qmp_command), &process(&self.id))
            .await
            .map(|r| r.pids)
            .map_err(|e| agent_err("ListPids", e))
    }

    pub async fn close_stdin(&self) -> Result<(), ContainerError> {
        self.pumps
            .lock()
            .await
            .close_stdin(self.config.timeouts.io_wait)
            .await;
        if self.status() == Status::Stopped {
            return Ok(());
        }
        self.agent
            .close_stdin(ctx(self.config.timeouts.qmp_command), &process(&self.id))
            .await
            .map(|_| ())
            .map_err(|e| agent_err("CloseStdin", e))
    }

    fn running_vm(&self) -> Result<(), ContainerError> {
        if self.vm_exit.borrow().is_some() || self.tearing_down.load(Ordering::Acquire) {
            return Err(self.not_running());
        }
        Ok(())
    }

    /// `ctr task exec`: a new process in the container's namespaces, created stopped.
    pub async fn exec(
        &self,
        exec_id: &str,
        process_json: Vec<u8>,
        stdio: StdioPaths,
    ) -> Result<Arc<Exec>, ContainerError> {
        self.running_vm()?;
        if exec_id.is_empty() {
            return Err(ContainerError::InvalidRequest(
                "exec: an exec id is required".into(),
            ));
        }
        if self.status() != Status::Running {
            return Err(ContainerError::InvalidRequest(format!(
                "exec {exec_id:?}: container {} is not running",
                self.id
            )));
        }
        let mut execs = self.execs.lock().await;
        if execs.contains_key(exec_id) {
            return Err(ContainerError::ExecExists(exec_id.to_owned()));
        }
        let t = &self.config.timeouts;
        let exec = Exec::create(
            self.agent.clone(),
            &self.transport,
            &self.id,
            exec_id,
            process_json,
            stdio,
            &self.namespace,
            (t.vm_start, t.device_detection, t.io_wait),
        )
        .await?;
        let exec = Arc::new(exec);
        execs.insert(exec_id.to_owned(), Arc::clone(&exec));
        Ok(exec)
    }

    pub async fn get_exec(&self, exec_id: &str) -> Result<Arc<Exec>, ContainerError> {
        self.execs
            .lock()
            .await
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ContainerError::ExecNotFound(exec_id.to_owned()))
    }

    /// Delete of an exec: refused while it runs; otherwise the guest forgets it.
    pub async fn remove_exec(&self, exec_id: &str) -> Result<Arc<Exec>, ContainerError> {
        let exec = self.get_exec(exec_id).await?;
        if exec.status().0 == Status::Running {
            return Err(ContainerError::InvalidRequest(format!(
                "exec {exec_id:?} is running; kill it first"
            )));
        }
        if self.vm_exit.borrow().is_none() {
            exec.remove().await?;
        } else {
            exec.abort().await;
        }
        self.execs.lock().await.remove(exec_id);
        Ok(exec)
    }

    /// `ctr task metrics`: the guest's cgroup v2 figures for the container.
    pub async fn stats(&self) -> Result<HashMap<String, String>, ContainerError> {
        self.running_vm()?;
        self.agent
            .stats_container(ctx(self.config.timeouts.qmp_command), &process(&self.id))
            .await
            .map(|r| r.files)
            .map_err(|e| agent_err("StatsContainer", e))
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// Freezes (`true`, Pause) or thaws (`false`, Resume) every process of the container with
    /// the cgroup freezer in the guest.
    pub async fn set_frozen(&self, frozen: bool) -> Result<(), ContainerError> {
        self.running_vm()?;
        let ctx = ctx(self.config.timeouts.qmp_command * 2);
        let req = process(&self.id);
        if frozen {
            self.agent.pause_container(ctx, &req).await
        } else {
            self.agent.resume_container(ctx, &req).await
        }
        .map_err(|e| {
            let rpc = if frozen {
                "PauseContainer"
            } else {
                "ResumeContainer"
            };
            agent_err(rpc, e)
        })?;
        self.paused.store(frozen, Ordering::Release);
        Ok(())
    }

    /// New cgroup limits (OCI linux.resources as JSON), applied in the guest.
    pub async fn update(&self, resources_json: Vec<u8>) -> Result<(), ContainerError> {
        self.running_vm()?;
        let req = spinbox_agent_api::agent::UpdateContainerRequest {
            container_id: self.id.clone(),
            resources: resources_json,
            ..Default::default()
        };
        self.agent
            .update_container(ctx(self.config.timeouts.qmp_command), &req)
            .await
            .map(|_| ())
            .map_err(|e| agent_err("UpdateContainer", e))
    }

    /// Window size of the init's terminal.
    pub async fn resize_pty(&self, width: u32, height: u32) -> Result<(), ContainerError> {
        self.running_vm()?;
        let req = spinbox_agent_api::agent::ResizePtyRequest {
            container_id: self.id.clone(),
            width,
            height,
            ..Default::default()
        };
        self.agent
            .resize_pty(ctx(self.config.timeouts.qmp_command), &req)
            .await
            .map(|_| ())
            .map_err(|e| agent_err("ResizePty", e))
    }

    /// Forwards the guest's OOM events (a long poll on the agent) to `on_oom` until the VM or
    /// the container goes. An agent without OOM events ends the watch at once.
    pub fn watch_oom<F>(self: &Arc<Self>, on_oom: F)
    where
        F: Fn() + Send + 'static,
    {
        let me = Arc::clone(self);
        let task = tokio::spawn(async move {
            loop {
                let r = me
                    .agent
                    .get_oom_event(
                        ttrpc::context::Context::default(),
                        &spinbox_agent_api::agent::Empty::default(),
                    )
                    .await;
                match r {
                    Ok(ev) if ev.container_id == me.id => on_oom(),
                    Ok(ev) => {
                        tracing::warn!(id = %me.id, other = %ev.container_id, "OOM event for another container")
                    }
                    Err(ttrpc::Error::RpcStatus(s)) if s.code() == ttrpc::Code::UNIMPLEMENTED => {
                        tracing::warn!(id = %me.id, "the agent has no OOM events");
                        return;
                    }
                    Err(e) => {
                        if me.vm_exit.borrow().is_some() || me.tearing_down.load(Ordering::Acquire)
                        {
                            return;
                        }
                        tracing::warn!(id = %me.id, error = %e, "GetOomEvent failed; retrying");
                        tokio::time::sleep(me.config.timeouts.event_reconnect).await;
                    }
                }
            }
        });
        *self.oom_watch.lock().unwrap_or_else(|p| p.into_inner()) = Some(task.abort_handle());
    }

    /// Tears the container down through the cleanup phases (hotplug → io → connections → vm
    /// → network → mounts; the event channel belongs to the shim and closes when it exits).
    /// Runs once: a second or concurrent call waits for the first and gets its report.
    pub async fn destroy(&self) -> CleanupReport {
        self.cleanup.get_or_init(|| self.teardown()).await.clone()
    }

    async fn teardown(&self) -> CleanupReport {
        self.tearing_down.store(true, Ordering::Release);
        let vm_alive = self.vm_exit.borrow().is_none();
        let mut c = Cleanup::new(&self.id);
        // Nothing is hotplugged into a spinbox VM after boot (yet): nothing to stop.
        c.phase(Phase::Hotplug, async { Vec::new() }).await;
        c.phase(Phase::Io, async {
            for exec in self.execs.lock().await.values() {
                exec.abort().await;
            }
            let mut pumps = self.pumps.lock().await;
            pumps.abort_stdin();
            let limit = if vm_alive {
                self.config.timeouts.io_wait
            } else {
                VM_DEATH_DRAIN
            };
            if self.status() == Status::Running && vm_alive {
                // Deleting a running container is refused earlier; a shutdown of the shim
                // gets here with one: its output is cut, not waited for.
                pumps.abort();
            } else if !pumps.drain_output(limit).await {
                tracing::warn!(id = %self.id, "output cut off at teardown");
            }
            Vec::new()
        })
        .await;
        c.phase(Phase::Connections, async {
            let mut errors = Vec::new();
            if let Some(t) = self
                .oom_watch
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                t.abort();
            }
            if vm_alive {
                if let Err(e) = self
                    .agent
                    .remove_container(ctx(self.config.timeouts.shutdown_grace), &process(&self.id))
                    .await
                {
                    errors.push(format!("agent RemoveContainer: {e}"));
                }
            }
            // The stdio vsock streams.
            self.pumps.lock().await.abort();
            errors
        })
        .await;
        let vm = self.vm.lock().await.take();
        c.phase(Phase::Vm, release_vm(vm)).await;
        let network = spinbox_net::Settings::from_config(&self.config);
        c.phase(Phase::Network, release_network(&network, &self.state))
            .await;
        let ok = c.ok_so_far();
        c.phase(
            Phase::Mounts,
            release_mounts(Some(&self.rootfs), &self.work_dir, &self.state, ok),
        )
        .await;
        if self.status() != Status::Stopped {
            self.set_status(Status::Stopped);
        }
        c.finish()
    }
}

/// What the shim takes from the bundle.
struct Bundle {
    spec: Vec<u8>,
    source: spinbox_storage::RootfsSource,
    read_only: bool,
    netns: spinbox_net::SpecNetns,
    publish: Vec<spinbox_net::PortMapping>,
    files: Vec<FileCopy>,
    shares: Vec<Share>,
}

/// The network namespace `linux.namespaces` asks for.
fn spec_netns(spec: &serde_json::Value) -> spinbox_net::SpecNetns {
    let entry = spec["linux"]["namespaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|ns| ns["type"] == "network");
    match entry {
        None => spinbox_net::SpecNetns::Host,
        Some(ns) => match ns["path"].as_str() {
            Some(p) if !p.is_empty() => spinbox_net::SpecNetns::Path(p.into()),
            _ => spinbox_net::SpecNetns::New,
        },
    }
}

/// What the guest's network configuration is: the mirrored interfaces and their routes.
fn guest_network(attached: &spinbox_net::Attached) -> NetworkConfig {
    NetworkConfig {
        interfaces: attached
            .interfaces
            .iter()
            .map(|i| NetworkInterface {
                name: i.name.clone(),
                mac: i.mac.clone(),
                mtu: i.mtu,
                addresses: i
                    .addresses
                    .iter()
                    .map(|a| IpAddress {
                        address: a.addr().to_string(),
                        prefix_len: u32::from(a.prefix_len()),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .collect(),
        routes: attached
            .routes
            .iter()
            .map(|r| NetworkRoute {
                destination: r.destination.map(|d| d.to_string()).unwrap_or_default(),
                gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
                device: r.device.clone(),
                source: r.source.map(|s| s.to_string()).unwrap_or_default(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// Reads the bundle's spec and finds the rootfs source, the network and the file copies.
async fn load_bundle(opts: &CreateOpts) -> Result<Bundle, ContainerError> {
    let spec_path = opts.bundle.join("config.json");
    let spec = tokio::fs::read(&spec_path)
        .await
        .map_err(|e| ContainerError::Bundle {
            path: spec_path.clone(),
            reason: e.to_string(),
        })?;
    let parsed: serde_json::Value =
        serde_json::from_slice(&spec).map_err(|e| ContainerError::Bundle {
            path: spec_path.clone(),
            reason: format!("not valid JSON: {e}"),
        })?;
    let read_only = parsed["root"]["readonly"].as_bool().unwrap_or(false);
    let source = if opts.rootfs.is_empty() {
        // No snapshot mounts (`ctr run --config`, a pre-made bundle): the spec's root.path,
        // relative to the bundle, is the rootfs directory.
        let root = parsed["root"]["path"].as_str().unwrap_or("rootfs");
        let path = opts.bundle.join(root);
        if !path.is_dir() {
            return Err(ContainerError::Bundle {
                path: spec_path.clone(),
                reason: format!(
                    "root.path {} is not a directory and containerd gave no rootfs mounts",
                    path.display()
                ),
            });
        }
        spinbox_storage::RootfsSource::Dir { path, read_only }
    } else {
        spinbox_storage::parse_rootfs(&opts.rootfs)?
    };
    let netns = spec_netns(&parsed);
    let publish = match parsed["annotations"][spinbox_net::publish::ANNOTATION].as_str() {
        Some(v) => spinbox_net::publish::parse(v)?,
        None => Vec::new(),
    };
    let (files, shares) = crate::copies::plan(&parsed).await;
    Ok(Bundle {
        spec,
        source,
        read_only,
        netns,
        publish,
        files,
        shares,
    })
}

/// The network phase: what `network.json` in the state directory names (nft rules, tc
/// redirects and TAPs, CNI DEL, the namespace spinbox created); the record goes once all is
/// released.
async fn release_network(settings: &spinbox_net::Settings, state: &StateDir) -> Vec<String> {
    spinbox_net::release_recorded(settings, &state.path().join(spinbox_net::RECORD_FILE)).await
}

/// The VM phase: the shutdown ladder, then the VM's host side (backend, console log, files).
async fn release_vm(vm: Option<Vm>) -> Vec<String> {
    match vm {
        Some(vm) => {
            let report = vm.shutdown().await;
            tracing::info!(
                vm = %report.vm_id,
                graceful = report.graceful,
                duration_ms = report.duration_ms,
                "VM down"
            );
            vm.release().await
        }
        None => Vec::new(),
    }
}

/// The mounts phase: the container's images and data directory, then — only when everything
/// before succeeded — the state directory with its record, last, so that whatever could not
/// be released stays recorded for `shim delete` / `spinbox gc`.
async fn release_mounts(
    rootfs: Option<&PreparedRootfs>,
    work_dir: &Path,
    state: &StateDir,
    earlier_ok: bool,
) -> Vec<String> {
    let mut errors = Vec::new();
    if let Some(rootfs) = rootfs {
        errors.extend(spinbox_storage::release(&rootfs.owned));
    }
    match tokio::fs::remove_dir_all(work_dir).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => errors.push(format!("removing {}: {e}", work_dir.display())),
    }
    if earlier_ok && errors.is_empty() {
        if let Err(e) = state.remove().await {
            errors.push(format!("removing {}: {e}", state.path().display()));
        }
    } else {
        tracing::warn!(dir = %state.path().display(), "state record kept: cleanup incomplete");
    }
    errors
}

/// Reclaims what a dead shim left: the VM and everything its record names (processes verified
/// by start time, files, the container's data directory), then the state directory. `dir` is
/// the state directory the shim recorded in the bundle, or `<paths.state_dir>/<id>`.
/// Idempotent.
pub async fn reclaim(config: &Config, id: &str, dir: Option<PathBuf>) -> Vec<String> {
    let mut errors = Vec::new();
    if spinbox_vmm::state::validate_id(id).is_err() {
        return vec![format!("refusing to reclaim invalid id {id:?}")];
    }
    let dir = dir.unwrap_or_else(|| config.paths.state_dir.join(id));
    match spinbox_vmm::state::reclaim_contents(&dir).await {
        Ok(killed) if !killed.is_empty() => {
            tracing::warn!(id, killed = ?killed, "reclaimed processes of a dead shim")
        }
        Ok(_) => {}
        Err(e) => errors.push(format!("reclaiming {}: {e}", dir.display())),
    }
    // The VM is gone: then its network, then the record itself (kept if anything failed).
    let settings = spinbox_net::Settings::from_config(config);
    errors.extend(
        spinbox_net::release_recorded(&settings, &dir.join(spinbox_net::RECORD_FILE)).await,
    );
    if errors.is_empty() {
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("removing {}: {e}", dir.display())),
        }
    }
    // A record older than its data directory's entry (or none at all): the default place.
    let work = work_dir(config, id);
    match tokio::fs::remove_dir_all(&work).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => errors.push(format!("removing {}: {e}", work.display())),
    }
    errors
}
