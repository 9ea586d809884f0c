//! spinbox host networking.
//!
//! A container's network is a network namespace on the host: one CRI or nerdctl prepared
//! (a veth with an address), or one spinbox makes and fills through CNI. The VM takes it over
//! by mirroring: for each interface of the namespace a TAP is created next to it and tc
//! redirects every frame between the two, so the guest's virtio-net device — given the
//! interface's MAC, addresses, routes and MTU — *is* that interface as far as the network
//! can tell. Published ports and masquerade are nftables rules in one `inet spinbox` table.
//!
//! Everything is recorded in `network.json` (in the container's state directory) before it
//! is created, and [`release`] undoes what a record names — from the shim's teardown or,
//! after a crash, from `shim delete` and `spinbox gc`.

pub mod cni;
mod guard;
pub mod link;
pub mod netns;
pub mod nft;
pub mod publish;
mod release;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use link::{Interface, Route};
pub use publish::PortMapping;
pub use release::{release, release_recorded};

/// The record file in a container's state directory.
pub const RECORD_FILE: &str = "network.json";

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("network namespace {path}: {reason}")]
    Netns { path: PathBuf, reason: String },
    #[error("netlink: {what}: {reason}")]
    Netlink { what: String, reason: String },
    #[error("CNI: {what}: {reason}")]
    Cni { what: String, reason: String },
    #[error("nftables: {what}: {reason}")]
    Nft { what: String, reason: String },
    #[error("annotation {}: entry {entry:?}: {reason}", publish::ANNOTATION)]
    Publish { entry: String, reason: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Other(String),
}

impl NetError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> NetError {
        NetError::Io {
            what: what.into(),
            source,
        }
    }
}

/// `network.mode` of the configuration.
pub use spinbox_config::NetworkMode as Mode;

/// What the runtime configuration says about networking.
#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: Mode,
    pub cni_conflist: PathBuf,
    pub cni_bin_dirs: Vec<PathBuf>,
    pub cni_ifname: String,
    pub cni_attempts: u32,
    pub cni_plugin_timeout: Duration,
    pub netns_dir: PathBuf,
    pub lock_file: PathBuf,
    pub nft: PathBuf,
    pub nft_timeout: Duration,
    /// CNI mode: containers on the bridge reach the gateway and beyond, not each other.
    pub isolate: bool,
    /// Host ports below 1024 may be published.
    pub publish_privileged_ports: bool,
}

impl Settings {
    pub fn from_config(config: &spinbox_config::Config) -> Settings {
        let n = &config.network;
        Settings {
            mode: n.mode,
            cni_conflist: n.cni_conflist.clone(),
            cni_bin_dirs: n.cni_bin_dirs.clone(),
            cni_ifname: n.cni_ifname.clone(),
            cni_attempts: n.cni_attempts,
            cni_plugin_timeout: config.timeouts.cni_plugin,
            netns_dir: n.netns_dir.clone(),
            lock_file: n.lock_file.clone(),
            nft: n.nft.clone(),
            nft_timeout: config.timeouts.nft,
            isolate: n.isolate,
            publish_privileged_ports: n.publish_privileged_ports,
        }
    }
}

/// The network namespace the OCI spec asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecNetns {
    /// No network namespace entry: the host's network (`--net-host`, hostNetwork).
    Host,
    /// An entry without a path: a new, empty namespace.
    New,
    /// An entry with a path: that namespace (CRI, nerdctl, `ctr --with-ns`).
    Path(PathBuf),
}

/// A TAP for QEMU and what the guest device must look like.
#[derive(Debug)]
pub struct Nic {
    pub tap: OwnedFd,
    pub tap_name: String,
    pub mac: String,
    pub mtu: u32,
}

/// The network a VM gets: its NICs and the guest's configuration.
#[derive(Debug, Default)]
pub struct Attached {
    pub nics: Vec<Nic>,
    pub interfaces: Vec<Interface>,
    pub routes: Vec<Route>,
    /// Where the container's network lives on the host (for logs and the boot timeline).
    pub netns: Option<PathBuf>,
    pub mode: Option<&'static str>,
}

/// What was (or is about to be) created for one container; see the crate docs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NetworkRecord {
    pub id: String,
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// spinbox created `netns` and removes it.
    #[serde(default)]
    pub netns_created: bool,
    #[serde(default)]
    pub cni: Option<CniRecord>,
    /// (interface, TAP) pairs joined by tc redirects.
    #[serde(default)]
    pub mirrored: Vec<(String, String)>,
    /// Rules tagged for this container may exist in the nft table.
    #[serde(default)]
    pub nft: bool,
    /// The addresses of the mirrored interfaces, as the VM took them over (informational:
    /// `spinbox ps`; nothing is released by them).
    #[serde(default)]
    pub addresses: Vec<IpNet>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CniRecord {
    /// The conflist as it was used (DEL must use the same configuration).
    pub conflist: Value,
    pub conflist_path: PathBuf,
    pub attachment: cni::Attachment,
    #[serde(default)]
    pub result: Option<Value>,
}

