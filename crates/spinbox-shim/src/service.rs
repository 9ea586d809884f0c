//! The containerd task service (`containerd.task.v2.Task`): containerd's protobuf types are
//! converted here, at the edge, and everything inside works on plain Rust types.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim_protos::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest, PauseRequest,
    PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest,
    StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse, UpdateTaskRequest,
    WaitRequest, WaitResponse,
};
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::topics;
use containerd_shim_protos::types::task::{ProcessInfo, Status as TaskStatus};
use spinbox_config::Config;
use spinbox_storage::MountSpec;
use tokio::sync::{Mutex, Notify};
use ttrpc::r#async::TtrpcContext;
use ttrpc::{Code, Error as TtrpcError};

use crate::cleanup::{Cleanup, Phase};
use crate::container::{Container, ContainerError, CreateOpts, ExitInfo, Status};
use crate::events::{self, Events};
use crate::lifecycle::{Lifecycle, LifecycleError, State};
use crate::metrics;
use crate::sandbox::Sandbox;
use crate::stdio::StdioPaths;

/// The task service; the state it shares with the tasks it spawns (exit watchers, the VM
/// death monitor, the signal handler) lives in [`Shared`].
pub struct TaskService {
    shared: Arc<Shared>,
}

pub struct Shared {
    config: Config,
    namespace: String,
    events: Events,
    /// The shim's state machine: the pod's (its sandbox's VM), not each container's.
    lifecycle: Lifecycle,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// The pod's VM, once its first container booted it.
    sandbox: Mutex<Option<Arc<Sandbox>>>,
    /// Serialises creates: a member joins only a fully created sandbox.
    creating: Mutex<()>,
    exit: Arc<Notify>,
}

