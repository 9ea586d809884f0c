//! What the host must not give a container, refused before anything is set up.
//!
//! - A network namespace that is the shim's own or PID 1's: mirroring puts a TAP beside each
//!   interface and redirects its ingress into the VM, which for the host's namespace would
//!   take the host's network.
//! - A network namespace that already holds a spinbox TAP: another sandbox's VM mirrors it,
//!   and two VMs cannot take over the same interfaces (rolling back would also remove the
//!   other sandbox's TAP and redirects).
//! - A published host port below 1024 unless `network.publish_privileged_ports`, one another
//!   container's rules already publish, or one a socket on the host is bound to (its traffic
//!   would go to the container instead).
//!
//! The namespace and port checks run once early (a refusal leaves nothing) and again under the
//! host lock right before the TAPs and the rules are made, so two creates cannot both take a
//! namespace or a port.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::errno::Errno;
use nix::sys::socket::{
    bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrIn6,
    SockaddrLike,
};

use crate::link::{self, TAP_PREFIX};
use crate::netns;
use crate::nft::PublishedPort;
use crate::publish::{PortMapping, Protocol};
use crate::NetError;

/// The shim's own network namespace.
const SELF_NETNS: &str = "/proc/self/ns/net";
/// PID 1's: the host's, where the shim does not run in one of its own.
const INIT_NETNS: &str = "/proc/1/ns/net";

/// A namespace file's identity: stat(2)'s (device, inode), the magic links followed.
type NsId = (u64, u64);

async fn ns_id(path: &Path) -> std::io::Result<NsId> {
    let m = tokio::fs::metadata(path).await?;
    Ok((m.dev(), m.ino()))
}

/// Why a namespace must not be mirrored, if it is the shim's (`shim`) or PID 1's (`init`).
fn own_namespace(target: NsId, shim: NsId, init: Option<NsId>) -> Option<&'static str> {
    match (target == shim, Some(target) == init) {
        (true, true) => Some("is the shim's own network namespace (the host's, PID 1's)"),
        (true, false) => Some("is the shim's own network namespace"),
        (false, true) => Some("is the host's network namespace (PID 1's)"),
        (false, false) => None,
    }
}

/// Refuses the spec's namespace at `path` when it is the shim's own or PID 1's.
pub(crate) async fn check_not_own(path: &Path) -> Result<(), NetError> {
    let target = ns_id(path).await.map_err(|e| NetError::Netns {
        path: path.to_path_buf(),
        reason: format!("stat: {e}"),
    })?;
    let shim = ns_id(Path::new(SELF_NETNS))
        .await
        .map_err(|e| NetError::io(format!("stat {SELF_NETNS}"), e))?;
    // In a user namespace PID 1's may be out of reach: the shim's own is then what counts.
    let init = match ns_id(Path::new(INIT_NETNS)).await {
        Ok(id) => Some(id),
        Err(e) => {
            log::warn!("stat {INIT_NETNS}: {e}; checking against the shim's namespace only");
            None
        }
    };
    match own_namespace(target, shim, init) {
        None => Ok(()),
        Some(what) => Err(NetError::Unsupported(format!(
            "linux.namespaces[network] {} {what}: spinbox mirrors a container's namespace onto \
             the VM (a TAP beside each interface, its ingress redirected into the VM) and would \
             take the host's network; give the container a network namespace of its own",
            path.display()
        ))),
    }
}

/// The first spinbox TAP among a namespace's link names.
fn foreign_tap(names: &[String]) -> Option<&str> {
    names
        .iter()
        .map(String::as_str)
        .find(|n| n.starts_with(TAP_PREFIX))
}

/// Refuses the namespace at `path` when it holds a spinbox TAP (another sandbox's VM).
pub(crate) async fn check_no_tap(path: &Path) -> Result<(), NetError> {
    let names = netns::run_in(path, || async {
        let h = link::connect()?;
        link::link_names(&h).await
    })
    .await?;
    match foreign_tap(&names) {
        None => Ok(()),
        Some(tap) => Err(NetError::Unsupported(format!(
            "linux.namespaces[network] {} holds {tap}, the TAP of another spinbox sandbox: its \
             VM already mirrors this namespace, and two VMs cannot take over the same \
             interfaces; give the container a network namespace of its own (or make it a \
             member of that sandbox's pod)",
            path.display()
        ))),
    }
}

