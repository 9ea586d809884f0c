//! Driving the private containerd's CRI plugin (what kubelet talks to) over its unix socket,
//! with the `k8s-cri` crate's tonic clients for `runtime.v1`.
//!
//! `make test` starts the suite's containerd with CRI on (deploy/private-containerd.sh with
//! `SPINBOX_CRI_CNI_CONF_DIR`), a CNI network of the suite's own (bridge `spbcri0`,
//! 10.87.251.0/24) and the pause and busybox images imported into the `k8s.io` namespace, and
//! passes the socket in `$SPINBOX_CRI_ADDRESS` and the CNI plugin's host-local dataDir in
//! `$SPINBOX_CRI_IPAM_DIR`.
//!
//! Every call has a deadline. A [`Pod`] stops and removes its sandbox when dropped unless the
//! test did so itself, so a failed assertion does not leave a pod (or its VM) running.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
pub use k8s_cri::v1 as api;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

pub use crate::ctr::IMAGE;

/// How long one CRI call may take. A RunPodSandbox or CreateContainer of spinbox boots or
/// grows a VM under TCG (seconds); a minute is far beyond any healthy call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A CRI call that failed or did not answer in time.
#[derive(Debug)]
pub enum CriError {
    Connect(String),
    Status {
        call: &'static str,
        status: tonic::Status,
    },
    Timeout {
        call: &'static str,
        after: Duration,
    },
}

impl std::fmt::Display for CriError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CriError::Connect(e) => write!(f, "connecting to the CRI socket: {e}"),
            CriError::Status { call, status } => {
                write!(f, "{call}: {:?}: {}", status.code(), status.message())
            }
            CriError::Timeout { call, after } => write!(f, "{call}: no answer in {after:?}"),
        }
    }
}

impl std::error::Error for CriError {}

pub type Result<T> = std::result::Result<T, CriError>;

/// The suite's CRI endpoint and the places its leak checks look at.
#[derive(Clone, Debug)]
pub struct CriEnv {
    /// containerd's unix socket (CRI is served on it).
    pub address: PathBuf,
    /// The host-local dataDir of the suite's CRI network.
    pub ipam_dir: PathBuf,
    /// spinbox's state root (`$SPINBOX_E2E_ROOT`): state/, log/, data/, ipam/ below it.
    pub spinbox_root: PathBuf,
}

impl CriEnv {
    /// `None` (after saying why) when the suite runs without a CRI-enabled containerd; a
    /// panic instead when `SPINBOX_REQUIRE_VM` is set.
    pub fn from_env() -> Option<CriEnv> {
        let var = |name: &str| std::env::var_os(name).map(PathBuf::from);
        match (
            var("SPINBOX_CRI_ADDRESS"),
            var("SPINBOX_CRI_IPAM_DIR"),
            var("SPINBOX_E2E_ROOT"),
        ) {
            (Some(address), Some(ipam_dir), Some(spinbox_root)) => Some(CriEnv {
                address,
                ipam_dir,
                spinbox_root,
            }),
            _ => {
                let why = "no CRI-enabled private containerd (SPINBOX_CRI_ADDRESS, \
                           SPINBOX_CRI_IPAM_DIR, SPINBOX_E2E_ROOT; run through `make test`)";
                if std::env::var_os("SPINBOX_REQUIRE_VM").is_some() {
                    panic!("{why}");
                }
                eprintln!("skipped: {why}");
                None
            }
        }
    }
}

/// Runs `fut` under `CALL_TIMEOUT`, naming `call` in the error.
async fn deadline<T>(
    call: &'static str,
    fut: impl Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(Ok(resp)) => Ok(resp.into_inner()),
        Ok(Err(status)) => Err(CriError::Status { call, status }),
        Err(_) => Err(CriError::Timeout {
            call,
            after: CALL_TIMEOUT,
        }),
    }
}

/// A connection to the CRI runtime service.
#[derive(Clone)]
pub struct Cri {
    rt: RuntimeServiceClient<Channel>,
    address: PathBuf,
}

