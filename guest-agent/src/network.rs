//! ConfigureNetwork: the guest's own network namespace, set up as the host describes it.
//!
//! Each interface is a virtio-net device the VM was started with, found by its MAC; it is set
//! down, renamed, given its MTU and addresses, and brought up. Then the routes are added, in
//! order. The agent (PID 1) runs in the guest's root network namespace, which containers
//! created with `share_vm_network` share.
//!
//! The request is checked whole ([`plan`]) before anything is touched, so a bad address or
//! route fails with a message naming the field and leaves the network alone. Addresses and
//! routes are added with "replace" semantics (`ip addr replace`, `ip route replace`), so a
//! retried call does not fail on what the first one already did.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use futures::TryStreamExt as _;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{RouteMessage, RouteScope};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use spinbox_agent_api::agent::{NetworkConfig, NetworkInterface, NetworkRoute};
use ttrpc::Code;

use crate::container::RpcError;
use crate::log::{debug, info, warning};

/// How long to wait for a virtio-net device to show up (virtio_net may still be probing),
/// and how often to look.
const LINK_WAIT: Duration = Duration::from_secs(2);
const LINK_POLL: Duration = Duration::from_millis(50);
/// Longest interface name the kernel takes (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

/// One ConfigureNetwork at a time: two interleaved would rename each other's links.
static CONFIGURING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// IPv4 or IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    fn max_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    /// 0.0.0.0 or ::, the destination of a default route.
    fn unspecified(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    }
}

/// One interface, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfacePlan {
    /// The name to give it; empty: keep the kernel's.
    pub name: String,
    pub mac: [u8; 6],
    /// 0: leave the MTU alone.
    pub mtu: u32,
    pub addresses: Vec<(IpAddr, u8)>,
}

/// One route, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePlan {
    pub family: Family,
    /// The destination prefix (0.0.0.0/0 or ::/0 for a default route).
    pub destination: IpAddr,
    pub prefix_len: u8,
    /// None: a link route (the destination is on `device`).
    pub gateway: Option<IpAddr>,
    /// Interface name; empty only with a gateway (the kernel picks the device).
    pub device: String,
    pub source: Option<IpAddr>,
    /// For messages: `route[1] (default via 10.0.0.1 dev eth0)`.
    pub label: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub interfaces: Vec<InterfacePlan>,
    pub routes: Vec<RoutePlan>,
}

/// `aa:bb:cc:dd:ee:ff` (either case; `-` accepted as separator too) -> bytes.
pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        bail!("MAC address {s:?}: want six hex bytes like aa:bb:cc:dd:ee:ff");
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(&parts) {
        if part.is_empty() || part.len() > 2 {
            bail!("MAC address {s:?}: bad byte {part:?}");
        }
        *byte = u8::from_str_radix(part, 16)
            .map_err(|_| anyhow!("MAC address {s:?}: bad byte {part:?}"))?;
    }
    Ok(mac)
}

/// Bytes -> `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// An IP address from the request; the error names the field and the value.
pub fn parse_ip(field: &str, value: &str) -> Result<IpAddr> {
    value
        .trim()
        .parse::<IpAddr>()
        .map_err(|_| anyhow!("{field}: {value:?} is not an IPv4 or IPv6 address"))
}

/// Whether `ip` has bits set past its first `prefix_len` bits.
fn has_host_bits(ip: &IpAddr, prefix_len: u8) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let bits = u32::from(*a);
            let host = u32::MAX.checked_shr(u32::from(prefix_len)).unwrap_or(0);
            bits & host != 0
        }
        IpAddr::V6(a) => {
            let bits = u128::from(*a);
            let host = u128::MAX.checked_shr(u32::from(prefix_len)).unwrap_or(0);
            bits & host != 0
        }
    }
}

