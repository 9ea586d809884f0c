//! What setup refuses, against the real host: the test's own network namespace as a spec's,
//! a namespace another setup already mirrors, and published ports that are privileged,
//! already published or bound. Every refusal leaves nothing: no TAP, no redirect, no rule, no
//! record. Namespaces, veths and addresses (10.87.254.0/24) are the test's own. Needs root,
//! iproute2 and nftables.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use spinbox_net::{publish, Mode, Request, Settings, SpecNetns};

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn settings(mode: Mode, dir: &Path) -> Settings {
    Settings {
        mode,
        cni_conflist: dir.join("absent.conflist"),
        cni_bin_dirs: vec!["/opt/cni/bin".into(), "/usr/lib/cni".into()],
        cni_ifname: "eth0".into(),
        cni_attempts: 1,
        cni_plugin_timeout: Duration::from_secs(10),
        netns_dir: "/run/netns".into(),
        lock_file: dir.join("network.lock"),
        nft: "nft".into(),
        nft_timeout: Duration::from_secs(5),
        isolate: false,
        publish_privileged_ports: false,
    }
}

/// Named network namespaces removed when dropped, even if the test panicked.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// A namespace the way CRI prepares one: a veth `eth0` with `addr`, its peer in `peer`.
fn prepared(ns: &str, peer: &str, addr: &str) {
    sh(&["ip", "netns", "add", ns]);
    sh(&["ip", "netns", "add", peer]);
    sh(&[
        "ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", "peer0", "netns",
        peer,
    ]);
    sh(&["ip", "-n", ns, "addr", "add", addr, "dev", "eth0"]);
    sh(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
}

/// Rules tagged for `id` in the NAT table.
fn tag_rules(id: &str) -> usize {
    let out = Command::new("nft")
        .args(["-j", "list", "table", "inet", "spinbox"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .matches(&format!("\"spinbox:{id}\""))
        .count()
}

/// A TCP port nothing on the host uses now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    l.local_addr().unwrap().port()
}

fn request(id: &str, netns: &str, publish: &str, record: PathBuf) -> Request {
    Request {
        id: id.into(),
        spec_netns: SpecNetns::Path(netns.into()),
        publish: publish::parse(publish).unwrap(),
        record_path: record,
    }
}

#[tokio::test]
async fn the_tests_own_namespace_is_refused_without_trace() {
    let tmp = tempfile::tempdir().unwrap();
    let record = tmp.path().join("network.json");
    for mode in [Mode::Auto, Mode::Netns] {
        let s = settings(mode, tmp.path());
        let req = request("sbg-own", "/proc/self/ns/net", "", record.clone());
        let e = spinbox_net::setup(&s, &req).await.unwrap_err().to_string();
        assert!(
            e.contains("/proc/self/ns/net is the shim's own network namespace")
                && e.contains("would take the host's network"),
            "{e}"
        );
    }
    assert!(!record.exists());
    let links = sh(&["ip", "link", "show"]);
    assert!(!links.contains("sbtap"), "TAP on the host: {links}");
}

#[tokio::test]
async fn a_mirrored_namespace_and_taken_ports_are_refused_without_trace() {
    let tmp = tempfile::tempdir().unwrap();
    let pid = std::process::id();
    let (a, b, pa, pb) = (
        format!("sbg{pid}a"),
        format!("sbg{pid}b"),
        format!("sbg{pid}x"),
        format!("sbg{pid}y"),
    );
    let _ns = Namespaces(vec![a.clone(), b.clone(), pa.clone(), pb.clone()]);
    prepared(&a, &pa, "10.87.254.2/24");
    prepared(&b, &pb, "10.87.254.3/24");
    let s = settings(Mode::Netns, tmp.path());
    let port = free_port();
    let (first_id, second_id) = (format!("sbg-first-{pid}"), format!("sbg-second-{pid}"));
    let first_record = tmp.path().join("first.json");
    let first = request(
        &first_id,
        &format!("/run/netns/{a}"),
        &format!("{port}:80"),
        first_record.clone(),
    );
    let attached = spinbox_net::setup(&s, &first).await.expect("first setup");
    assert_eq!(tag_rules(&first_id), 2, "publish: prerouting and output");

    // The same namespace again: refused naming the TAP; the first one's stays intact.
    let second_record = tmp.path().join("second.json");
    let again = request(
        &second_id,
        &format!("/run/netns/{a}"),
        "",
        second_record.clone(),
    );
    let e = spinbox_net::setup(&s, &again)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("holds sbtap0, the TAP of another spinbox sandbox"),
        "{e}"
    );
    let filters = sh(&[
        "ip", "netns", "exec", &a, "tc", "filter", "show", "dev", "eth0", "ingress",
    ]);
    assert!(filters.contains("sbtap0"), "first redirect gone: {filters}");
    assert!(sh(&["ip", "-n", &a, "link", "show", "sbtap0"]).contains("sbtap0"));

    // Another namespace, the same host port: refused naming the port and the owner.
    let other = |publish: &str| {
        request(
            &second_id,
            &format!("/run/netns/{b}"),
            publish,
            second_record.clone(),
        )
    };
    let e = spinbox_net::setup(&s, &other(&format!("{port}:8080")))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("host port {port}/tcp is already published")) && e.contains(&first_id),
        "{e}"
    );
    // The same number over UDP is another port.
    let udp = spinbox_net::setup(&s, &other(&format!("{port}:53/udp")))
        .await
        .expect("udp publish of the same number");
    drop(udp);
    let errors = spinbox_net::release_recorded(&s, &second_record).await;
    assert!(errors.is_empty(), "{errors:?}");

    // A host port a socket of the host holds (a listener on loopback only).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let bound = listener.local_addr().unwrap().port();
    let e = spinbox_net::setup(&s, &other(&format!("{bound}:80")))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("host port {bound}/tcp is in use on the host")),
        "{e}"
    );
    drop(listener);

    // Below 1024: refused unless the configuration allows it.
    let e = spinbox_net::setup(&s, &other("80:80"))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("network.publish_privileged_ports"), "{e}");

    // Nothing of the refused setups: no TAP or redirect in b, no rule, no record.
    assert!(!second_record.exists());
    assert_eq!(tag_rules(&second_id), 0);
    assert!(!sh(&["ip", "-n", &b, "link", "show"]).contains("sbtap"));
    let qdiscs = sh(&[
        "ip", "netns", "exec", &b, "tc", "qdisc", "show", "dev", "eth0",
    ]);
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");

    // Allowed by the configuration, a privileged port is published.
    let mut allowing = settings(Mode::Netns, tmp.path());
    allowing.publish_privileged_ports = true;
    let low = free_privileged_port();
    let ok = spinbox_net::setup(&allowing, &other(&format!("{low}:80")))
        .await
        .expect("privileged port with publish_privileged_ports");
    assert_eq!(tag_rules(&second_id), 2);
    drop(ok);
    let errors = spinbox_net::release_recorded(&s, &second_record).await;
    assert!(errors.is_empty(), "{errors:?}");

    drop(attached);
    let errors = spinbox_net::release_recorded(&s, &first_record).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(tag_rules(&first_id), 0);
}

/// A TCP port below 1024 nothing on the host listens on.
fn free_privileged_port() -> u16 {
    (900..1000)
        .find(|p| std::net::TcpListener::bind(("0.0.0.0", *p)).is_ok())
        .expect("a free port in 900-999")
}
