//! The ttrpc `Agent` service.

use std::sync::Arc;

use async_trait::async_trait;
use spinbox_agent_api::agent::{
    CreateContainerRequest, CreateContainerResponse, Empty, ExecProcessRequest,
    GuestResourcesResponse, HealthRequest, HealthResponse, ListPidsResponse, NetworkConfig,
    OnlineCpusRequest, OnlineCpusResponse, OomEvent, PrepareShutdownRequest,
    PrepareShutdownResponse, ProcessRequest, ResizePtyRequest, SignalProcessRequest,
    StartProcessResponse, StatsResponse, UpdateContainerRequest, WaitProcessResponse,
};
use spinbox_agent_api::agent_ttrpc::{create_agent, Agent};
use ttrpc::r#async::{Service, TtrpcContext};

use crate::container::Manager;
use crate::log::{boottime, info, warning};
use crate::shutdown::unmount_data_filesystems;

/// What the agent learned while booting; fixed once it serves.
#[derive(Debug, Clone)]
pub struct BootInfo {
    pub kernel_release: String,
    pub boot_to_ready_ms: u64,
    pub modules_loaded: Vec<String>,
}

pub struct AgentService {
    boot: BootInfo,
    containers: Arc<Manager>,
}

impl AgentService {
    /// The ttrpc service map for `ttrpc::r#async::Server::register_service`.
    pub fn services(
        boot: BootInfo,
        containers: Arc<Manager>,
    ) -> std::collections::HashMap<String, Service> {
        create_agent(Arc::new(AgentService { boot, containers }))
    }
}

#[async_trait]
impl Agent for AgentService {
    async fn health(
        &self,
        _ctx: &TtrpcContext,
        _req: HealthRequest,
    ) -> ttrpc::Result<HealthResponse> {
        Ok(HealthResponse {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            kernel_release: self.boot.kernel_release.clone(),
            boot_to_ready_ms: self.boot.boot_to_ready_ms,
            uptime_ms: millis(boottime()),
            modules_loaded: self.boot.modules_loaded.clone(),
            ..Default::default()
        })
    }

    async fn prepare_shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: PrepareShutdownRequest,
    ) -> ttrpc::Result<PrepareShutdownResponse> {
        let unmounted = tokio::task::spawn_blocking(unmount_data_filesystems)
            .await
            .map_err(|e| {
                warning!("prepare-shutdown task failed: {e}");
                ttrpc::Error::RpcStatus(ttrpc::get_status(
                    ttrpc::Code::INTERNAL,
                    format!("prepare-shutdown task failed: {e}"),
                ))
            })?;
        info!(
            "prepared for shutdown (synced; {} unmounted)",
            unmounted.len()
        );
        Ok(PrepareShutdownResponse {
            unmounted,
            ..Default::default()
        })
    }

    async fn configure_network(
        &self,
        _ctx: &TtrpcContext,
        req: NetworkConfig,
    ) -> ttrpc::Result<Empty> {
        crate::network::configure(&req).await?;
        Ok(Empty::default())
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        let (pid, warnings) = self.containers.create(req).await?;
        Ok(CreateContainerResponse {
            pid,
            warnings,
            ..Default::default()
        })
    }

    async fn start_process(
        &self,
        _ctx: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<StartProcessResponse> {
        let pid = self
            .containers
            .start(&req.container_id, &req.exec_id)
            .await?;
        Ok(StartProcessResponse {
            pid,
            ..Default::default()
        })
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        let exit = self
            .containers
            .wait(&req.container_id, &req.exec_id)
            .await?;
        Ok(WaitProcessResponse {
            exit_status: exit.status,
            exited_at_unix_nanos: exit.at_unix_nanos,
            ..Default::default()
        })
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers
            .signal(&req.container_id, &req.exec_id, req.signal, req.all)?;
        Ok(Empty::default())
    }

    async fn close_stdin(&self, _ctx: &TtrpcContext, req: ProcessRequest) -> ttrpc::Result<Empty> {
        self.containers
            .close_stdin(&req.container_id, &req.exec_id)?;
        Ok(Empty::default())
    }

    async fn list_pids(
        &self,
        _ctx: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<ListPidsResponse> {
        let pids = self.containers.list_pids(&req.container_id, &req.exec_id)?;
        Ok(ListPidsResponse {
            pids,
            ..Default::default()
        })
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers
            .remove(&req.container_id, &req.exec_id)
            .await?;
        Ok(Empty::default())
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers.exec(req).await?;
        Ok(Empty::default())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        self.containers
            .resize_pty(&req.container_id, &req.exec_id, req.width, req.height)?;
        Ok(Empty::default())
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<StatsResponse> {
        let files = self.containers.stats(&req.container_id).await?;
        Ok(StatsResponse {
            files,
            ..Default::default()
        })
    }

    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers.pause(&req.container_id).await?;
        Ok(Empty::default())
    }

    async fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers.resume(&req.container_id).await?;
        Ok(Empty::default())
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers
            .update(&req.container_id, &req.resources)
            .await?;
        Ok(Empty::default())
    }

    async fn online_cpus(
        &self,
        _ctx: &TtrpcContext,
        req: OnlineCpusRequest,
    ) -> ttrpc::Result<OnlineCpusResponse> {
        let failed = |e: String| {
            ttrpc::Error::from(crate::container::RpcError::new(
                ttrpc::Code::INTERNAL,
                format!("setting the online CPUs to {}: {e}", req.want),
            ))
        };
        let want = req.want;
        let online = tokio::task::spawn_blocking(move || crate::cpus::set_online(want))
            .await
            .map_err(|e| failed(e.to_string()))?
            .map_err(|e| failed(e.to_string()))?;
        Ok(OnlineCpusResponse {
            online,
            ..Default::default()
        })
    }

    async fn guest_resources(
        &self,
        _ctx: &TtrpcContext,
        _req: Empty,
    ) -> ttrpc::Result<GuestResourcesResponse> {
        let failed = |e: String| {
            ttrpc::Error::from(crate::container::RpcError::new(
                ttrpc::Code::INTERNAL,
                format!("reading the guest's resources: {e}"),
            ))
        };
        tokio::task::spawn_blocking(crate::resources::read)
            .await
            .map_err(|e| failed(e.to_string()))?
            .map_err(|e| failed(e.to_string()))
    }

    async fn get_oom_event(&self, _ctx: &TtrpcContext, _req: Empty) -> ttrpc::Result<OomEvent> {
        let container_id = self.containers.next_oom_event().await?;
        Ok(OomEvent {
            container_id,
            ..Default::default()
        })
    }
}

pub fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `uname -r`.
pub fn kernel_release() -> String {
    // SAFETY: utsname is plain old data; uname(2) fills it with NUL-terminated strings.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return String::new();
    }
    // SAFETY: the kernel NUL-terminates `release` within its bounds (and zeroed() backs that up).
    unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}