impl Cri {
    /// Connects to the CRI plugin on containerd's unix socket `address`.
    pub async fn connect(address: &Path) -> Result<Cri> {
        let path = address.to_path_buf();
        // The URI is a placeholder: the connector ignores it and dials the socket.
        let endpoint =
            Endpoint::from_static("http://[::]:50051").connect_timeout(Duration::from_secs(5));
        let connect = endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }));
        let channel = tokio::time::timeout(Duration::from_secs(10), connect)
            .await
            .map_err(|_| CriError::Connect(format!("{}: no answer in 10 s", address.display())))?
            .map_err(|e| CriError::Connect(format!("{}: {e}", address.display())))?;
        Ok(Cri {
            rt: RuntimeServiceClient::new(channel),
            address: address.to_path_buf(),
        })
    }

    /// RunPodSandbox with `handler` (a runtime name in containerd's CRI config): the pod,
    /// which stops and removes itself when dropped.
    pub async fn run_pod(&mut self, config: api::PodSandboxConfig, handler: &str) -> Result<Pod> {
        let id = deadline(
            "RunPodSandbox",
            self.rt.run_pod_sandbox(api::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.to_string(),
            }),
        )
        .await?
        .pod_sandbox_id;
        Ok(Pod {
            id,
            config,
            address: self.address.clone(),
            removed: false,
        })
    }

    pub async fn stop_pod(&mut self, id: &str) -> Result<()> {
        deadline(
            "StopPodSandbox",
            self.rt.stop_pod_sandbox(api::StopPodSandboxRequest {
                pod_sandbox_id: id.to_string(),
            }),
        )
        .await
        .map(drop)
    }

    pub async fn remove_pod(&mut self, id: &str) -> Result<()> {
        deadline(
            "RemovePodSandbox",
            self.rt.remove_pod_sandbox(api::RemovePodSandboxRequest {
                pod_sandbox_id: id.to_string(),
            }),
        )
        .await
        .map(drop)
    }

    /// PodSandboxStatus, verbose (containerd's `info` map holds the runtime spec).
    pub async fn pod_status(&mut self, id: &str) -> Result<api::PodSandboxStatusResponse> {
        deadline(
            "PodSandboxStatus",
            self.rt.pod_sandbox_status(api::PodSandboxStatusRequest {
                pod_sandbox_id: id.to_string(),
                verbose: true,
            }),
        )
        .await
    }

    /// The pod's IP from PodSandboxStatus.
    pub async fn pod_ip(&mut self, id: &str) -> Result<String> {
        let status = self.pod_status(id).await?;
        Ok(status
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap_or_default())
    }

    /// Pods containerd knows with this id (empty once removed).
    pub async fn list_pods(&mut self, id: &str) -> Result<Vec<api::PodSandbox>> {
        deadline(
            "ListPodSandbox",
            self.rt.list_pod_sandbox(api::ListPodSandboxRequest {
                filter: Some(api::PodSandboxFilter {
                    id: id.to_string(),
                    ..Default::default()
                }),
            }),
        )
        .await
        .map(|r| r.items)
    }

    /// CreateContainer in `pod`; returns the container id.
    pub async fn create_container(
        &mut self,
        pod: &Pod,
        config: api::ContainerConfig,
    ) -> Result<String> {
        deadline(
            "CreateContainer",
            self.rt.create_container(api::CreateContainerRequest {
                pod_sandbox_id: pod.id.clone(),
                config: Some(config),
                sandbox_config: Some(pod.config.clone()),
            }),
        )
        .await
        .map(|r| r.container_id)
    }

    pub async fn start_container(&mut self, id: &str) -> Result<()> {
        deadline(
            "StartContainer",
            self.rt.start_container(api::StartContainerRequest {
                container_id: id.to_string(),
            }),
        )
        .await
        .map(drop)
    }

    /// CreateContainer + StartContainer.
    pub async fn run_container(
        &mut self,
        pod: &Pod,
        config: api::ContainerConfig,
    ) -> Result<String> {
        let id = self.create_container(pod, config).await?;
        self.start_container(&id).await?;
        Ok(id)
    }

    /// StopContainer: SIGTERM, then SIGKILL after `grace_s` seconds.
    pub async fn stop_container(&mut self, id: &str, grace_s: i64) -> Result<()> {
        deadline(
            "StopContainer",
            self.rt.stop_container(api::StopContainerRequest {
                container_id: id.to_string(),
                timeout: grace_s,
            }),
        )
        .await
        .map(drop)
    }

    pub async fn remove_container(&mut self, id: &str) -> Result<()> {
        deadline(
            "RemoveContainer",
            self.rt.remove_container(api::RemoveContainerRequest {
                container_id: id.to_string(),
            }),
        )
        .await
        .map(drop)
    }

    /// The containers of pod `pod_id`.
    pub async fn list_containers(&mut self, pod_id: &str) -> Result<Vec<api::Container>> {
        deadline(
            "ListContainers",
            self.rt.list_containers(api::ListContainersRequest {
                filter: Some(api::ContainerFilter {
                    pod_sandbox_id: pod_id.to_string(),
                    ..Default::default()
                }),
            }),
        )
        .await
        .map(|r| r.containers)
    }

    /// ExecSync of `cmd` in container `id`, given `timeout_s` seconds to finish.
    pub async fn exec(
        &mut self,
        id: &str,
        cmd: &[&str],
        timeout_s: i64,
    ) -> Result<api::ExecSyncResponse> {
        deadline(
            "ExecSync",
            self.rt.exec_sync(api::ExecSyncRequest {
                container_id: id.to_string(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: timeout_s,
            }),
        )
        .await
    }

    /// ExecSync of `sh -c script` that must exit 0: its stdout.
    pub async fn sh(&mut self, id: &str, script: &str) -> String {
        let out = self
            .exec(id, &["sh", "-c", script], 30)
            .await
            .unwrap_or_else(|e| panic!("exec {script:?} in {id}: {e}"));
        assert_eq!(
            out.exit_code,
            0,
            "exec {script:?} in {id} exited {}; stdout {:?}, stderr {:?}",
            out.exit_code,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub async fn container_stats(&mut self, id: &str) -> Result<api::ContainerStats> {
        deadline(
            "ContainerStats",
            self.rt.container_stats(api::ContainerStatsRequest {
                container_id: id.to_string(),
            }),
        )
        .await
        .map(|r| r.stats.unwrap_or_default())
    }
}

/// A pod sandbox this test runs. Dropped without [`Pod::stop_and_remove`] (a failed
/// assertion), it stops and removes itself through a connection of its own.
pub struct Pod {
    pub id: String,
    pub config: api::PodSandboxConfig,
    address: PathBuf,
    removed: bool,
}

impl Pod {
    /// StopPodSandbox + RemovePodSandbox (tried once more on drop if either fails).
    pub async fn stop_and_remove(mut self, cri: &mut Cri) -> Result<()> {
        cri.stop_pod(&self.id).await?;
        cri.remove_pod(&self.id).await?;
        self.removed = true;
        Ok(())
    }

    /// The path of the pod's network namespace (from the runtime spec containerd reports in
    /// the verbose status), if it has one of its own.
    pub async fn netns_path(&self, cri: &mut Cri) -> Result<Option<PathBuf>> {
        let status = cri.pod_status(&self.id).await?;
        let info: serde_json::Value = status
            .info
            .get("info")
            .and_then(|i| serde_json::from_str(i).ok())
            .unwrap_or_default();
        Ok(info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|ns| ns["type"] == "network")
            .and_then(|ns| ns["path"].as_str())
            .filter(|p| !p.is_empty())
            .map(PathBuf::from))
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        // The test's runtime may be the one blocked in this drop: clean up on a thread with a
        // runtime and a connection of its own.
        let (id, address) = (self.id.clone(), self.address.clone());
        let cleanup = std::thread::spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| CriError::Connect(format!("a runtime: {e}")))?;
            rt.block_on(async {
                let mut cri = Cri::connect(&address).await?;
                cri.stop_pod(&id).await?;
                cri.remove_pod(&id).await
            })
        });
        match cleanup.join() {
            Ok(Ok(())) => eprintln!("pod {}: stopped and removed on drop", self.id),
            Ok(Err(e)) => eprintln!("pod {}: cleanup on drop failed: {e}", self.id),
            Err(_) => eprintln!("pod {}: cleanup on drop panicked", self.id),
        }
    }
}

