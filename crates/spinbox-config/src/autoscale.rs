//! `vm.autoscale`: the resize controllers' scaling by use. Off, a VM is resized only to
//! what its containers' limits ask (Update, a container joining or leaving its pod); on, the
//! controllers also watch the guest's CPU busy time and memory pressure through the agent and
//! add or remove a vCPU or a memory step, between the limits' size and the maxima.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Autoscale {
    pub enabled: bool,
    /// How often the controllers sample the guest.
    #[serde(with = "duration")]
    pub interval: Duration,
    /// Consecutive samples above (below) a threshold before a vCPU or memory step is added
    /// (removed): the hysteresis.
    pub sustain: u32,
    /// The least time between two resizes of the same resource by use.
    #[serde(with = "duration")]
    pub min_interval: Duration,
    /// Guest CPU busy time (% of its online vCPUs) at or above which a vCPU is added.
    pub cpu_high_pct: u32,
    /// Guest CPU busy time (%) at or below which a vCPU is removed (taken offline).
    pub cpu_low_pct: u32,
    /// Memory added or given back at a time (MiB).
    pub memory_step_mib: u32,
    /// Guest memory pressure (PSI `some` avg10, %) at or above which memory is added.
    pub memory_pressure_pct: u32,
}

impl Default for Autoscale {
    fn default() -> Self {
        Autoscale {
            enabled: false,
            interval: Duration::from_secs(1),
            sustain: 3,
            min_interval: Duration::from_secs(5),
            cpu_high_pct: 80,
            cpu_low_pct: 20,
            memory_step_mib: 256,
            memory_pressure_pct: 10,
        }
    }
}

impl Autoscale {
    pub(crate) fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.interval < Duration::from_millis(100) {
            return Err((
                "vm.autoscale.interval",
                format!("{:?} is below the 100ms minimum", self.interval),
            ));
        }
        if self.sustain == 0 {
            return Err(("vm.autoscale.sustain", "must be at least 1".into()));
        }
        if self.cpu_high_pct > 100 || self.cpu_low_pct >= self.cpu_high_pct {
            return Err((
                "vm.autoscale.cpu_low_pct",
                format!(
                    "{} must be below vm.autoscale.cpu_high_pct ({}), which is at most 100",
                    self.cpu_low_pct, self.cpu_high_pct
                ),
            ));
        }
        if self.memory_step_mib == 0 || !self.memory_step_mib.is_multiple_of(2) {
            return Err((
                "vm.autoscale.memory_step_mib",
                format!(
                    "{} MiB is not a positive multiple of the 2 MiB memory block",
                    self.memory_step_mib
                ),
            ));
        }
        if self.memory_pressure_pct == 0 || self.memory_pressure_pct > 100 {
            return Err((
                "vm.autoscale.memory_pressure_pct",
                format!("{} is out of range 1..=100", self.memory_pressure_pct),
            ));
        }
        Ok(())
    }
}
