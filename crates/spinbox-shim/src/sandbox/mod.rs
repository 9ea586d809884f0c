//! A Sandbox: the pod's microVM and what belongs to the VM rather than to one container —
//! the agent connection, the vsock transport, the pod network mirrored into it, the disks
//! hot-plugged for containers that joined after boot, and the OOM event stream.
//!
//! The first container of a pod (the CRI sandbox, or the only container of a `ctr run`)
//! boots the VM and owns the Sandbox; members join it: their disks are hot-plugged onto
//! root ports reserved at boot ([`spinbox_vmm::hotplug`]), a layer shared by two members is
//! attached once (found by its serial) and unplugged when its last user goes. Hot-plugged
//! disks are recorded in `hotplug.json` in the sandbox's state directory before each plug
//! ([`disks`]). A running VM's vCPUs and memory are resized in [`resize`].
//!
//! Locks: `vm` is held only to reach the VM's QMP for one plug or unplug, or to take the VM
//! at teardown; `slots` serialises plugs and unplugs (taken before `vm`).

use std::collections::HashMap;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use spinbox_agent_api::agent::{IpAddress, NetworkConfig, NetworkInterface, NetworkRoute};
use spinbox_agent_api::agent_ttrpc::AgentClient;
use spinbox_config::Config;
use spinbox_vmm::state::StateDir;
use spinbox_vmm::vm::OutputPorts;
use spinbox_vmm::vsock::VsockTransport;
use spinbox_vmm::Vm;
use tokio::sync::watch;

use crate::container::bundle::PodResources;
use crate::container::ContainerError;

mod controllers;
mod disks;
mod resize;

use controllers::Controllers;
use disks::Slots;
pub use resize::Fit;
use resize::ResizeState;

/// One TaskOOM per container per this, however often the guest reports.
const OOM_COALESCE: std::time::Duration = std::time::Duration::from_secs(1);
/// The OOM poll's floor: a guest that answers at once is asked at most this often.
const OOM_MIN_POLL: std::time::Duration = std::time::Duration::from_millis(20);
/// Containers whose last OOM event is remembered (for coalescing) at once.
const OOM_TRACKED: usize = 256;

pub struct Sandbox {
    /// The pod's sandbox id: the id of the container that booted the VM.
    pub id: String,
    vm: tokio::sync::Mutex<Option<Vm>>,
    vm_exit: watch::Receiver<Option<ExitStatus>>,
    agent: AgentClient,
    transport: VsockTransport,
    state: Arc<StateDir>,
    /// Whether the VM mirrors a network namespace (members join the guest's then).
    share_vm_network: bool,
    slots: tokio::sync::Mutex<Slots>,
    output_ports: Mutex<Option<OutputPorts>>,
    /// Set once the VM's teardown began: QEMU exiting after this is our doing.
    tearing_down: AtomicBool,
    /// Set when an operator stopped the VM (`spinbox stop`): its exit is a death the shim
    /// cleans up after as any other, but not one to report as unexpected.
    stop_requested: AtomicBool,
    /// Every resize of the VM holds it (limits, controllers, the `hotplug` phase).
    resize: tokio::sync::Mutex<ResizeState>,
    controllers: Controllers,
    config: Config,
}

