//! Inside one network namespace, over rtnetlink: what interfaces, addresses and routes it
//! has, TAP creation, and the tc redirect that joins a TAP to an interface both ways.
//!
//! Every function here runs on the thread that [`crate::netns::run_in`] placed in the
//! namespace; the netlink connection is opened there.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use serde::{Deserialize, Serialize};

use crate::NetError;

/// Names of the TAPs spinbox creates start with this; they are never mirrored themselves.
pub const TAP_PREFIX: &str = "sbtap";
/// Parent handle of the ingress qdisc (ffff:).
const INGRESS_PARENT: u32 = 0xffff_0000;

/// An interface of the container's namespace, as the VM must take it over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub mac: String,
    pub mtu: u32,
    pub addresses: Vec<IpNet>,
}

/// A route of the container's namespace through one of its interfaces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// None: the default route.
    pub destination: Option<IpNet>,
    pub gateway: Option<IpAddr>,
    pub device: String,
    pub source: Option<IpAddr>,
}

/// Opens a netlink connection in the calling thread's namespace.
pub fn connect() -> Result<Handle, NetError> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| NetError::io("opening a netlink socket", e))?;
    tokio::spawn(conn);
    Ok(handle)
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |e| NetError::Netlink {
        what,
        reason: e.to_string(),
    }
}

pub fn format_mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn link_name(link: &LinkMessage) -> Option<String> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

/// The names of every link of the namespace (TAPs, loopback and all).
pub async fn link_names(handle: &Handle) -> Result<Vec<String>, NetError> {
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing links"))?;
    Ok(links.iter().filter_map(link_name).collect())
}

/// The Ethernet interfaces the VM takes over: every one but loopback and spinbox's TAPs,
/// with their IPv4 and global IPv6 addresses.
pub async fn interfaces(handle: &Handle) -> Result<Vec<Interface>, NetError> {
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing links"))?;
    let mut out = Vec::new();
    for link in links {
        let Some(name) = link_name(&link) else {
            continue;
        };
        if link.header.link_layer_type != LinkLayerType::Ether || name.starts_with(TAP_PREFIX) {
            continue;
        }
        let mut mac = None;
        let mut mtu = 1500;
        for a in &link.attributes {
            match a {
                LinkAttribute::Address(b) if b.len() == 6 => mac = Some(format_mac(b)),
                LinkAttribute::Mtu(m) => mtu = *m,
                _ => {}
            }
        }
        let Some(mac) = mac else { continue };
        let mut addresses = Vec::new();
        let mut addrs = handle
            .address()
            .get()
            .set_link_index_filter(link.header.index)
            .execute();
        while let Some(msg) = addrs
            .try_next()
            .await
            .map_err(nl(format!("listing addresses of {name}")))?
        {
            let ip = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            let Some(ip) = ip else { continue };
            // Link-local IPv6 comes from the MAC: the guest derives the same one.
            if let IpAddr::V6(v6) = ip {
                if (v6.segments()[0] & 0xffc0) == 0xfe80 {
                    continue;
                }
            }
            if let Ok(net) = IpNet::new(ip, msg.header.prefix_len) {
                addresses.push(net);
            }
        }
        out.push(Interface {
            name,
            index: link.header.index,
            mac,
            mtu,
            addresses,
        });
    }
    out.sort_by_key(|i| i.index);
    Ok(out)
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// Routes of the main table through `ifaces`, except those the kernel adds by itself for an
/// address (the guest's kernel adds them the same way).
pub async fn routes(handle: &Handle, ifaces: &[Interface]) -> Result<Vec<Route>, NetError> {
    let mut out = Vec::new();
    let requests = [
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ];
    for req in requests {
        let msgs: Vec<RouteMessage> = handle
            .route()
            .get(req)
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing routes"))?;
        for msg in msgs {
            if let Some(r) = convert_route(&msg, ifaces) {
                out.push(r);
            }
        }
    }
    Ok(out)
}

fn convert_route(msg: &RouteMessage, ifaces: &[Interface]) -> Option<Route> {
    const MAIN_TABLE: u32 = 254;
    let h = &msg.header;
    if h.protocol == RouteProtocol::Kernel || h.kind != RouteType::Unicast {
        return None;
    }
    let mut table = u32::from(h.table);
    let (mut dst, mut gw, mut oif, mut src) = (None, None, None, None);
    for a in &msg.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(d) => dst = route_ip(d),
            RouteAttribute::Gateway(g) => gw = route_ip(g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::PrefSource(s) => src = route_ip(s),
            _ => {}
        }
    }
    if table != MAIN_TABLE {
        return None;
    }
    let device = ifaces.iter().find(|i| Some(i.index) == oif)?.name.clone();
    let destination = match dst {
        Some(ip) => Some(IpNet::new(ip, h.destination_prefix_length).ok()?),
        None if h.destination_prefix_length == 0 => None,
        None => return None,
    };
    // IPv6 multicast and link-local routes come with the interface in the guest too.
    if let Some(IpNet::V6(n)) = destination {
        let first = n.addr().segments()[0];
        if (first & 0xffc0) == 0xfe80 || (first & 0xff00) == 0xff00 {
            return None;
        }
    }
    Some(Route {
        destination,
        gateway: gw,
        device,
        source: src,
    })
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Creates a TAP named `name` in the calling thread's namespace (with virtio-net headers, no
/// packet info) and returns its queue fd. The TAP is not persistent: it disappears when the
/// last holder of the fd (QEMU) closes it.
pub fn create_tap(name: &str) -> Result<OwnedFd, NetError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(NetError::Other(format!(
            "TAP name {name:?} is not 1-15 bytes"
        )));
    }
    // SAFETY: a plain open(2) of a NUL-terminated literal.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(NetError::io(
            "opening /dev/net/tun",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes an ifreq, which IfReq lays out (40 bytes).
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(NetError::io(
            format!("TUNSETIFF {name}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(fd)
}

/// Index of the link named `name`, or None.
pub async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>, NetError> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(l)) => Ok(Some(l.header.index)),
        Ok(None) => Ok(None),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(nl(format!("looking up link {name}"))(e)),
    }
}