/// A route destination: `a.b.c.d/len`, an IPv6 equivalent, or a bare address (a host route).
/// Empty: None, the default route.
pub fn parse_destination(s: &str) -> Result<Option<(IpAddr, u8)>> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let ip = parse_ip("destination", addr).with_context(|| format!("destination {s:?}"))?;
    let max = Family::of(&ip).max_prefix();
    let prefix_len = match len {
        None => max,
        Some(l) => l
            .parse::<u8>()
            .ok()
            .filter(|n| *n <= max)
            .ok_or_else(|| anyhow!("destination {s:?}: prefix length must be 0..={max}"))?,
    };
    if has_host_bits(&ip, prefix_len) {
        bail!("destination {s:?}: address has bits set past the /{prefix_len} prefix");
    }
    Ok(Some((ip, prefix_len)))
}

/// The family of a route: the destination's; for a default route, the gateway's, else the
/// source's. Every address given must be of that family.
pub fn route_family(
    destination: Option<&(IpAddr, u8)>,
    gateway: Option<&IpAddr>,
    source: Option<&IpAddr>,
) -> Result<Family> {
    let (family, from) = match (destination, gateway, source) {
        (Some((d, _)), _, _) => (Family::of(d), "the destination"),
        (None, Some(g), _) => (Family::of(g), "the gateway"),
        (None, None, Some(s)) => (Family::of(s), "the source"),
        (None, None, None) => {
            bail!("a default route needs a gateway or a source address to tell IPv4 from IPv6")
        }
    };
    for (what, ip) in [("gateway", gateway), ("source", source)] {
        if let Some(ip) = ip {
            if Family::of(ip) != family {
                bail!(
                    "{what} {ip} is {} but {from} is {}",
                    Family::of(ip).name(),
                    family.name()
                );
            }
        }
    }
    Ok(family)
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
}

fn interface_plan(i: usize, iface: &NetworkInterface) -> Result<InterfacePlan> {
    let mac = parse_mac(&iface.mac).with_context(|| format!("interfaces[{i}].mac"))?;
    if mac == [0; 6] || mac[0] & 1 != 0 {
        bail!(
            "interfaces[{i}].mac: {:?} is not a unicast hardware address",
            iface.mac
        );
    }
    if !iface.name.is_empty() && !valid_ifname(&iface.name) {
        bail!(
            "interfaces[{i}].name: {:?} is not a valid interface name (1-{MAX_IFNAME} bytes, \
             no '/', ':' or spaces)",
            iface.name
        );
    }
    if iface.mtu != 0 && !(68..=65535).contains(&iface.mtu) {
        bail!("interfaces[{i}].mtu: {} is out of range", iface.mtu);
    }
    let mut addresses = Vec::new();
    for (j, a) in iface.addresses.iter().enumerate() {
        let field = format!("interfaces[{i}].addresses[{j}].address");
        let ip = parse_ip(&field, &a.address)?;
        if ip.is_unspecified() || ip.is_multicast() {
            bail!("{field}: {ip} cannot be an interface address");
        }
        let max = Family::of(&ip).max_prefix();
        let prefix_len = u8::try_from(a.prefix_len)
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| {
                anyhow!(
                    "interfaces[{i}].addresses[{j}].prefix_len: {} for {ip} (want 1..={max})",
                    a.prefix_len
                )
            })?;
        addresses.push((ip, prefix_len));
    }
    Ok(InterfacePlan {
        name: iface.name.clone(),
        mac,
        mtu: iface.mtu,
        addresses,
    })
}

fn route_label(i: usize, r: &NetworkRoute) -> String {
    let mut s = format!(
        "route[{i}] ({}",
        if r.destination.is_empty() {
            "default"
        } else {
            r.destination.as_str()
        }
    );
    if !r.gateway.is_empty() {
        s.push_str(&format!(" via {}", r.gateway));
    }
    if !r.device.is_empty() {
        s.push_str(&format!(" dev {}", r.device));
    }
    if !r.source.is_empty() {
        s.push_str(&format!(" src {}", r.source));
    }
    s.push(')');
    s
}

