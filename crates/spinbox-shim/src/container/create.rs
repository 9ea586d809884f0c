//! Creating a container, in named phases — validate → bundle → state → mounts → network → vm
//! → container → stdio — each failure reported with its phase's name and rolled back
//! through the same cleanup phases a delete uses, so a failed create leaves no trace.
//!
//! Two paths share the phases. A container that boots its own VM (the CRI sandbox of a pod,
//! or a `ctr run` container, a pod of one) creates the state directory and records everything
//! after it there before it exists; it owns the [`Sandbox`]. A member of a pod joins the
//! sandbox's running VM: its work directory is recorded in the sandbox's state, its disks are
//! hot-plugged, and nothing of the network or the VM is touched.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use spinbox_agent_api::agent::{CreateContainerRequest, Rootfs, Share};
use spinbox_config::Config;
use spinbox_storage::{LayerCache, PrepareOptions, PreparedRootfs};
use spinbox_vmm::accel::HostCaps;
use spinbox_vmm::state::StateDir;
use spinbox_vmm::{NicAttach, ShareAttach, Vm, VmOptions};

use super::bundle::{load_bundle, Bundle, PodResources, PodRole};
use super::error::{agent_err, failed, ContainerError, CreatePhase as P};
use super::sizing::{self, LimitsFrom};
use super::timeline::Timeline;
use super::{ctx, release_mounts, work_dir, Container, CreateOpts, Parts};
use crate::cleanup::{Cleanup, Phase};
use crate::sandbox::{guest_network, Fit, Sandbox};
use crate::stdio;

/// What a create has acquired so far; released through the cleanup phases on failure.
struct Acquired {
    state: Arc<StateDir>,
    work_dir: PathBuf,
    rootfs: Option<PreparedRootfs>,
    vm: Option<Vm>,
    sandbox: Option<Arc<Sandbox>>,
    network: spinbox_net::Settings,
}

impl Acquired {
    async fn rollback(self, id: &str) {
        let mut c = Cleanup::new(id);
        let vm = self.vm;
        let sandbox = self.sandbox;
        c.phase(Phase::Vm, async {
            match (&sandbox, vm) {
                (Some(s), _) => s.release_vm(false).await,
                (None, vm) => crate::sandbox::release_vm(vm, false).await,
            }
        })
        .await;
        c.phase(
            Phase::Network,
            crate::sandbox::release_network(&self.network, &self.state),
        )
        .await;
        let ok = c.ok_so_far();
        c.phase(
            Phase::Mounts,
            release_mounts(self.rootfs.as_ref(), &self.work_dir, Some(&self.state), ok),
        )
        .await;
        let report = c.finish();
        if !report.ok() {
            tracing::warn!(id, errors = %report.summary(), "rollback of a failed create is incomplete");
        }
    }
}

impl Container {
    /// Creates the container: in `sandbox`'s VM when the bundle names it a member of that
    /// pod, else in a VM of its own.
    pub async fn create(
        opts: CreateOpts,
        config: &Config,
        sandbox: Option<Arc<Sandbox>>,
    ) -> Result<Container, ContainerError> {
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
        match (&bundle.pod, sandbox) {
            (PodRole::Member { sandbox_id }, Some(sandbox)) if *sandbox_id == sandbox.id => {
                Container::join(opts, bundle, sandbox, timeline).await
            }
            (PodRole::Member { sandbox_id }, _) => Err(failed(
                P::Validate,
                ContainerError::Pod {
                    sandbox: sandbox_id.clone(),
                    reason: format!(
                        "container {} belongs to it, but this shim does not run it (its VM is gone, or it was never created here)",
                        opts.id
                    ),
                },
            )),
            (_, Some(_)) => Err(failed(
                P::Validate,
                ContainerError::Lifecycle {
                    id: opts.id.clone(),
                    error: crate::lifecycle::LifecycleError::VmAlreadyExists,
                },
            )),
            (_, None) => Container::create_owner(opts, config, bundle, timeline).await,
        }
    }

