//! spinbox-net against the real host: network namespaces, veths, tc, CNI plugins and nft.
//! Every namespace, bridge and address here is the test's own (10.87.25x.0/24); nothing is
//! sent outside them. Needs root, iproute2, containernetworking-plugins and nftables.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use spinbox_net::{Mode, NetworkRecord, Request, Settings, SpecNetns};

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn try_sh(args: &[&str]) {
    let _ = Command::new(args[0]).args(&args[1..]).output();
}

fn settings(mode: Mode, conflist: PathBuf, dir: &Path) -> Settings {
    Settings {
        mode,
        cni_conflist: conflist,
        cni_bin_dirs: vec!["/opt/cni/bin".into(), "/usr/lib/cni".into()],
        cni_ifname: "eth0".into(),
        cni_attempts: 2,
        cni_plugin_timeout: Duration::from_secs(10),
        netns_dir: "/run/netns".into(),
        lock_file: dir.join("cni.lock"),
        nft: "nft".into(),
        nft_timeout: Duration::from_secs(5),
        isolate: false,
        publish_privileged_ports: false,
    }
}

/// Removes the named netns and links when dropped, even if the test panicked.
struct Scratch {
    netns: Vec<String>,
    links: Vec<String>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for l in &self.links {
            try_sh(&["ip", "link", "del", l]);
        }
        for n in &self.netns {
            try_sh(&["ip", "netns", "del", n]);
        }
    }
}

/// Rules tagged for `id` in the spinbox tables (inet: NAT; bridge: isolation).
fn tag_rules(id: &str) -> usize {
    ["inet", "bridge"]
        .iter()
        .map(|family| {
            let out = Command::new("nft")
                .args(["-j", "list", "table", family, "spinbox"])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            text.matches(&format!("\"spinbox:{id}\"")).count()
        })
        .sum()
}

/// Reads frames from the TAP until one satisfies `want` or 5 s pass (poll(2) on a blocking
/// thread: the TAP fd is non-blocking).
async fn tap_sees(
    fd: &std::os::fd::OwnedFd,
    want: impl Fn(&[u8]) -> bool + Send + 'static,
) -> bool {
    let fd = fd.try_clone().unwrap();
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 65536];
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) } <= 0 {
                continue;
            }
            // SAFETY: reading into our own buffer from a TAP fd we hold.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            // Frames start with the 10-byte virtio-net header (IFF_VNET_HDR).
            if n > 10 && want(&buf[10..n as usize]) {
                return true;
            }
        }
        false
    })
    .await
    .unwrap()
}

fn is_arp_reply_from(frame: &[u8], ip: [u8; 4]) -> bool {
    frame.len() >= 42
        && frame[12..14] == [0x08, 0x06]
        && frame[20..22] == [0, 2]
        && frame[28..32] == ip
}