fn route_plan(
    i: usize,
    r: &NetworkRoute,
    names: &HashSet<&str>,
    unnamed: bool,
) -> Result<RoutePlan> {
    let label = route_label(i, r);
    let inner = || -> Result<RoutePlan> {
        let destination = parse_destination(&r.destination)?;
        let optional = |field: &str, v: &str| -> Result<Option<IpAddr>> {
            if v.trim().is_empty() {
                Ok(None)
            } else {
                parse_ip(field, v).map(Some)
            }
        };
        let gateway = optional("gateway", &r.gateway)?;
        let source = optional("source", &r.source)?;
        let family = route_family(destination.as_ref(), gateway.as_ref(), source.as_ref())?;
        if r.device.is_empty() {
            if gateway.is_none() {
                bail!("a route without a gateway needs a device");
            }
        } else if !names.contains(r.device.as_str()) && !unnamed {
            bail!(
                "device {:?} is not one of the configured interfaces",
                r.device
            );
        }
        let (destination, prefix_len) = destination.unwrap_or((family.unspecified(), 0));
        Ok(RoutePlan {
            family,
            destination,
            prefix_len,
            gateway,
            device: r.device.clone(),
            source,
            label: label.clone(),
        })
    };
    inner().with_context(|| label.clone())
}

/// Checks the whole request without touching the system.
pub fn plan(cfg: &NetworkConfig) -> Result<Plan> {
    let mut interfaces = Vec::new();
    let mut macs = HashSet::new();
    let mut names = HashSet::new();
    for (i, iface) in cfg.interfaces.iter().enumerate() {
        let p = interface_plan(i, iface)?;
        if !macs.insert(p.mac) {
            bail!("interfaces[{i}].mac: {} is given twice", format_mac(&p.mac));
        }
        if !p.name.is_empty() && !names.insert(iface.name.as_str()) {
            bail!("interfaces[{i}].name: {:?} is given twice", p.name);
        }
        interfaces.push(p);
    }
    // An interface that keeps its kernel name can only be checked against routes once found.
    let unnamed = interfaces.iter().any(|p| p.name.is_empty());
    let mut routes = Vec::new();
    for (i, r) in cfg.routes.iter().enumerate() {
        routes.push(route_plan(i, r, &names, unnamed)?);
    }
    Ok(Plan { interfaces, routes })
}

/// ConfigureNetwork: checks the request, then applies it.
pub async fn configure(cfg: &NetworkConfig) -> Result<(), RpcError> {
    let plan = plan(cfg)
        .map_err(|e| RpcError::new(Code::INVALID_ARGUMENT, format!("configure network: {e:#}")))?;
    let _guard = CONFIGURING.lock().await;
    apply(&plan).await.map_err(|e| {
        let msg = format!("configure network: {e:#}");
        warning!("{msg}");
        let code = if e.downcast_ref::<MissingLinks>().is_some() {
            Code::FAILED_PRECONDITION
        } else {
            Code::INTERNAL
        };
        RpcError::new(code, msg)
    })
}

/// No link carries these MACs.
#[derive(Debug)]
struct MissingLinks(Vec<String>);

impl std::fmt::Display for MissingLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no network interface with MAC {} after {} ms (is the virtio-net device attached and virtio_net loaded?)",
            self.0.join(", "),
            LINK_WAIT.as_millis()
        )
    }
}

impl std::error::Error for MissingLinks {}

/// A link as the kernel reports it.
#[derive(Debug, Clone)]
struct Link {
    index: u32,
    name: String,
    mac: Vec<u8>,
}

fn link_of(msg: &LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        mac: Vec::new(),
    };
    for a in &msg.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Address(m) => link.mac = m.clone(),
            _ => {}
        }
    }
    link
}

/// A netlink failure as the errno text (`File exists (os error 17)`).
fn nl(e: rtnetlink::Error) -> anyhow::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => anyhow::Error::new(m.to_io()),
        other => anyhow::Error::new(other),
    }
}

