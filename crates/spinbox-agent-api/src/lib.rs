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

/// `p` with empty and `.` components dropped (`//a/./b/` -> `/a/b`): how host and guest
/// compare a bind mount's source with a copy's or a share's.
pub fn clean_path(p: &str) -> String {
    let parts: Vec<&str> = p
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    format!("/{}", parts.join("/"))
}

/// Most virtio-fs shares (writable host directory binds) one VM takes.
pub const MAX_SHARES: usize = 8;

/// The virtio-fs tag of a VM's share number `index`.
pub fn share_tag(index: usize) -> String {
    format!("sbxfs{index}")
}

/// A virtio-fs tag the agent accepts: `sbxfs` and a number below [`MAX_SHARES`] (it becomes
/// a directory name in the guest).
pub fn valid_share_tag(tag: &str) -> bool {
    tag.strip_prefix("sbxfs")
        .and_then(|n| n.parse::<usize>().ok())
        .is_some_and(|n| n < MAX_SHARES && share_tag(n) == tag)
}

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
/// `STDIO <container_id> <exec_id or -> <stdin|stdout|stderr>[ port]\n`. After it the
/// connection carries that stream's raw bytes; the writer's shutdown(SHUT_WR) is EOF.
///
/// With ` port` (output streams only) the host asks for the bytes on the stream's virtio
/// serial port ([`output_port_name`]) instead. The agent answers with one byte: [`ROUTE_PORT`]
/// (the bytes go by the port; at EOF the connection carries the stream's byte count, 8 bytes
/// little-endian, then shutdown) or [`ROUTE_INLINE`] (no port for this stream: the bytes
/// follow on the connection as without ` port`).
pub fn stdio_header(container_id: &str, exec_id: &str, stream: StdioStream) -> String {
    StdioHeader {
        container: container_id.to_owned(),
        exec: exec_id.to_owned(),
        stream,
        port: false,
    }
    .line()
}

/// A parsed stdio header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StdioHeader {
    pub container: String,
    /// "" for the container's init.
    pub exec: String,
    pub stream: StdioStream,
    /// The host asks for the bytes on the stream's serial port.
    pub port: bool,
}

impl StdioHeader {
    /// The header line, newline included.
    pub fn line(&self) -> String {
        let exec = if self.exec.is_empty() {
            "-"
        } else {
            &self.exec
        };
        let port = if self.port { " port" } else { "" };
        format!(
            "STDIO {} {exec} {}{port}\n",
            self.container,
            self.stream.as_str()
        )
    }
}

/// The agent's answer to a ` port` header: the bytes go by the serial port.
pub const ROUTE_PORT: u8 = b'P';
/// The agent's answer to a ` port` header: the bytes follow on this connection.
pub const ROUTE_INLINE: u8 = b'I';

/// The virtio serial port (`virtserialport` name) that carries a container init's output
/// stream, if that stream has one. Under emulation a serial port moves several times the
/// bytes per guest CPU second of a vsock stream: the agent splices the process's pipe into
/// it without copying (docs/ARCHITECTURE.md).
pub fn output_port_name(stream: StdioStream) -> Option<&'static str> {
    match stream {
        StdioStream::Stdout => Some("spinbox.stdout"),
        StdioStream::Stderr => Some("spinbox.stderr"),
        StdioStream::Stdin => None,
    }
}

/// Parses a header line (without or with its newline). ` port` is accepted on output
/// streams only.
pub fn parse_stdio_header(line: &str) -> Option<StdioHeader> {
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
    let port = match parts.next() {
        None => false,
        Some("port") if output_port_name(stream).is_some() => true,
        Some(_) => return None,
    };
    if parts.next().is_some() || container.is_empty() {
        return None;
    }
    Some(StdioHeader {
        container,
        exec,
        stream,
        port,
    })
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
        let parsed = parse_stdio_header(&h).expect("parses");
        assert_eq!(
            (
                parsed.container.as_str(),
                parsed.exec.as_str(),
                parsed.stream,
                parsed.port
            ),
            ("c1", "", StdioStream::Stdout, false)
        );
        let h = stdio_header("c1", "e7", StdioStream::Stdin);
        let parsed = parse_stdio_header(&h).expect("parses");
        assert_eq!(
            (parsed.exec.as_str(), parsed.stream),
            ("e7", StdioStream::Stdin)
        );
        assert_eq!(parse_stdio_header("STDIO c1 - stdbad\n"), None);
        assert_eq!(parse_stdio_header("HELLO c1 - stdout\n"), None);
        assert_eq!(parse_stdio_header("STDIO c1 - stdout extra\n"), None);
        assert_eq!(parse_stdio_header("STDIO c1 - stdout port port\n"), None);
    }

    #[test]
    fn share_tags_are_numbered_and_checked() {
        assert_eq!(share_tag(0), "sbxfs0");
        assert!(valid_share_tag("sbxfs7"));
        for bad in [
            "sbxfs8",
            "sbxfs01",
            "sbxfs",
            "sbxfs-1",
            "x",
            "sbxfs0/..",
            "",
        ] {
            assert!(!valid_share_tag(bad), "{bad}");
        }
    }

    #[test]
    fn port_route_is_asked_for_output_streams_only() {
        let header = StdioHeader {
            container: "c1".into(),
            exec: String::new(),
            stream: StdioStream::Stderr,
            port: true,
        };
        assert_eq!(header.line(), "STDIO c1 - stderr port\n");
        assert_eq!(parse_stdio_header(&header.line()), Some(header));
        assert_eq!(parse_stdio_header("STDIO c1 - stdin port\n"), None);
        assert_eq!(
            output_port_name(StdioStream::Stdout),
            Some("spinbox.stdout")
        );
        assert_eq!(output_port_name(StdioStream::Stdin), None);
    }
}