impl Sandbox {
    /// Wraps a booted VM. `boot_serials` are the disks it booted with; `hotplug_ports` the
    /// root ports it reserved; `pod` what CRI's sandbox annotations asked for the pod.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: &str,
        vm: Vm,
        state: Arc<StateDir>,
        share_vm_network: bool,
        boot_serials: impl IntoIterator<Item = String>,
        hotplug_ports: u32,
        pod: PodResources,
        config: &Config,
    ) -> Sandbox {
        let output_ports = vm.take_output_ports();
        let boot_vcpus = vm.config().vm.vcpus;
        Sandbox {
            id: id.to_owned(),
            vm_exit: vm.exit_watch(),
            agent: vm.agent().clone(),
            transport: vm.transport().clone(),
            vm: tokio::sync::Mutex::new(Some(vm)),
            state,
            share_vm_network,
            slots: tokio::sync::Mutex::new(Slots {
                free: (0..hotplug_ports).rev().collect(),
                plugged: HashMap::new(),
                at_boot: boot_serials.into_iter().collect(),
            }),
            output_ports: Mutex::new(output_ports),
            tearing_down: AtomicBool::new(false),
            stop_requested: AtomicBool::new(false),
            resize: tokio::sync::Mutex::new(ResizeState::new(pod, boot_vcpus)),
            controllers: Controllers::default(),
            config: config.clone(),
        }
    }

    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    pub fn transport(&self) -> &VsockTransport {
        &self.transport
    }

    pub fn state(&self) -> &Arc<StateDir> {
        &self.state
    }

    pub fn share_vm_network(&self) -> bool {
        self.share_vm_network
    }

    /// The VM's output serial ports, for the first container that asks (the owner).
    pub fn take_output_ports(&self) -> Option<OutputPorts> {
        self.output_ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Whether QEMU is still running.
    pub fn vm_alive(&self) -> bool {
        self.vm_exit.borrow().is_none()
    }

    pub fn is_tearing_down(&self) -> bool {
        self.tearing_down.load(Ordering::Acquire)
    }

    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitStatus>> {
        self.vm_exit.clone()
    }

    /// Resolves when QEMU exits without us tearing it down (a VM death: guest panic, QEMU
    /// killed or crashed). Never resolves for our own shutdown.
    pub async fn vm_died(&self) {
        let mut rx = self.vm_exit.clone();
        let _ = rx.wait_for(|s| s.is_some()).await;
        if self.is_tearing_down() {
            std::future::pending::<()>().await;
        }
        let status = (*rx.borrow()).map(|s| s.to_string()).unwrap_or_default();
        if self.stop_requested.load(Ordering::Acquire) {
            tracing::info!(sandbox = %self.id, qemu = %status, "microVM stopped by request");
        } else {
            tracing::error!(sandbox = %self.id, qemu = %status, "microVM exited on its own");
        }
    }

    fn gone(&self) -> ContainerError {
        ContainerError::Pod {
            sandbox: self.id.clone(),
            reason: "its VM is gone".into(),
        }
    }

    /// The VM phase of the pod's teardown: the shutdown ladder, then the VM's host side.
    pub async fn release_vm(&self, idle: bool) -> Vec<String> {
        self.tearing_down.store(true, Ordering::Release);
        let vm = self.vm.lock().await.take();
        release_vm(vm, idle).await
    }

    /// Stops the VM from outside (`spinbox stop`): the shutdown ladder (each graceful step
    /// given `grace`, else `timeouts.shutdown_grace`), or with `force` its last two steps,
    /// while the shim lives on. The containers end with the VM (their exits
    /// published as after any VM death) and the pod is cleaned up; containerd deletes the
    /// tasks as usual.
    pub async fn stop_vm(&self, force: bool, grace: Option<std::time::Duration>, why: &str) {
        self.stop_requested.store(true, Ordering::Release);
        let vm = self.vm.lock().await;
        let Some(vm) = vm.as_ref() else {
            tracing::info!(sandbox = %self.id, why, "stop asked of a VM already torn down");
            return;
        };
        tracing::info!(sandbox = %self.id, force, why, "stopping the VM on request");
        let report = match (force, grace) {
            (true, _) => vm.force_shutdown(why).await,
            (false, Some(grace)) => vm.shutdown_with_grace(grace).await,
            (false, None) => vm.shutdown().await,
        };
        tracing::info!(sandbox = %self.id, graceful = report.graceful, duration_ms = report.duration_ms, "VM stopped on request");
    }

    /// Takes a VM whose guest stopped answering down without its help (QMP quit, then
    /// SIGKILL of QEMU); the processes in it exit with it. A teardown that already took the
    /// VM is climbing the ladder itself.
    pub async fn force_down(&self, why: &str) {
        let vm = self.vm.lock().await;
        if let Some(vm) = vm.as_ref() {
            let report = vm.force_shutdown(why).await;
            tracing::warn!(
                sandbox = %self.id,
                duration_ms = report.duration_ms,
                why,
                "VM forced down"
            );
        }
    }

    /// The network phase of the pod's teardown.
    pub async fn release_network(&self) -> Vec<String> {
        let network = spinbox_net::Settings::from_config(&self.config);
        release_network(&network, &self.state).await
    }

    /// Marks the teardown begun (QEMU exiting from now on is not a death).
    pub fn begin_teardown(&self) {
        self.tearing_down.store(true, Ordering::Release);
    }

    /// The config the VM was booted with (a member's create runs with it too).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Forwards the guest's OOM events (a long poll on the agent) to `on_oom` with the id of
    /// the container whose cgroup saw the kill, until the VM goes. An agent without OOM
    /// events ends the watch at once. The watch ends by itself when the VM does.
    ///
    /// The guest decides when the poll answers, so the stream is bounded here: an id that is
    /// not a valid container id is dropped, one container's events are coalesced to one per
    /// [`OOM_COALESCE`], and the poll runs at most once per [`OOM_MIN_POLL`] — an agent
    /// answering at once cannot grow the event queue or flood containerd.
    pub fn watch_oom<F>(self: &Arc<Self>, on_oom: F)
    where
        F: Fn(String) + Send + 'static,
    {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut vm_exit = me.vm_exit.clone();
            let empty = spinbox_agent_api::agent::Empty::default();
            let mut last_sent: HashMap<String, std::time::Instant> = HashMap::new();
            let mut dropped: u64 = 0;
            loop {
                let polled_at = tokio::time::Instant::now();
                let polled = tokio::select! {
                    r = me.agent.get_oom_event(ttrpc::context::Context::default(), &empty) => r,
                    _ = vm_exit.wait_for(|s| s.is_some()) => return,
                };
                match polled {
                    Ok(ev) => {
                        let id = ev.container_id;
                        let now = std::time::Instant::now();
                        let fresh = spinbox_vmm::state::validate_id(&id).is_ok()
                            && last_sent
                                .get(&id)
                                .is_none_or(|t| now.duration_since(*t) >= OOM_COALESCE);
                        if fresh {
                            if last_sent.len() >= OOM_TRACKED {
                                last_sent.retain(|_, t| now.duration_since(*t) < OOM_COALESCE);
                            }
                            if last_sent.len() < OOM_TRACKED {
                                last_sent.insert(id.clone(), now);
                                on_oom(id);
                            }
                        } else {
                            dropped += 1;
                            if dropped.is_power_of_two() {
                                tracing::warn!(sandbox = %me.id, dropped, "OOM events coalesced or dropped (invalid id, or faster than one per container per second)");
                            }
                        }
                        tokio::time::sleep_until(polled_at + OOM_MIN_POLL).await;
                    }
                    Err(ttrpc::Error::RpcStatus(s)) if s.code() == ttrpc::Code::UNIMPLEMENTED => {
                        tracing::warn!(sandbox = %me.id, "the agent has no OOM events");
                        return;
                    }
                    Err(e) => {
                        if !me.vm_alive() || me.is_tearing_down() {
                            return;
                        }
                        tracing::warn!(sandbox = %me.id, error = %e, "GetOomEvent failed; retrying");
                        tokio::time::sleep(me.config.timeouts.event_reconnect).await;
                    }
                }
            }
        });
    }
}

/// What the guest's network configuration is: the mirrored interfaces and their routes.
pub(crate) fn guest_network(attached: &spinbox_net::Attached) -> NetworkConfig {
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

/// The network phase: what `network.json` in the state directory names (nft rules, tc
/// redirects and TAPs, CNI DEL, the namespace spinbox created); the record goes once all is
/// released.
pub(crate) async fn release_network(
    settings: &spinbox_net::Settings,
    state: &StateDir,
) -> Vec<String> {
    spinbox_net::release_recorded(settings, &state.path().join(spinbox_net::RECORD_FILE)).await
}

/// The VM phase: the shutdown ladder, then the VM's host side (backend, console log, files).
/// `idle`: the guest runs no container process any more, so a prepared guest is quit rather
/// than powered off ([`Vm::shutdown_idle`]).
pub(crate) async fn release_vm(vm: Option<Vm>, idle: bool) -> Vec<String> {
    match vm {
        Some(vm) => {
            let report = if idle {
                vm.shutdown_idle().await
            } else {
                vm.shutdown().await
            };
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