    /// A container that boots its own VM (a pod's sandbox, or a pod of one).
    async fn create_owner(
        opts: CreateOpts,
        config: &Config,
        bundle: Bundle,
        mut timeline: Timeline,
    ) -> Result<Container, ContainerError> {
        // The VM's size from its workload, before anything exists: a refusal leaves nothing.
        let (limits, from) = match &bundle.pod {
            PodRole::Sandbox { resources } => (*resources, LimitsFrom::SandboxAnnotations),
            _ => (bundle.limits, LimitsFrom::Spec),
        };
        let (vcpus, memory_mib) =
            sizing::vm_size(config, &limits, from).map_err(|e| failed(P::Validate, e))?;
        let mut vm_config = config.clone();
        (vm_config.vm.vcpus, vm_config.vm.memory_mib) = (vcpus, memory_mib);
        if (vcpus, memory_mib) != (config.vm.vcpus, config.vm.memory_mib) {
            tracing::info!(id = %opts.id, vcpus, memory_mib, from = ?from, "VM sized by its workload's limits");
        }
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
        let mut acquired = Acquired {
            state: Arc::clone(&state),
            work_dir: work_dir(config, &opts.id),
            rootfs: None,
            vm: None,
            sandbox: None,
            network: spinbox_net::Settings::from_config(config),
        };
        timeline.mark("state");
        match Container::boot_in(opts, config, &vm_config, bundle, &mut acquired, timeline).await {
            Ok(c) => Ok(c),
            Err(e) => {
                tracing::warn!(error = %e, "create failed; rolling back");
                acquired.rollback(&state.record().await.id).await;
                Err(e)
            }
        }
    }

    async fn boot_in(
        opts: CreateOpts,
        config: &Config,
        vm_config: &Config,
        bundle: Bundle,
        acquired: &mut Acquired,
        mut timeline: Timeline,
    ) -> Result<Container, ContainerError> {
        let Bundle {
            spec,
            source,
            read_only,
            netns,
            publish,
            files,
            shares,
            pod,
            limits,
        } = bundle;
        let state = Arc::clone(&acquired.state);
        let work_dir = acquired.work_dir.clone();

        // Mounts: the rootfs as block images (the layer cache is shared and not ours; the
        // work directory with the writable layer is).
        let prepared = prepare_rootfs(config, &opts, &source, read_only, &work_dir, &state)
            .await
            .map_err(|e| failed(P::Mounts, e))?;
        let guest = prepared.guest.clone();
        let disks = prepared
            .disks
            .iter()
            .map(|d| spinbox_vmm::DiskAttach {
                path: d.path.clone(),
                serial: d.serial.clone(),
                read_only: d.read_only,
            })
            .collect();
        let boot_serials: Vec<String> = prepared.disks.iter().map(|d| d.serial.clone()).collect();
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
        // A pod's VM keeps root ports for its members' disks.
        let hotplug_ports = match &pod {
            PodRole::Sandbox { .. } => config.vm.hotplug_slots,
            _ => 0,
        };
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
            hotplug_ports,
        };

        // VM.
        timeline.mark("network");
        let vm = Vm::start_in(
            Arc::clone(&state),
            false,
            vm_config,
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
        let sandbox = Arc::new(Sandbox::new(
            &opts.id,
            vm,
            Arc::clone(&state),
            share_vm_network,
            boot_serials,
            hotplug_ports,
            match &pod {
                PodRole::Sandbox { resources } => *resources,
                _ => PodResources::default(),
            },
            config,
        ));
        acquired.sandbox = Some(Arc::clone(&sandbox));
        // The VM was sized for them: recorded so that later resizes count them.
        sandbox
            .set_limits(&opts.id, Some(limits))
            .await
            .map_err(|e| failed(P::Validate, e))?;

        if share_vm_network {
            sandbox
                .agent()
                .configure_network(ctx(config.timeouts.agent_call), &network_config)
                .await
                .map_err(|e| failed(P::Network, agent_err("ConfigureNetwork", e)))?;
        }
        timeline.mark("configure_network");
        let output_ports = sandbox.take_output_ports();
        let parts = Parts {
            opts,
            spec,
            guest,
            files,
            shares,
            work_dir,
            owns_sandbox: true,
        };
        let rootfs = acquired.rootfs.take().unwrap_or_default();
        let made = Container::create_in_guest(
            parts,
            rootfs,
            Arc::clone(&sandbox),
            output_ports,
            config,
            timeline,
            Some(&boot),
        )
        .await;
        match made {
            Ok(c) => {
                acquired.sandbox = None;
                sandbox.start_controllers();
                Ok(c)
            }
            Err((e, rootfs)) => {
                acquired.rootfs = Some(rootfs);
                Err(e)
            }
        }
    }

