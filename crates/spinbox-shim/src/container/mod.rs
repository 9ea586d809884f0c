//! One container in a pod's microVM, in plain Rust types (containerd's protobuf types stay in
//! `service.rs`): its rootfs disks, its stdio, its init process and its execs. The VM, its
//! agent connection and the pod network belong to the [`Sandbox`]; the container that booted
//! the VM owns it, members of the pod share it.
//!
//! - [`create`]: the create phases and their rollback (a failed create leaves no trace).
//! - [`bundle`]: what the shim reads from a bundle, CRI's pod annotations included.
//! - [`error`]: the errors and their ttrpc codes.
//! - [`timeline`]: where a create's time went.
//!
//! Ownership: the exit watcher task owns the wait on the guest process and is the only writer
//! of the exit state; RPC handlers read it through a watch channel.

pub(crate) mod bundle;
mod create;
mod error;
mod kill;
pub(crate) mod sizing;
mod timeline;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use spinbox_agent_api::agent::{FileCopy, ProcessRequest, Share};
use spinbox_config::Config;
use spinbox_storage::{GuestRootfs, MountSpec, PreparedRootfs};
use spinbox_vmm::state::StateDir;
use tokio::sync::watch;

pub use self::bundle::PodRole;
pub(crate) use self::error::agent_err;
pub use self::error::ContainerError;
pub(crate) use self::kill::{answered, arm_kill_watchdog};
use crate::cleanup::{Cleanup, CleanupReport, Phase};
use crate::exec::Exec;
use crate::lifecycle::LifecycleError;
use crate::sandbox::{Fit, Sandbox};
use crate::stdio::{StdioPaths, StdioPumps};

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
pub(crate) const VM_DEATH_DRAIN: Duration = Duration::from_millis(250);

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

/// What a create brings to the container besides its VM: the request, the spec and how the
/// guest assembles the rootfs.
struct Parts {
    opts: CreateOpts,
    spec: Vec<u8>,
    guest: GuestRootfs,
    files: Vec<FileCopy>,
    shares: Vec<Share>,
    work_dir: PathBuf,
    owns_sandbox: bool,
}

pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub stdio: StdioPaths,
    pub pid: u32,
    /// The pod's VM; `owns_sandbox`: this container booted it (and tears it down).
    sandbox: Arc<Sandbox>,
    owns_sandbox: bool,
    namespace: String,
    /// Exec ids: `None` while the exec is being created (the id is taken; the table is not
    /// locked across the agent call).
    execs: tokio::sync::Mutex<HashMap<String, Option<Arc<Exec>>>>,
    paused: AtomicBool,
    pumps: Arc<tokio::sync::Mutex<StdioPumps>>,
    rootfs: PreparedRootfs,
    work_dir: PathBuf,
    status: Mutex<Status>,
    exit: watch::Receiver<Option<ExitInfo>>,
    exit_tx: Mutex<Option<watch::Sender<Option<ExitInfo>>>>,
    /// Set once the guest ran the process (a never-started one has no output to wait for).
    started: AtomicBool,
    /// Set once teardown began.
    tearing_down: AtomicBool,
    /// The last teardown's report; a failed one is retried by the next destroy.
    cleanup: tokio::sync::Mutex<Option<CleanupReport>>,
    config: Config,
}

impl Container {
    fn assemble(
        parts: Parts,
        pid: u32,
        sandbox: Arc<Sandbox>,
        pumps: StdioPumps,
        rootfs: PreparedRootfs,
        config: &Config,
    ) -> Container {
        let (exit_tx, exit) = watch::channel(None);
        Container {
            id: parts.opts.id,
            bundle: parts.opts.bundle,
            stdio: parts.opts.stdio,
            pid,
            sandbox,
            owns_sandbox: parts.owns_sandbox,
            namespace: parts.opts.namespace,
            execs: tokio::sync::Mutex::new(HashMap::new()),
            paused: AtomicBool::new(false),
            pumps: Arc::new(tokio::sync::Mutex::new(pumps)),
            rootfs,
            work_dir: parts.work_dir,
            status: Mutex::new(Status::Created),
            exit,
            exit_tx: Mutex::new(Some(exit_tx)),
            started: AtomicBool::new(false),
            tearing_down: AtomicBool::new(false),
            cleanup: tokio::sync::Mutex::new(None),
            config: config.clone(),
        }
    }

