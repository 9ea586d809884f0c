//! Resizing a running VM to what its pod asks: vCPUs hot-plugged over QMP and brought online
//! (or taken offline) by the agent, memory plugged and unplugged through the VM's virtio-mem
//! device. One lock serialises every resize of a VM; the controllers ([`super::controllers`])
//! and the limit changes (Update, a container joining or leaving) both go through it, and
//! the `hotplug` cleanup phase closes it for good before the VM goes down.
//!
//! The VM's boot memory never shrinks; what was hot-plugged above it can be given back, but
//! never below what the guest says it uses (plus [`SHRINK_HEADROOM_MIB`]). What the guest
//! says is bounded by what the host knows the VM has.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use spinbox_agent_api::agent::{Empty, GuestResourcesResponse, OnlineCpusRequest};

use super::Sandbox;
use crate::container::bundle::PodResources;
use crate::container::{agent_err, ctx, sizing, ContainerError};

/// Memory left free above what the guest uses when memory is given back.
const SHRINK_HEADROOM_MIB: u32 = 64;

/// What a VM is being resized to, and by whom.
pub(super) struct ResizeState {
    /// Each container's limits (its spec's, then its Updates').
    limits: BTreeMap<String, PodResources>,
    /// What CRI's sandbox annotations asked for the whole pod at boot.
    pod: PodResources,
    /// vCPUs the guest has online (QEMU may have more plugged: offline ones stay, idle).
    online_vcpus: u32,
    /// Set by the `hotplug` cleanup phase: no resize starts after it.
    stopped: bool,
}

impl ResizeState {
    pub(super) fn new(pod: PodResources, vcpus: u32) -> ResizeState {
        ResizeState {
            limits: BTreeMap::new(),
            pod,
            online_vcpus: vcpus,
            stopped: false,
        }
    }
}

/// Which way a resize may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// Only up: before limits that need more are applied (Update, a container joining).
    Grow,
    /// Only down: after limits that need less were applied (Update, a container leaving).
    Shrink,
}

