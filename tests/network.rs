//! Networking end to end through containerd: CNI mode (spinbox makes the namespace and runs
//! the suite's conflist: bridge `spbtest0`, 10.87.250.0/24), a namespace prepared the way CRI
//! does (veth + address) mirrored into the VM, published ports, refusal of the host network,
//! and nothing left after delete or after kill -9 of the shim. All traffic stays on the
//! suite's bridge and in namespaces the tests made; each test ends with the leak check (which
//! covers namespaces, nft rules and IP allocations). What the network phase refuses (the shim's
//! own namespace, taken or privileged ports) is in network/guard.rs.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use spinbox_tests::ctr::{Ctr, IMAGE, RUNTIME};
use spinbox_tests::VM_TESTS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "network/guard.rs"]
mod guard;

const GATEWAY: &str = "10.87.250.1";
const SUBNET_PREFIX: &str = "10.87.250.";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// The IPv4 address CNI gave container `id`, from its network record.
fn cni_address(ctr: &Ctr, id: &str) -> Ipv4Addr {
    let path = ctr.spinbox_root.join("state").join(id).join("network.json");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("network record")).unwrap();
    let addr = record["cni"]["result"]["ips"][0]["address"]
        .as_str()
        .expect("an address in the CNI result");
    addr.split('/').next().unwrap().parse().unwrap()
}

