//! containerd-shim-spinbox-v2: the containerd shim v2 (`io.containerd.spinbox.v2`) that runs
//! each container inside its own QEMU microVM.
//!
//! containerd runs this binary with `start` (spawn the long-lived shim, print its address),
//! with `delete` (reclaim what a dead shim left), and the spawned shim serves the task API.
//! Logs go through `tracing` (bridged to containerd's log pipe by the shim crate); containerd's
//! `--debug` raises the level.

mod cleanup;
mod container;
mod copies;
mod events;
mod exec;
mod lifecycle;
mod metrics;
mod reclaim;
mod runtime_options;
mod sandbox;
mod service;
mod stdio;

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{run, spawn, Shim};
use containerd_shim::{Config as ShimConfig, Error as ShimError, Flags, StartOpts};
use containerd_shim_protos::api::DeleteResponse;
use spinbox_config::Config;
use tokio::sync::Notify;

use crate::service::{Shared, TaskService};

const RUNTIME_ID: &str = "io.containerd.spinbox.v2";
/// File in the bundle directory (the shim's working directory) holding the shim's address.
const ADDRESS_FILE: &str = "address";

struct SpinboxShim {
    id: String,
    namespace: String,
    exit: Arc<Notify>,
    /// The task service's shared state, for the signal handler.
    shared: OnceLock<Arc<Shared>>,
}

fn load_config() -> Result<Config, ShimError> {
    Config::load().map_err(|e| ShimError::InvalidArgument(e.to_string()))
}

#[async_trait]
impl Shim for SpinboxShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut ShimConfig) -> Self {
        SpinboxShim {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            exit: Arc::new(Notify::new()),
            shared: OnceLock::new(),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, ShimError> {
        // Fail here, where containerd shows the message, rather than in the daemon.
        load_config()?;
        // The containers of a Kubernetes pod share one shim (and VM): the socket address is
        // derived from the pod's sandbox id, so a member's start finds the sandbox's shim
        // serving there and answers with its address (containerd 1.6/1.7 call start for
        // every container; 2.x reuses the sandbox's shim without asking).
        let grouping = pod_grouping(&opts.id).await;
        if grouping != opts.id {
            tracing::info!(id = %opts.id, sandbox = %grouping, "start: joining the pod's shim");
        }
        let address = spawn(opts, &grouping, Vec::new()).await?;
        // The bundle's `address` file is how the shim finds (and removes) its socket when it
        // exits, and how `delete` finds it after a crash.
        tokio::fs::write(ADDRESS_FILE, &address)
            .await
            .map_err(|e| ShimError::Other(format!("writing {ADDRESS_FILE} in the bundle: {e}")))?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, ShimError> {
        let config = load_config()?;
        // The state directory the dead shim recorded in the bundle (its per-task config may
        // have put it elsewhere than ours).
        // A member of a pod names its sandbox's directory: the whole pod is reclaimed.
        let recorded = tokio::fs::read(service::STATE_POINTER_FILE)
            .await
            .ok()
            .map(|b| std::path::PathBuf::from(String::from_utf8_lossy(&b).into_owned()))
            .filter(|p| {
                p.is_absolute()
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| spinbox_vmm::state::validate_id(n).is_ok())
            });
        let reclaim::Reclaimed {
            mut errors,
            live_owner: live,
        } = reclaim::reclaim(&config, &self.id, recorded).await;
        // The dead shim's socket (a member's names its pod's shim, which may live on).
        if let (None, Ok(address)) = (live, tokio::fs::read_to_string(ADDRESS_FILE).await) {
            let path = address.trim().trim_start_matches("unix://");
            match tokio::fs::remove_file(path).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => errors.push(format!("removing shim socket {path}: {e}")),
            }
        }
        if !errors.is_empty() {
            return Err(ShimError::Other(format!(
                "reclaiming container {}: {}",
                self.id,
                errors.join("; ")
            )));
        }
        let mut resp = DeleteResponse::new();
        resp.exit_status = container::VM_DIED_STATUS;
        resp.exited_at = service::timestamp(std::time::SystemTime::now());
        Ok(resp)
    }

    async fn wait(&mut self) {
        // The shim crate only logs SIGTERM/SIGINT; here they shut the shim down in order.
        // SIGUSR1 is `spinbox stop`: the VM goes down along its ladder while the shim stays,
        // so containerd sees the tasks exit (see `Shared::stop_requested`).
        let signal = |kind| match tokio::signal::unix::signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "installing a signal handler");
                None
            }
        };
        use tokio::signal::unix::SignalKind;
        let mut term = signal(SignalKind::terminate());
        let mut int = signal(SignalKind::interrupt());
        let mut usr1 = signal(SignalKind::user_defined1());
        loop {
            let why = tokio::select! {
                _ = self.exit.notified() => return,
                Some(_) = async { term.as_mut()?.recv().await } => "SIGTERM",
                Some(_) = async { int.as_mut()?.recv().await } => "SIGINT",
                Some(_) = async { usr1.as_mut()?.recv().await } => {
                    if let Some(shared) = self.shared.get() {
                        let shared = Arc::clone(shared);
                        tokio::spawn(async move { shared.stop_requested().await });
                    }
                    continue;
                }
            };
            tracing::warn!(signal = why, "signalled: shutting down");
            if let Some(shared) = self.shared.get() {
                shared.shutdown_all(why).await;
            }
            return;
        }
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let config = match load_config() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "configuration; using built-in defaults");
                Config::default()
            }
        };
        let service =
            TaskService::new(config, self.namespace.clone(), publisher, self.exit.clone());
        let _ = self.shared.set(service.shared());
        service
    }
}

/// The id whose shim a container belongs with: the pod's sandbox for a member of a
/// Kubernetes pod (CRI's annotations in the bundle's spec), else its own.
async fn pod_grouping(id: &str) -> String {
    let Ok(spec) = tokio::fs::read("config.json").await else {
        return id.to_owned();
    };
    let Ok(parsed) = serde_json::from_slice::<serde_json::Value>(&spec) else {
        return id.to_owned();
    };
    let role = container::PodRole::from_annotations(&parsed["annotations"]);
    let grouping = role.grouping(id);
    if spinbox_vmm::state::validate_id(grouping).is_err() {
        // Refused by create with a clear error; the address stays the container's own.
        return id.to_owned();
    }
    grouping.to_owned()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // QEMU is spawned from runtime worker threads, which live as long as the shim: its
    // parent-death signal then fires exactly when the shim dies.
    let config = ShimConfig {
        // tokio reaps the children it spawned (QEMU, vhost-device-vsock); a reaper that
        // waits for any pid would steal their exit statuses.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    run::<SpinboxShim>(RUNTIME_ID, Some(config)).await;
}
