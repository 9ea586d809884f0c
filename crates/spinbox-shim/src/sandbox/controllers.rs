//! The VM's CPU and memory controllers. They run from Create until the `hotplug` cleanup
//! phase stops them. Limit changes reach the VM through [`Sandbox::fit_to_limits`]; with
//! `vm.autoscale.enabled` the controllers also sample the guest (GuestResources) every
//! `interval` and, when it stays busy or under memory pressure for `sustain` samples, add a
//! vCPU or a memory step, and remove one when it stays idle — at most one step per
//! `min_interval`, between what the limits ask and the maxima.

use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use spinbox_config::Autoscale;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::resize::Resource;
use super::Sandbox;

/// The per-VM controllers' tasks and their stop signal.
pub(super) struct Controllers {
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Default for Controllers {
    fn default() -> Self {
        Controllers {
            stop: watch::channel(false).0,
            tasks: Mutex::new(Vec::new()),
        }
    }
}

impl Controllers {
    /// Stops both controllers and waits for them (a step in flight finishes first).
    pub(super) async fn stop(&self) {
        let _ = self.stop.send(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// Which way a sampled resource wants to go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    Up,
    Down,
}

/// Hysteresis: a step only after `sustain` samples in a row agree, and at most one per
/// `min_interval`.
#[derive(Debug)]
pub(super) struct Trend {
    up: u32,
    down: u32,
    last_step: Option<Instant>,
}

impl Trend {
    pub(super) fn new() -> Trend {
        Trend {
            up: 0,
            down: 0,
            last_step: None,
        }
    }

    /// Feeds one sample (`Some(Up)`: above the high mark, `Some(Down)`: below the low one,
    /// None: between) and says whether to step now.
    pub(super) fn sample(
        &mut self,
        s: Option<Step>,
        cfg: &Autoscale,
        now: Instant,
    ) -> Option<Step> {
        match s {
            Some(Step::Up) => (self.up, self.down) = (self.up.saturating_add(1), 0),
            Some(Step::Down) => (self.up, self.down) = (0, self.down.saturating_add(1)),
            None => (self.up, self.down) = (0, 0),
        }
        if self
            .last_step
            .is_some_and(|t| now.duration_since(t) < cfg.min_interval)
        {
            return None;
        }
        let step = if self.up >= cfg.sustain {
            Step::Up
        } else if self.down >= cfg.sustain {
            Step::Down
        } else {
            return None;
        };
        (self.up, self.down) = (0, 0);
        self.last_step = Some(now);
        Some(step)
    }
}

/// CPU busy % over an interval from two (busy, total) tick samples; bounded to 0..=100 (the
/// guest's counters are its word).
pub(super) fn busy_pct(prev: (u64, u64), now: (u64, u64)) -> Option<u32> {
    let total = now.1.checked_sub(prev.1).filter(|t| *t > 0)?;
    let busy = now.0.saturating_sub(prev.0).min(total);
    u32::try_from(busy * 100 / total).ok()
}

impl Sandbox {
    /// Starts the VM's controllers (after Create). Without `vm.autoscale.enabled` they only
    /// apply limit changes, which need no task.
    pub fn start_controllers(self: &Arc<Self>) {
        let cfg = self.config.vm.autoscale.clone();
        if !cfg.enabled {
            return;
        }
        let mut tasks = self
            .controllers
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !tasks.is_empty() {
            return;
        }
        for what in [Resource::Vcpus, Resource::Memory] {
            let me = Arc::downgrade(self);
            let stop = self.controllers.stop.subscribe();
            tasks.push(tokio::spawn(control(me, what, cfg.clone(), stop)));
        }
        tracing::info!(sandbox = %self.id, interval_ms = u64::try_from(cfg.interval.as_millis()).unwrap_or(u64::MAX), "resize controllers autoscaling");
    }
}

/// One controller's loop: sample, decide, step; until stopped or the sandbox goes.
async fn control(
    sandbox: Weak<Sandbox>,
    what: Resource,
    cfg: Autoscale,
    mut stop: watch::Receiver<bool>,
) {
    let mut trend = Trend::new();
    let mut prev_ticks: Option<(u64, u64)> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(cfg.interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let Some(sb) = sandbox.upgrade() else { return };
        if !sb.vm_alive() || sb.is_tearing_down() {
            return;
        }
        let r = match sb.guest_resources().await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(sandbox = %sb.id, error = %e, "GuestResources failed; next sample");
                continue;
            }
        };
        let (sample, current, why) = match what {
            Resource::Vcpus => {
                let ticks = (r.cpu_busy_ticks, r.cpu_total_ticks);
                let pct = prev_ticks.and_then(|p| busy_pct(p, ticks));
                prev_ticks = Some(ticks);
                let Some(pct) = pct else { continue };
                let s = if pct >= cfg.cpu_high_pct {
                    Some(Step::Up)
                } else if pct <= cfg.cpu_low_pct {
                    Some(Step::Down)
                } else {
                    None
                };
                (
                    s,
                    r.online_cpus,
                    format!("autoscale: guest CPU {pct}% busy"),
                )
            }
            Resource::Memory => {
                let pressure = r.memory_pressure_avg10.min(10_000);
                let total = r.mem_total_kib.max(1);
                let avail_pct = r.mem_available_kib.min(total) * 100 / total;
                let s = if pressure >= cfg.memory_pressure_pct * 100 || avail_pct < 5 {
                    Some(Step::Up)
                } else if pressure == 0 && avail_pct > 50 {
                    Some(Step::Down)
                } else {
                    None
                };
                let have = match sb.sizes().await {
                    Ok((_, have)) => have.memory_mib,
                    Err(_) => continue,
                };
                (
                    s,
                    have,
                    format!(
                        "autoscale: guest memory pressure {}.{:02}%, {avail_pct}% available",
                        pressure / 100,
                        pressure % 100
                    ),
                )
            }
        };
        let Some(step) = trend.sample(sample, &cfg, Instant::now()) else {
            continue;
        };
        let by = match what {
            Resource::Vcpus => 1,
            Resource::Memory => cfg.memory_step_mib,
        };
        let to = match step {
            Step::Up => current.saturating_add(by),
            Step::Down => current.saturating_sub(by),
        };
        if let Err(e) = sb.scale(what, to, &why).await {
            tracing::warn!(sandbox = %sb.id, what = ?what, error = %e, "autoscale step failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg() -> Autoscale {
        Autoscale {
            enabled: true,
            sustain: 3,
            min_interval: Duration::from_secs(5),
            ..Autoscale::default()
        }
    }

    #[test]
    fn a_step_needs_sustained_samples_and_the_minimum_interval() {
        let cfg = cfg();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut t = Trend::new();
        assert_eq!(t.sample(Some(Step::Up), &cfg, at(1)), None);
        assert_eq!(t.sample(Some(Step::Up), &cfg, at(2)), None);
        // A sample in between resets the count: hysteresis.
        assert_eq!(t.sample(None, &cfg, at(3)), None);
        assert_eq!(t.sample(Some(Step::Up), &cfg, at(4)), None);
        assert_eq!(t.sample(Some(Step::Up), &cfg, at(5)), None);
        assert_eq!(t.sample(Some(Step::Up), &cfg, at(6)), Some(Step::Up));
        // Still busy, but within min_interval of the last step.
        for s in 7..11 {
            assert_eq!(t.sample(Some(Step::Up), &cfg, at(s)), None, "at {s}");
        }
        assert_eq!(t.sample(Some(Step::Up), &cfg, at(11)), Some(Step::Up));
        // Idle: down after three more.
        for s in 12..16 {
            assert_eq!(t.sample(Some(Step::Down), &cfg, at(s)), None, "at {s}");
        }
        assert_eq!(t.sample(Some(Step::Down), &cfg, at(16)), Some(Step::Down));
    }

    #[test]
    fn busy_time_is_bounded_whatever_the_guest_counts() {
        assert_eq!(busy_pct((0, 0), (50, 100)), Some(50));
        assert_eq!(busy_pct((10, 100), (10, 200)), Some(0));
        // Busy beyond total, counters going backwards: bounded, or no sample.
        assert_eq!(busy_pct((0, 0), (500, 100)), Some(100));
        assert_eq!(busy_pct((50, 100), (0, 200)), Some(0));
        assert_eq!(busy_pct((0, 100), (0, 50)), None);
        assert_eq!(busy_pct((0, 100), (0, 100)), None);
    }
}
