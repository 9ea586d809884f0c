//! The shutdown ladder: agent prepare (sync, unmount) → ctrl-alt-del → ACPI power button →
//! QMP quit → SIGKILL, each step bounded, every event logged and recorded in `shutdown.json`.
//! A VM that runs no process any more ([`Vm::shutdown_idle`]) is quit once the agent has
//! prepared: the guest's own power-off would have nothing left to stop or flush.

use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use spinbox_agent_api::agent::PrepareShutdownRequest;

use super::{exited, ms, Vm};
use crate::qmp::QmpError;
use crate::state;

/// One step of the shutdown ladder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShutdownStep {
    /// QEMU had already exited when the shutdown began (VM death): nothing to climb.
    AlreadyExited,
    AgentPrepare,
    CtrlAltDel,
    AcpiPowerdown,
    QmpQuit,
    Sigkill,
}

/// A timestamped event of a shutdown, in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ShutdownEvent {
    ShutdownInitiated {
        at_ms: u64,
        graceful: bool,
    },
    ShutdownEscalation {
        at_ms: u64,
        step: ShutdownStep,
        reason: String,
        waited_ms: u64,
    },
    ShutdownComplete {
        at_ms: u64,
        graceful: bool,
        last_step: ShutdownStep,
        duration_ms: u64,
    },
}

/// How a shutdown went: the events in order, and whether it needed force. Written as
/// `shutdown.json` in the state directory at every event (so a crash mid-shutdown leaves how
/// far it got), and logged one line per event. Once the VM is released, kept as
/// `<log_dir>/shutdown/<id>.<started_unix_ms>.json` ([`crate::history`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShutdownReport {
    pub vm_id: String,
    /// Wall-clock start, milliseconds since the Unix epoch; events' `at_ms` count from here.
    pub started_unix_ms: u64,
    pub events: Vec<ShutdownEvent>,
    /// Whether it finished (false only while the ladder is still climbing).
    pub complete: bool,
    pub graceful: bool,
    pub duration_ms: u64,
}

impl ShutdownStep {
    pub fn as_str(self) -> &'static str {
        match self {
            ShutdownStep::AlreadyExited => "already-exited",
            ShutdownStep::AgentPrepare => "agent-prepare",
            ShutdownStep::CtrlAltDel => "ctrl-alt-del",
            ShutdownStep::AcpiPowerdown => "acpi-powerdown",
            ShutdownStep::QmpQuit => "qmp-quit",
            ShutdownStep::Sigkill => "sigkill",
        }
    }
}

impl Vm {
    /// Shuts the VM down along the ladder — agent prepare (sync, unmount) → ctrl-alt-del →
    /// ACPI power button → QMP quit → SIGKILL. The agent and each power-off step are given
    /// `timeouts.shutdown_grace`, QMP commands `timeouts.qmp_command`. Each event is logged
    /// (one line, stable field names) and the report rewritten as `shutdown.json` in the state
    /// directory. A second call, concurrent or later, waits for the first and returns its
    /// report. Host resources stay until [`Vm::release`].
    pub async fn shutdown(&self) -> ShutdownReport {
        self.shutdown
            .get_or_init(|| self.climb_ladder(None, None, false))
            .await
            .clone()
    }

    /// [`Vm::shutdown`] of a VM that runs no process any more (its containers exited and were
    /// removed): once the agent has synced and unmounted, QEMU is quit at once, and that is a
    /// graceful shutdown whose last step is `agent-prepare`. The guest's power-off
    /// (ctrl-alt-del: SIGTERM to every process, a bounded wait, the kernel's device shutdown)
    /// would stop nothing and flush nothing more; under TCG it costs ~70 ms of every
    /// container's teardown. If the agent does not prepare, the ladder goes on as usual.
    pub async fn shutdown_idle(&self) -> ShutdownReport {
        self.shutdown
            .get_or_init(|| self.climb_ladder(None, None, true))
            .await
            .clone()
    }

    /// [`Vm::shutdown`] with each graceful step given `grace` instead of
    /// `timeouts.shutdown_grace` (an operator's `spinbox stop --timeout`).
    pub async fn shutdown_with_grace(&self, grace: Duration) -> ShutdownReport {
        self.shutdown
            .get_or_init(|| self.climb_ladder(None, Some(grace), false))
            .await
            .clone()
    }

    /// Takes a guest that stopped answering down without asking it: QMP quit, then SIGKILL
    /// (the ladder's last two steps). `why` is recorded as the escalation past the graceful
    /// steps. Like [`Vm::shutdown`], it runs once: a shutdown already climbing is waited for.
    pub async fn force_shutdown(&self, why: &str) -> ShutdownReport {
        self.shutdown
            .get_or_init(|| self.climb_ladder(Some(why), None, false))
            .await
            .clone()
    }