    /// A member of a pod: joins `sandbox`'s running VM.
    async fn join(
        opts: CreateOpts,
        bundle: Bundle,
        sandbox: Arc<Sandbox>,
        mut timeline: Timeline,
    ) -> Result<Container, ContainerError> {
        let Bundle {
            spec,
            source,
            read_only,
            files,
            mut shares,
            limits,
            ..
        } = bundle;
        let config = sandbox.config().clone();
        if !sandbox.vm_alive() || sandbox.is_tearing_down() {
            return Err(failed(P::Validate, sandbox_gone(&sandbox)));
        }
        // The pod's limits with this container's: refused before anything exists when the
        // VM cannot grow to them.
        sandbox
            .set_limits(&opts.id, Some(limits))
            .await
            .map_err(|e| failed(P::Validate, e))?;
        // Members' data live below the sandbox's, so that the pod's reclaim takes them along.
        let work_dir = member_work_dir(&config, &sandbox.id, &opts.id);
        let state = Arc::clone(sandbox.state());
        let prepared = prepare_rootfs(&config, &opts, &source, read_only, &work_dir, &state).await;
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                let errors = release_member(&sandbox, &opts.id, None, &work_dir).await;
                log_rollback(&opts.id, &errors);
                return Err(failed(P::Mounts, e));
            }
        };
        timeline.mark("mounts");
        if let Err(e) = sandbox.attach(&opts.id, &prepared.disks).await {
            let errors = release_member(&sandbox, &opts.id, Some(&prepared), &work_dir).await;
            log_rollback(&opts.id, &errors);
            return Err(failed(P::Vm, e));
        }
        let grown = sandbox
            .fit_to_limits(Fit::Grow, &format!("{} joined the pod", opts.id))
            .await;
        if let Err(e) = grown {
            let errors = release_member(&sandbox, &opts.id, Some(&prepared), &work_dir).await;
            log_rollback(&opts.id, &errors);
            return Err(failed(P::Vm, e));
        }
        timeline.mark("hotplug");
        if !shares.is_empty() {
            // virtio-fs devices come with the VM's boot; a member's writable directory binds
            // are left to the agent, which skips them with a warning.
            tracing::warn!(
                id = %opts.id,
                sources = ?shares.iter().map(|s: &Share| s.source.clone()).collect::<Vec<_>>(),
                "spec not applied as written: writable host directory binds of a container joining a running pod are not shared (virtio-fs devices are attached when the pod's VM boots)"
            );
            shares.clear();
        }
        let parts = Parts {
            opts,
            spec,
            guest: prepared.guest.clone(),
            files,
            shares,
            work_dir: work_dir.clone(),
            owns_sandbox: false,
        };
        let id = parts.opts.id.clone();
        let made = Container::create_in_guest(
            parts,
            prepared,
            Arc::clone(&sandbox),
            None,
            &config,
            timeline,
            None,
        )
        .await;
        match made {
            Ok(c) => Ok(c),
            Err((e, prepared)) => {
                let errors = release_member(&sandbox, &id, Some(&prepared), &work_dir).await;
                log_rollback(&id, &errors);
                Err(e)
            }
        }
    }
}

fn log_rollback(id: &str, errors: &[String]) {
    if !errors.is_empty() {
        tracing::warn!(id, errors = ?errors, "rollback of a failed create is incomplete");
    }
}

pub(crate) fn sandbox_gone(sandbox: &Sandbox) -> ContainerError {
    ContainerError::Pod {
        sandbox: sandbox.id.clone(),
        reason: "its VM is shutting down or gone".into(),
    }
}

/// Where a member's own images live: below its sandbox's data directory.
pub fn member_work_dir(config: &Config, sandbox_id: &str, id: &str) -> PathBuf {
    work_dir(config, sandbox_id).join("members").join(id)
}

/// Records `work_dir` in `state` — with the container's id and namespace, for `spinbox ps`
/// (one write: the owner's id first, then each member's as it joins) — creates it, and
/// prepares the rootfs images there.
async fn prepare_rootfs(
    config: &Config,
    opts: &CreateOpts,
    source: &spinbox_storage::RootfsSource,
    read_only: bool,
    work_dir: &std::path::Path,
    state: &StateDir,
) -> Result<PreparedRootfs, ContainerError> {
    let id = opts.id.as_str();
    state
        .update(|r| {
            r.dirs.push(work_dir.to_owned());
            if !r.containers.iter().any(|c| c == id) {
                r.containers.push(id.to_owned());
            }
            if r.namespace.is_none() && !opts.namespace.is_empty() {
                r.namespace = Some(opts.namespace.clone());
            }
        })
        .await
        .map_err(|source| ContainerError::State {
            path: state.path().to_owned(),
            source,
        })?;
    let _ = tokio::fs::remove_dir_all(work_dir).await;
    // data_dir and everything below it owner-only (0700 directories, 0600 images).
    spinbox_storage::prepare_data_dirs(&config.paths.data_dir, work_dir).await?;
    let cache = LayerCache::new(config.paths.data_dir.join("layers"))
        .with_limit_mib(config.storage.layer_cache_max_mib);
    let tag = spinbox_storage::disk_tag(id);
    let prepared = spinbox_storage::prepare(
        source,
        &PrepareOptions {
            cache: &cache,
            work_dir,
            upper_size_mib: config.vm.rootfs_upper_mib,
            read_only,
            disk_tag: &tag,
        },
    )
    .await?;
    tracing::info!(
        id,
        layers_cached = prepared.cache_hits,
        layers_built = prepared.cache_misses,
        "rootfs prepared"
    );
    Ok(prepared)
}

