//! Published ports: the `io.spinbox.net.publish` annotation, e.g. `8080:80/tcp,5353:53/udp`.

use serde::{Deserialize, Serialize};

use crate::NetError;

/// The annotation that asks for published ports.
pub const ANNOTATION: &str = "io.spinbox.net.publish";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
}

/// The annotation's entry form, `HOST:CONTAINER/PROTO`.
impl std::fmt::Display for PortMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}/{}",
            self.host_port, self.container_port, self.protocol
        )
    }
}

/// Parses `HOST:CONTAINER[/tcp|udp]` entries separated by commas; the protocol defaults to
/// tcp. A bad entry is an error naming the annotation and the entry.
pub fn parse(value: &str) -> Result<Vec<PortMapping>, NetError> {
    let mut out: Vec<PortMapping> = Vec::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let bad = |why: &str| NetError::Publish {
            entry: entry.to_string(),
            reason: why.to_string(),
        };
        let (ports, proto) = match entry.split_once('/') {
            Some((p, "tcp")) => (p, Protocol::Tcp),
            Some((p, "udp")) => (p, Protocol::Udp),
            Some(_) => return Err(bad("the protocol must be tcp or udp")),
            None => (entry, Protocol::Tcp),
        };
        let (host, container) = ports
            .split_once(':')
            .ok_or_else(|| bad("want HOST_PORT:CONTAINER_PORT[/PROTO]"))?;
        let port = |s: &str| -> Result<u16, NetError> {
            match s.parse::<u16>() {
                Ok(p) if p > 0 => Ok(p),
                _ => Err(bad("ports are numbers from 1 to 65535")),
            }
        };
        let m = PortMapping {
            host_port: port(host)?,
            container_port: port(container)?,
            protocol: proto,
        };
        if out
            .iter()
            .any(|o| o.host_port == m.host_port && o.protocol == m.protocol)
        {
            return Err(bad("the host port is published twice"));
        }
        out.push(m);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_entries() {
        let m = parse("8080:80/tcp, 5353:53/udp,9000:9000").unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].host_port, 8080);
        assert_eq!(m[0].container_port, 80);
        assert_eq!(m[1].protocol, Protocol::Udp);
        assert_eq!(m[2].protocol, Protocol::Tcp);
        assert!(parse("").unwrap().is_empty());
        assert_eq!(m[0].to_string(), "8080:80/tcp");
        assert_eq!(m[1].to_string(), "5353:53/udp");
    }

    #[test]
    fn rejects_bad_entries_by_name() {
        for bad in [
            "80",
            "0:80",
            "70000:80",
            "8080:80/sctp",
            "a:b",
            "80:80,80:81",
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(ANNOTATION), "{e}");
        }
    }
}