impl NetworkRecord {
    fn is_empty(&self) -> bool {
        self.netns.is_none() && self.cni.is_none() && self.mirrored.is_empty() && !self.nft
    }

    pub async fn load(path: &Path) -> Result<Option<NetworkRecord>, NetError> {
        match tokio::fs::read(path).await {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| NetError::Other(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(NetError::io(format!("reading {}", path.display()), e)),
        }
    }

    /// Writes the record (owner-only, atomically through a rename).
    pub async fn save(&self, path: &Path) -> Result<(), NetError> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| NetError::Other(e.to_string()))?;
        let tmp = path.with_extension("json.tmp");
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_data()?;
            std::fs::rename(&tmp, &path)
        })
        .await
        .map_err(|e| NetError::Other(format!("record task: {e}")))?
        .map_err(|e| NetError::io("writing the network record", e))
    }
}

/// One container's network setup request.
#[derive(Debug, Clone)]
pub struct Request {
    pub id: String,
    pub spec_netns: SpecNetns,
    pub publish: Vec<PortMapping>,
    /// Where the record lives (`<state dir>/network.json`).
    pub record_path: PathBuf,
}

enum Plan {
    None,
    Mirror(PathBuf),
    Cni { netns: Option<PathBuf> },
}

async fn has_interfaces(netns: &Path) -> Result<bool, NetError> {
    let ifaces = netns::run_in(netns, || async {
        let h = link::connect()?;
        link::interfaces(&h).await
    })
    .await?;
    Ok(!ifaces.is_empty())
}

async fn plan(settings: &Settings, req: &Request) -> Result<Plan, NetError> {
    if req.spec_netns == SpecNetns::Host {
        return Err(NetError::Unsupported(
            "linux.namespaces has no network namespace: the container asks for the host's \
             network (--net-host, hostNetwork), which a container in a VM cannot share; \
             give it a network namespace"
                .into(),
        ));
    }
    let path = match &req.spec_netns {
        SpecNetns::Path(p) => Some(p.clone()),
        _ => None,
    };
    if let Some(p) = &path {
        if !netns::is_netns(p) {
            return Err(NetError::Netns {
                path: p.clone(),
                reason: "linux.namespaces network path is not a network namespace".into(),
            });
        }
        // Mirroring and CNI both change the namespace: never the host's, never a VM's.
        if settings.mode != Mode::None {
            guard::check_not_own(p).await?;
            guard::check_no_tap(p).await?;
        }
    }
    let conflist_present = tokio::fs::try_exists(&settings.cni_conflist)
        .await
        .unwrap_or(false);
    match settings.mode {
        Mode::None => Ok(Plan::None),
        Mode::Netns => match path {
            Some(p) if has_interfaces(&p).await? => Ok(Plan::Mirror(p)),
            _ => Err(NetError::Unsupported(
                "network.mode is \"netns\" but linux.namespaces names no network namespace \
                 path with interfaces"
                    .into(),
            )),
        },
        Mode::Cni => {
            if !conflist_present {
                return Err(NetError::Cni {
                    what: format!("network.cni_conflist {}", settings.cni_conflist.display()),
                    reason: "does not exist (network.mode is \"cni\")".into(),
                });
            }
            Ok(Plan::Cni { netns: path })
        }
        Mode::Auto => {
            if let Some(p) = &path {
                if has_interfaces(p).await? {
                    return Ok(Plan::Mirror(p.clone()));
                }
            }
            if conflist_present {
                Ok(Plan::Cni { netns: path })
            } else {
                Ok(Plan::None)
            }
        }
    }
}

/// Sets up the container's network. On error, whatever was created is released again and
/// the record says nothing is left (the caller may still run [`release`]; it is idempotent).
pub async fn setup(settings: &Settings, req: &Request) -> Result<Attached, NetError> {
    let mut record = NetworkRecord {
        id: req.id.clone(),
        ..Default::default()
    };
    match setup_inner(settings, req, &mut record).await {
        Ok(a) => Ok(a),
        Err(e) => {
            let errors = release(settings, &record).await;
            for err in &errors {
                log::warn!("network rollback for {}: {err}", req.id);
            }
            if errors.is_empty() {
                let _ = tokio::fs::remove_file(&req.record_path).await;
            }
            Err(e)
        }
    }
}

