//! A running VM's size: vCPUs hot-plugged over QMP and memory plugged or unplugged through
//! its virtio-mem device, each change recorded in `vm.json` ([`VmShape`]) before QEMU is
//! asked, so a reclaim after a crash knows the VM's true shape.

use std::time::Duration;

use spinbox_config::Config;

use super::Vm;
use crate::cmdline::hotplug_region_mib;
use crate::hotplug::{self, HotplugError};
use crate::state::VmShape;

/// The shape a VM boots with under `config` (the shim sizes `vm.vcpus` and `vm.memory_mib`
/// by the workload before boot).
pub(super) fn boot_shape(config: &Config) -> VmShape {
    let vm = &config.vm;
    VmShape {
        vcpus: vm.vcpus,
        max_vcpus: vm.max_vcpus.max(vm.vcpus),
        memory_base_mib: vm.memory_mib,
        memory_plugged_mib: 0,
        memory_max_mib: vm.memory_mib + hotplug_region_mib(vm.memory_mib, vm.max_memory_mib),
    }
}

impl Vm {
    /// The VM's shape as last recorded.
    pub async fn shape(&self) -> VmShape {
        self.state
            .record()
            .await
            .shape
            .unwrap_or_else(|| boot_shape(&self.config))
    }

    async fn record_shape(&self, change: impl FnOnce(&mut VmShape)) -> Result<(), HotplugError> {
        let boot = boot_shape(&self.config);
        self.state
            .update(|r| change(r.shape.get_or_insert(boot)))
            .await
            .map_err(HotplugError::Record)
    }

    /// Hot-plugs vCPUs until QEMU has `target` (at most `maxcpus`); returns how many it had
    /// before and has after. The guest brings them online when the agent asks.
    pub async fn plug_vcpus(&self, target: u32) -> Result<(u32, u32), HotplugError> {
        let max = self.shape().await.max_vcpus;
        self.record_shape(|s| s.vcpus = s.vcpus.max(target.min(max)))
            .await?;
        let result = hotplug::plug_vcpus(&self.qmp, target).await;
        // The record follows what QEMU has, whether or not all of them went in.
        let have = match &result {
            Ok((_, after)) => Some(*after),
            Err(_) => hotplug::plugged_vcpus(&self.qmp).await.ok(),
        };
        if let Some(have) = have {
            self.record_shape(|s| s.vcpus = have).await?;
        }
        result
    }

    /// Resizes the VM's memory to `total_mib` (boot memory plus hot-plugged; never below the
    /// boot memory, at most what the VM booted with room for), waiting at most `wait` for
    /// the guest. Returns the total before and after, in MiB: after is short of `total_mib`
    /// when the guest could not give everything back.
    pub async fn resize_memory(
        &self,
        total_mib: u32,
        wait: Duration,
    ) -> Result<(u32, u32), HotplugError> {
        let shape = self.shape().await;
        let base = shape.memory_base_mib;
        let region = shape.memory_max_mib - base;
        if region == 0 {
            return if total_mib <= base {
                Ok((base, base))
            } else {
                Err(HotplugError::MemoryBounds(format!(
                    "{total_mib} MiB wanted, the VM booted with {base} MiB and no room to grow (vm.max_memory_mib)"
                )))
            };
        }
        let target = total_mib.saturating_sub(base);
        // Recorded first when growing: the record never shows less than the VM may have.
        if target > shape.memory_plugged_mib {
            self.record_shape(|s| s.memory_plugged_mib = target.min(region))
                .await?;
        }
        let result = hotplug::resize_memory(&self.qmp, target, region, wait).await;
        let have = match &result {
            Ok((_, after)) => Some(*after),
            Err(_) => hotplug::plugged_memory_mib(&self.qmp).await.ok(),
        };
        if let Some(have) = have {
            self.record_shape(|s| s.memory_plugged_mib = have).await?;
        }
        let (before, after) = result?;
        Ok((base + before, base + after))
    }
}
