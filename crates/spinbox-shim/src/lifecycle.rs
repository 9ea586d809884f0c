//! The shim's state machine and its sentinel errors.
//!
//! ```text
//!            Create              started ok
//!   Idle ───────────▶ Creating ───────────▶ Running ──Delete──▶ Deleting ──done──▶ Idle
//!    ▲                   │ failed (rolled back, VM included)
//!    └───────────────────┘
//!   any state ──VM death / Shutdown RPC / SIGTERM──▶ ShuttingDown   (terminal)
//! ```
//!
//! The state is one atomic byte: reads never take a lock; transitions are compare-and-swap,
//! so two racing RPCs cannot both win. A refused transition says what is in the way with a
//! sentinel error that carries the ttrpc code containerd understands.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};

use ttrpc::Code;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    Idle = 0,
    Creating = 1,
    Running = 2,
    Deleting = 3,
    ShuttingDown = 4,
}

impl State {
    fn from_u8(v: u8) -> State {
        match v {
            0 => State::Idle,
            1 => State::Creating,
            2 => State::Running,
            3 => State::Deleting,
            _ => State::ShuttingDown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Creating => "creating",
            State::Running => "running",
            State::Deleting => "deleting",
            State::ShuttingDown => "shutting-down",
        }
    }

    /// Whether `self → to` is an edge of the machine.
    pub fn may_become(self, to: State) -> bool {
        use State::*;
        matches!(
            (self, to),
            (Idle, Creating)
                | (Creating, Running)
                | (Creating, Idle)
                | (Running, Deleting)
                | (Deleting, Idle)
                | (Idle | Creating | Running | Deleting, ShuttingDown)
        )
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The errors a caller can act on, each with its ttrpc code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LifecycleError {
    #[error("VM not running")]
    VmNotRunning,
    #[error("VM already exists: this shim already holds a container")]
    VmAlreadyExists,
    #[error("VM not created")]
    VmNotCreated,
    #[error("device timeout: {0}")]
    DeviceTimeout(String),
    #[error("no free guest CID: {0}")]
    CidExhausted(String),
    /// The network phase of a create failed (CNI, netns mirroring, nftables).
    #[error("network setup failed: {0}")]
    NetworkSetup(String),
    #[error("mount setup failed: {0}")]
    MountSetup(String),
    #[error("invalid state transition {from} -> {to}")]
    InvalidTransition { from: State, to: State },
    #[error("shutdown in progress")]
    ShutdownInProgress,
    #[error("creation in progress")]
    CreationInProgress,
    #[error("deletion in progress")]
    DeletionInProgress,
    #[error("cleanup incomplete: {0}")]
    CleanupIncomplete(String),
}

impl LifecycleError {
    pub fn code(&self) -> Code {
        match self {
            // containerd reads NotFound on kill/state as "process already finished".
            LifecycleError::VmNotRunning | LifecycleError::VmNotCreated => Code::NOT_FOUND,
            LifecycleError::VmAlreadyExists => Code::ALREADY_EXISTS,
            LifecycleError::DeviceTimeout(_) => Code::DEADLINE_EXCEEDED,
            LifecycleError::CidExhausted(_) => Code::RESOURCE_EXHAUSTED,
            LifecycleError::NetworkSetup(_)
            | LifecycleError::MountSetup(_)
            | LifecycleError::CleanupIncomplete(_) => Code::INTERNAL,
            LifecycleError::InvalidTransition { .. } => Code::FAILED_PRECONDITION,
            LifecycleError::ShutdownInProgress
            | LifecycleError::CreationInProgress
            | LifecycleError::DeletionInProgress => Code::UNAVAILABLE,
        }
    }

    /// The error for wanting `to` while the machine is in `from`.
    fn refused(from: State, to: State) -> LifecycleError {
        match from {
            State::ShuttingDown => LifecycleError::ShutdownInProgress,
            State::Creating => LifecycleError::CreationInProgress,
            State::Deleting => LifecycleError::DeletionInProgress,
            State::Running if to == State::Creating => LifecycleError::VmAlreadyExists,
            State::Idle if to == State::Deleting => LifecycleError::VmNotCreated,
            _ => LifecycleError::InvalidTransition { from, to },
        }
    }
}

/// The shim's state: lock-free reads, checked compare-and-swap transitions.
#[derive(Debug)]
pub struct Lifecycle {
    state: AtomicU8,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            state: AtomicU8::new(State::Idle as u8),
        }
    }
}

