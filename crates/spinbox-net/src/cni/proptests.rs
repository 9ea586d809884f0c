//! Property tests of what CNI plugins hand back: results, error replies and conflists parse
//! or fail without panicking, and a plugin's output is read within fixed bounds.

use std::os::unix::fs::PermissionsExt;

use proptest::prelude::*;
use serde_json::json;

use super::*;

/// Arbitrary JSON, leaning on the keys and shapes of CNI results and conflists.
fn json_value() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("cniVersion".to_string()),
        Just("interfaces".to_string()),
        Just("ips".to_string()),
        Just("routes".to_string()),
        Just("address".to_string()),
        Just("gateway".to_string()),
        Just("interface".to_string()),
        Just("dst".to_string()),
        Just("gw".to_string()),
        Just("name".to_string()),
        Just("mac".to_string()),
        Just("plugins".to_string()),
        Just("type".to_string()),
        Just("code".to_string()),
        Just("msg".to_string()),
        ".{0,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,20}".prop_map(Value::String),
        "[0-9.:/a-f]{0,24}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn ip_net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (any::<[u8; 4]>(), 0u8..=32).prop_map(|(a, p)| IpNet::new(IpAddr::from(a), p).unwrap()),
        (any::<[u8; 16]>(), 0u8..=128).prop_map(|(a, p)| IpNet::new(IpAddr::from(a), p).unwrap()),
    ]
}

fn ip_addr() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<[u8; 16]>().prop_map(IpAddr::from)
    ]
}

fn cni_result() -> impl Strategy<Value = CniResult> {
    let iface = (".{0,15}", ".{0,17}", ".{0,30}").prop_map(|(name, mac, sandbox)| CniInterface {
        name,
        mac,
        sandbox,
    });
    let ip = (
        ip_net(),
        prop::option::of(ip_addr()),
        prop::option::of(0usize..8),
    )
        .prop_map(|(address, gateway, interface)| CniIp {
            address,
            gateway,
            interface,
        });
    let route = (ip_net(), prop::option::of(ip_addr())).prop_map(|(dst, gw)| CniRoute { dst, gw });
    (
        "[0-9.]{0,6}",
        prop::collection::vec(iface, 0..4),
        prop::collection::vec(ip, 0..4),
        prop::collection::vec(route, 0..4),
    )
        .prop_map(|(cni_version, interfaces, ips, routes)| CniResult {
            cni_version,
            interfaces,
            ips,
            routes,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_results_never_panic(v in json_value(), bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = serde_json::from_value::<CniResult>(v.clone());
        let _ = serde_json::from_slice::<CniResult>(&bytes);
        let _ = serde_json::from_slice::<CniErrorReply>(&bytes);
        let _ = serde_json::from_value::<CniErrorReply>(v);
    }

    #[test]
    fn results_round_trip(r in cni_result()) {
        let text = serde_json::to_string(&r).unwrap();
        prop_assert_eq!(serde_json::from_str::<CniResult>(&text).unwrap(), r);
    }

    /// A valid result with one field replaced by arbitrary JSON: parses or errors, never panics.
    #[test]
    fn mutated_results_never_panic(r in cni_result(), path in 0usize..6, v in json_value()) {
        let mut raw = serde_json::to_value(&r).unwrap();
        let slot = match path {
            0 => raw.get_mut("ips"),
            1 => raw.pointer_mut("/ips/0/address"),
            2 => raw.pointer_mut("/ips/0/interface"),
            3 => raw.pointer_mut("/routes/0/dst"),
            4 => raw.pointer_mut("/interfaces/0"),
            _ => raw.get_mut("cniVersion"),
        };
        if let Some(slot) = slot {
            *slot = v;
        }
        let _ = serde_json::from_value::<CniResult>(raw);
    }

    #[test]
    fn arbitrary_conflists_never_panic(v in json_value(), bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        for input in [serde_json::to_vec(&v).unwrap(), bytes] {
            if let Err(e) = ConfList::parse(Path::new("/etc/x.conflist"), &input) {
                prop_assert!(e.to_string().contains("/etc/x.conflist"), "{e}");
            }
        }
    }

    /// read_capped against its model, over a pipe written in arbitrary chunks.
    #[test]
    fn capped_reads_match_their_model(
        input in prop::collection::vec(any::<u8>(), 0..300),
        max in 0usize..200,
        drain in any::<bool>(),
        chunk in 1usize..33,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let got = rt.block_on(async {
            let (mut w, mut r) = tokio::io::duplex(chunk);
            let feed = input.clone();
            let writer = tokio::spawn(async move { w.write_all(&feed).await.is_ok() });
            let got = read_capped(&mut r, max, drain).await.unwrap();
            drop(r);
            let wrote_all = writer.await.unwrap();
            (got, wrote_all)
        });
        let (got, wrote_all) = got;
        prop_assert_eq!(got.over, input.len() > max);
        prop_assert_eq!(&got.bytes[..], &input[..input.len().min(max)]);
        if drain {
            prop_assert!(wrote_all, "a drained writer is never cut off");
        }
    }
}

/// Writes an executable fake plugin and runs `exec` with it (retrying the rare ETXTBSY of a
/// script just written while another test thread forks).
async fn run_plugin(script: &str) -> Result<Option<Value>, NetError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
    let inv = Invoker {
        bin_dirs: vec![dir.path().to_path_buf()],
        timeout: Duration::from_secs(20),
    };
    let att = Attachment {
        container_id: "c1".into(),
        netns: "/run/netns/none".into(),
        ifname: "eth0".into(),
    };
    let conf = json!({"type": "fake", "name": "n", "cniVersion": "1.0.0"});
    for _ in 0..20 {
        match inv.exec("ADD", &conf, &att).await {
            Err(e) if e.to_string().contains("Text file busy") => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => return other,
        }
    }
    inv.exec("ADD", &conf, &att).await
}

/// A plugin that writes without end: cut off at MAX_PLUGIN_STDOUT at once, not at the timeout.
#[tokio::test]
async fn endless_plugin_output_is_cut_off_at_the_bound() {
    let started = std::time::Instant::now();
    let e = run_plugin("#!/bin/sh\ncat >/dev/null\nexec yes '{\"cniVersion\":\"1.0.0\"}'\n")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("larger than"), "{e}");
    assert!(e.contains("ADD fake for c1"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

/// A plugin that floods stderr then fails: the error carries a bounded part of it, and the
/// flood never blocks the plugin.
#[tokio::test]
async fn stderr_flood_is_kept_bounded() {
    let e = run_plugin(
        "#!/bin/sh\ncat >/dev/null\nhead -c 4000000 /dev/zero | tr '\\0' e >&2\nexit 3\n",
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("exit status: 3"), "{}", &e[..200.min(e.len())]);
    assert!(e.len() < MAX_PLUGIN_STDERR + 512, "{} bytes", e.len());
}

/// A well-behaved plugin still gets its config and its result comes back.
#[tokio::test]
async fn plugin_result_comes_back() {
    let v = run_plugin(
        "#!/bin/sh\nread -r conf\necho \"{\\\"cniVersion\\\":\\\"1.0.0\\\",\\\"dns\\\":{}}\"\n",
    )
    .await
    .unwrap();
    assert_eq!(v.unwrap()["cniVersion"], "1.0.0");
}

/// A conflist path naming an endless file is refused at the bound, not read whole.
#[tokio::test]
async fn endless_conflist_is_refused() {
    let e = ConfList::load(Path::new("/dev/zero"))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("larger than") && e.contains("/dev/zero"), "{e}");
}