async fn setup_inner(
    settings: &Settings,
    req: &Request,
    record: &mut NetworkRecord,
) -> Result<Attached, NetError> {
    guard::check_privileged(&req.publish, settings.publish_privileged_ports)?;
    let plan = plan(settings, req).await?;
    if !matches!(plan, Plan::None) && !req.publish.is_empty() {
        // Early, so that a refusal leaves nothing; again under the lock before the rules.
        check_ports(settings, req).await?;
    }
    let (netns, masquerade) = match plan {
        Plan::None => {
            if !req.publish.is_empty() {
                return Err(NetError::Unsupported(format!(
                    "annotation {} asks for published ports, but the container has no network \
                     (network.mode, network.cni_conflist)",
                    publish::ANNOTATION
                )));
            }
            return Ok(Attached::default());
        }
        Plan::Mirror(p) => {
            record.netns = Some(p.clone());
            (p, None)
        }
        Plan::Cni { netns } => {
            let netns = match netns {
                Some(p) => {
                    record.netns = Some(p.clone());
                    p
                }
                None => {
                    let p = settings.netns_dir.join(format!("spinbox-{}", req.id));
                    record.netns = Some(p.clone());
                    record.netns_created = true;
                    record.save(&req.record_path).await?;
                    netns::create(&settings.netns_dir, &format!("spinbox-{}", req.id)).await?
                }
            };
            let subnet = cni_add(settings, req, record, &netns).await?;
            (netns, subnet)
        }
    };

    // Mirror every interface of the namespace onto a TAP of its own.
    let (ifaces, routes) = netns::run_in(&netns, || async {
        let h = link::connect()?;
        let ifaces = link::interfaces(&h).await?;
        let routes = link::routes(&h, &ifaces).await?;
        Ok((ifaces, routes))
    })
    .await?;
    if ifaces.is_empty() {
        return Err(NetError::Netns {
            path: netns.clone(),
            reason: "no Ethernet interface to give the VM".into(),
        });
    }
    let pairs: Vec<(String, String)> = ifaces
        .iter()
        .enumerate()
        .map(|(i, iface)| (iface.name.clone(), format!("{}{i}", link::TAP_PREFIX)))
        .collect();
    // Under the lock, no other create mirrors the namespace between the check and the TAPs;
    // a refusal comes before the record names TAPs (a rollback would remove the other's).
    let tap_lock = cni::HostLock::acquire(&settings.lock_file).await?;
    guard::check_no_tap(&netns).await?;
    record.mirrored = pairs.clone();
    record.addresses = ifaces.iter().flat_map(|i| i.addresses.clone()).collect();
    record.save(&req.record_path).await?;
    let plan_ifaces = ifaces.clone();
    let taps = netns::run_in(&netns, move || async move {
        let h = link::connect()?;
        let mut taps = Vec::new();
        for (iface, (_, tap_name)) in plan_ifaces.iter().zip(&pairs) {
            let fd = link::create_tap(tap_name)?;
            let tap_index = link::link_index(&h, tap_name).await?.ok_or_else(|| {
                NetError::Other(format!("TAP {tap_name} vanished after creation"))
            })?;
            link::set_up(&h, tap_index, iface.mtu).await?;
            link::redirect_both_ways(&h, iface.index, tap_index).await?;
            taps.push((fd, tap_name.clone()));
        }
        Ok(taps)
    })
    .await?;
    drop(tap_lock);

    if let Some(ip) = nft::first_v4(
        &ifaces
            .iter()
            .flat_map(|i| i.addresses.clone())
            .collect::<Vec<_>>(),
    ) {
        let mut rules = nft::container_rules(
            &req.id,
            ip,
            masquerade.as_ref().map(|m| m.subnet),
            &req.publish,
        );
        if settings.isolate {
            if let Some(m) = &masquerade {
                rules.extend(nft::isolation_rules(&req.id, ip, m.subnet, m.gateway));
            }
        }
        if !rules.is_empty() {
            let _lock = cni::HostLock::acquire(&settings.lock_file).await?;
            if !req.publish.is_empty() {
                check_ports(settings, req).await?;
            }
            record.nft = true;
            record.save(&req.record_path).await?;
            nft_client(settings).add_rules(rules).await?;
        }
    } else if !req.publish.is_empty() {
        return Err(NetError::Unsupported(format!(
            "annotation {}: the container has no IPv4 address to publish ports to",
            publish::ANNOTATION
        )));
    }

    let nics = taps
        .into_iter()
        .zip(&ifaces)
        .map(|((tap, tap_name), iface)| Nic {
            tap,
            tap_name,
            mac: iface.mac.clone(),
            mtu: iface.mtu,
        })
        .collect();
    Ok(Attached {
        nics,
        interfaces: ifaces,
        routes,
        mode: Some(if record.cni.is_some() { "cni" } else { "netns" }),
        netns: Some(netns),
    })
}

