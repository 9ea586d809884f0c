//! Resizing a running VM: vCPUs hot-plugged over QMP and brought online by the agent.

use super::Sandbox;
use crate::container::ContainerError;

impl Sandbox {
    /// Grows the VM to `target` vCPUs (never shrinks it; at most `vm.max_vcpus`): hot-plugs
    /// them over QMP and has the agent bring them online. One structured line per resize.
    pub async fn grow_vcpus(&self, target: u32, why: &str) -> Result<u32, ContainerError> {
        let max = self.config.vm.max_vcpus;
        if target > max {
            return Err(ContainerError::InvalidRequest(format!(
                "{why}: {target} vCPUs asked, more than vm.max_vcpus ({max})"
            )));
        }
        let started = std::time::Instant::now();
        let (from, to) = {
            let vm = self.vm.lock().await;
            let Some(vm) = vm.as_ref() else {
                return Err(ContainerError::InvalidRequest(format!(
                    "{why}: the VM is being torn down"
                )));
            };
            spinbox_vmm::hotplug::plug_vcpus(vm.qmp(), target).await?
        };
        if to == from {
            return Ok(to);
        }
        // The guest registers a new vCPU when its ACPI event is handled, a moment after
        // device_add: ask until it has them all online (timeouts.device_detection).
        let deadline = tokio::time::Instant::now() + self.config.timeouts.device_detection;
        let online = loop {
            let online = self
                .agent
                .online_cpus(
                    crate::container::ctx(self.config.timeouts.qmp_command),
                    &spinbox_agent_api::agent::Empty::default(),
                )
                .await
                .map_err(|e| crate::container::agent_err("OnlineCpus", e))?
                .online;
            if online >= to {
                break online;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ContainerError::InvalidRequest(format!(
                    "{why}: the guest has {online} of {to} vCPUs online {:?} after the hot-plug (timeouts.device_detection)",
                    self.config.timeouts.device_detection
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        tracing::info!(
            sandbox = %self.id,
            what = "vcpus",
            from,
            to,
            guest_online = online,
            why,
            took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "VM resized"
        );
        Ok(to)
    }
}