async fn dump_links(handle: &Handle) -> Result<Vec<Link>> {
    let mut links = Vec::new();
    let mut stream = handle.link().get().execute();
    while let Some(msg) = stream
        .try_next()
        .await
        .map_err(nl)
        .context("listing links")?
    {
        links.push(link_of(&msg));
    }
    Ok(links)
}

/// The link of each interface (by MAC), in order, waiting up to [`LINK_WAIT`] for them to
/// appear. Also returns every link seen (for name clashes).
async fn find_links(handle: &Handle, ifaces: &[InterfacePlan]) -> Result<(Vec<Link>, Vec<Link>)> {
    let deadline = Instant::now() + LINK_WAIT;
    loop {
        let all = dump_links(handle).await?;
        let found: Vec<Option<&Link>> = ifaces
            .iter()
            .map(|p| all.iter().find(|l| l.mac.as_slice() == p.mac.as_slice()))
            .collect();
        if found.iter().all(Option::is_some) {
            let links = found.into_iter().flatten().cloned().collect();
            return Ok((links, all));
        }
        if Instant::now() >= deadline {
            let missing = ifaces
                .iter()
                .zip(&found)
                .filter(|(_, l)| l.is_none())
                .map(|(p, _)| format_mac(&p.mac))
                .collect();
            return Err(MissingLinks(missing).into());
        }
        tokio::time::sleep(LINK_POLL).await;
    }
}

async fn set_link(handle: &Handle, msg: LinkMessage) -> Result<()> {
    handle.link().set(msg).execute().await.map_err(nl)
}

/// Aborts the netlink connection task when configuration ends, however it ends.
struct ConnectionTask(tokio::task::JoinHandle<()>);

