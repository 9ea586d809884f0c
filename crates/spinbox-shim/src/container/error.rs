//! The container errors, each with the ttrpc code containerd acts on, and the phases of a
//! create that a failure names.

use std::fmt;
use std::path::PathBuf;

use spinbox_vmm::VmError;

use crate::lifecycle::LifecycleError;

/// The phases of a create, in order; a failed create names the one that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreatePhase {
    Validate,
    Bundle,
    State,
    Mounts,
    Network,
    Vm,
    Container,
    Stdio,
}

impl fmt::Display for CreatePhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CreatePhase::Validate => "validate",
            CreatePhase::Bundle => "bundle",
            CreatePhase::State => "state",
            CreatePhase::Mounts => "mounts",
            CreatePhase::Network => "network",
            CreatePhase::Vm => "vm",
            CreatePhase::Container => "container",
            CreatePhase::Stdio => "stdio",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("create failed in the {phase} phase: {source}")]
    Create {
        phase: CreatePhase,
        #[source]
        source: Box<ContainerError>,
    },
    #[error("invalid container id {id:?}: {reason}")]
    InvalidId { id: String, reason: String },
    #[error("bundle {path}: {reason}")]
    Bundle { path: PathBuf, reason: String },
    #[error("state directory {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("preparing rootfs: {0}")]
    Rootfs(#[from] spinbox_storage::StorageError),
    #[error("starting microVM: {0}")]
    Vm(#[from] VmError),
    #[error("network: {0}")]
    Network(#[from] spinbox_net::NetError),
    #[error("agent {rpc}: {message}")]
    Agent {
        rpc: &'static str,
        code: ttrpc::Code,
        message: String,
    },
    #[error("stdio: {0}")]
    Stdio(std::io::Error),
    #[error("container {id}: {error}")]
    Lifecycle { id: String, error: LifecycleError },
    #[error("container {0}: process already started")]
    AlreadyStarted(String),
    #[error("exec {0:?} already exists")]
    ExecExists(String),
    #[error("exec {0:?} not found")]
    ExecNotFound(String),
    #[error("{0}")]
    InvalidRequest(String),
    /// A container of a pod whose sandbox this shim does not hold (or holds no longer).
    #[error("pod sandbox {sandbox}: {reason}")]
    Pod { sandbox: String, reason: String },
    #[error("{0}")]
    Hotplug(Box<spinbox_vmm::hotplug::HotplugError>),
}

impl ContainerError {
    /// The ttrpc code containerd acts on.
    pub fn code(&self) -> ttrpc::Code {
        use ttrpc::Code;
        match self {
            ContainerError::Create { source, .. } => source.code(),
            ContainerError::InvalidId { .. } | ContainerError::Bundle { .. } => {
                Code::INVALID_ARGUMENT
            }
            ContainerError::State { source, .. }
                if source.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                LifecycleError::VmAlreadyExists.code()
            }
            ContainerError::State { .. } | ContainerError::Stdio(_) => Code::INTERNAL,
            ContainerError::Rootfs(e) => LifecycleError::MountSetup(e.to_string()).code(),
            ContainerError::Vm(e) => match e {
                VmError::Path { .. } | VmError::InvalidId { .. } => Code::INVALID_ARGUMENT,
                VmError::Cid(e) => LifecycleError::CidExhausted(e.to_string()).code(),
                VmError::BackendTimeout { .. } | VmError::AgentTimeout { .. } => {
                    LifecycleError::DeviceTimeout(e.to_string()).code()
                }
                _ => Code::UNAVAILABLE,
            },
            ContainerError::Network(spinbox_net::NetError::Unsupported(_))
            | ContainerError::Network(spinbox_net::NetError::Publish { .. }) => {
                Code::INVALID_ARGUMENT
            }
            ContainerError::Network(e) => LifecycleError::NetworkSetup(e.to_string()).code(),
            ContainerError::Agent { code, .. } => *code,
            ContainerError::Lifecycle { error, .. } => error.code(),
            ContainerError::AlreadyStarted(_) => Code::FAILED_PRECONDITION,
            ContainerError::ExecExists(_) => Code::ALREADY_EXISTS,
            ContainerError::ExecNotFound(_) => Code::NOT_FOUND,
            ContainerError::InvalidRequest(_) => Code::INVALID_ARGUMENT,
            ContainerError::Pod { .. } => Code::FAILED_PRECONDITION,
            ContainerError::Hotplug(_) => Code::UNAVAILABLE,
        }
    }
}

pub(crate) fn failed(phase: CreatePhase, e: impl Into<ContainerError>) -> ContainerError {
    ContainerError::Create {
        phase,
        source: Box::new(e.into()),
    }
}

pub(crate) fn agent_err(rpc: &'static str, e: ttrpc::Error) -> ContainerError {
    match e {
        ttrpc::Error::RpcStatus(s) => ContainerError::Agent {
            rpc,
            code: s.code(),
            message: s.message().to_owned(),
        },
        other => ContainerError::Agent {
            rpc,
            code: ttrpc::Code::UNAVAILABLE,
            message: other.to_string(),
        },
    }
}

impl From<spinbox_vmm::hotplug::HotplugError> for ContainerError {
    fn from(e: spinbox_vmm::hotplug::HotplugError) -> ContainerError {
        ContainerError::Hotplug(Box::new(e))
    }
}
