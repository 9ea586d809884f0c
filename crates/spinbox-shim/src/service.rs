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
    DeleteRequest, DeleteResponse, Empty, KillRequest, PidsRequest, PidsResponse, ShutdownRequest,
    StartRequest, StartResponse, StateRequest, StateResponse, WaitRequest, WaitResponse,
};
use containerd_shim_protos::events::task::{TaskCreate, TaskDelete, TaskExit, TaskStart};
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{MessageDyn, MessageField};
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::topics;
use containerd_shim_protos::types::task::{ProcessInfo, Status as TaskStatus};
use spinbox_config::Config;
use spinbox_storage::MountSpec;
use tokio::sync::{Mutex, Notify};
use ttrpc::r#async::TtrpcContext;
use ttrpc::{Code, Error as TtrpcError};

use crate::container::{Container, ContainerError, CreateOpts, ExitInfo, Status};
use crate::stdio::StdioPaths;

pub struct TaskService {
    config: Config,
    namespace: String,
    publisher: Arc<RemotePublisher>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// Ids whose Create is in progress: a second Create of the same id is refused.
    creating: Mutex<std::collections::HashSet<String>>,
    exit: Arc<Notify>,
}

fn status(code: Code, msg: impl Into<String>) -> TtrpcError {
    TtrpcError::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn to_ttrpc(e: ContainerError) -> TtrpcError {
    let code = match &e {
        ContainerError::InvalidId { .. } | ContainerError::Bundle { .. } => Code::INVALID_ARGUMENT,
        ContainerError::Unsupported(_) => Code::UNIMPLEMENTED,
        ContainerError::Rootfs(_) | ContainerError::Stdio(_) => Code::INTERNAL,
        ContainerError::Vm(_) => Code::UNAVAILABLE,
        ContainerError::Agent { code, .. } => *code,
        ContainerError::NotRunning(_) => Code::NOT_FOUND,
        ContainerError::AlreadyStarted(_) => Code::FAILED_PRECONDITION,
    };
    status(code, e.to_string())
}

/// A protobuf timestamp for containerd.
pub(crate) fn timestamp(t: SystemTime) -> MessageField<Timestamp> {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    ts.nanos = i32::try_from(d.subsec_nanos()).unwrap_or(0);
    MessageField::some(ts)
}

impl TaskService {
    pub fn new(
        config: Config,
        namespace: String,
        publisher: RemotePublisher,
        exit: Arc<Notify>,
    ) -> Self {
        TaskService {
            config,
            namespace,
            publisher: Arc::new(publisher),
            containers: Mutex::new(HashMap::new()),
            creating: Mutex::new(Default::default()),
            exit,
        }
    }

    async fn get(&self, id: &str, exec_id: &str) -> ttrpc::Result<Arc<Container>> {
        if !exec_id.is_empty() {
            return Err(status(
                Code::UNIMPLEMENTED,
                format!("exec processes are not supported yet (exec id {exec_id:?})"),
            ));
        }
        self.containers
            .lock()
            .await
            .get(id)
            .cloned()
            .ok_or_else(|| status(Code::NOT_FOUND, format!("container {id} not found")))
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        publish_with_retry(
            &self.publisher,
            &self.namespace,
            topic,
            event,
            self.config.timeouts.event_reconnect,
        )
        .await;
    }
}

/// Attempts to hand an event to containerd before it is dropped (and logged).
const PUBLISH_ATTEMPTS: u32 = 3;

/// Publishes an event; when the publisher refuses it (containerd unreachable, queue full),
/// waits `timeouts.event_reconnect` and tries again, a bounded number of times.
async fn publish_with_retry(
    publisher: &RemotePublisher,
    namespace: &str,
    topic: &str,
    event: Box<dyn MessageDyn>,
    retry_after: std::time::Duration,
) {
    let mut last = String::new();
    for attempt in 1..=PUBLISH_ATTEMPTS {
        match publisher
            .publish(
                ttrpc::context::Context::default(),
                topic,
                namespace,
                event.clone_box(),
            )
            .await
        {
            Ok(()) => return,
            Err(e) => {
                last = e.to_string();
                tracing::warn!(topic, attempt, error = %e, "publishing event; retrying");
                tokio::time::sleep(retry_after).await;
            }
        }
    }
    tracing::error!(topic, error = %last, "event dropped after {PUBLISH_ATTEMPTS} attempts");
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> ttrpc::Result<CreateTaskResponse> {
        let id = req.id.clone();
        tracing::info!(id = %id, bundle = %req.bundle, "create");
        if self.containers.lock().await.contains_key(&id)
            || !self.creating.lock().await.insert(id.clone())
        {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("container {id} already exists"),
            ));
        }
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
            namespace: self.namespace.clone(),
        };
        let result = Container::create(opts, &self.config).await;
        self.creating.lock().await.remove(&id);
        let container = result.map_err(|e| {
            tracing::error!(id = %id, error = %e, "create failed");
            to_ttrpc(e)
        })?;
        let pid = container.pid;
        self.containers
            .lock()
            .await
            .insert(id.clone(), Arc::new(container));
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
        self.publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(ev))
            .await;
        let mut resp = CreateTaskResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        let c = self.get(&req.id, &req.exec_id).await?;
        let publisher = Arc::clone(&self.publisher);
        let namespace = self.namespace.clone();
        let retry_after = self.config.timeouts.event_reconnect;
        let id = c.id.clone();
        let pid = c.pid;
        let on_exit = move |info: ExitInfo| {
            let mut ev = TaskExit::new();
            ev.container_id = id.clone();
            ev.id = id;
            ev.pid = pid;
            ev.exit_status = info.status;
            ev.exited_at = timestamp(info.at);
            tokio::spawn(async move {
                publish_with_retry(
                    &publisher,
                    &namespace,
                    topics::TASK_EXIT_EVENT_TOPIC,
                    Box::new(ev),
                    retry_after,
                )
                .await;
            });
        };
        let pid = c.start(on_exit).await.map_err(to_ttrpc)?;
        let mut ev = TaskStart::new();
        ev.container_id = c.id.clone();
        ev.pid = pid;
        self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(ev))
            .await;
        let mut resp = StartResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        let c = self.get(&req.id, &req.exec_id).await?;
        let mut resp = StateResponse::new();
        resp.id = c.id.clone();
        resp.bundle = c.bundle.display().to_string();
        resp.pid = c.pid;
        resp.status = match c.status() {
            Status::Created => TaskStatus::CREATED,
            Status::Running => TaskStatus::RUNNING,
            Status::Stopped => TaskStatus::STOPPED,
        }
        .into();
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
        let c = self.get(&req.id, "").await?;
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
        let c = self.get(&req.id, &req.exec_id).await?;
        tracing::info!(id = %req.id, signal = req.signal, all = req.all, "kill");
        c.kill(req.signal, req.all).await.map_err(to_ttrpc)?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        let c = self.get(&req.id, &req.exec_id).await?;
        let info = c.wait().await;
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
        let c = self.get(&req.id, &req.exec_id).await?;
        if c.status() == Status::Running {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("container {} is running; kill it first", c.id),
            ));
        }
        let errors = c.destroy().await;
        self.containers.lock().await.remove(&c.id);
        if !errors.is_empty() {
            tracing::error!(id = %c.id, errors = ?errors, "delete: cleanup incomplete");
        }
        let info = c.exit_info().unwrap_or(ExitInfo {
            status: 0,
            at: SystemTime::now(),
        });
        let mut ev = TaskDelete::new();
        ev.container_id = c.id.clone();
        ev.id = c.id.clone();
        ev.pid = c.pid;
        ev.exit_status = info.status;
        ev.exited_at = timestamp(info.at);
        self.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(ev))
            .await;
        let mut resp = DeleteResponse::new();
        resp.pid = c.pid;
        resp.exit_status = info.status;
        resp.exited_at = timestamp(info.at);
        Ok(resp)
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> ttrpc::Result<Empty> {
        let c = self.get(&req.id, &req.exec_id).await?;
        if req.stdin {
            c.close_stdin().await.map_err(to_ttrpc)?;
        }
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
        if let Ok(c) = self.get(&req.id, "").await {
            resp.task_pid = c.pid;
        }
        Ok(resp)
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<Empty> {
        let live: Vec<Arc<Container>> = self.containers.lock().await.values().cloned().collect();
        if !live.is_empty() {
            // containerd sends Shutdown after Delete; with containers left it is a no-op,
            // as with runc's shim.
            return Ok(Empty::new());
        }
        tracing::info!("shutdown: no containers left, exiting");
        self.exit.notify_one();
        Ok(Empty::new())
    }
}
