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

/// Kernel command-line key carrying the stdio vsock port.
pub const CMDLINE_STDIO_PORT: &str = "spinbox.stdio_port";

/// Limits of `CreateContainerRequest.files`, which the shim keeps to and the agent checks: how
/// many copies, how many bytes each (a directory's files together), how many bytes all
/// together (they travel in one ttrpc message), how many entries one directory.
pub const MAX_FILE_COPIES: usize = 16;
pub const MAX_FILE_COPY_BYTES: usize = 1 << 20;
pub const MAX_FILE_COPIES_BYTES: usize = 2 << 20;
pub const MAX_TREE_ENTRIES: usize = 256;

/// Kernel command-line key carrying the host's hostname, which the agent gives the guest: a
/// container whose spec sets no hostname gets it in its new UTS namespace, as under runc.
pub const CMDLINE_HOSTNAME: &str = "spinbox.hostname";

/// Whether `name` can travel on a kernel command line as a hostname: 1 to 64 letters, digits,
/// dots and hyphens.
pub fn valid_hostname(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

/// The vsock port for stdio streams unless the kernel command line says otherwise.
pub const DEFAULT_STDIO_PORT: u32 = 1025;

/// Line the agent writes to the console (whatever its log level) once its ttrpc server
/// listens: `spinbox-agent-ready port=<port>`. The host waits for it before dialling, so it
/// never sends a vsock CONNECT into a guest whose vsock driver is not up yet (over
/// vhost-device-vsock such a CONNECT can go unanswered for good).
pub const READY_MARKER: &str = "spinbox-agent-ready";

/// Which stream of a process a stdio connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StdioStream {
    Stdin,
    Stdout,
    Stderr,
}

impl StdioStream {
    pub fn as_str(self) -> &'static str {
        match self {
            StdioStream::Stdin => "stdin",
            StdioStream::Stdout => "stdout",
            StdioStream::Stderr => "stderr",
        }
    }
}

/// The first line the host sends on a new connection to the stdio port:
/// `STDIO <container_id> <exec_id or -> <stdin|stdout|stderr>\n`. After it the connection
/// carries that stream's raw bytes; the writer's shutdown(SHUT_WR) is EOF.
pub fn stdio_header(container_id: &str, exec_id: &str, stream: StdioStream) -> String {
    let exec = if exec_id.is_empty() { "-" } else { exec_id };
    format!("STDIO {container_id} {exec} {}\n", stream.as_str())
}

/// Parses a header line (without or with its newline) into (container_id, exec_id, stream).
pub fn parse_stdio_header(line: &str) -> Option<(String, String, StdioStream)> {
    let mut parts = line.trim_end_matches('\n').split(' ');
    if parts.next()? != "STDIO" {
        return None;
    }
    let container = parts.next()?.to_owned();
    let exec = match parts.next()? {
        "-" => String::new(),
        e => e.to_owned(),
    };
    let stream = match parts.next()? {
        "stdin" => StdioStream::Stdin,
        "stdout" => StdioStream::Stdout,
        "stderr" => StdioStream::Stderr,
        _ => return None,
    };
    if parts.next().is_some() || container.is_empty() {
        return None;
    }
    Some((container, exec, stream))
}

/// Version of this API crate; the agent reports its own crate version in `HealthResponse`.
pub const API_VERSION: &str = env!("CARGO_PKG_VERSION");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdio_header_round_trip() {
        let h = stdio_header("c1", "", StdioStream::Stdout);
        assert_eq!(h, "STDIO c1 - stdout\n");
        assert_eq!(
            parse_stdio_header(&h),
            Some(("c1".into(), String::new(), StdioStream::Stdout))
        );
        let h = stdio_header("c1", "e7", StdioStream::Stdin);
        assert_eq!(
            parse_stdio_header(&h),
            Some(("c1".into(), "e7".into(), StdioStream::Stdin))
        );
        assert_eq!(parse_stdio_header("STDIO c1 - stdbad\n"), None);
        assert_eq!(parse_stdio_header("HELLO c1 - stdout\n"), None);
        assert_eq!(parse_stdio_header("STDIO c1 - stdout extra\n"), None);
    }
}