impl Drop for ConnectionTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn apply(plan: &Plan) -> Result<()> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
    let _task = ConnectionTask(tokio::spawn(conn));

    // Loopback first: it exists in every network namespace, maybe still down.
    let lo = handle
        .link()
        .get()
        .match_name("lo")
        .execute()
        .try_next()
        .await
        .map_err(nl)
        .context("finding lo")?
        .context("finding lo: not reported")?;
    set_link(
        &handle,
        LinkUnspec::new_with_index(lo.header.index).up().build(),
    )
    .await
    .context("setting lo up")?;

    let (links, all) = find_links(&handle, &plan.interfaces).await?;
    let what = |p: &InterfacePlan, l: &Link| {
        format!(
            "interface {} (MAC {}, was {})",
            if p.name.is_empty() { &l.name } else { &p.name },
            format_mac(&p.mac),
            l.name
        )
    };
    for (p, l) in plan.interfaces.iter().zip(&links) {
        set_link(&handle, LinkUnspec::new_with_index(l.index).down().build())
            .await
            .with_context(|| format!("{}: setting it down", what(p, l)))?;
    }

    // Renames: when a wanted name is held by another link (eth0 and eth1 swapped, say),
    // park the links to rename under temporary names first.
    let renames: Vec<(&InterfacePlan, &Link)> = plan
        .interfaces
        .iter()
        .zip(&links)
        .filter(|(p, l)| !p.name.is_empty() && p.name != l.name)
        .collect();
    let taken: HashSet<&str> = all.iter().map(|l| l.name.as_str()).collect();
    if renames.iter().any(|(p, _)| taken.contains(p.name.as_str())) {
        for (p, l) in &renames {
            let tmp = format!("sbx{}", l.index);
            debug!("network: renaming {} to {tmp} for now", l.name);
            set_link(
                &handle,
                LinkUnspec::new_with_index(l.index).name(tmp).build(),
            )
            .await
            .with_context(|| format!("{}: renaming it", what(p, l)))?;
        }
    }
    for (p, l) in &renames {
        set_link(
            &handle,
            LinkUnspec::new_with_index(l.index)
                .name(p.name.clone())
                .build(),
        )
        .await
        .with_context(|| format!("{}: renaming it to {}", what(p, l), p.name))?;
    }

    let mut devices: HashMap<String, u32> = HashMap::new();
    for (p, l) in plan.interfaces.iter().zip(&links) {
        let label = what(p, l);
        if p.mtu != 0 {
            set_link(
                &handle,
                LinkUnspec::new_with_index(l.index).mtu(p.mtu).build(),
            )
            .await
            .with_context(|| format!("{label}: setting MTU {}", p.mtu))?;
        }
        for (ip, len) in &p.addresses {
            let mut req = handle.address().add(l.index, *ip, *len).replace();
            if ip.is_ipv6() {
                // The address was configured (and checked for duplicates) on the host side;
                // a tentative address would also refuse to be a route's preferred source.
                req.message_mut()
                    .attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            req.execute()
                .await
                .map_err(nl)
                .with_context(|| format!("{label}: adding address {ip}/{len}"))?;
        }
        set_link(&handle, LinkUnspec::new_with_index(l.index).up().build())
            .await
            .with_context(|| format!("{label}: setting it up"))?;
        let name = if p.name.is_empty() {
            l.name.clone()
        } else {
            p.name.clone()
        };
        let addrs: Vec<String> = p
            .addresses
            .iter()
            .map(|(ip, len)| format!("{ip}/{len}"))
            .collect();
        info!(
            "network: {name} (MAC {}, index {}) up{}, addresses [{}]",
            format_mac(&p.mac),
            l.index,
            if p.mtu != 0 {
                format!(", mtu {}", p.mtu)
            } else {
                String::new()
            },
            addrs.join(", ")
        );
        devices.insert(name, l.index);
    }

    for r in &plan.routes {
        let oif = if r.device.is_empty() {
            None
        } else {
            Some(
                *devices
                    .get(&r.device)
                    .ok_or_else(|| {
                        anyhow!(
                            "device {:?} is not one of the configured interfaces",
                            r.device
                        )
                    })
                    .with_context(|| r.label.clone())?,
            )
        };
        handle
            .route()
            .add(route_message(r, oif))
            .replace()
            .execute()
            .await
            .map_err(nl)
            .with_context(|| r.label.clone())?;
        debug!("network: added {}", r.label);
    }
    if !plan.routes.is_empty() {
        info!("network: {} routes added", plan.routes.len());
    }
    Ok(())
}