/// Refuses host ports below 1024 unless the configuration allows them.
pub(crate) fn check_privileged(publish: &[PortMapping], allowed: bool) -> Result<(), NetError> {
    match publish.iter().find(|m| m.host_port < 1024) {
        Some(m) if !allowed => Err(NetError::Publish {
            entry: m.to_string(),
            reason: format!(
                "host port {}/{} is privileged (below 1024, where the host's own services \
                 listen) and network.publish_privileged_ports is false",
                m.host_port, m.protocol
            ),
        }),
        _ => Ok(()),
    }
}

/// Refuses a host port that rules of another container (not `id`) already publish.
pub(crate) fn check_not_published(
    publish: &[PortMapping],
    taken: &[PublishedPort],
    id: &str,
) -> Result<(), NetError> {
    for m in publish {
        if let Some(t) = taken
            .iter()
            .find(|t| t.port == m.host_port && t.protocol == m.protocol && t.owner != id)
        {
            return Err(NetError::Publish {
                entry: m.to_string(),
                reason: format!(
                    "host port {}/{} is already published by spinbox container {:?} (the nft \
                     table inet spinbox; `spinbox gc` or deploy/cleanup-cni.sh removes the \
                     rules of a container that is gone)",
                    m.host_port, m.protocol, t.owner
                ),
            });
        }
    }
    Ok(())
}