/// Refuses host ports other containers publish or host sockets are bound to.
async fn check_ports(settings: &Settings, req: &Request) -> Result<(), NetError> {
    let taken = nft_client(settings).published().await?;
    guard::check_not_published(&req.publish, &taken, &req.id)?;
    guard::check_not_bound(&req.publish).await
}

pub(crate) fn nft_client(settings: &Settings) -> nft::Nft {
    nft::Nft {
        binary: settings.nft.clone(),
        timeout: settings.nft_timeout,
    }
}

pub(crate) fn invoker(settings: &Settings) -> cni::Invoker {
    cni::Invoker {
        bin_dirs: settings.cni_bin_dirs.clone(),
        timeout: settings.cni_plugin_timeout,
    }
}

/// The IPv4 network CNI put a container on: what masquerade excludes and isolation covers.
struct CniSubnet {
    subnet: IpNet,
    gateway: Option<std::net::Ipv4Addr>,
}

/// CNI ADD under the host lock, with bounded retries; returns the first IPv4 address's subnet
/// and gateway.
async fn cni_add(
    settings: &Settings,
    req: &Request,
    record: &mut NetworkRecord,
    netns: &Path,
) -> Result<Option<CniSubnet>, NetError> {
    let list = cni::ConfList::load(&settings.cni_conflist).await?;
    let raw = tokio::fs::read(&settings.cni_conflist)
        .await
        .map_err(|e| NetError::io(format!("reading {}", settings.cni_conflist.display()), e))?;
    let conflist: Value = serde_json::from_slice(&raw)
        .map_err(|e| NetError::Other(format!("{}: {e}", settings.cni_conflist.display())))?;
    let attachment = cni::Attachment {
        container_id: req.id.clone(),
        netns: netns.to_path_buf(),
        ifname: settings.cni_ifname.clone(),
    };
    record.cni = Some(CniRecord {
        conflist,
        conflist_path: settings.cni_conflist.clone(),
        attachment: attachment.clone(),
        result: None,
    });
    record.save(&req.record_path).await?;
    let inv = invoker(settings);
    let runtime = Map::new();
    let attempts = settings.cni_attempts.max(1);
    let mut last = None;
    for attempt in 1..=attempts {
        let outcome = {
            let _lock = cni::HostLock::acquire(&settings.lock_file).await?;
            match inv.add(&list, &attachment, &runtime).await {
                Ok(r) => Ok(r),
                Err(e) => {
                    // A half-done ADD must not hold an address into the next attempt.
                    if let Err(d) = inv.del(&list, &attachment, None, &runtime).await {
                        log::warn!("CNI DEL after a failed ADD for {}: {d}", req.id);
                    }
                    Err(e)
                }
            }
        };
        match outcome {
            Ok((raw, parsed)) => {
                if let Some(c) = record.cni.as_mut() {
                    c.result = Some(raw);
                }
                record.save(&req.record_path).await?;
                let subnet = parsed
                    .ips
                    .iter()
                    .find(|ip| ip.address.addr().is_ipv4())
                    .map(|ip| CniSubnet {
                        subnet: ip.address.trunc(),
                        gateway: match ip.gateway {
                            Some(std::net::IpAddr::V4(g)) => Some(g),
                            _ => None,
                        },
                    });
                return Ok(subnet);
            }
            Err(e) => {
                log::warn!("CNI ADD attempt {attempt}/{attempts} for {}: {e}", req.id);
                last = Some(e);
                if attempt < attempts {
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                }
            }
        }
    }
    Err(last.unwrap_or_else(|| NetError::Other("CNI ADD never ran".into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_empty_is_empty() {
        let r = NetworkRecord {
            id: "c".into(),
            ..Default::default()
        };
        assert!(r.is_empty());
        let full = NetworkRecord {
            id: "c".into(),
            netns: Some("/run/netns/spinbox-c".into()),
            netns_created: true,
            mirrored: vec![("eth0".into(), "sbtap0".into())],
            nft: true,
            cni: None,
            addresses: vec!["10.87.0.5/16".parse().unwrap()],
        };
        let text = serde_json::to_string(&full).unwrap();
        let back: NetworkRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(back, full);
        assert!(!back.is_empty());
    }
}