/// Releases what a member holds outside the guest: its hot-plugged disks (those no sibling
/// uses), its images and work directory, and its entries in the sandbox's record (its id
/// always; its work directory once that is gone). Idempotent.
pub(crate) async fn release_member(
    sandbox: &Sandbox,
    id: &str,
    rootfs: Option<&PreparedRootfs>,
    work_dir: &std::path::Path,
) -> Vec<String> {
    let mut errors = sandbox.detach(id).await;
    // Its share of the VM goes back (what the guest still uses stays).
    if let Ok(Some(_)) = sandbox.set_limits(id, None).await {
        if sandbox.vm_alive() && !sandbox.is_tearing_down() {
            let why = format!("{id} left the pod");
            if let Err(e) = sandbox.fit_to_limits(Fit::Shrink, &why).await {
                tracing::warn!(sandbox = %sandbox.id, id, error = %e, "the VM was not shrunk after a container left");
            }
        }
    }
    let ok = errors.is_empty();
    errors.extend(release_mounts(rootfs, work_dir, None, ok).await);
    // What could not be released stays recorded for reclaim; the container is gone either way.
    let released = errors.is_empty();
    let dir = work_dir.to_owned();
    let forgotten = sandbox
        .state()
        .update(|r| {
            r.containers.retain(|c| c != id);
            if released {
                r.dirs.retain(|d| d != &dir);
            }
        })
        .await;
    if let Err(e) = forgotten {
        errors.push(format!(
            "updating the record in {}: {e}",
            sandbox.state().path().display()
        ));
    }
    errors
}

impl Container {
    /// The container phase and the stdio phase, common to both paths. On failure the
    /// container is gone from the guest again and the rootfs is handed back for release.
    #[allow(clippy::too_many_arguments)]
    async fn create_in_guest(
        parts: Parts,
        rootfs: PreparedRootfs,
        sandbox: Arc<Sandbox>,
        output_ports: Option<spinbox_vmm::vm::OutputPorts>,
        config: &Config,
        mut timeline: Timeline,
        boot: Option<&spinbox_vmm::BootInfo>,
    ) -> Result<Container, (ContainerError, PreparedRootfs)> {
        let Parts {
            opts,
            spec,
            guest,
            files,
            shares,
            work_dir: _,
            owns_sandbox,
        } = &parts;
        let req = CreateContainerRequest {
            container_id: opts.id.clone(),
            oci_spec: spec.clone(),
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
            share_vm_network: sandbox.share_vm_network(),
            files: files.clone(),
            shares: shares.clone(),
            sandbox_id: if *owns_sandbox {
                String::new()
            } else {
                sandbox.id.clone()
            },
            ..Default::default()
        };
        let created = match sandbox
            .agent()
            .create_container(ctx(config.timeouts.agent_call), &req)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                return Err((
                    failed(P::Container, agent_err("CreateContainer", e)),
                    rootfs,
                ))
            }
        };
        tracing::info!(id = %opts.id, pid = created.pid, "container created in the guest");
        for warning in &created.warnings {
            tracing::warn!(id = %opts.id, "spec not applied as written: {warning}");
        }

        // Stdio.
        timeline.mark("container");
        let pumps = stdio::connect(
            sandbox.transport(),
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
        .await;
        let pumps = match pumps {
            Ok(p) => p,
            Err(e) => {
                if sandbox.vm_alive() {
                    let removed = sandbox
                        .agent()
                        .remove_container(
                            ctx(config.timeouts.shutdown_grace),
                            &super::process(&opts.id),
                        )
                        .await;
                    if let Err(e) = removed {
                        tracing::warn!(id = %opts.id, error = %e, "removing a half-created container from the guest");
                    }
                }
                return Err((failed(P::Stdio, ContainerError::Stdio(e)), rootfs));
            }
        };
        timeline.mark("stdio");
        timeline.log(&opts.id, boot);
        Ok(Container::assemble(
            parts,
            created.pid,
            sandbox,
            pumps,
            rootfs,
            config,
        ))
    }
}