    /// The pod's sandbox this container runs in.
    pub fn sandbox(&self) -> &Arc<Sandbox> {
        &self.sandbox
    }

    /// Whether this container booted its VM (and takes it down on delete).
    pub fn owns_sandbox(&self) -> bool {
        self.owns_sandbox
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
        self.sandbox.state().path()
    }

    fn not_running(&self) -> ContainerError {
        ContainerError::Lifecycle {
            id: self.id.clone(),
            error: LifecycleError::VmNotRunning,
        }
    }

    /// The pod's VM died: a process that never started cannot report, so its exit is the
    /// VM's (a started one's exit watcher sees the death itself). Returns that exit when it
    /// was set here: containerd hears of it from the caller (TaskExit).
    pub fn vm_died_under(&self) -> Option<ExitInfo> {
        self.end_unstarted(VM_DIED_STATUS)
    }

    /// Ends a process that never started with `status`, unless it started (or ended) already.
    fn end_unstarted(&self, status: u32) -> Option<ExitInfo> {
        let tx = self
            .exit_tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        let info = ExitInfo {
            status,
            at: SystemTime::now(),
        };
        self.set_status(Status::Stopped);
        let _ = tx.send(Some(info));
        Some(info)
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
            .sandbox
            .agent()
            .start_process(ctx(self.config.timeouts.agent_call), &process(&self.id))
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
        self.started.store(true, Ordering::Release);
        self.set_status(Status::Running);
        tracing::info!(id = %self.id, pid = resp.pid, "process started");
        let me = Arc::clone(self);
        let mut vm_exit = self.sandbox.exit_watch();
        tokio::spawn(async move {
            let waited = async {
                me.sandbox
                    .agent()
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

    pub async fn pids(&self) -> Result<Vec<u32>, ContainerError> {
        if self.status() == Status::Stopped {
            return Ok(Vec::new());
        }
        self.sandbox
            .agent()
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
        self.sandbox
            .agent()
            .close_stdin(ctx(self.config.timeouts.qmp_command), &process(&self.id))
            .await
            .map(|_| ())
            .map_err(|e| agent_err("CloseStdin", e))
    }

    fn running_vm(&self) -> Result<(), ContainerError> {
        if !self.sandbox.vm_alive() || self.tearing_down.load(Ordering::Acquire) {
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
        {
            let mut execs = self.execs.lock().await;
            if execs.contains_key(exec_id) {
                return Err(ContainerError::ExecExists(exec_id.to_owned()));
            }
            execs.insert(exec_id.to_owned(), None);
        }
        let t = &self.config.timeouts;
        let created = Exec::create(
            Arc::clone(&self.sandbox),
            &self.id,
            exec_id,
            process_json,
            stdio,
            &self.namespace,
            (t.agent_call, t.device_detection, t.io_wait, t.kill),
        )
        .await;
        let mut execs = self.execs.lock().await;
        match created {
            Ok(exec) => {
                let exec = Arc::new(exec);
                execs.insert(exec_id.to_owned(), Some(Arc::clone(&exec)));
                Ok(exec)
            }
            Err(e) => {
                execs.remove(exec_id);
                Err(e)
            }
        }
    }

    pub async fn get_exec(&self, exec_id: &str) -> Result<Arc<Exec>, ContainerError> {
        self.execs
            .lock()
            .await
            .get(exec_id)
            .cloned()
            .flatten()
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
        if self.sandbox.vm_alive() {
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
        self.sandbox
            .agent()
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
            self.sandbox.agent().pause_container(ctx, &req).await
        } else {
            self.sandbox.agent().resume_container(ctx, &req).await
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

    /// New cgroup limits (OCI linux.resources as JSON), applied in the guest. The VM is
    /// resized to the pod's limits with them: grown before limits that need more (vCPUs
    /// hot-plugged, memory plugged, up to the maxima, refused naming them beyond), shrunk
    /// after limits that need less (never below what the guest uses).
    pub async fn update(&self, resources_json: Vec<u8>) -> Result<(), ContainerError> {
        self.running_vm()?;
        let resources: serde_json::Value =
            serde_json::from_slice(&resources_json).map_err(|e| {
                ContainerError::InvalidRequest(format!(
                    "Update of {}: the resources are not OCI LinuxResources JSON: {e}",
                    self.id
                ))
            })?;
        let asked = sizing::resources_limits(&resources);
        let why = format!("Update of {}", self.id);
        let before = self.sandbox.merge_limits(&self.id, asked).await?;
        if let Err(e) = self.sandbox.fit_to_limits(Fit::Grow, &why).await {
            self.sandbox.set_limits(&self.id, Some(before)).await?;
            return Err(e);
        }
        let req = spinbox_agent_api::agent::UpdateContainerRequest {
            container_id: self.id.clone(),
            resources: resources_json,
            ..Default::default()
        };
        let applied = self
            .sandbox
            .agent()
            .update_container(ctx(self.config.timeouts.agent_call), &req)
            .await
            .map(|_| ())
            .map_err(|e| agent_err("UpdateContainer", e));
        if applied.is_err() {
            self.sandbox.set_limits(&self.id, Some(before)).await?;
        }
        // Whatever the guest took, the VM follows the limits now in force.
        if let Err(e) = self.sandbox.fit_to_limits(Fit::Shrink, &why).await {
            tracing::warn!(id = %self.id, error = %e, "the VM was not shrunk after an Update");
        }
        applied
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
        self.sandbox
            .agent()
            .resize_pty(ctx(self.config.timeouts.qmp_command), &req)
            .await
            .map(|_| ())
            .map_err(|e| agent_err("ResizePty", e))
    }

    /// Tears the container down through the cleanup phases: hotplug → io → connections, then
    /// for the VM's owner vm → network → mounts, for a member of a pod its mounts (hot-plugged
    /// disks, images, work directory); the event channel belongs to the shim and closes when
    /// it exits. A pod's owner is torn down after its members (the service orders that).
    /// Runs once when it succeeds: a second or concurrent call waits for the first and gets
    /// its report. A failed teardown is run again by the next call (every phase is
    /// idempotent: what was released is not there to release twice), so containerd can
    /// retry a Delete whose cleanup failed.
    pub async fn destroy(&self) -> CleanupReport {
        let mut done = self.cleanup.lock().await;
        if let Some(report) = done.as_ref().filter(|r| r.ok()) {
            return report.clone();
        }
        let report = self.teardown().await;
        *done = Some(report.clone());
        report
    }

    /// Whether a teardown ran and left something behind (a Delete to retry).
    pub async fn cleanup_failed(&self) -> bool {
        self.cleanup.lock().await.as_ref().is_some_and(|r| !r.ok())
    }

    async fn teardown(&self) -> CleanupReport {
        self.tearing_down.store(true, Ordering::Release);
        // A process that never started is killed with its container (as `runc delete`
        // kills one still in `runc init`).
        self.end_unstarted(VM_DIED_STATUS);
        if self.owns_sandbox {
            self.sandbox.begin_teardown();
        }
        // The owner's process has exited (its members left before it): once its container is
        // removed in the guest, the VM runs nothing, and a prepared guest is quit rather than
        // powered off. A shim shutting down with the process running powers the guest off,
        // which gives its processes SIGTERM and a grace first.
        let idle = self.status() != Status::Running;
        let vm_alive = self.sandbox.vm_alive();
        let mut c = Cleanup::new(&self.id);
        // The VM's resize controllers stop first (a member's share of the VM goes back with
        // its mounts, when it has left the guest).
        c.phase(Phase::Hotplug, async {
            if self.owns_sandbox {
                self.sandbox.stop_controllers().await
            } else {
                Vec::new()
            }
        })
        .await;
        c.phase(Phase::Io, async {
            let execs: Vec<Arc<Exec>> = self
                .execs
                .lock()
                .await
                .values()
                .flatten()
                .cloned()
                .collect();
            for exec in execs {
                exec.abort().await;
            }
            let mut pumps = self.pumps.lock().await;
            pumps.abort_stdin();
            let limit = if vm_alive {
                self.config.timeouts.io_wait
            } else {
                VM_DEATH_DRAIN
            };
            if !self.started.load(Ordering::Acquire)
                || (self.status() == Status::Running && vm_alive)
            {
                // A process that never ran has no output to wait for. Deleting a running
                // container is refused earlier; a shutdown of the shim gets here with one:
                // its output is cut, not waited for.
                pumps.abort();
            } else if !pumps.drain_output(limit).await {
                tracing::warn!(id = %self.id, "output cut off at teardown");
            }
            Vec::new()
        })
        .await;
        c.phase(Phase::Connections, async {
            let mut errors = Vec::new();
            if vm_alive {
                if let Err(e) = self
                    .sandbox
                    .agent()
                    .remove_container(ctx(self.config.timeouts.shutdown_grace), &process(&self.id))
                    .await
                {
                    if self.owns_sandbox {
                        // The VM goes next: a guest that does not answer is not asked again
                        // along the ladder's graceful steps.
                        tracing::warn!(id = %self.id, error = %e, "agent RemoveContainer failed; the VM is forced down");
                        self.sandbox
                            .force_down(&format!("the agent did not remove {}: {e}", self.id))
                            .await;
                    } else {
                        errors.push(format!("agent RemoveContainer: {e}"));
                    }
                }
            }
            // The stdio vsock streams.
            self.pumps.lock().await.abort();
            errors
        })
        .await;
        if self.owns_sandbox {
            c.phase(Phase::Vm, self.sandbox.release_vm(idle)).await;
            c.phase(Phase::Network, self.sandbox.release_network())
                .await;
            let ok = c.ok_so_far();
            c.phase(
                Phase::Mounts,
                release_mounts(
                    Some(&self.rootfs),
                    &self.work_dir,
                    Some(self.sandbox.state()),
                    ok,
                ),
            )
            .await;
        } else {
            c.phase(
                Phase::Mounts,
                create::release_member(&self.sandbox, &self.id, Some(&self.rootfs), &self.work_dir),
            )
            .await;
        }
        if self.status() != Status::Stopped {
            self.set_status(Status::Stopped);
        }
        c.finish()
    }
}

pub(crate) fn ctx(limit: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(i64::try_from(limit.as_nanos()).unwrap_or(i64::MAX))
}

pub(crate) fn process(id: &str) -> ProcessRequest {
    ProcessRequest {
        container_id: id.to_owned(),
        ..Default::default()
    }
}

/// The per-container data directory (writable layer image).
pub fn work_dir(config: &Config, id: &str) -> PathBuf {
    config.paths.data_dir.join("containers").join(id)
}

/// The mounts phase: the container's images and data directory, then (for the VM's owner,
/// `state`) — only when everything before succeeded — the state directory with its record, last, so that whatever could not
/// be released stays recorded for `shim delete` / `spinbox gc`.
pub(crate) async fn release_mounts(
    rootfs: Option<&PreparedRootfs>,
    work_dir: &Path,
    state: Option<&StateDir>,
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
    let Some(state) = state else {
        return errors;
    };
    if earlier_ok && errors.is_empty() {
        if let Err(e) = state.remove().await {
            errors.push(format!("removing {}: {e}", state.path().display()));
        }
    } else {
        tracing::warn!(dir = %state.path().display(), "state record kept: cleanup incomplete");
    }
    errors
}