/// The VM's size as the controllers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub vcpus: u32,
    pub memory_mib: u32,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Sandbox {
    /// Records container `id`'s limits (None: it left) and returns what it had before. A
    /// change that would need a VM beyond the maxima is refused, naming the limit and the
    /// key, and nothing is recorded.
    pub async fn set_limits(
        &self,
        id: &str,
        limits: Option<PodResources>,
    ) -> Result<Option<PodResources>, ContainerError> {
        let mut st = self.resize.lock().await;
        let old = st.limits.get(id).copied();
        match limits {
            Some(l) => {
                st.limits.insert(id.to_owned(), l);
                if let Err(e) = self.limits_size(&st) {
                    match old {
                        Some(o) => st.limits.insert(id.to_owned(), o),
                        None => st.limits.remove(id),
                    };
                    return Err(e);
                }
            }
            None => {
                st.limits.remove(id);
            }
        }
        Ok(old)
    }

    /// Container `id`'s limits with what an Update `asked` (what it leaves out stays as it
    /// was); returns what it had before. Refused like [`Sandbox::set_limits`].
    pub async fn merge_limits(
        &self,
        id: &str,
        asked: PodResources,
    ) -> Result<PodResources, ContainerError> {
        let mut st = self.resize.lock().await;
        let before = st.limits.get(id).copied().unwrap_or_default();
        let merged = PodResources {
            memory_bytes: asked.memory_bytes.or(before.memory_bytes),
            cpu_quota: asked.cpu_quota.or(before.cpu_quota),
            cpu_period: asked.cpu_quota.and(asked.cpu_period).or(before.cpu_period),
        };
        st.limits.insert(id.to_owned(), merged);
        if let Err(e) = self.limits_size(&st) {
            st.limits.insert(id.to_owned(), before);
            return Err(e);
        }
        Ok(before)
    }

    /// What the pod's limits ask of the VM.
    fn limits_size(&self, st: &ResizeState) -> Result<Size, ContainerError> {
        let containers: Vec<PodResources> = st.limits.values().copied().collect();
        let (vcpus, memory_mib) = sizing::pod_size(&self.config, &st.pod, &containers)?;
        Ok(Size { vcpus, memory_mib })
    }

    /// What the pod's limits ask of the VM now, and what it has.
    pub async fn sizes(&self) -> Result<(Size, Size), ContainerError> {
        let st = self.resize.lock().await;
        let wanted = self.limits_size(&st)?;
        let have = self.current_size(&st).await?;
        Ok((wanted, have))
    }

    async fn current_size(&self, st: &ResizeState) -> Result<Size, ContainerError> {
        let vm = self.vm.lock().await;
        let vm = vm.as_ref().ok_or_else(|| self.gone())?;
        let shape = vm.shape().await;
        Ok(Size {
            vcpus: st.online_vcpus,
            memory_mib: shape.memory_base_mib + shape.memory_plugged_mib,
        })
    }

    /// Resizes the VM to what its containers' limits ask, only the way `fit` allows.
    pub async fn fit_to_limits(&self, fit: Fit, why: &str) -> Result<(), ContainerError> {
        let mut st = self.resize.lock().await;
        if st.stopped {
            return Ok(());
        }
        let wanted = self.limits_size(&st)?;
        let have = self.current_size(&st).await?;
        let (vcpus, memory) = match fit {
            Fit::Grow => (
                (wanted.vcpus > have.vcpus).then_some(wanted.vcpus),
                (wanted.memory_mib > have.memory_mib).then_some(wanted.memory_mib),
            ),
            Fit::Shrink => (
                (wanted.vcpus < have.vcpus).then_some(wanted.vcpus),
                (wanted.memory_mib < have.memory_mib).then_some(wanted.memory_mib),
            ),
        };
        if let Some(target) = vcpus {
            self.resize_vcpus(&mut st, target, why).await?;
        }
        if let Some(target) = memory {
            self.resize_memory(&st, target, why).await?;
        }
        Ok(())
    }

    /// One step by use (the autoscaling controllers): `vcpus` or `memory_mib` to `to`, if no
    /// resize stopped them meanwhile and it stays within `floor` (what the limits ask) and
    /// the maxima.
    pub(super) async fn scale(
        &self,
        what: Resource,
        to: u32,
        why: &str,
    ) -> Result<(), ContainerError> {
        let mut st = self.resize.lock().await;
        if st.stopped {
            return Ok(());
        }
        let floor = self.limits_size(&st)?;
        match what {
            Resource::Vcpus => {
                let to = to.clamp(floor.vcpus, self.config.vm.max_vcpus);
                if to != st.online_vcpus {
                    self.resize_vcpus(&mut st, to, why).await?;
                }
            }
            Resource::Memory => {
                let to = to.clamp(floor.memory_mib, self.config.vm.max_memory_mib);
                if to != self.current_size(&st).await?.memory_mib {
                    self.resize_memory(&st, to, why).await?;
                }
            }
        }
        Ok(())
    }

    /// The guest's word on what it has and uses.
    pub(super) async fn guest_resources(&self) -> Result<GuestResourcesResponse, ContainerError> {
        self.agent
            .guest_resources(ctx(self.config.timeouts.qmp_command), &Empty::default())
            .await
            .map_err(|e| agent_err("GuestResources", e))
    }

    /// vCPUs online to `target` (at most `vm.max_vcpus`): hot-plugged first when QEMU has
    /// fewer, then brought online; or the highest taken offline.
    async fn resize_vcpus(
        &self,
        st: &mut ResizeState,
        target: u32,
        why: &str,
    ) -> Result<(), ContainerError> {
        let max = self.config.vm.max_vcpus;
        if target > max {
            return Err(ContainerError::InvalidRequest(format!(
                "{why}: {target} vCPUs asked, more than vm.max_vcpus ({max})"
            )));
        }
        let started = Instant::now();
        let from = st.online_vcpus;
        let plugged = {
            let vm = self.vm.lock().await;
            let vm = vm.as_ref().ok_or_else(|| self.gone())?;
            vm.plug_vcpus(target).await?.1
        };
        // The guest registers a new vCPU when its ACPI event is handled, a moment after
        // device_add: ask until it has them online (timeouts.device_detection).
        let deadline = tokio::time::Instant::now() + self.config.timeouts.device_detection;
        let online = loop {
            let online = self
                .agent
                .online_cpus(
                    ctx(self.config.timeouts.agent_call),
                    &OnlineCpusRequest {
                        want: target,
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| agent_err("OnlineCpus", e))?
                .online
                // The guest's word, bounded by what QEMU has.
                .min(plugged);
            st.online_vcpus = online;
            if online == target {
                break online;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ContainerError::InvalidRequest(format!(
                    "{why}: the guest has {online} of {target} vCPUs online {:?} after the resize (timeouts.device_detection)",
                    self.config.timeouts.device_detection
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        tracing::info!(
            sandbox = %self.id,
            what = "vcpus",
            from,
            to = online,
            plugged,
            why,
            took_ms = ms(started.elapsed()),
            "VM resized"
        );
        Ok(())
    }

    /// Memory to `target_mib` in all: plugged, or given back down to what the guest uses.
    async fn resize_memory(
        &self,
        st: &ResizeState,
        target_mib: u32,
        why: &str,
    ) -> Result<(), ContainerError> {
        let max = self.config.vm.max_memory_mib;
        if target_mib > max {
            return Err(ContainerError::InvalidRequest(format!(
                "{why}: {target_mib} MiB asked, more than vm.max_memory_mib ({max})"
            )));
        }
        let started = Instant::now();
        let have = self.current_size(st).await?.memory_mib;
        let mut target = target_mib;
        if target < have {
            let r = self.guest_resources().await?;
            let total_kib = u64::from(have) << 10;
            let used_kib = r
                .mem_total_kib
                .min(total_kib)
                .saturating_sub(r.mem_available_kib.min(total_kib));
            let used = u32::try_from(used_kib >> 10).unwrap_or(u32::MAX);
            target = target.max(used.saturating_add(SHRINK_HEADROOM_MIB));
            if target >= have {
                tracing::info!(sandbox = %self.id, what = "memory", have, wanted = target_mib, guest_used = used, why, "memory not given back: the guest uses it");
                return Ok(());
            }
        }
        let (from, to) = {
            let vm = self.vm.lock().await;
            let vm = vm.as_ref().ok_or_else(|| self.gone())?;
            vm.resize_memory(target, self.config.timeouts.device_detection)
                .await?
        };
        tracing::info!(
            sandbox = %self.id,
            what = "memory_mib",
            from,
            to,
            wanted = target_mib,
            why,
            took_ms = ms(started.elapsed()),
            "VM resized"
        );
        Ok(())
    }

    /// The `hotplug` cleanup phase: stops the controllers and closes resizing for good (a
    /// resize in flight finishes first).
    pub async fn stop_controllers(&self) -> Vec<String> {
        self.controllers.stop().await;
        let mut st = self.resize.lock().await;
        if !st.stopped {
            st.stopped = true;
            tracing::info!(sandbox = %self.id, online_vcpus = st.online_vcpus, "resize controllers stopped");
        }
        Vec::new()
    }
}

/// What a controller scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Vcpus,
    Memory,
}
