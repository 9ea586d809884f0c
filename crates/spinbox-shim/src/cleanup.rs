//! The cleanup orchestrator: teardown in fixed phases, every phase run even when an earlier
//! one failed, errors collected per phase into one report.
//!
//! Order: hotplug stop → I/O shutdown (drain) → connection close (ttrpc, vsock) → VM shutdown
//! → network release → mount release → event channel close. Each phase's action is
//! idempotent, so a cleanup that is run again (a Delete after a VM death already cleaned up, a
//! `shim delete` after a crash) finds nothing left to do and reports success.

use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Hotplug,
    Io,
    Connections,
    Vm,
    Network,
    Mounts,
    Events,
}

impl Phase {
    #[cfg(test)]
    pub const ALL: [Phase; 7] = [
        Phase::Hotplug,
        Phase::Io,
        Phase::Connections,
        Phase::Vm,
        Phase::Network,
        Phase::Mounts,
        Phase::Events,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Hotplug => "hotplug",
            Phase::Io => "io",
            Phase::Connections => "connections",
            Phase::Vm => "vm",
            Phase::Network => "network",
            Phase::Mounts => "mounts",
            Phase::Events => "events",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How one phase went.
#[derive(Debug, Clone)]
pub struct PhaseOutcome {
    pub phase: Phase,
    pub errors: Vec<String>,
    pub took: Duration,
}

/// How a whole cleanup went.
#[derive(Debug, Clone, Default)]
pub struct CleanupReport {
    pub phases: Vec<PhaseOutcome>,
}

impl CleanupReport {
    pub fn ok(&self) -> bool {
        self.phases.iter().all(|p| p.errors.is_empty())
    }

    pub fn failed_phases(&self) -> Vec<Phase> {
        self.phases
            .iter()
            .filter(|p| !p.errors.is_empty())
            .map(|p| p.phase)
            .collect()
    }

    /// One line: `vm: <error>; mounts: <error>`.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        for p in &self.phases {
            for e in &p.errors {
                parts.push(format!("{}: {e}", p.phase));
            }
        }
        parts.join("; ")
    }
}

/// Runs phases in order; a phase out of order is a programming error and is refused loudly.
pub struct Cleanup {
    id: String,
    report: CleanupReport,
}

impl Cleanup {
    pub fn new(id: &str) -> Cleanup {
        Cleanup {
            id: id.to_owned(),
            report: CleanupReport::default(),
        }
    }

    /// Runs one phase. Its errors are recorded; the next phase runs regardless.
    pub async fn phase<F>(&mut self, phase: Phase, action: F) -> &mut Self
    where
        F: Future<Output = Vec<String>>,
    {
        if let Some(last) = self.report.phases.last() {
            if last.phase >= phase {
                let msg = format!("phase {phase} run after {}", last.phase);
                tracing::error!(id = %self.id, "{msg}");
                self.report.phases.push(PhaseOutcome {
                    phase,
                    errors: vec![msg],
                    took: Duration::ZERO,
                });
                return self;
            }
        }
        let started = Instant::now();
        let errors = action.await;
        let took = started.elapsed();
        tracing::debug!(id = %self.id, phase = %phase, took_ms = took.as_millis() as u64, errors = errors.len(), "cleanup phase");
        self.report.phases.push(PhaseOutcome {
            phase,
            errors,
            took,
        });
        self
    }

    /// Whether every phase so far succeeded.
    pub fn ok_so_far(&self) -> bool {
        self.report.ok()
    }

    /// The report, logged: one line naming the failed phases, or one saying all went well.
    pub fn finish(self) -> CleanupReport {
        let total: Duration = self.report.phases.iter().map(|p| p.took).sum();
        if self.report.ok() {
            tracing::info!(
                id = %self.id,
                took_ms = total.as_millis() as u64,
                "cleanup complete"
            );
        } else {
            let failed: Vec<&str> = self
                .report
                .failed_phases()
                .iter()
                .map(|p| p.as_str())
                .collect();
            tracing::error!(
                id = %self.id,
                failed_phases = %failed.join(","),
                errors = %self.report.summary(),
                "cleanup incomplete"
            );
        }
        self.report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn every_phase_runs_and_errors_are_kept_per_phase() {
        let ran = Arc::new(Mutex::new(Vec::new()));
        let mut c = Cleanup::new("t");
        for phase in Phase::ALL {
            let ran = ran.clone();
            c.phase(phase, async move {
                ran.lock().unwrap().push(phase);
                match phase {
                    Phase::Io => vec!["pipe broke".to_string()],
                    Phase::Mounts => vec!["busy".to_string(), "gone".to_string()],
                    _ => Vec::new(),
                }
            })
            .await;
        }
        let report = c.finish();
        assert_eq!(*ran.lock().unwrap(), Phase::ALL.to_vec());
        assert!(!report.ok());
        assert_eq!(report.failed_phases(), [Phase::Io, Phase::Mounts]);
        assert_eq!(
            report.summary(),
            "io: pipe broke; mounts: busy; mounts: gone"
        );
    }

    #[tokio::test]
    async fn a_phase_out_of_order_is_refused_not_run() {
        let mut c = Cleanup::new("t");
        c.phase(Phase::Vm, async { Vec::new() }).await;
        let ran = Arc::new(Mutex::new(false));
        let flag = ran.clone();
        c.phase(Phase::Io, async move {
            *flag.lock().unwrap() = true;
            Vec::new()
        })
        .await;
        let report = c.finish();
        assert!(!*ran.lock().unwrap());
        assert_eq!(report.failed_phases(), [Phase::Io]);
    }
}