#[tokio::test]
async fn prepared_netns_is_mirrored_onto_a_tap_and_released() {
    let tmp = tempfile::tempdir().unwrap();
    let pid = std::process::id();
    let (ctr_ns, peer_ns) = (format!("sbt{pid}c"), format!("sbt{pid}p"));
    let _scratch = Scratch {
        netns: vec![ctr_ns.clone(), peer_ns.clone()],
        links: vec![],
    };
    sh(&["ip", "netns", "add", &ctr_ns]);
    sh(&["ip", "netns", "add", &peer_ns]);
    sh(&[
        "ip",
        "link",
        "add",
        "sbtv0",
        "netns",
        &ctr_ns,
        "address",
        "02:aa:bb:cc:dd:01",
        "mtu",
        "1400",
        "type",
        "veth",
        "peer",
        "name",
        "sbtv1",
        "netns",
        &peer_ns,
    ]);
    let in_ctr = |args: &[&str]| {
        let mut v = vec!["ip", "netns", "exec", ctr_ns.as_str()];
        v.extend_from_slice(args);
        sh(&v)
    };
    in_ctr(&["ip", "addr", "add", "10.87.253.2/24", "dev", "sbtv0"]);
    in_ctr(&["ip", "link", "set", "sbtv0", "up"]);
    in_ctr(&["ip", "route", "add", "default", "via", "10.87.253.1"]);
    sh(&[
        "ip",
        "-n",
        &peer_ns,
        "addr",
        "add",
        "10.87.253.1/24",
        "dev",
        "sbtv1",
    ]);
    sh(&["ip", "-n", &peer_ns, "link", "set", "sbtv1", "up"]);

    let s = settings(Mode::Netns, tmp.path().join("none.conflist"), tmp.path());
    let record_path = tmp.path().join("network.json");
    let req = Request {
        id: format!("mirror-{pid}"),
        spec_netns: SpecNetns::Path(format!("/run/netns/{ctr_ns}").into()),
        publish: vec![],
        record_path: record_path.clone(),
    };
    let attached = spinbox_net::setup(&s, &req).await.expect("setup");
    assert_eq!(attached.nics.len(), 1);
    let iface = &attached.interfaces[0];
    assert_eq!(iface.name, "sbtv0");
    assert_eq!(iface.mac, "02:aa:bb:cc:dd:01");
    assert_eq!(iface.mtu, 1400);
    assert_eq!(iface.addresses[0].to_string(), "10.87.253.2/24");
    assert!(
        attached.routes.iter().any(|r| r.destination.is_none()
            && r.gateway.map(|g| g.to_string()) == Some("10.87.253.1".into())),
        "default route missing: {:?}",
        attached.routes
    );
    let tap = in_ctr(&["ip", "-d", "link", "show", "sbtap0"]);
    assert!(tap.contains("mtu 1400") && tap.contains("tun"), "{tap}");
    let filters = in_ctr(&["tc", "filter", "show", "dev", "sbtv0", "ingress"]);
    assert!(
        filters.contains("mirred") && filters.contains("sbtap0"),
        "{filters}"
    );
    let rec = NetworkRecord::load(&record_path).await.unwrap().unwrap();
    assert_eq!(rec.mirrored, vec![("sbtv0".into(), "sbtap0".into())]);
    assert!(!rec.netns_created);

    // Both directions through the redirects: an ARP request written into the TAP (what the
    // guest would send) leaves through the veth; the peer's reply comes back out of the TAP.
    let tap_fd = attached.nics[0].tap.as_raw_fd();
    let mut frame = vec![0u8; 10]; // virtio-net header
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&[0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0x01, 0x08, 0x06]);
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&[0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0x01, 10, 87, 253, 2]);
    frame.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 87, 253, 1]);
    // SAFETY: writing our own buffer to a TAP fd we hold.
    let n = unsafe { libc::write(tap_fd, frame.as_ptr().cast(), frame.len()) };
    assert_eq!(
        n,
        frame.len() as isize,
        "{}",
        std::io::Error::last_os_error()
    );
    assert!(
        tap_sees(&attached.nics[0].tap, |f| is_arp_reply_from(
            f,
            [10, 87, 253, 1]
        ))
        .await,
        "no ARP reply from the veth's peer came back through the TAP"
    );

    drop(attached);
    let errors = spinbox_net::release_recorded(&s, &record_path).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert!(!record_path.exists());
    let links = in_ctr(&["ip", "link", "show"]);
    assert!(!links.contains("sbtap"), "{links}");
    let qdiscs = in_ctr(&["tc", "qdisc", "show", "dev", "sbtv0"]);
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");
    // Released twice: nothing to do, no error.
    let rec_errors = spinbox_net::release(&s, &rec).await;
    assert!(rec_errors.is_empty(), "{rec_errors:?}");
}