impl Lifecycle {
    pub fn get(&self) -> State {
        State::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Moves `from → to` if the machine is in `from` and the edge exists.
    pub fn transition(&self, from: State, to: State) -> Result<(), LifecycleError> {
        if !from.may_become(to) {
            return Err(LifecycleError::InvalidTransition { from, to });
        }
        match self
            .state
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                tracing::debug!(from = %from, to = %to, "shim state");
                Ok(())
            }
            Err(actual) => Err(LifecycleError::refused(State::from_u8(actual), to)),
        }
    }

    /// Enters `ShuttingDown` from wherever the machine is; returns the state it left, or
    /// `None` if it was shutting down already.
    pub fn begin_shutdown(&self) -> Option<State> {
        let prev = State::from_u8(self.state.swap(State::ShuttingDown as u8, Ordering::AcqRel));
        if prev == State::ShuttingDown {
            None
        } else {
            tracing::info!(from = %prev, "shim state: shutting down");
            Some(prev)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [State; 5] = [
        State::Idle,
        State::Creating,
        State::Running,
        State::Deleting,
        State::ShuttingDown,
    ];

    #[test]
    fn the_edges_are_exactly_the_documented_ones() {
        let mut edges = Vec::new();
        for from in ALL {
            for to in ALL {
                if from.may_become(to) {
                    edges.push(format!("{from}->{to}"));
                }
            }
        }
        assert_eq!(
            edges,
            [
                "idle->creating",
                "idle->shutting-down",
                "creating->idle",
                "creating->running",
                "creating->shutting-down",
                "running->deleting",
                "running->shutting-down",
                "deleting->idle",
                "deleting->shutting-down",
            ]
        );
    }

    #[test]
    fn refusals_name_what_is_in_the_way() {
        let l = Lifecycle::default();
        assert_eq!(
            l.transition(State::Running, State::Deleting),
            Err(LifecycleError::VmNotCreated)
        );
        l.transition(State::Idle, State::Creating).unwrap();
        // A second Create while the first runs.
        assert_eq!(
            l.transition(State::Idle, State::Creating),
            Err(LifecycleError::CreationInProgress)
        );
        l.transition(State::Creating, State::Running).unwrap();
        assert_eq!(
            l.transition(State::Idle, State::Creating),
            Err(LifecycleError::VmAlreadyExists)
        );
        l.transition(State::Running, State::Deleting).unwrap();
        assert_eq!(
            l.transition(State::Running, State::Deleting),
            Err(LifecycleError::DeletionInProgress)
        );
        assert_eq!(
            l.transition(State::Idle, State::Running),
            Err(LifecycleError::InvalidTransition {
                from: State::Idle,
                to: State::Running
            })
        );
        assert_eq!(l.begin_shutdown(), Some(State::Deleting));
        assert_eq!(l.begin_shutdown(), None);
        assert_eq!(
            l.transition(State::Deleting, State::Idle),
            Err(LifecycleError::ShutdownInProgress)
        );
        assert_eq!(l.get(), State::ShuttingDown);
        assert_eq!(LifecycleError::ShutdownInProgress.code(), Code::UNAVAILABLE);
        assert_eq!(LifecycleError::VmNotRunning.code(), Code::NOT_FOUND);
    }

    #[test]
    fn racing_transitions_have_one_winner() {
        let l = std::sync::Arc::new(Lifecycle::default());
        let wins: usize = (0..8)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || l.transition(State::Idle, State::Creating).is_ok())
            })
            .map(|h| h.join().unwrap() as usize)
            .sum();
        assert_eq!(wins, 1);
    }
}