/// Whether binding `port` of `proto` on `addr` fails because a socket of the calling
/// thread's namespace holds it: Some(the error text) if so. An address family the host does
/// not have is not in use.
fn probe<A: SockaddrLike>(
    family: AddressFamily,
    addr: &A,
    proto: Protocol,
) -> Result<Option<String>, Errno> {
    let ty = match proto {
        Protocol::Tcp => SockType::Stream,
        Protocol::Udp => SockType::Datagram,
    };
    let fd = match socket(family, ty, SockFlag::SOCK_CLOEXEC, None) {
        Ok(fd) => fd,
        Err(Errno::EAFNOSUPPORT) => return Ok(None),
        Err(e) => return Err(e),
    };
    if family == AddressFamily::Inet6 {
        // [::] alone: the IPv4 wildcard is probed by itself.
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    if proto == Protocol::Tcp {
        // Connections in TIME_WAIT do not hold a port; listeners and bound sockets do.
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    }
    // Bound, never listening: no connection can arrive; closing releases the port.
    match bind(fd.as_raw_fd(), addr) {
        Ok(()) => Ok(None),
        Err(Errno::EADDRINUSE) => Ok(Some(Errno::EADDRINUSE.desc().to_string())),
        Err(Errno::EADDRNOTAVAIL) if family == AddressFamily::Inet6 => Ok(None),
        Err(e) => Err(e),
    }
}

/// Refuses a host port some socket of the shim's namespace (the host's) is bound to: the
/// IPv4 and IPv6 wildcards are probed, which conflict with a socket on any local address.
pub(crate) async fn check_not_bound(publish: &[PortMapping]) -> Result<(), NetError> {
    let publish = publish.to_vec();
    tokio::task::spawn_blocking(move || {
        for m in &publish {
            let v4 = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, m.host_port));
            let v6 = SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, m.host_port, 0, 0));
            let results = [
                (
                    format!("0.0.0.0:{}", m.host_port),
                    probe(AddressFamily::Inet, &v4, m.protocol),
                ),
                (
                    format!("[::]:{}", m.host_port),
                    probe(AddressFamily::Inet6, &v6, m.protocol),
                ),
            ];
            for (at, r) in results {
                let reason = match r {
                    Ok(None) => continue,
                    Ok(Some(why)) => format!(
                        "host port {}/{} is in use on the host (binding {at}: {why}): \
                         publishing it would take its traffic; choose another host port",
                        m.host_port, m.protocol
                    ),
                    Err(e) => format!(
                        "host port {}/{}: probing whether it is in use (binding {at}): {e}",
                        m.host_port, m.protocol
                    ),
                };
                return Err(NetError::Publish {
                    entry: m.to_string(),
                    reason,
                });
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| NetError::Other(format!("port probe task: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::parse;

    #[test]
    fn own_namespace_names_which() {
        let (a, b, c) = ((1, 10), (1, 11), (2, 10));
        assert!(own_namespace(a, b, Some(b)).is_none());
        assert!(
            own_namespace(c, a, Some(a)).is_none(),
            "same inode, other device"
        );
        assert!(own_namespace(a, a, Some(a)).unwrap().contains("shim's own"));
        assert!(own_namespace(a, a, Some(a)).unwrap().contains("PID 1"));
        assert!(own_namespace(a, a, None).unwrap().contains("shim's own"));
        let init = own_namespace(a, b, Some(a)).unwrap();
        assert!(init.contains("host's") && !init.contains("shim"), "{init}");
    }

    #[test]
    fn a_spinbox_tap_is_found_by_its_prefix() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(foreign_tap(&names(&["lo", "eth0"])), None);
        assert_eq!(
            foreign_tap(&names(&["lo", "eth0", "sbtap0"])),
            Some("sbtap0")
        );
        assert_eq!(foreign_tap(&names(&["tap0", "xsbtap1"])), None);
    }

    #[test]
    fn privileged_ports_need_the_config() {
        let low = parse("8080:80,80:8080/udp").unwrap();
        let e = check_privileged(&low, false).unwrap_err().to_string();
        assert!(e.contains("network.publish_privileged_ports"), "{e}");
        assert!(
            e.contains("80:8080/udp") && e.contains("host port 80/udp"),
            "{e}"
        );
        assert!(check_privileged(&low, true).is_ok());
        assert!(check_privileged(&parse("1024:80").unwrap(), false).is_ok());
    }

    #[test]
    fn a_port_published_by_another_container_is_refused() {
        let taken = [PublishedPort {
            owner: "web".into(),
            protocol: Protocol::Tcp,
            port: 18080,
        }];
        let e = check_not_published(&parse("18080:80").unwrap(), &taken, "other")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("host port 18080/tcp") && e.contains("\"web\""),
            "{e}"
        );
        // Another protocol, another port, or the container's own rules: no conflict.
        assert!(check_not_published(&parse("18080:80/udp").unwrap(), &taken, "o").is_ok());
        assert!(check_not_published(&parse("18081:80").unwrap(), &taken, "o").is_ok());
        assert!(check_not_published(&parse("18080:80").unwrap(), &taken, "web").is_ok());
    }

    #[tokio::test]
    async fn a_bound_port_is_refused_and_a_free_one_is_not() {
        // Listeners the test holds, on loopback, in the test's namespace (where it runs).
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp_port = tcp.local_addr().unwrap().port();
        let e = check_not_bound(&parse(&format!("{tcp_port}:80")).unwrap())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("host port {tcp_port}/tcp is in use")),
            "{e}"
        );
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp_port = udp.local_addr().unwrap().port();
        let e = check_not_bound(&parse(&format!("{udp_port}:53/udp")).unwrap())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("host port {udp_port}/udp is in use")),
            "{e}"
        );
        // Released: the port is free again, and the probe itself holds nothing afterwards.
        drop(tcp);
        let free = parse(&format!("{tcp_port}:80")).unwrap();
        check_not_bound(&free).await.unwrap();
        check_not_bound(&free).await.unwrap();
        let again = std::net::TcpListener::bind(("127.0.0.1", tcp_port));
        assert!(again.is_ok(), "the probe kept the port: {again:?}");
    }

    #[tokio::test]
    async fn the_shims_own_namespace_is_refused_and_another_is_not() {
        // PID 1's namespace file may be out of reach (a sandboxed test host): then only ours.
        let init_readable = std::fs::metadata(INIT_NETNS).is_ok();
        for path in [SELF_NETNS, INIT_NETNS] {
            if path == INIT_NETNS && !init_readable {
                continue;
            }
            let e = check_not_own(Path::new(path))
                .await
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(path) && e.contains("network namespace of its own"),
                "{e}"
            );
            assert!(e.contains("shim's own") || e.contains("host's"), "{e}");
        }
        assert!(check_not_own(Path::new("/nonexistent/ns")).await.is_err());

        // A namespace of its own: a thread that unshared one (needs CAP_SYS_ADMIN).
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let r = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map(|()| nix::unistd::gettid());
            let _ = ready_tx.send(r);
            let _ = done_rx.recv();
        });
        let tid = ready_rx
            .recv()
            .unwrap()
            .expect("unshare(CLONE_NEWNET): run as root");
        let other = format!("/proc/self/task/{tid}/ns/net");
        let r = check_not_own(Path::new(&other)).await;
        drop(done_tx);
        t.join().unwrap();
        r.unwrap();
    }
}
