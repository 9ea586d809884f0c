//! The ttrpc API between spinbox's host side and `spinbox-agent` in the guest.
//!
//! Both sides depend on this crate, so the wire types can never drift apart.

#![allow(
    clippy::all,
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    unused_imports,
    unused_results,
    unused_mut
)]

/// Protobuf messages of `spinbox.agent.v1`.
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// Async ttrpc client (`AgentClient`) and server trait (`Agent`, `create_agent`).
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

/// The vsock port the agent serves on unless the kernel command line says otherwise
/// (`spinbox.agent_port=N`).
pub const DEFAULT_AGENT_PORT: u32 = 1024;

/// Kernel command-line key carrying the agent's vsock port.
pub const CMDLINE_AGENT_PORT: &str = "spinbox.agent_port";

/// Version of this API crate; the agent reports its own crate version in `HealthResponse`.
pub const API_VERSION: &str = env!("CARGO_PKG_VERSION");
