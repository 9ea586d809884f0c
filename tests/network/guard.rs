//! What the network phase refuses (issue 17): the shim's own network namespace, and published
//! host ports that are already published, in use on the host, or privileged — each refusal
//! naming its reason, and leaving nothing behind.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use spinbox_tests::ctr::{Ctr, IMAGE, RUNTIME};
use spinbox_tests::VM_TESTS;

use super::{cni_address, http_get, remove, sh, text, wait_running, Detached, GATEWAY};

/// A second, short-lived private containerd started inside a network namespace the test made
/// (so its shims run there: that namespace is the shim's own), stopped and removed on drop.
struct NetnsContainerd {
    netns: String,
    dir: PathBuf,
    address: String,
}

impl NetnsContainerd {
    fn start(netns: &str, dir: &Path) -> NetnsContainerd {
        let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        // The shim the suite's containerd runs (tests/run.sh builds it there).
        let shim_dir = PathBuf::from(repo).join("target/debug");
        assert!(
            shim_dir.join("containerd-shim-spinbox-v2").exists(),
            "no shim in {}",
            shim_dir.display()
        );
        let config = std::env::var("SPINBOX_E2E_CONFIG").expect("SPINBOX_E2E_CONFIG");
        sh(&["ip", "netns", "add", netns]);
        let mut started = NetnsContainerd {
            netns: netns.to_string(),
            dir: dir.to_path_buf(),
            address: String::new(),
        };
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                netns,
                "bash",
                "deploy/private-containerd.sh",
                "start",
            ])
            .arg(dir)
            .arg(&shim_dir)
            .arg(&config)
            .current_dir(repo)
            .output()
            .expect("deploy/private-containerd.sh");
        assert!(out.status.success(), "{}", text(&out.stderr));
        started.address = text(&out.stdout).trim().to_string();
        started
    }

    fn ctr(&self, args: &[&str]) -> std::process::Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.address)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("ctr")
    }
}

impl Drop for NetnsContainerd {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../deploy/private-containerd.sh"
            ))
            .arg("stop")
            .arg(&self.dir)
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}

/// The recipe: a containerd (and so its shims) inside a namespace the test made, and a
/// container given that very namespace. Mirroring it would put a TAP beside the shim's own
/// interfaces and redirect their traffic into the VM; the create is refused, naming why.
#[tokio::test]
async fn the_shims_own_netns_is_refused() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let ns = format!("sbtn{}", std::process::id());
    let tmp = tempfile::tempdir().unwrap();
    let inner = NetnsContainerd::start(&ns, &tmp.path().join("containerd"));
    // An interface in that namespace, as a pod's has, so that mirroring is what auto picks.
    sh(&[
        "ip", "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
    ]);
    sh(&[
        "ip",
        "-n",
        &ns,
        "addr",
        "add",
        "10.87.249.2/24",
        "dev",
        "eth0",
    ]);
    sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
    let image = ctr
        .spinbox_root
        .parent()
        .expect("the suite's root")
        .join("busybox.tar");
    let out = inner.ctr(&["images", "import", &image.display().to_string()]);
    assert!(out.status.success(), "import: {}", text(&out.stderr));

    let with_ns = format!("network:/var/run/netns/{ns}");
    let out = inner.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--with-ns",
        &with_ns,
        IMAGE,
        "net-own",
        "true",
    ]);
    assert!(!out.status.success(), "ran in the shim's own namespace");
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "/var/run/netns/{ns} is the shim's own network namespace"
        )) && err.contains("give the container a network namespace of its own"),
        "{err}"
    );
    // Nothing of it: no TAP or redirect in the namespace, no shim left for that containerd.
    let links = sh(&["ip", "-n", &ns, "link", "show"]);
    assert!(!links.contains("sbtap"), "TAP left: {links}");
    let qdiscs = sh(&[
        "ip", "netns", "exec", &ns, "tc", "qdisc", "show", "dev", "eth0",
    ]);
    assert!(!qdiscs.contains("ingress"), "redirect left: {qdiscs}");
    let _ = inner.ctr(&["containers", "rm", "net-own"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !spinbox_tests::processes_mentioning(&format!("-address {}", inner.address)).is_empty() {
        assert!(
            Instant::now() < deadline,
            "a shim of the netns containerd is left"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let inner_ctr = Ctr {
        address: inner.address.clone(),
        spinbox_root: ctr.spinbox_root.clone(),
        containerd_dir: inner.dir.clone(),
    };
    inner_ctr.assert_no_shim_sockets(&["net-own"]);
    drop(inner);
    // The suite's spinbox root (state, logs, data, mounts, netns, nft) is clean too.
    ctr.assert_clean();
}

/// A host port nothing on the host uses now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    l.local_addr().unwrap().port()
}

fn refused(ctr: &Ctr, id: &str, publish: &str) -> String {
    let annotation = format!("io.spinbox.net.publish={publish}");
    let out = ctr.run_container(RUNTIME, id, &["--annotation", &annotation], &["true"], None);
    assert!(!out.status.success(), "{id} with {publish} ran");
    let _ = ctr.run(&["containers", "rm", id], None);
    text(&out.stderr)
}

/// A published port cannot be published again, a port a host socket holds cannot be taken,
/// and one below 1024 needs `network.publish_privileged_ports`. The container that holds the
/// port keeps serving it through the refusals.
#[tokio::test]
async fn published_bound_and_privileged_ports_are_refused() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let server = "net-pub-owner";
    let _guard = Detached {
        ctr: &ctr,
        id: server,
    };
    let port = free_port();
    let annotation = format!("io.spinbox.net.publish={port}:80/tcp");
    let out = ctr.run(
        &[
            "run", "-d", "--runtime", RUNTIME, "--annotation", &annotation, IMAGE, server, "sh",
            "-c",
            "mkdir -p /www && echo served-by-owner > /www/index.html && exec httpd -f -p 80 -h /www",
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_running(&ctr, server).await;
    assert!(cni_address(&ctr, server)
        .to_string()
        .starts_with("10.87.250."));

    let err = refused(&ctr, "net-pub-again", &format!("{port}:8080/tcp"));
    assert!(
        err.contains(&format!("host port {port}/tcp is already published")) && err.contains(server),
        "{err}"
    );

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let bound = listener.local_addr().unwrap().port();
    let err = refused(&ctr, "net-pub-bound", &format!("{bound}:80"));
    assert!(
        err.contains(&format!("host port {bound}/tcp is in use on the host")),
        "{err}"
    );
    drop(listener);

    let err = refused(&ctr, "net-pub-low", "80:80");
    assert!(
        err.contains("network.publish_privileged_ports") && err.contains("host port 80/tcp"),
        "{err}"
    );

    // The owner's rules survived the refused creates: its port still answers.
    let body = http_get(&format!("{GATEWAY}:{port}")).await;
    assert!(
        body.as_deref().is_ok_and(|b| b.contains("served-by-owner")),
        "published port after the refusals: {body:?}"
    );
    remove(&ctr, server).await;
    ctr.assert_clean();
}