/// Sets `index`'s MTU and brings it up.
pub async fn set_up(handle: &Handle, index: u32, mtu: u32) -> Result<(), NetError> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
        .execute()
        .await
        .map_err(nl(format!("setting link {index} up with MTU {mtu}")))
}

/// Everything arriving on `a` leaves on `b` and the other way round: an ingress qdisc on each
/// with a u32 match-all filter whose action is a mirred egress redirect to the other.
pub async fn redirect_both_ways(handle: &Handle, a: u32, b: u32) -> Result<(), NetError> {
    for (from, to) in [(a, b), (b, a)] {
        handle
            .qdisc()
            .add(from as i32)
            .ingress()
            .execute()
            .await
            .map_err(nl(format!("adding an ingress qdisc on link {from}")))?;
        handle
            .traffic_filter(from as i32)
            .add()
            .parent(INGRESS_PARENT)
            .protocol((libc::ETH_P_ALL as u16).to_be())
            .redirect(to)
            .map_err(nl("building the redirect filter"))?
            .execute()
            .await
            .map_err(nl(format!("adding the redirect filter {from} -> {to}")))?;
    }
    Ok(())
}

/// Removes the ingress qdisc (and with it the redirect filter) of the link named `name`; a
/// missing link or qdisc is not an error.
pub async fn remove_ingress(handle: &Handle, name: &str) -> Result<(), NetError> {
    let Some(index) = link_index(handle, name).await? else {
        return Ok(());
    };
    let mut req = handle.qdisc().del(index as i32);
    req.message_mut().header.parent = rtnetlink::packet_route::tc::TcHandle::INGRESS;
    req.message_mut().header.handle = rtnetlink::packet_route::tc::TcHandle::from(INGRESS_PARENT);
    match req.execute().await {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e))
            if [-libc::ENOENT, -libc::EINVAL, -libc::ENODEV].contains(&e.raw_code()) =>
        {
            Ok(())
        }
        Err(e) => Err(nl(format!("removing the ingress qdisc of {name}"))(e)),
    }
}

/// Deletes the link named `name` if it exists.
pub async fn delete_link(handle: &Handle, name: &str) -> Result<(), NetError> {
    let Some(index) = link_index(handle, name).await? else {
        return Ok(());
    };
    match handle.link().del(index).execute().await {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
        Err(e) => Err(nl(format!("deleting link {name}"))(e)),
    }
}