fn status(code: Code, msg: impl Into<String>) -> TtrpcError {
    TtrpcError::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn to_ttrpc(e: ContainerError) -> TtrpcError {
    status(e.code(), e.to_string())
}

fn lifecycle_err(id: &str, e: LifecycleError) -> TtrpcError {
    status(e.code(), format!("container {id}: {e}"))
}

/// A protobuf timestamp for containerd.
pub(crate) fn timestamp(t: SystemTime) -> MessageField<Timestamp> {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    ts.nanos = i32::try_from(d.subsec_nanos()).unwrap_or(0);
    MessageField::some(ts)
}

/// File in the bundle naming the container's state directory, for `shim delete` after a
/// crash (the bundle is the only thing containerd hands it).
pub const STATE_POINTER_FILE: &str = "spinbox-state";

/// The config a Create runs with: the runtime options' `ConfigPath` (containerd's
/// `runtimeoptions.v1.Options`, set by `ctr run --runtime-config-path` or a CRI runtime
/// handler's `options.ConfigPath`) when given, else the shim's own.
fn config_for(options: &MessageField<Any>, default: &Config) -> Result<Config, TtrpcError> {
    let Some(any) = options.as_ref() else {
        return Ok(default.clone());
    };
    if !any.type_url.ends_with("runtimeoptions.v1.Options") {
        return Err(status(
            Code::INVALID_ARGUMENT,
            format!(
                "runtime options of type {:?} are not understood (spinbox takes runtimeoptions.v1.Options with ConfigPath)",
                any.type_url
            ),
        ));
    }
    let path = crate::runtime_options::config_path(&any.value).map_err(|e| {
        status(
            Code::INVALID_ARGUMENT,
            format!("runtime options: not a valid runtimeoptions.v1.Options: {e}"),
        )
    })?;
    match path {
        Some(p) if !p.is_empty() => Config::from_file(std::path::Path::new(&p)).map_err(|e| {
            status(
                Code::INVALID_ARGUMENT,
                format!("runtime options ConfigPath: {e}"),
            )
        }),
        _ => Ok(default.clone()),
    }
}

impl TaskService {
    pub fn new(
        config: Config,
        namespace: String,
        publisher: RemotePublisher,
        exit: Arc<Notify>,
    ) -> Self {
        let events = Events::new(
            publisher,
            namespace.clone(),
            config.timeouts.event_reconnect,
        );
        TaskService {
            shared: Arc::new(Shared {
                config,
                namespace,
                events,
                lifecycle: Lifecycle::default(),
                containers: Mutex::new(HashMap::new()),
                sandbox: Mutex::new(None),
                creating: Mutex::new(()),
                exit,
            }),
        }
    }

    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    async fn get(&self, id: &str) -> ttrpc::Result<Arc<Container>> {
        self.shared
            .containers
            .lock()
            .await
            .get(id)
            .cloned()
            .ok_or_else(|| status(Code::NOT_FOUND, format!("container {id} not found")))
    }
}

impl Shared {
    /// TaskExit of a process: the init (`id` = the container id) or an exec (`id` = its exec id).
    fn publish_exit(&self, container_id: String, id: String, pid: u32, info: ExitInfo) {
        let mut ev = TaskExit::new();
        ev.container_id = container_id;
        ev.id = id;
        ev.pid = pid;
        ev.exit_status = info.status;
        ev.exited_at = timestamp(info.at);
        self.events
            .publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(ev));
    }

    /// VM death: every container's exit is the VM's; TaskExit goes out for each started
    /// process as soon as its exit watcher has what reached the host, then the shim shuts
    /// down and cleans up (containerd's Delete afterwards gets the same result).
    async fn on_vm_death(self: Arc<Self>, sandbox: Arc<Sandbox>) {
        self.lifecycle.begin_shutdown();
        let live = self.teardown_order().await;
        for c in &live {
            // A process that never started exits with the VM too (TaskExit, as for a
            // started one, whose exit watcher publishes its own).
            if let Some(info) = c.vm_died_under() {
                self.publish_exit(c.id.clone(), c.id.clone(), c.pid, info);
            }
        }
        for c in live {
            let info = c.wait().await;
            tracing::warn!(id = %c.id, sandbox = %sandbox.id, status = info.status, "cleaning up after VM death");
            c.destroy().await;
        }
    }

    /// `spinbox stop` (SIGUSR1): reads what it asked from the sandbox's state directory
    /// (`stop-request.json`, removed once read; none: a graceful stop) and stops the VM.
    pub async fn stop_requested(&self) {
        let Some(sandbox) = self.sandbox.lock().await.clone() else {
            tracing::warn!("SIGUSR1 (spinbox stop) with no VM to stop");
            return;
        };
        let path = sandbox
            .state()
            .path()
            .join(spinbox_vmm::state::STOP_REQUEST_FILE);
        let request = match tokio::fs::read(&path).await {
            Ok(bytes) => {
                if let Err(e) = tokio::fs::remove_file(&path).await {
                    tracing::warn!(path = %path.display(), error = %e, "removing the stop request");
                }
                serde_json::from_slice::<spinbox_vmm::state::StopRequest>(&bytes)
                    .map_err(|e| tracing::warn!(path = %path.display(), error = %e, "an unreadable stop request: stopping gracefully"))
                    .ok()
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "SIGUSR1 without a stop request: stopping gracefully");
                None
            }
        };
        let request = request.unwrap_or(spinbox_vmm::state::StopRequest {
            force: false,
            why: "SIGUSR1".into(),
            grace_ms: None,
        });
        sandbox
            .stop_vm(
                request.force,
                request.grace_ms.map(std::time::Duration::from_millis),
                &request.why,
            )
            .await;
    }

    /// The containers in the order a pod comes down: members first, the VM's owner last.
    async fn teardown_order(&self) -> Vec<Arc<Container>> {
        let mut live: Vec<Arc<Container>> =
            self.containers.lock().await.values().cloned().collect();
        live.sort_by_key(|c| c.owns_sandbox());
        live
    }

    /// Shim shutdown (Shutdown RPC with nothing left, or SIGTERM): every container torn down,
    /// members before the VM's owner, then the event channel closed, last.
    pub async fn shutdown_all(&self, why: &str) {
        self.lifecycle.begin_shutdown();
        let live = self.teardown_order().await;
        if !live.is_empty() {
            tracing::warn!(
                why,
                containers = live.len(),
                "shim shutting down with containers"
            );
        }
        for c in live {
            c.destroy().await;
        }
        // The containers' phases ran in their own cleanups; the event channel is the shim's
        // and closes last, once every queued event (TaskExit, TaskDelete) had its chance.
        let limit = events::close_limit(self.config.timeouts.event_reconnect);
        let mut c = Cleanup::new("shim");
        c.phase(Phase::Events, self.events.close(limit)).await;
        c.finish();
        self.exit.notify_one();
    }
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> ttrpc::Result<CreateTaskResponse> {
        let id = req.id.clone();
        let sh = &self.shared;
        tracing::info!(id = %id, bundle = %req.bundle, "create");
        // One create at a time: a pod's member joins only a sandbox that finished creating.
        let _one = sh.creating.lock().await;
        let sandbox = sh.sandbox.lock().await.clone();
        // The first container boots the VM (Idle → Creating → Running); members of its pod
        // join while it runs, without a transition of their own.
        let joining = sandbox.is_some();
        let config = match &sandbox {
            Some(s) => {
                let refused = match sh.lifecycle.get() {
                    State::Running => None,
                    State::Deleting => Some(LifecycleError::DeletionInProgress),
                    State::ShuttingDown => Some(LifecycleError::ShutdownInProgress),
                    _ => Some(LifecycleError::VmNotRunning),
                };
                if let Some(e) = refused {
                    return Err(lifecycle_err(&id, e));
                }
                s.config().clone()
            }
            None => {
                let config = config_for(&req.options, &sh.config)?;
                sh.lifecycle
                    .transition(State::Idle, State::Creating)
                    .map_err(|e| lifecycle_err(&id, e))?;
                config
            }
        };
        let back_to_idle = || {
            if !joining {
                let _ = sh.lifecycle.transition(State::Creating, State::Idle);
            }
        };
        let opts = CreateOpts {
            id: id.clone(),
            bundle: PathBuf::from(&req.bundle),
            rootfs: req
                .rootfs
                .iter()
                .map(|m| MountSpec {
                    kind: m.type_.clone(),
                    source: m.source.clone(),
                    options: m.options.clone(),
                })
                .collect(),
            stdio: StdioPaths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            },
            namespace: sh.namespace.clone(),
        };
        // Where `shim delete` finds the record if this shim dies: a member's is its pod's.
        let pointer = PathBuf::from(&req.bundle).join(STATE_POINTER_FILE);
        let state_dir = match &sandbox {
            Some(s) => s.state().path().to_owned(),
            None => config.paths.state_dir.join(&id),
        };
        if let Err(e) = tokio::fs::write(&pointer, state_dir.as_os_str().as_encoded_bytes()).await {
            back_to_idle();
            return Err(status(
                Code::INTERNAL,
                format!("writing {}: {e}", pointer.display()),
            ));
        }
        let container = match Container::create(opts, &config, sandbox).await {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::error!(id = %id, error = %e, "create failed");
                back_to_idle();
                return Err(to_ttrpc(e));
            }
        };
        if !joining {
            if let Err(e) = sh.lifecycle.transition(State::Creating, State::Running) {
                // The shim began shutting down while this create ran (SIGTERM).
                container.destroy().await;
                return Err(lifecycle_err(&id, e));
            }
        }
        let pid = container.pid;
        sh.containers
            .lock()
            .await
            .insert(id.clone(), Arc::clone(&container));
        if container.owns_sandbox() {
            let sandbox = Arc::clone(container.sandbox());
            *sh.sandbox.lock().await = Some(Arc::clone(&sandbox));
            // OOM kills in the guest become TaskOOM of the container whose cgroup saw them.
            let oom_events = Arc::clone(sh);
            sandbox.watch_oom(move |container_id| {
                let shared = Arc::clone(&oom_events);
                tokio::spawn(async move {
                    if !shared.containers.lock().await.contains_key(&container_id) {
                        tracing::warn!(other = %container_id, "OOM event for a container this shim does not hold");
                        return;
                    }
                    tracing::warn!(id = %container_id, "OOM kill in the container");
                    let mut ev = TaskOOM::new();
                    ev.container_id = container_id;
                    shared
                        .events
                        .publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(ev));
                });
            });
            // VM death, whenever it comes, ends in TaskExit and a cleanup of the whole pod.
            let monitor = Arc::clone(sh);
            tokio::spawn(async move {
                sandbox.vm_died().await;
                monitor.on_vm_death(sandbox).await;
            });
        }
        let mut ev = TaskCreate::new();
        ev.container_id = id.clone();
        ev.bundle = req.bundle.clone();
        ev.rootfs = req.rootfs.clone();
        let mut io = containerd_shim_protos::events::task::TaskIO::new();
        io.stdin = req.stdin;
        io.stdout = req.stdout;
        io.stderr = req.stderr;
        io.terminal = req.terminal;
        ev.io = MessageField::some(io);
        ev.pid = pid;
        sh.events
            .publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(ev));
        let mut resp = CreateTaskResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        let c = self.get(&req.id).await?;
        if !req.exec_id.is_empty() {
            let exec = c.get_exec(&req.exec_id).await.map_err(to_ttrpc)?;
            let shared = Arc::clone(&self.shared);
            let (id, exec_id) = (c.id.clone(), req.exec_id.clone());
            let on_exit =
                move |pid: u32, info: ExitInfo| shared.publish_exit(id, exec_id, pid, info);
            let pid = exec.start(on_exit).await.map_err(to_ttrpc)?;
            let mut ev = TaskExecStarted::new();
            ev.container_id = c.id.clone();
            ev.exec_id = req.exec_id.clone();
            ev.pid = pid;
            self.shared
                .events
                .publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(ev));
            let mut resp = StartResponse::new();
            resp.pid = pid;
            return Ok(resp);
        }
        let shared = Arc::clone(&self.shared);
        let id = c.id.clone();
        let pid = c.pid;
        let on_exit = move |info: ExitInfo| shared.publish_exit(id.clone(), id, pid, info);
        let pid = c.start(on_exit).await.map_err(to_ttrpc)?;
        let mut ev = TaskStart::new();
        ev.container_id = c.id.clone();
        ev.pid = pid;
        self.shared
            .events
            .publish(topics::TASK_START_EVENT_TOPIC, Box::new(ev));
        let mut resp = StartResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        let c = self.get(&req.id).await?;
        if !req.exec_id.is_empty() {
            let exec = c.get_exec(&req.exec_id).await.map_err(to_ttrpc)?;
            let (st, pid) = exec.status();
            let mut resp = StateResponse::new();
            resp.id = req.exec_id.clone();
            resp.bundle = c.bundle.display().to_string();
            resp.pid = pid;
            resp.status = task_status(st, false).into();
            resp.stdin = exec.stdio.stdin.clone();
            resp.stdout = exec.stdio.stdout.clone();
            resp.stderr = exec.stdio.stderr.clone();
            resp.terminal = exec.stdio.terminal;
            resp.exec_id = req.exec_id.clone();
            if let Some(info) = exec.exit_info() {
                resp.exit_status = info.status;
                resp.exited_at = timestamp(info.at);
            }
            return Ok(resp);
        }
        let mut resp = StateResponse::new();
        resp.id = c.id.clone();
        resp.bundle = c.bundle.display().to_string();
        resp.pid = c.pid;
        resp.status = task_status(c.status(), c.is_paused()).into();
        resp.stdin = c.stdio.stdin.clone();
        resp.stdout = c.stdio.stdout.clone();
        resp.stderr = c.stdio.stderr.clone();
        resp.terminal = c.stdio.terminal;
        if let Some(info) = c.exit_info() {
            resp.exit_status = info.status;
            resp.exited_at = timestamp(info.at);
        }
        Ok(resp)
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> ttrpc::Result<PidsResponse> {
        let c = self.get(&req.id).await?;
        let pids = c.pids().await.map_err(to_ttrpc)?;
        let mut resp = PidsResponse::new();
        resp.processes = pids
            .into_iter()
            .map(|pid| {
                let mut p = ProcessInfo::new();
                p.pid = pid;
                p
            })
            .collect();
        Ok(resp)
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        let c = self.get(&req.id).await?;
        tracing::info!(id = %req.id, exec = %req.exec_id, signal = req.signal, all = req.all, "kill");
        if !req.exec_id.is_empty() {
            let exec = c.get_exec(&req.exec_id).await.map_err(to_ttrpc)?;
            exec.kill(req.signal).await.map_err(to_ttrpc)?;
            return Ok(Empty::new());
        }
        if let Some(info) = c.kill(req.signal, req.all).await.map_err(to_ttrpc)? {
            // A created process that never started ended here: its exit is published now.
            self.shared
                .publish_exit(c.id.clone(), c.id.clone(), c.pid, info);
        }
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        let c = self.get(&req.id).await?;
        let info = if req.exec_id.is_empty() {
            c.wait().await
        } else {
            c.get_exec(&req.exec_id)
                .await
                .map_err(to_ttrpc)?
                .wait()
                .await
        };
        let mut resp = WaitResponse::new();
        resp.exit_status = info.status;
        resp.exited_at = timestamp(info.at);
        Ok(resp)
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: DeleteRequest,
    ) -> ttrpc::Result<DeleteResponse> {
        let c = self.get(&req.id).await?;
        let sh = &self.shared;
        if !req.exec_id.is_empty() {
            // An exec's delete: the guest forgets it; no TaskDelete (as with runc's shim).
            let exec = c.remove_exec(&req.exec_id).await.map_err(to_ttrpc)?;
            let (_, pid) = exec.status();
            let info = exec.exit_info().unwrap_or(ExitInfo {
                status: 0,
                at: SystemTime::now(),
            });
            let mut resp = DeleteResponse::new();
            resp.pid = pid;
            resp.exit_status = info.status;
            resp.exited_at = timestamp(info.at);
            return Ok(resp);
        }
        if c.status() == Status::Running {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("container {} is running; kill it first", c.id),
            ));
        }
        let retry = c.cleanup_failed().await;
        let report = if retry {
            // A Delete whose cleanup failed, again: the teardown runs once more; the
            // container stays known until it succeeds.
            tracing::info!(id = %c.id, "delete retried after an incomplete cleanup");
            c.destroy().await
        } else if c.owns_sandbox() {
            // The pod comes down: its members first (CRI removes them before the sandbox;
            // anything left goes now), then the VM with its owner.
            // After a VM death the shim is already shutting down and cleaning up: Delete
            // waits for that cleanup and reports it.
            let deleting = match sh.lifecycle.transition(State::Running, State::Deleting) {
                Ok(()) => true,
                Err(LifecycleError::ShutdownInProgress) => false,
                Err(e) => return Err(lifecycle_err(&c.id, e)),
            };
            let members: Vec<Arc<Container>> = sh
                .containers
                .lock()
                .await
                .values()
                .filter(|m| !m.owns_sandbox())
                .cloned()
                .collect();
            for m in members {
                tracing::warn!(id = %m.id, sandbox = %c.id, "member still present when its sandbox is deleted: tearing it down");
                m.destroy().await;
                sh.containers.lock().await.remove(&m.id);
            }
            let report = c.destroy().await;
            *sh.sandbox.lock().await = None;
            if deleting {
                let _ = sh.lifecycle.transition(State::Deleting, State::Idle);
            }
            report
        } else {
            c.destroy().await
        };
        if !report.ok() {
            // The container stays known: containerd's retry of the Delete runs the cleanup
            // again (see Container::destroy).
            let phases: Vec<&str> = report.failed_phases().iter().map(|p| p.as_str()).collect();
            return Err(lifecycle_err(
                &c.id,
                LifecycleError::CleanupIncomplete(format!(
                    "phases {} failed: {} (what remains is recorded in {} for `spinbox gc`; a retried delete runs the cleanup again)",
                    phases.join(","),
                    report.summary(),
                    c.state_dir().display()
                )),
            ));
        }
        sh.containers.lock().await.remove(&c.id);
        // The exit the process had: its own, the VM's, or the kill of a never-started one
        // at teardown (137).
        let info = c.exit_info().unwrap_or(ExitInfo {
            status: crate::container::VM_DIED_STATUS,
            at: SystemTime::now(),
        });
        let mut ev = TaskDelete::new();
        ev.container_id = c.id.clone();
        ev.id = c.id.clone();
        ev.pid = c.pid;
        ev.exit_status = info.status;
        ev.exited_at = timestamp(info.at);
        sh.events
            .publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(ev));
        let mut resp = DeleteResponse::new();
        resp.pid = c.pid;
        resp.exit_status = info.status;
        resp.exited_at = timestamp(info.at);
        Ok(resp)
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> ttrpc::Result<Empty> {
        let c = self.get(&req.id).await?;
        if req.stdin {
            if req.exec_id.is_empty() {
                c.close_stdin().await.map_err(to_ttrpc)?;
            } else {
                let exec = c.get_exec(&req.exec_id).await.map_err(to_ttrpc)?;
                exec.close_stdin().await.map_err(to_ttrpc)?;
            }
        }
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        let c = self.get(&req.id).await?;
        let spec = req.spec.as_ref().ok_or_else(|| {
            status(
                Code::INVALID_ARGUMENT,
                format!("exec {:?}: no process spec", req.exec_id),
            )
        })?;
        tracing::info!(id = %req.id, exec = %req.exec_id, "exec");
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        c.exec(&req.exec_id, spec.value.clone(), stdio)
            .await
            .map_err(to_ttrpc)?;
        let mut ev = TaskExecAdded::new();
        ev.container_id = c.id.clone();
        ev.exec_id = req.exec_id.clone();
        self.shared
            .events
            .publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(ev));
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        let c = self.get(&req.id).await?;
        if req.exec_id.is_empty() {
            c.resize_pty(req.width, req.height).await
        } else {
            let exec = c.get_exec(&req.exec_id).await.map_err(to_ttrpc)?;
            exec.resize(req.width, req.height).await
        }
        .map_err(to_ttrpc)?;
        Ok(Empty::new())
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> ttrpc::Result<StatsResponse> {
        let c = self.get(&req.id).await?;
        let files = c.stats().await.map_err(to_ttrpc)?;
        let any = metrics::to_any(&metrics::from_files(&files))
            .map_err(|e| status(Code::INTERNAL, format!("encoding metrics: {e}")))?;
        let mut resp = StatsResponse::new();
        resp.stats = MessageField::some(any);
        Ok(resp)
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> ttrpc::Result<Empty> {
        let c = self.get(&req.id).await?;
        c.set_frozen(true).await.map_err(to_ttrpc)?;
        let mut ev = TaskPaused::new();
        ev.container_id = c.id.clone();
        self.shared
            .events
            .publish(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(ev));
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> ttrpc::Result<Empty> {
        let c = self.get(&req.id).await?;
        c.set_frozen(false).await.map_err(to_ttrpc)?;
        let mut ev = TaskResumed::new();
        ev.container_id = c.id.clone();
        self.shared
            .events
            .publish(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(ev));
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> ttrpc::Result<Empty> {
        let c = self.get(&req.id).await?;
        let resources = req
            .resources
            .as_ref()
            .ok_or_else(|| status(Code::INVALID_ARGUMENT, "update: no resources given"))?;
        c.update(resources.value.clone()).await.map_err(to_ttrpc)?;
        Ok(Empty::new())
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> ttrpc::Result<ConnectResponse> {
        let mut resp = ConnectResponse::new();
        resp.shim_pid = std::process::id();
        resp.version = env!("CARGO_PKG_VERSION").to_owned();
        if let Ok(c) = self.get(&req.id).await {
            resp.task_pid = c.pid;
        }
        Ok(resp)
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<Empty> {
        if !self.shared.containers.lock().await.is_empty() {
            // containerd sends Shutdown after Delete; with containers left it is a no-op,
            // as with runc's shim.
            return Ok(Empty::new());
        }
        tracing::info!(state = %self.shared.lifecycle.get(), "shutdown: no containers left, exiting");
        let shared = Arc::clone(&self.shared);
        // The reply goes out first; the events phase and the exit follow.
        tokio::spawn(async move { shared.shutdown_all("Shutdown RPC").await });
        Ok(Empty::new())
    }
}

fn task_status(s: Status, paused: bool) -> TaskStatus {
    match s {
        Status::Created => TaskStatus::CREATED,
        Status::Running if paused => TaskStatus::PAUSED,
        Status::Running => TaskStatus::RUNNING,
        Status::Stopped => TaskStatus::STOPPED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_runtime_options_are_refused_naming_the_type() {
        let mut any = Any::new();
        any.type_url = "containerd.runc.v1.Options".into();
        let e = config_for(&MessageField::some(any), &Config::default()).unwrap_err();
        assert!(e.to_string().contains("containerd.runc.v1.Options"), "{e}");
        assert!(config_for(&MessageField::none(), &Config::default()).is_ok());
    }
}