#[tokio::test]
async fn cni_mode_allocates_publishes_and_releases_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let pid = std::process::id();
    let bridge = format!("sbtb{pid}");
    let _scratch = Scratch {
        netns: vec![],
        links: vec![bridge.clone()],
    };
    let ipam_dir = tmp.path().join("ipam");
    let conflist = tmp.path().join("test.conflist");
    std::fs::write(
        &conflist,
        serde_json::json!({
            "cniVersion": "1.0.0", "name": format!("sbt{pid}"),
            "plugins": [
                {"type": "bridge", "bridge": bridge, "isGateway": true, "isDefaultGateway": true,
                 "ipam": {"type": "host-local", "dataDir": ipam_dir,
                          "ranges": [[{"subnet": "10.87.252.0/24"}]]}},
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        })
        .to_string(),
    )
    .unwrap();
    let mut s = settings(Mode::Auto, conflist, tmp.path());
    s.isolate = true;
    let id = format!("sbt-cni-{pid}");
    let record_path = tmp.path().join("network.json");
    let req = Request {
        id: id.clone(),
        spec_netns: SpecNetns::New,
        publish: spinbox_net::publish::parse("18080:80/tcp").unwrap(),
        record_path: record_path.clone(),
    };
    let attached = spinbox_net::setup(&s, &req).await.expect("setup");
    let netns = PathBuf::from(format!("/run/netns/spinbox-{id}"));
    assert_eq!(attached.netns.as_deref(), Some(netns.as_path()));
    assert_eq!(attached.mode, Some("cni"));
    let iface = &attached.interfaces[0];
    assert_eq!(iface.name, "eth0");
    let addr = iface.addresses[0];
    assert!(
        "10.87.252.0/24"
            .parse::<ipnet::IpNet>()
            .unwrap()
            .contains(&addr.addr()),
        "{addr}"
    );
    assert!(attached
        .routes
        .iter()
        .any(|r| r.destination.is_none() && r.gateway.is_some()));
    let allocated = std::fs::read_dir(ipam_dir.join(format!("sbt{pid}")))
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy() == addr.addr().to_string());
    assert!(allocated, "host-local holds no file for {addr}");
    // masquerade + publish in prerouting and output + isolation on the bridge
    assert_eq!(tag_rules(&id), 4);
    let bridge_rules = sh(&["nft", "list", "table", "bridge", "spinbox"]);
    assert!(
        bridge_rules.contains(&format!(
            "ip saddr {} ip daddr 10.87.252.0/24 ip daddr != 10.87.252.1 drop",
            addr.addr()
        )),
        "{bridge_rules}"
    );
    let rec = NetworkRecord::load(&record_path).await.unwrap().unwrap();
    assert!(rec.netns_created && rec.nft && rec.cni.as_ref().unwrap().result.is_some());

    drop(attached);
    let errors = spinbox_net::release_recorded(&s, &record_path).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert!(!netns.exists(), "netns left behind");
    assert_eq!(tag_rules(&id), 0, "nft rules left behind");
    let left: Vec<_> = std::fs::read_dir(ipam_dir.join(format!("sbt{pid}")))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("10."))
        .collect();
    assert!(left.is_empty(), "allocations left: {left:?}");
}

#[tokio::test]
async fn host_network_and_bad_requests_are_refused_without_trace() {
    let tmp = tempfile::tempdir().unwrap();
    let s = settings(Mode::Auto, tmp.path().join("absent.conflist"), tmp.path());
    let record_path = tmp.path().join("network.json");
    let mut req = Request {
        id: "sbt-host".into(),
        spec_netns: SpecNetns::Host,
        publish: vec![],
        record_path: record_path.clone(),
    };
    let e = spinbox_net::setup(&s, &req).await.unwrap_err().to_string();
    assert!(e.contains("host's network"), "{e}");
    // No conflist in auto mode: no network; publishing then is an error naming the annotation.
    req.spec_netns = SpecNetns::New;
    let none = spinbox_net::setup(&s, &req).await.unwrap();
    assert!(none.nics.is_empty());
    req.publish = spinbox_net::publish::parse("8080:80").unwrap();
    let e = spinbox_net::setup(&s, &req).await.unwrap_err().to_string();
    assert!(e.contains("io.spinbox.net.publish"), "{e}");
    // cni mode without the conflist names the key.
    let s = settings(Mode::Cni, tmp.path().join("absent.conflist"), tmp.path());
    req.publish.clear();
    let e = spinbox_net::setup(&s, &req).await.unwrap_err().to_string();
    assert!(e.contains("network.cni_conflist"), "{e}");
    assert!(!record_path.exists());
    assert!(!Path::new("/run/netns/spinbox-sbt-host").exists());
}
