//! A VM's size from its workload: the vCPUs and memory a pod may use — CRI's sandbox
//! annotations for a Kubernetes pod, the container's own `linux.resources` for a pod of one
//! (`ctr run --cpus 2 --memory-limit …`) — never less than the config's defaults
//! (`vm.vcpus`, `vm.memory_mib`), and refused above its maxima (`vm.max_vcpus`,
//! `vm.max_memory_mib`), naming the field that asked.

use spinbox_config::Config;

use super::bundle::{PodResources, SANDBOX_CPU_QUOTA, SANDBOX_MEMORY};
use super::error::ContainerError;

/// Where a workload's limits come from: named in a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitsFrom {
    /// The container's own spec (a pod of one).
    Spec,
    /// CRI's annotations on a pod's sandbox container.
    SandboxAnnotations,
}

impl LimitsFrom {
    fn cpu_field(self) -> &'static str {
        match self {
            LimitsFrom::Spec => "linux.resources.cpu.quota/period",
            LimitsFrom::SandboxAnnotations => SANDBOX_CPU_QUOTA,
        }
    }

    fn memory_field(self) -> &'static str {
        match self {
            LimitsFrom::Spec => "linux.resources.memory.limit",
            LimitsFrom::SandboxAnnotations => SANDBOX_MEMORY,
        }
    }
}

/// The VM's vCPUs and memory (MiB) for a workload limited by `limits`: its CPU quota rounded
/// up to whole vCPUs, its memory plus `vm.pod_memory_overhead_mib` for the guest kernel and
/// agent; the defaults where it asks less or sets no limit.
pub fn vm_size(
    config: &Config,
    limits: &PodResources,
    from: LimitsFrom,
) -> Result<(u32, u32), ContainerError> {
    let vm = &config.vm;
    let mut vcpus = vm.vcpus;
    if let (Some(quota), Some(period)) = (limits.cpu_quota, limits.cpu_period) {
        let quota = u64::try_from(quota).unwrap_or(0);
        let wanted = quota.div_ceil(period.max(1));
        if wanted > u64::from(vm.max_vcpus) {
            return Err(ContainerError::InvalidRequest(format!(
                "{}: a quota of {quota} µs per {period} µs asks {wanted} vCPUs, more than vm.max_vcpus ({})",
                from.cpu_field(),
                vm.max_vcpus
            )));
        }
        vcpus = vcpus.max(u32::try_from(wanted).unwrap_or(u32::MAX));
    }
    let mut memory_mib = vm.memory_mib;
    if let Some(bytes) = limits.memory_bytes {
        let wanted = bytes
            .div_ceil(1 << 20)
            .saturating_add(u64::from(vm.pod_memory_overhead_mib));
        if wanted > u64::from(vm.max_memory_mib) {
            return Err(ContainerError::InvalidRequest(format!(
                "{}: {bytes} bytes need a VM of {wanted} MiB (the limit + vm.pod_memory_overhead_mib), more than vm.max_memory_mib ({})",
                from.memory_field(),
                vm.max_memory_mib
            )));
        }
        memory_mib = memory_mib.max(u32::try_from(wanted).unwrap_or(u32::MAX));
    }
    Ok((vcpus, memory_mib))
}

/// The limits a spec's `linux.resources` sets (a negative quota or a zero limit: none).
pub fn spec_limits(spec: &serde_json::Value) -> PodResources {
    resources_limits(&spec["linux"]["resources"])
}

/// The vCPUs a CPU quota asks for (rounded up), if it sets one.
pub fn vcpus_for(limits: &PodResources) -> Option<u32> {
    let (quota, period) = (limits.cpu_quota?, limits.cpu_period?);
    let wanted = u64::try_from(quota).ok()?.div_ceil(period.max(1));
    Some(u32::try_from(wanted).unwrap_or(u32::MAX))
}

/// The limits an OCI `LinuxResources` object sets (what Update carries).
pub fn resources_limits(r: &serde_json::Value) -> PodResources {
    PodResources {
        memory_bytes: r["memory"]["limit"]
            .as_i64()
            .and_then(|b| u64::try_from(b).ok())
            .filter(|&b| b > 0),
        cpu_quota: r["cpu"]["quota"].as_i64().filter(|&q| q > 0),
        cpu_period: r["cpu"]["period"].as_u64().filter(|&p| p > 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(config: &Config, limits: &PodResources) -> (u32, u32) {
        vm_size(config, limits, LimitsFrom::Spec).unwrap()
    }

    #[test]
    fn a_vm_is_sized_by_its_workload_and_never_below_the_defaults() {
        let config = Config::default();
        let (d_cpus, d_mib) = (config.vm.vcpus, config.vm.memory_mib);
        assert_eq!(size(&config, &PodResources::default()), (d_cpus, d_mib));
        // 1.5 CPUs round up to 2; 1 GiB plus the overhead.
        let pod = PodResources {
            memory_bytes: Some(1 << 30),
            cpu_quota: Some(150_000),
            cpu_period: Some(100_000),
        };
        let (cpus, mib) = size(&config, &pod);
        assert_eq!(cpus, d_cpus.max(2));
        assert_eq!(mib, 1024 + config.vm.pod_memory_overhead_mib);
        // Less than the defaults never shrinks the VM below them.
        let small = PodResources {
            memory_bytes: Some(1 << 20),
            cpu_quota: Some(10_000),
            cpu_period: Some(100_000),
        };
        assert_eq!(size(&config, &small), (d_cpus, d_mib));
    }

    #[test]
    fn more_than_the_maxima_is_refused_naming_the_field_and_the_key() {
        let config = Config::default();
        let cpus = PodResources {
            cpu_quota: Some(i64::from(config.vm.max_vcpus + 1) * 100_000),
            cpu_period: Some(100_000),
            ..Default::default()
        };
        let e = vm_size(&config, &cpus, LimitsFrom::Spec)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("linux.resources.cpu") && e.contains("vm.max_vcpus"),
            "{e}"
        );
        let memory = PodResources {
            memory_bytes: Some(u64::from(config.vm.max_memory_mib) << 20),
            ..Default::default()
        };
        let e = vm_size(&config, &memory, LimitsFrom::SandboxAnnotations)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(SANDBOX_MEMORY) && e.contains("vm.max_memory_mib"),
            "{e}"
        );
        // Exactly the maximum fits.
        let fits = PodResources {
            cpu_quota: Some(i64::from(config.vm.max_vcpus) * 100_000),
            cpu_period: Some(100_000),
            memory_bytes: Some(
                u64::from(config.vm.max_memory_mib - config.vm.pod_memory_overhead_mib) << 20,
            ),
        };
        assert_eq!(
            size(&config, &fits),
            (config.vm.max_vcpus, config.vm.max_memory_mib)
        );
    }

    #[test]
    fn limits_are_read_from_the_spec() {
        let spec = serde_json::json!({"linux": {"resources": {
            "memory": {"limit": 1073741824},
            "cpu": {"quota": 200000, "period": 100000, "shares": 1024}
        }}});
        assert_eq!(
            spec_limits(&spec),
            PodResources {
                memory_bytes: Some(1 << 30),
                cpu_quota: Some(200_000),
                cpu_period: Some(100_000),
            }
        );
        let unlimited = serde_json::json!({"linux": {"resources": {
            "memory": {"limit": -1}, "cpu": {"quota": -1, "period": 100000}
        }}});
        assert_eq!(spec_limits(&unlimited).memory_bytes, None);
        assert_eq!(spec_limits(&unlimited).cpu_quota, None);
        assert_eq!(spec_limits(&serde_json::json!({})), PodResources::default());
    }
}
