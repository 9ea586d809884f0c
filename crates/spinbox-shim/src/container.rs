//! One container and its microVM, in plain Rust types (containerd's protobuf types stay in
//! `service.rs`).
//!
//! Create: validate → load the bundle's spec → prepare rootfs images → boot the VM with them
//! → create the container in the guest → connect stdio. Every step that fails rolls back the
//! ones before it, in reverse, so a failed create leaves no trace.
//!
//! Ownership: the exit watcher task owns the wait on the guest process and is the only writer
//! of the exit state; RPC handlers read it through a watch channel.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use spinbox_agent_api::agent::{
    CreateContainerRequest, ProcessRequest, Rootfs, SignalProcessRequest,
};
use spinbox_agent_api::agent_ttrpc::AgentClient;
use spinbox_config::Config;
use spinbox_storage::{LayerCache, MountSpec, PrepareOptions, PreparedRootfs};
use spinbox_vmm::accel::HostCaps;
use spinbox_vmm::{DiskAttach, Vm, VmOptions};
use tokio::sync::watch;

use crate::stdio::{self, StdioPaths, StdioPumps};

/// Exit code reported when the VM died under a running container (as for SIGKILL).
pub const VM_DIED_STATUS: u32 = 128 + 9;

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("invalid container id {id:?}: {reason}")]
    InvalidId { id: String, reason: String },
    #[error("bundle {path}: {reason}")]
    Bundle { path: PathBuf, reason: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("preparing rootfs: {0}")]
    Rootfs(#[from] spinbox_storage::StorageError),
    #[error("starting microVM: {0}")]
    Vm(#[from] spinbox_vmm::VmError),
    #[error("agent {rpc}: {message}")]
    Agent {
        rpc: &'static str,
        code: ttrpc::Code,
        message: String,
    },
    #[error("stdio: {0}")]
    Stdio(std::io::Error),
    #[error("container {0} is not running")]
    NotRunning(String),
    #[error("container {0}: process already started")]
    AlreadyStarted(String),
}

fn agent_err(rpc: &'static str, e: ttrpc::Error) -> ContainerError {
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
    vm: tokio::sync::Mutex<Option<Vm>>,
    pumps: Arc<tokio::sync::Mutex<StdioPumps>>,
    rootfs: PreparedRootfs,
    work_dir: PathBuf,
    status: Mutex<Status>,
    exit: watch::Receiver<Option<ExitInfo>>,
    exit_tx: Mutex<Option<watch::Sender<Option<ExitInfo>>>>,
    config: Config,
}

fn ctx(limit: Duration) -> ttrpc::context::Context {
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

impl Container {
    pub async fn create(opts: CreateOpts, config: &Config) -> Result<Container, ContainerError> {
        spinbox_vmm::state::validate_id(&opts.id).map_err(|reason| ContainerError::InvalidId {
            id: opts.id.clone(),
            reason,
        })?;
        if opts.stdio.terminal {
            return Err(ContainerError::Unsupported(
                "terminal (TTY) containers are not supported yet".into(),
            ));
        }
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
        if parsed["process"]["terminal"].as_bool().unwrap_or(false) {
            return Err(ContainerError::Unsupported(
                "process.terminal: TTY containers are not supported yet".into(),
            ));
        }
        let source = if opts.rootfs.is_empty() {
            // No snapshot mounts (`ctr run --config`, a pre-made bundle): the spec's
            // root.path, relative to the bundle, is the rootfs directory.
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

        // Rollback order is the reverse of the steps below.
        let work_dir = work_dir(config, &opts.id);
        let _ = tokio::fs::remove_dir_all(&work_dir).await;
        tokio::fs::create_dir_all(&work_dir)
            .await
            .map_err(|e| ContainerError::Bundle {
                path: work_dir.clone(),
                reason: format!("creating container data dir: {e}"),
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
        .await;
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&work_dir).await;
                return Err(e.into());
            }
        };
        tracing::info!(
            id = %opts.id,
            layers_cached = prepared.cache_hits,
            layers_built = prepared.cache_misses,
            "rootfs prepared"
        );
        let vm_options = VmOptions {
            disks: prepared
                .disks
                .iter()
                .map(|d| DiskAttach {
                    path: d.path.clone(),
                    serial: d.serial.clone(),
                    read_only: d.read_only,
                })
                .collect(),
        };
        let vm = match Vm::start_with(&opts.id, config, &vm_options, &HostCaps::probe()).await {
            Ok(vm) => vm,
            Err(e) => {
                rollback(None, &prepared, &work_dir).await;
                return Err(e.into());
            }
        };
        let agent = vm.agent().clone();
        let g = &prepared.guest;
        let req = CreateContainerRequest {
            container_id: opts.id.clone(),
            oci_spec: spec,
            rootfs: protobuf::MessageField::some(Rootfs {
                lower_serials: g.lower_serials.clone(),
                upper_serial: g.upper_serial.clone(),
                block_serial: g.block_serial.clone(),
                block_fstype: g.block_fstype.clone(),
                read_only: g.read_only,
                ..Default::default()
            }),
            stdin: !opts.stdio.stdin.is_empty(),
            stdout: !opts.stdio.stdout.is_empty(),
            stderr: !opts.stdio.stderr.is_empty(),
            terminal: opts.stdio.terminal,
            ..Default::default()
        };
        let created = agent
            .create_container(ctx(config.timeouts.vm_start), &req)
            .await
            .map_err(|e| agent_err("CreateContainer", e));
        let pid = match created {
            Ok(r) => {
                tracing::info!(id = %opts.id, pid = r.pid, "container created in the guest");
                r.pid
            }
            Err(e) => {
                rollback(Some(vm), &prepared, &work_dir).await;
                return Err(e);
            }
        };
        let pumps = stdio::connect(
            vm.transport(),
            spinbox_agent_api::DEFAULT_STDIO_PORT,
            &opts.id,
            "",
            &opts.namespace,
            &opts.stdio,
            config.timeouts.device_detection,
        )
        .await;
        let pumps = match pumps {
            Ok(p) => p,
            Err(e) => {
                rollback(Some(vm), &prepared, &work_dir).await;
                return Err(ContainerError::Stdio(e));
            }
        };
        let (exit_tx, exit) = watch::channel(None);
        Ok(Container {
            id: opts.id,
            bundle: opts.bundle,
            stdio: opts.stdio,
            pid,
            agent,
            vm: tokio::sync::Mutex::new(Some(vm)),
            pumps: Arc::new(tokio::sync::Mutex::new(pumps)),
            rootfs: prepared,
            work_dir,
            status: Mutex::new(Status::Created),
            exit,
            exit_tx: Mutex::new(Some(exit_tx)),
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
            .ok_or_else(|| ContainerError::AlreadyStarted(self.id.clone()))?;
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
        let vm_exit = {
            let vm = self.vm.lock().await;
            vm.as_ref().map(|v| v.exit_watch())
        };
        tokio::spawn(async move {
            let waited = async {
                me.agent
                    .wait_process(ttrpc::context::Context::default(), &process(&me.id))
                    .await
            };
            let vm_died = async {
                match vm_exit {
                    Some(mut rx) => {
                        let _ = rx.wait_for(|s| s.is_some()).await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let info = tokio::select! {
                r = waited => match r {
                    Ok(w) => ExitInfo {
                        status: w.exit_status,
                        at: SystemTime::UNIX_EPOCH + Duration::from_nanos(w.exited_at_unix_nanos),
                    },
                    Err(e) => {
                        tracing::warn!(id = %me.id, error = %e, "WaitProcess failed; treating as VM death");
                        ExitInfo { status: VM_DIED_STATUS, at: SystemTime::now() }
                    }
                },
                _ = vm_died => {
                    tracing::warn!(id = %me.id, "microVM exited under a running container");
                    ExitInfo { status: VM_DIED_STATUS, at: SystemTime::now() }
                }
            };
            tracing::info!(id = %me.id, status = info.status, "process exited");
            // Every byte the process wrote reaches containerd before the exit is published.
            me.pumps
                .lock()
                .await
                .drain_output(me.config.timeouts.io_wait)
                .await;
            me.set_status(Status::Stopped);
            let _ = exit_tx.send(Some(info));
            on_exit(info);
        });
        Ok(resp.pid)
    }

    /// Waits for the exit (of a started process; a never-started one never exits by itself).
    pub async fn wait(&self) -> ExitInfo {
        let mut rx = self.exit.clone();
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

    pub async fn kill(&self, signal: u32, all: bool) -> Result<(), ContainerError> {
        if self.status() == Status::Stopped {
            return Err(ContainerError::NotRunning(self.id.clone()));
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
        self.pumps.lock().await.close_stdin();
        if self.status() == Status::Stopped {
            return Ok(());
        }
        self.agent
            .close_stdin(ctx(self.config.timeouts.qmp_command), &process(&self.id))
            .await
            .map(|_| ())
            .map_err(|e| agent_err("CloseStdin", e))
    }

    /// Tears the container down: guest container, stdio, VM (shutdown ladder), rootfs images.
    /// Idempotent; every step runs even if an earlier one failed; errors are returned.
    pub async fn destroy(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let mut vm = self.vm.lock().await;
        if let Some(vm) = vm.take() {
            if vm.exit_watch().borrow().is_none() {
                if let Err(e) = self
                    .agent
                    .remove_container(ctx(self.config.timeouts.shutdown_grace), &process(&self.id))
                    .await
                {
                    tracing::warn!(id = %self.id, error = %e, "agent RemoveContainer failed");
                }
            }
            self.pumps.lock().await.abort();
            let report = vm.shutdown().await;
            errors.extend(report.cleanup_errors);
        } else {
            self.pumps.lock().await.abort();
        }
        errors.extend(spinbox_storage::release(&self.rootfs.owned));
        match std::fs::remove_dir_all(&self.work_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("removing {}: {e}", self.work_dir.display())),
        }
        if self.status() != Status::Stopped {
            self.set_status(Status::Stopped);
        }
        errors
    }
}

/// Undoes a create that failed after the rootfs was prepared: the VM (if it got that far) is
/// shut down, then the container's images and data directory are removed. Errors are logged:
/// the create's own error is what the caller reports.
async fn rollback(vm: Option<Vm>, prepared: &PreparedRootfs, work_dir: &Path) {
    if let Some(vm) = vm {
        for e in vm.shutdown().await.cleanup_errors {
            tracing::warn!(error = %e, "rollback: VM cleanup");
        }
    }
    for e in spinbox_storage::release(&prepared.owned) {
        tracing::warn!(error = %e, "rollback: releasing rootfs");
    }
    let _ = tokio::fs::remove_dir_all(work_dir).await;
}

/// Reclaims what a dead shim left for `id`: its VM (processes verified by start time, state
/// directory) and the container's data directory. Idempotent.
pub async fn reclaim(config: &Config, id: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if spinbox_vmm::state::validate_id(id).is_err() {
        return vec![format!("refusing to reclaim invalid id {id:?}")];
    }
    let dir = config.paths.state_dir.join(id);
    if let Ok(record) = spinbox_vmm::state::read_record(&dir) {
        for f in &record.files {
            let _ = spinbox_vmm::state::remove_file_if_exists(f);
        }
    }
    match spinbox_vmm::state::reclaim(&dir).await {
        Ok(killed) if !killed.is_empty() => {
            tracing::warn!(id, killed = ?killed, "reclaimed processes of a dead shim")
        }
        Ok(_) => {}
        Err(e) => errors.push(format!("reclaiming {}: {e}", dir.display())),
    }
    let work = work_dir(config, id);
    match std::fs::remove_dir_all(&work) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => errors.push(format!("removing {}: {e}", work.display())),
    }
    errors
}