/// The netlink message for a checked route (`ip route replace` semantics are the caller's).
fn route_message(r: &RoutePlan, oif: Option<u32>) -> RouteMessage {
    // As `ip route` does: an IPv4 route without a gateway has link scope; IPv6 routes stay
    // universe. (plan() made the gateway and source the destination's family.)
    match r.destination {
        IpAddr::V4(dst) => {
            let mut b =
                RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(dst, r.prefix_len);
            match r.gateway {
                Some(IpAddr::V4(g)) => b = b.gateway(g),
                _ => b = b.scope(RouteScope::Link),
            }
            if let Some(IpAddr::V4(s)) = r.source {
                b = b.pref_source(s);
            }
            if let Some(i) = oif {
                b = b.output_interface(i);
            }
            b.build()
        }
        IpAddr::V6(dst) => {
            let mut b =
                RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(dst, r.prefix_len);
            if let Some(IpAddr::V6(g)) = r.gateway {
                b = b.gateway(g);
            }
            if let Some(IpAddr::V6(s)) = r.source {
                b = b.pref_source(s);
            }
            if let Some(i) = oif {
                b = b.output_interface(i);
            }
            b.build()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spinbox_agent_api::agent::IpAddress;

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("aa:BB:0c:dd:ee:0f").unwrap(),
            [0xaa, 0xbb, 0x0c, 0xdd, 0xee, 0x0f]
        );
        assert_eq!(parse_mac("02-00-00-00-00-01").unwrap()[5], 1);
        for bad in [
            "",
            "aa:bb:cc:dd:ee",
            "aa:bb:cc:dd:ee:ff:00",
            "aa:bb:cc:dd:ee:fg",
            "aaa:bb:cc:dd:ee:f",
            "aa::cc:dd:ee:ff",
        ] {
            let e = parse_mac(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{bad:?}: {e}");
        }
        assert_eq!(
            format_mac(&[0xaa, 0xbb, 0x0c, 0, 1, 0xff]),
            "aa:bb:0c:00:01:ff"
        );
    }

    #[test]
    fn destinations() {
        assert_eq!(parse_destination("").unwrap(), None);
        assert_eq!(
            parse_destination("10.1.0.0/16").unwrap(),
            Some(("10.1.0.0".parse().unwrap(), 16))
        );
        assert_eq!(
            parse_destination("10.1.2.3").unwrap(),
            Some(("10.1.2.3".parse().unwrap(), 32))
        );
        assert_eq!(
            parse_destination("2001:db8::/32").unwrap(),
            Some(("2001:db8::".parse().unwrap(), 32))
        );
        assert_eq!(
            parse_destination("0.0.0.0/0").unwrap(),
            Some(("0.0.0.0".parse().unwrap(), 0))
        );
        for bad in [
            "10.1.0.0/33",
            "10.1.2.3/16",
            "nope/8",
            "2001:db8::/129",
            "10.0.0.0/x",
        ] {
            let e = format!("{:#}", parse_destination(bad).unwrap_err());
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn families() {
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let v6: IpAddr = "fd00::1".parse().unwrap();
        let d4 = (IpAddr::from([10, 0, 0, 0]), 8);
        let d6 = ("fd00::".parse::<IpAddr>().unwrap(), 64);
        assert_eq!(route_family(Some(&d4), None, None).unwrap(), Family::V4);
        assert_eq!(
            route_family(Some(&d6), Some(&v6), None).unwrap(),
            Family::V6
        );
        assert_eq!(route_family(None, Some(&v4), None).unwrap(), Family::V4);
        assert_eq!(route_family(None, None, Some(&v6)).unwrap(), Family::V6);
        assert_eq!(
            route_family(None, Some(&v6), Some(&v6)).unwrap(),
            Family::V6
        );
        let e = route_family(Some(&d4), Some(&v6), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("gateway fd00::1 is IPv6") && e.contains("IPv4"),
            "{e}"
        );
        let e = route_family(None, Some(&v4), Some(&v6))
            .unwrap_err()
            .to_string();
        assert!(e.contains("source"), "{e}");
        assert!(route_family(None, None, None).is_err());
    }

    fn iface(name: &str, mac: &str, addrs: &[(&str, u32)]) -> NetworkInterface {
        NetworkInterface {
            name: name.into(),
            mac: mac.into(),
            mtu: 1500,
            addresses: addrs
                .iter()
                .map(|(a, l)| IpAddress {
                    address: a.to_string(),
                    prefix_len: *l,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn route(dst: &str, gw: &str, dev: &str, src: &str) -> NetworkRoute {
        NetworkRoute {
            destination: dst.into(),
            gateway: gw.into(),
            device: dev.into(),
            source: src.into(),
            ..Default::default()
        }
    }

    #[test]
    fn plans() {
        let cfg = NetworkConfig {
            interfaces: vec![iface(
                "eth0",
                "02:42:AC:11:00:02",
                &[("10.88.0.5", 16), ("fd00::5", 64)],
            )],
            routes: vec![
                route("", "10.88.0.1", "eth0", ""),
                route("", "fd00::1", "eth0", "fd00::5"),
                route("192.168.7.0/24", "", "eth0", "10.88.0.5"),
            ],
            ..Default::default()
        };
        let p = plan(&cfg).unwrap();
        assert_eq!(p.interfaces[0].mac, [0x02, 0x42, 0xac, 0x11, 0, 2]);
        assert_eq!(p.interfaces[0].addresses.len(), 2);
        let r = &p.routes[0];
        assert_eq!(
            (r.family, r.destination, r.prefix_len),
            (Family::V4, IpAddr::from([0, 0, 0, 0]), 0)
        );
        assert_eq!(r.label, "route[0] (default via 10.88.0.1 dev eth0)");
        assert_eq!(p.routes[1].family, Family::V6);
        assert_eq!(p.routes[1].destination, "::".parse::<IpAddr>().unwrap());
        assert!(p.routes[2].gateway.is_none());
        assert_eq!(p.routes[2].prefix_len, 24);
    }

    #[test]
    fn plan_rejections_name_the_field() {
        let bad = |ifaces: Vec<NetworkInterface>, routes: Vec<NetworkRoute>| {
            let cfg = NetworkConfig {
                interfaces: ifaces,
                routes,
                ..Default::default()
            };
            format!("{:#}", plan(&cfg).unwrap_err())
        };
        let ok = || iface("eth0", "02:00:00:00:00:01", &[("10.0.0.2", 24)]);
        let e = bad(
            vec![iface("eth0", "02:00:00:00:00:01", &[("10.0.0.300", 24)])],
            vec![],
        );
        assert!(
            e.contains("addresses[0].address") && e.contains("10.0.0.300"),
            "{e}"
        );
        let e = bad(
            vec![iface("eth0", "02:00:00:00:00:01", &[("10.0.0.3", 33)])],
            vec![],
        );
        assert!(e.contains("prefix_len"), "{e}");
        let e = bad(vec![iface("eth0", "nope", &[])], vec![]);
        assert!(e.contains("interfaces[0].mac") && e.contains("nope"), "{e}");
        let e = bad(vec![iface("a/b", "02:00:00:00:00:01", &[])], vec![]);
        assert!(e.contains("interfaces[0].name"), "{e}");
        let e = bad(vec![ok(), iface("eth1", "02:00:00:00:00:01", &[])], vec![]);
        assert!(e.contains("given twice"), "{e}");
        let e = bad(vec![ok()], vec![route("", "10.0.0.1", "eth9", "")]);
        assert!(e.contains("route[0]") && e.contains("eth9"), "{e}");
        let e = bad(vec![ok()], vec![route("10.1.0.0/16", "", "", "")]);
        assert!(e.contains("needs a device"), "{e}");
        let e = bad(
            vec![ok()],
            vec![route("10.1.0.0/16", "fd00::1", "eth0", "")],
        );
        assert!(
            e.contains("route[0] (10.1.0.0/16 via fd00::1 dev eth0)"),
            "{e}"
        );
        assert!(e.contains("IPv6"), "{e}");
        let e = bad(vec![ok()], vec![route("", "", "eth0", "")]);
        assert!(e.contains("default route"), "{e}");
        let e = bad(vec![ok()], vec![route("", "gw", "eth0", "")]);
        assert!(e.contains("gateway") && e.contains("\"gw\""), "{e}");
    }

    #[test]
    fn route_messages() {
        use rtnetlink::packet_route::route::RouteAttribute;
        let cfg = NetworkConfig {
            interfaces: vec![iface("eth0", "02:00:00:00:00:01", &[])],
            routes: vec![
                route("10.0.0.0/24", "", "eth0", ""),
                route("", "fd00::1", "", ""),
            ],
            ..Default::default()
        };
        let p = plan(&cfg).unwrap();
        let m = route_message(&p.routes[0], Some(7));
        assert_eq!(m.header.scope, RouteScope::Link);
        assert_eq!(m.header.destination_prefix_length, 24);
        assert!(m.attributes.contains(&RouteAttribute::Oif(7)));
        let m = route_message(&p.routes[1], None);
        assert_eq!(m.header.scope, RouteScope::Universe);
        assert_eq!(m.header.destination_prefix_length, 0);
        assert!(m
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Gateway(_))));
    }
}
