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

/// The size a running pod's VM should have: what CRI's sandbox annotations asked at boot
/// (`pod`), or the sum of its containers' limits when that asks more, never below the
/// defaults. A sum beyond the maxima is refused naming the container limit and the key.
pub fn pod_size(
    config: &Config,
    pod: &PodResources,
    containers: &[PodResources],
) -> Result<(u32, u32), ContainerError> {
    const PERIOD: u64 = 100_000;
    let mut sum = PodResources::default();
    let mut cpu_us: u64 = 0;
    for c in containers {
        if let Some(bytes) = c.memory_bytes {
            sum.memory_bytes = Some(sum.memory_bytes.unwrap_or(0).saturating_add(bytes));
        }
        if let (Some(quota), Some(period)) = (c.cpu_quota, c.cpu_period) {
            let quota = u64::try_from(quota).unwrap_or(0);
            // The quota per a common period, rounded up.
            cpu_us = cpu_us.saturating_add(
                u64::try_from(
                    (u128::from(quota) * u128::from(PERIOD)).div_ceil(u128::from(period.max(1))),
                )
                .unwrap_or(u64::MAX),
            );
        }
    }
    if cpu_us > 0 {
        sum.cpu_quota = Some(i64::try_from(cpu_us).unwrap_or(i64::MAX));
        sum.cpu_period = Some(PERIOD);
    }
    let (c_vcpus, c_mib) = vm_size(config, &sum, LimitsFrom::Spec)?;
    let (p_vcpus, p_mib) = vm_size(config, pod, LimitsFrom::SandboxAnnotations)?;
    Ok((c_vcpus.max(p_vcpus), c_mib.max(p_mib)))
}

/// The limits a spec's `linux.resources` sets (a negative quota or a zero limit: none).
pub fn spec_limits(spec: &serde_json::Value) -> PodResources {
    resources_limits(&spec["linux"]["resources"])
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

    #[test]
    fn a_pods_size_is_the_sum_of_its_containers_or_what_cri_asked() {
        let config = Config::default();
        let c = |cpus_m: i64, mib: u64| PodResources {
            memory_bytes: Some(mib << 20),
            cpu_quota: Some(cpus_m * 100),
            cpu_period: Some(100_000),
        };
        let none = PodResources::default();
        // Nothing asked: the defaults.
        assert_eq!(pod_size(&config, &none, &[]).unwrap(), (1, 512));
        // 1.5 + 1 CPUs -> 3 vCPUs; 512 + 1024 MiB + the overhead.
        assert_eq!(
            pod_size(&config, &none, &[c(1500, 512), c(1000, 1024), none]).unwrap(),
            (3, 1536 + 128)
        );
        // A half-CPU quota per 50 ms period counts as half a CPU.
        let half = PodResources {
            memory_bytes: None,
            cpu_quota: Some(25_000),
            cpu_period: Some(50_000),
        };
        assert_eq!(pod_size(&config, &none, &[half, half, half]).unwrap().0, 2);
        // CRI's sandbox annotations already sum the pod: the larger wins, never both.
        let pod = c(2000, 2048);
        assert_eq!(
            pod_size(&config, &pod, &[c(1000, 1024)]).unwrap(),
            (2, 2048 + 128)
        );
        // Beyond the maxima together: refused, naming the limit and the key.
        let e = pod_size(&config, &none, &[c(5000, 64), c(5000, 64)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("vm.max_vcpus"), "{e}");
        let e = pod_size(&config, &none, &[c(100, 5000), c(100, 5000)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("vm.max_memory_mib"), "{e}");
    }

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
