//! Kill: signals go to the guest, bounded by `timeouts.kill`. A guest cannot hold a SIGKILL
//! back: when the process's exit has not reached the host `timeouts.kill` after the signal
//! was sent, the pod's VM is forced down (QMP quit, then SIGKILL of QEMU) and the process
//! exits with the VM (137). A process that was created but never started is ended on the
//! host at once, as runc ends a container still waiting in `runc init`.

use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use spinbox_agent_api::agent::SignalProcessRequest;
use tokio::sync::watch;

use super::{agent_err, ctx, wait_exit, Container, ContainerError, ExitInfo, Status};
use crate::sandbox::Sandbox;

const SIGKILL: u32 = Signal::SIGKILL as u32;

/// Signals whose default action leaves a process running: a never-started process ignores
/// them, as it would once started.
fn ignored_by_default(signal: u32) -> bool {
    [
        Signal::SIGCHLD,
        Signal::SIGCONT,
        Signal::SIGURG,
        Signal::SIGWINCH,
    ]
    .iter()
    .any(|s| *s as u32 == signal)
}

/// After a SIGKILL of `what`: unless its exit (`exit`) arrives within `limit`, the guest is
/// not trusted to deliver it and `sandbox`'s VM is forced down.
pub(crate) fn arm_kill_watchdog(
    sandbox: &Arc<Sandbox>,
    what: String,
    exit: watch::Receiver<Option<ExitInfo>>,
    limit: Duration,
) {
    let sandbox = Arc::clone(sandbox);
    tokio::spawn(async move {
        if tokio::time::timeout(limit, wait_exit(exit)).await.is_ok() || !sandbox.vm_alive() {
            return;
        }
        let why = format!(
            "SIGKILL of {what} not confirmed by the guest within {limit:?} (timeouts.kill)"
        );
        tracing::error!(sandbox = %sandbox.id, "{why}: forcing the VM down");
        sandbox.force_down(&why).await;
    });
}

/// Whether an agent error is the agent's own answer (it is alive and said no) rather than
/// silence: a timeout or a broken connection.
pub(crate) fn answered(e: &ttrpc::Error) -> bool {
    matches!(e, ttrpc::Error::RpcStatus(_))
}

impl Container {
    /// Kill (`all`: every process of the container). Returns the exit when the kill ended a
    /// process that never started: the caller publishes it (TaskExit), as the exit watcher
    /// does for a started one.
    pub async fn kill(
        self: &Arc<Self>,
        signal: u32,
        all: bool,
    ) -> Result<Option<ExitInfo>, ContainerError> {
        if self.status() == Status::Stopped || !self.sandbox.vm_alive() {
            return Err(self.not_running());
        }
        if !self.started.load(std::sync::atomic::Ordering::Acquire) {
            if ignored_by_default(signal) {
                return Ok(None);
            }
            // Ended here, on the host: the guest drops the process when the container is
            // removed. A start racing this kill already took the exit; then the signal goes
            // to the guest like any other.
            if let Some(info) = self.end_unstarted(128 + signal) {
                tracing::info!(id = %self.id, signal, "created process killed before start");
                return Ok(Some(info));
            }
        }
        let limit = self.config.timeouts.kill;
        if signal == SIGKILL {
            arm_kill_watchdog(&self.sandbox, self.id.clone(), self.exit.clone(), limit);
        }
        let req = SignalProcessRequest {
            container_id: self.id.clone(),
            signal,
            all,
            ..Default::default()
        };
        match self.sandbox.agent().signal_process(ctx(limit), &req).await {
            Ok(_) => Ok(None),
            Err(e) if signal == SIGKILL && !answered(&e) => {
                // The watchdog ends it with the VM; the caller waits for that exit.
                tracing::warn!(id = %self.id, error = %e, "the guest did not take the SIGKILL");
                Ok(None)
            }
            Err(e) => Err(agent_err("SignalProcess", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_default_ignored_signals_leave_an_unstarted_process() {
        for s in [17, 18, 23, 28] {
            assert!(ignored_by_default(s), "{s}");
        }
        for s in [1, 2, 9, 15, 10] {
            assert!(!ignored_by_default(s), "{s}");
        }
    }
}