    /// Whether a shutdown finished (or QEMU exited by itself).
    pub fn is_stopped(&self) -> bool {
        self.qemu_gone()
    }

    async fn climb_ladder(
        &self,
        forced: Option<&str>,
        grace: Option<Duration>,
        idle: bool,
    ) -> ShutdownReport {
        let started = Instant::now();
        let mut ladder = Ladder {
            vm: self,
            started,
            report: ShutdownReport {
                vm_id: self.id.clone(),
                started_unix_ms: SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(ms)
                    .unwrap_or(0),
                events: Vec::new(),
                complete: false,
                graceful: true,
                duration_ms: 0,
            },
        };
        if self.qemu_gone() {
            // VM death: QEMU exited on its own; nothing to ask, nothing to kill.
            ladder.report.graceful = false;
            ladder
                .push(ShutdownEvent::ShutdownInitiated {
                    at_ms: 0,
                    graceful: false,
                })
                .await;
            return ladder.complete(ShutdownStep::AlreadyExited).await;
        }
        if let Some(why) = forced {
            ladder.report.graceful = false;
            ladder
                .push(ShutdownEvent::ShutdownInitiated {
                    at_ms: 0,
                    graceful: false,
                })
                .await;
            ladder
                .escalate(ShutdownStep::AgentPrepare, why.to_owned(), started)
                .await;
        } else if let Some(step) = self.graceful_steps(&mut ladder, grace, idle).await {
            return ladder.complete(step).await;
        }

        // 4. QMP quit: QEMU stops at once, the guest gets no say.
        ladder.report.graceful = false;
        let step_start = Instant::now();
        let Some(reason) = self.quit("quit").await else {
            return ladder.complete(ShutdownStep::QmpQuit).await;
        };
        ladder
            .escalate(ShutdownStep::QmpQuit, reason, step_start)
            .await;

        // 5. SIGKILL (works on a stopped process too).
        let _ = self.qemu.signal(nix::sys::signal::Signal::SIGKILL);
        if !self.wait_qemu_exit(Duration::from_secs(5)).await {
            tracing::error!(vm = %self.id, pid = self.qemu.pid, "QEMU survived SIGKILL for 5s");
        }
        ladder.complete(ShutdownStep::Sigkill).await
    }

    /// QMP `quit`, then up to `timeouts.qmp_command` for QEMU to exit: `None` once it is gone,
    /// else why not (`what` names the quit in the reason).
    async fn quit(&self, what: &str) -> Option<String> {
        let qmp_wait = self.config.timeouts.qmp_command;
        let reason = match self.qmp.execute("quit", None).await {
            Ok(_) | Err(QmpError::Disconnected { .. }) => {
                if self.wait_qemu_exit(qmp_wait).await {
                    return None;
                }
                format!("QEMU still running {qmp_wait:?} after {what} (timeouts.qmp_command)")
            }
            Err(e) => format!("{what} failed: {e}"),
        };
        (!self.qemu_gone()).then_some(reason)
    }