/// Namespace modes of a pod: network and IPC are the pod's; PID is each container's own
/// (what kubelet asks for a v1 pod) unless `share_pid` (`shareProcessNamespace: true`).
pub fn namespaces(share_pid: bool) -> api::NamespaceOption {
    api::NamespaceOption {
        network: api::NamespaceMode::Pod as i32,
        ipc: api::NamespaceMode::Pod as i32,
        pid: if share_pid {
            api::NamespaceMode::Pod
        } else {
            api::NamespaceMode::Container
        } as i32,
        ..Default::default()
    }
}

/// A pod config as kubelet would send it: metadata, hostname, a log directory, namespace
/// modes. `name` must be unique among the pods that exist at once.
pub fn pod_config(
    name: &str,
    hostname: &str,
    log_dir: &Path,
    share_pid: bool,
) -> api::PodSandboxConfig {
    api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: name.to_string(),
            uid: format!("uid-{name}"),
            namespace: "spinbox-test".to_string(),
            attempt: 0,
        }),
        hostname: hostname.to_string(),
        log_directory: log_dir.display().to_string(),
        linux: Some(api::LinuxPodSandboxConfig {
            security_context: Some(api::LinuxSandboxSecurityContext {
                namespace_options: Some(namespaces(share_pid)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A busybox container named `name` running `sh -c script`, logging to `<name>.log` in the
/// pod's log directory, with the pod's namespace modes and, if given, a memory limit.
pub fn container_config(
    name: &str,
    script: &str,
    share_pid: bool,
    memory_limit: Option<i64>,
) -> api::ContainerConfig {
    api::ContainerConfig {
        metadata: Some(api::ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: Some(api::ImageSpec {
            image: IMAGE.to_string(),
            ..Default::default()
        }),
        command: vec!["sh".into(), "-c".into(), script.into()],
        log_path: format!("{name}.log"),
        linux: Some(api::LinuxContainerConfig {
            resources: memory_limit.map(|m| api::LinuxContainerResources {
                memory_limit_in_bytes: m,
                ..Default::default()
            }),
            security_context: Some(api::LinuxContainerSecurityContext {
                namespace_options: Some(namespaces(share_pid)),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

/// Polls `probe` until it returns `Some`, failing with `what` (and the last thing the probe
/// said) after `within`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, String>>,
{
    let until = Instant::now() + within;
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(last) if Instant::now() >= until => {
                panic!("{what}: not within {within:?}; last: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