async fn wait_running(ctr: &Ctr, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ctr.task_line(id).is_some_and(|l| l.contains("RUNNING")) {
        assert!(Instant::now() < deadline, "{id} never RUNNING");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Removes a detached container if the test fails before it does (synchronously: Drop).
struct Detached<'a> {
    ctr: &'a Ctr,
    id: &'a str,
}

impl Drop for Detached<'_> {
    fn drop(&mut self) {
        if self.ctr.task_line(self.id).is_some() {
            let _ = self
                .ctr
                .run(&["task", "kill", "-s", "SIGKILL", self.id], None);
            for _ in 0..100 {
                if self
                    .ctr
                    .task_line(self.id)
                    .is_none_or(|l| l.contains("STOPPED"))
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.ctr.run(&["task", "rm", self.id], None);
        }
        let _ = self.ctr.run(&["containers", "rm", self.id], None);
    }
}

async fn remove(ctr: &Ctr, id: &str) {
    let _ = ctr.run(&["task", "kill", "-s", "SIGKILL", id], None);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ctr.task_line(id).is_none_or(|l| l.contains("STOPPED")) {
        assert!(Instant::now() < deadline, "{id} not stopped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = ctr.run(&["task", "rm", id], None);
    let out = ctr.run(&["containers", "rm", id], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// An HTTP GET to `addr` from the host; the body, or the error.
async fn http_get(addr: &str) -> Result<String, String> {
    let mut s = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .map_err(|_| format!("connect {addr}: timed out"))?
    .map_err(|e| format!("connect {addr}: {e}"))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut body))
        .await
        .map_err(|_| "reading: timed out".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(body)
}

#[tokio::test]
async fn cni_containers_get_addresses_reach_the_gateway_each_other_and_published_ports() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let server = "net-server";
    let _guard = Detached {
        ctr: &ctr,
        id: server,
    };
    let out = ctr.run(
        &[
            "run", "-d", "--runtime", RUNTIME,
            "--annotation", "io.spinbox.net.publish=18080:80/tcp",
            IMAGE, server, "sh", "-c",
            "mkdir -p /www && echo served-by-server > /www/index.html && exec httpd -f -p 80 -h /www",
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_running(&ctr, server).await;
    let server_ip = cni_address(&ctr, server);
    assert!(
        server_ip.to_string().starts_with(SUBNET_PREFIX),
        "{server_ip} is not from the conflist's subnet"
    );

    // A second container: its own address on the subnet, the gateway answers, the server
    // answers by IP (container to container over the bridge).
    let script = format!(
        "ip -4 -o addr show eth0; ping -c 1 -W 5 {GATEWAY} >/dev/null && echo gateway-ok; \
         ping -c 1 -W 5 {server_ip} >/dev/null && echo server-ping-ok; \
         wget -O - http://{server_ip}:80/"
    );
    let out = ctr.run_container(RUNTIME, "net-client", &[], &["sh", "-c", &script], None);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let client_ip = stdout
        .split_whitespace()
        .find(|w| w.starts_with(SUBNET_PREFIX))
        .unwrap_or_else(|| panic!("no address from the subnet on eth0: {stdout}"));
    assert!(!client_ip.starts_with(&format!("{server_ip}/")), "{stdout}");
    assert!(stdout.contains("gateway-ok"), "{stdout}");
    assert!(stdout.contains("served-by-server"), "{stdout}");

    // The published port: the host's address on the bridge, port 18080, reaches httpd's 80.
    let body = http_get(&format!("{GATEWAY}:18080")).await;
    assert!(
        body.as_deref()
            .is_ok_and(|b| b.contains("served-by-server")),
        "published port: {body:?}"
    );

    remove(&ctr, server).await;
    ctr.assert_clean();
    // After delete: the port is closed again (no rule left to forward it).
    assert!(http_get(&format!("{GATEWAY}:18080")).await.is_err());
}

/// A namespace made the way CRI makes one: a veth with an address and a default route, its
/// peer in another namespace. The VM takes the veth's MAC and address and reaches the peer.
#[tokio::test]
async fn prepared_netns_is_mirrored_into_the_vm() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let pid = std::process::id();
    let (ns, peer) = (format!("sbte{pid}c"), format!("sbte{pid}p"));
    struct Netns(Vec<String>);
    impl Drop for Netns {
        fn drop(&mut self) {
            for n in &self.0 {
                let _ = Command::new("ip").args(["netns", "del", n]).output();
            }
        }
    }
    let _guard = Netns(vec![ns.clone(), peer.clone()]);
    sh(&["ip", "netns", "add", &ns]);
    sh(&["ip", "netns", "add", &peer]);
    sh(&[
        "ip",
        "link",
        "add",
        "eth0",
        "netns",
        &ns,
        "address",
        "02:5b:0c:00:00:02",
        "mtu",
        "1450",
        "type",
        "veth",
        "peer",
        "name",
        "peer0",
        "netns",
        &peer,
    ]);
    sh(&[
        "ip",
        "-n",
        &ns,
        "addr",
        "add",
        "10.87.251.2/24",
        "dev",
        "eth0",
    ]);
    sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
    sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
    sh(&[
        "ip",
        "-n",
        &ns,
        "route",
        "add",
        "default",
        "via",
        "10.87.251.1",
    ]);
    sh(&[
        "ip",
        "-n",
        &peer,
        "addr",
        "add",
        "10.87.251.1/24",
        "dev",
        "peer0",
    ]);
    sh(&["ip", "-n", &peer, "link", "set", "peer0", "up"]);

    // resolv.conf and hosts as CRI gives them: bind mounts of host files.
    let files = tempfile::tempdir().unwrap();
    let resolv = files.path().join("resolv.conf");
    let hosts = files.path().join("hosts");
    std::fs::write(&resolv, "nameserver 10.87.251.1 # from-the-spec\n").unwrap();
    std::fs::write(&hosts, "10.87.251.1 peer-host\n").unwrap();
    let resolv_mount = format!(
        "type=bind,src={},dst=/etc/resolv.conf,options=rbind:ro",
        resolv.display()
    );
    let hosts_mount = format!(
        "type=bind,src={},dst=/etc/hosts,options=rbind:ro",
        hosts.display()
    );
    let with_ns = format!("network:/run/netns/{ns}");
    let out = ctr.run_container(
        RUNTIME,
        "net-mirror",
        &[
            "--with-ns",
            &with_ns,
            "--mount",
            &resolv_mount,
            "--mount",
            &hosts_mount,
        ],
        &[
            "sh",
            "-c",
            "cat /sys/class/net/eth0/address /sys/class/net/eth0/mtu; ip -4 -o addr show eth0; \
             ip route; ping -c 1 -W 5 10.87.251.1 >/dev/null && echo peer-ok; \
             cat /etc/resolv.conf /etc/hosts",
        ],
        None,
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("02:5b:0c:00:00:02"), "MAC: {stdout}");
    assert!(stdout.contains("1450"), "MTU: {stdout}");
    assert!(stdout.contains("10.87.251.2/24"), "address: {stdout}");
    assert!(
        stdout.contains("default via 10.87.251.1"),
        "route: {stdout}"
    );
    assert!(stdout.contains("peer-ok"), "peer unreachable: {stdout}");
    assert!(stdout.contains("# from-the-spec"), "resolv.conf: {stdout}");
    assert!(stdout.contains("peer-host"), "hosts: {stdout}");

    // The namespace is CRI's: it stays, without spinbox's TAP and redirects.
    let links = sh(&["ip", "-n", &ns, "link", "show"]);
    assert!(!links.contains("sbtap"), "TAP left: {links}");
    let qdiscs = sh(&[
        "ip", "netns", "exec", &ns, "tc", "qdisc", "show", "dev", "eth0",
    ]);
    assert!(!qdiscs.contains("ingress"), "redirect left: {qdiscs}");
    ctr.assert_clean();
}

#[tokio::test]
async fn host_network_and_bad_publish_requests_are_refused() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let out = ctr.run_container(RUNTIME, "net-host", &["--net-host"], &["true"], None);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("host's network"), "{err}");
    let out = ctr.run_container(
        RUNTIME,
        "net-badpublish",
        &["--annotation", "io.spinbox.net.publish=80"],
        &["true"],
        None,
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("io.spinbox.net.publish"), "{err}");
    for id in ["net-host", "net-badpublish"] {
        let _ = ctr.run(&["containers", "rm", id], None);
    }
    ctr.assert_clean();
}

/// kill -9 of the shim of a CNI container with a published port: containerd's cleanup (`shim
/// delete`) releases the namespace, allocation and rules from the record; cleanup-cni.sh then
/// reports nothing of spinbox's.
#[tokio::test]
async fn killed_shim_leaves_no_network_behind() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let id = "net-shimkill";
    let _guard = Detached { ctr: &ctr, id };
    let out = ctr.run(
        &[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            "--annotation",
            "io.spinbox.net.publish=18081:80/tcp",
            IMAGE,
            id,
            "sleep",
            "300",
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_running(&ctr, id).await;
    assert!(PathBuf::from(format!("/run/netns/spinbox-{id}")).exists());
    let shim_marker = format!("-id {id} -address {}", ctr.address);
    let shims = spinbox_tests::processes_mentioning(&shim_marker);
    let pid: i32 = shims
        .first()
        .and_then(|s| s.split(':').next())
        .and_then(|p| p.parse().ok())
        .expect("shim pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 the shim");
    let deadline = Instant::now() + Duration::from_secs(20);
    while ctr.task_line(id).is_some() {
        assert!(Instant::now() < deadline, "task still listed after kill -9");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // containerd's cleanup (`shim delete`) may still be releasing the network.
    ctr.wait_no_shim(id).await;
    assert!(ctr.run(&["containers", "rm", id], None).status.success());
    ctr.assert_clean();
    let status = Command::new("bash")
        .args(["deploy/cleanup-cni.sh", "--status"])
        .current_dir(env!("CARGO_MANIFEST_DIR").to_string() + "/..")
        .env(
            "SPINBOX_CONFIG",
            std::env::var("SPINBOX_E2E_CONFIG").unwrap_or_default(),
        )
        .env("CONTAINERD_ADDRESS", &ctr.address)
        .output()
        .expect("cleanup-cni.sh");
    let report = text(&status.stdout);
    assert!(status.status.success(), "{report}{}", text(&status.stderr));
    assert!(report.contains("nothing of spinbox's"), "{report}");
}

/// `network.mode` takes effect per container (through `--runtime-config-path`): `none` gives
/// loopback only where `auto` would have run CNI; `netns` refuses a container whose spec names
/// no namespace with interfaces, naming the key.
#[tokio::test]
async fn network_mode_none_and_netns_take_effect() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let variant = |mode: &str| {
        spinbox_tests::config_variant_file(dir.path(), mode, |c| {
            c["network"]["mode"] = mode.into();
        })
    };
    let none = variant("none");
    let out = ctr.run_container(
        RUNTIME,
        "net-mode-none",
        &["--runtime-config-path", &none],
        &["ls", "/sys/class/net"],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "lo");

    let netns = variant("netns");
    let out = ctr.run_container(
        RUNTIME,
        "net-mode-netns",
        &["--runtime-config-path", &netns],
        &["true"],
        None,
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("network.mode"), "{err}");
    let _ = ctr.run(&["containers", "rm", "net-mode-netns"], None);
    ctr.assert_clean();
}

/// What a crashed host can leave without any record — a namespace, a tagged nft rule, a
/// host-local allocation of a container containerd does not know — is reported as orphaned by
/// `cleanup-cni.sh --status` and removed by `cleanup-cni.sh`.
#[tokio::test]
async fn cleanup_cni_reports_and_removes_orphans() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let id = "net-orphan";
    sh(&["ip", "netns", "add", &format!("spinbox-{id}")]);
    let rules = format!(
        "add table inet spinbox\n\
         add chain inet spinbox output {{ type nat hook output priority -100; policy accept; }}\n\
         add rule inet spinbox output tcp dport 18099 dnat ip to 10.87.250.250:80 comment \"spinbox:{id}\"\n"
    );
    let mut nft = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    nft.stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    assert!(nft.wait().unwrap().success());
    let ipam = ctr.spinbox_root.join("ipam").join("spinbox-test");
    std::fs::create_dir_all(&ipam).unwrap();
    std::fs::write(ipam.join("10.87.250.250"), format!("{id}\r\neth0")).unwrap();

    let script = |args: &[&str]| {
        let out = Command::new("bash")
            .arg("deploy/cleanup-cni.sh")
            .args(args)
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .env(
                "SPINBOX_CONFIG",
                std::env::var("SPINBOX_E2E_CONFIG").unwrap(),
            )
            .env("CONTAINERD_ADDRESS", &ctr.address)
            .output()
            .unwrap();
        let report = text(&out.stdout);
        assert!(
            out.status.success(),
            "{args:?}: {report}{}",
            text(&out.stderr)
        );
        report
    };
    let status = script(&["--status"]);
    for kind in ["netns", "nft", "ipam"] {
        assert!(
            status
                .lines()
                .any(|l| l.starts_with(kind) && l.contains(id) && l.contains("orphaned")),
            "{kind} not reported as an orphan: {status}"
        );
    }
    let removed = script(&[]);
    assert!(removed.contains("removed"), "{removed}");
    ctr.assert_clean();
    assert!(script(&["--status"]).contains("nothing of spinbox's"));
}

/// `network.isolate`: a container on the bridge still reaches the gateway, not its neighbour.
#[tokio::test]
async fn isolated_containers_reach_the_gateway_not_each_other() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let path = spinbox_tests::config_variant_file(dir.path(), "isolate", |c| {
        c["network"]["isolate"] = true.into();
    });

    let server = "net-iso-server";
    let _guard = Detached {
        ctr: &ctr,
        id: server,
    };
    let out = ctr.run(
        &[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            "--runtime-config-path",
            &path,
            IMAGE,
            server,
            "sleep",
            "300",
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_running(&ctr, server).await;
    let server_ip = cni_address(&ctr, server);
    let script = format!(
        "ping -c 1 -W 5 {GATEWAY} >/dev/null && echo gateway-ok; \
         ping -c 1 -W 3 {server_ip} >/dev/null && echo neighbour-reached || echo neighbour-blocked"
    );
    let out = ctr.run_container(
        RUNTIME,
        "net-iso-client",
        &["--runtime-config-path", &path],
        &["sh", "-c", &script],
        None,
    );
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("gateway-ok"),
        "{stdout}{}",
        text(&out.stderr)
    );
    assert!(stdout.contains("neighbour-blocked"), "{stdout}");
    remove(&ctr, server).await;
    ctr.assert_clean();
}