    /// The ladder's graceful steps (agent prepare, ctrl-alt-del, ACPI); the step that
    /// powered the guest off, or `None` when it is still running after them. `idle`: the
    /// guest runs no process; a prepared one is quit ([`Vm::shutdown_idle`]).
    async fn graceful_steps(
        &self,
        ladder: &mut Ladder<'_>,
        grace: Option<Duration>,
        idle: bool,
    ) -> Option<ShutdownStep> {
        let grace = grace.unwrap_or(self.config.timeouts.shutdown_grace);
        ladder
            .push(ShutdownEvent::ShutdownInitiated {
                at_ms: 0,
                graceful: true,
            })
            .await;

        // 1. Agent: sync and unmount. Success does not power off by itself; it makes the
        //    power-off that follows lose nothing.
        let step_start = Instant::now();
        let ctx = ttrpc::context::with_timeout(ms(grace) as i64 * 1_000_000);
        let request = PrepareShutdownRequest::new();
        let prepared = tokio::select! {
            r = self.agent.prepare_shutdown(ctx, &request) => r.map(|_| ()).map_err(|e| e.to_string()),
            _ = exited(self.qemu_exit.clone()) => Ok(()),
        };
        match prepared {
            Ok(()) if idle && !self.qemu_gone() => {
                let Some(reason) = self.quit("quit of a prepared, idle guest").await else {
                    return Some(ShutdownStep::AgentPrepare);
                };
                ladder
                    .escalate(ShutdownStep::AgentPrepare, reason, step_start)
                    .await;
            }
            Ok(()) => {}
            Err(e) => {
                ladder
                    .escalate(
                        ShutdownStep::AgentPrepare,
                        format!("agent prepare failed: {e}"),
                        step_start,
                    )
                    .await;
            }
        }

        // 2..3. ctrl-alt-del, then the ACPI power button, each given `grace` to power off.
        let graceful_steps: [(ShutdownStep, &str, Option<serde_json::Value>); 2] = [
            (
                ShutdownStep::CtrlAltDel,
                "send-key",
                Some(serde_json::json!({"keys": [
                    {"type": "qcode", "data": "ctrl"},
                    {"type": "qcode", "data": "alt"},
                    {"type": "qcode", "data": "delete"}
                ]})),
            ),
            (ShutdownStep::AcpiPowerdown, "system_powerdown", None),
        ];
        for (step, command, args) in graceful_steps {
            if self.qemu_gone() {
                return Some(step);
            }
            let step_start = Instant::now();
            let reason = match self.qmp.execute(command, args).await {
                Ok(_) => {
                    if self.wait_qemu_exit(grace).await {
                        return Some(step);
                    }
                    format!(
                        "guest still running {grace:?} after {command} (timeouts.shutdown_grace)"
                    )
                }
                Err(e) => format!("{command} failed: {e}"),
            };
            if self.qemu_gone() {
                return Some(step);
            }
            ladder.escalate(step, reason, step_start).await;
        }

        None
    }
}

/// The shutdown in progress: its report, written and logged at every event.
struct Ladder<'a> {
    vm: &'a Vm,
    started: Instant,
    report: ShutdownReport,
}

impl Ladder<'_> {
    async fn push(&mut self, event: ShutdownEvent) {
        log_shutdown_event(&self.vm.id, &event);
        self.report.events.push(event);
        self.report.duration_ms = ms(self.started.elapsed());
        let dir = self.vm.state.path().to_owned();
        let report = self.report.clone();
        let written = tokio::task::spawn_blocking(move || {
            state::write_json(&dir, state::SHUTDOWN_RECORD_FILE, &report)
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(vm = %self.vm.id, error = %e, "writing the shutdown record")
            }
            Err(e) => tracing::warn!(vm = %self.vm.id, error = %e, "writing the shutdown record"),
        }
    }

    async fn escalate(&mut self, step: ShutdownStep, reason: String, step_start: Instant) {
        let event = ShutdownEvent::ShutdownEscalation {
            at_ms: ms(self.started.elapsed()),
            step,
            reason,
            waited_ms: ms(step_start.elapsed()),
        };
        self.push(event).await;
    }

    async fn complete(mut self, last_step: ShutdownStep) -> ShutdownReport {
        let duration = ms(self.started.elapsed());
        let graceful = self.report.graceful;
        self.report.complete = true;
        self.push(ShutdownEvent::ShutdownComplete {
            at_ms: duration,
            graceful,
            last_step,
            duration_ms: duration,
        })
        .await;
        self.report
    }
}

/// One log line per shutdown event, with stable field names (`vm_id`, `event`, `graceful`,
/// `step`, `reason`, `waited_ms`, `last_step`, `duration_ms`, `at_ms`). Under the shim these
/// reach containerd's log as `key="value"` pairs.
fn log_shutdown_event(vm_id: &str, event: &ShutdownEvent) {
    match event {
        ShutdownEvent::ShutdownInitiated { at_ms, graceful } => log::info!(
            vm_id, event = "shutdown_initiated", graceful = *graceful, at_ms = *at_ms;
            "VM {vm_id}: shutdown initiated (graceful={graceful})"
        ),
        ShutdownEvent::ShutdownEscalation {
            at_ms,
            step,
            reason,
            waited_ms,
        } => log::warn!(
            vm_id, event = "shutdown_escalation", step = step.as_str(), reason = reason.as_str(),
            waited_ms = *waited_ms, at_ms = *at_ms;
            "VM {vm_id}: shutdown escalates past {} after {waited_ms} ms: {reason}", step.as_str()
        ),
        ShutdownEvent::ShutdownComplete {
            at_ms,
            graceful,
            last_step,
            duration_ms,
        } => log::info!(
            vm_id, event = "shutdown_complete", graceful = *graceful,
            last_step = last_step.as_str(), duration_ms = *duration_ms, at_ms = *at_ms;
            "VM {vm_id}: shutdown complete ({}) at {} after {duration_ms} ms",
            if *graceful { "graceful" } else { "forced" }, last_step.as_str()
        ),
    }
}
