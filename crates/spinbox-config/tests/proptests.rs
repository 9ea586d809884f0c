//! Property tests of `config.json` parsing: arbitrary text or values never panic, every error
//! names the key that was wrong, and a config round-trips through `to_json_pretty`.

use std::path::PathBuf;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::{json, Value};
use spinbox_config::{duration, Config, MAX_CONFIG_BYTES, MAX_TIMEOUT};

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        (0u64..100_000).prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
        "/[a-z/]{0,12}".prop_map(Value::String),
        "[0-9]{1,22}(ms|s|m|h|q|)".prop_map(Value::String),
        prop_oneof![
            Just("auto"),
            Just("tcg"),
            Just("kvm"),
            Just("vhost-user"),
            Just("cni")
        ]
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((".{0,6}", inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Every dotted key path of the default config (objects and leaves).
fn key_paths() -> Vec<String> {
    fn walk(v: &Value, prefix: &str, out: &mut Vec<String>) {
        if let Value::Object(m) = v {
            for (k, child) in m {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                out.push(path.clone());
                walk(child, &path, out);
            }
        }
    }
    let v: Value = serde_json::from_str(&Config::default().to_json_pretty()).unwrap();
    let mut out = Vec::new();
    walk(&v, "", &mut out);
    out
}

fn set(v: &mut Value, path: &str, new: Value) {
    let mut cur = v;
    let parts: Vec<&str> = path.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        cur = cur.get_mut(*p).unwrap();
    }
    cur[parts[parts.len() - 1]] = new;
}

fn round_trips(c: &Config) -> Result<(), TestCaseError> {
    let text = c.to_json_pretty();
    let back = Config::from_json(&text, "round-trip");
    prop_assert!(back.is_ok(), "{text}\n{:?}", back.err());
    prop_assert_eq!(&back.unwrap(), c);
    Ok(())
}

fn ms_duration() -> impl Strategy<Value = Duration> {
    (0u64..=MAX_TIMEOUT.as_millis() as u64).prop_map(Duration::from_millis)
}

/// Configs that differ from the defaults anywhere a value of the right type can go.
fn config() -> impl Strategy<Value = Config> {
    (
        (
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
        ),
        prop::collection::vec(prop_oneof![4 => "[^\\s]{1,10}", 1 => ".{0,10}"], 0..3),
        prop::collection::vec(ms_duration(), 11),
        (
            "/.{0,20}",
            prop_oneof![4 => "[A-Za-z0-9_-]{1,15}", 1 => ".{0,16}"],
            any::<u32>(),
            any::<bool>(),
            any::<u64>(),
        ),
        prop::option::of("/.{0,10}"),
    )
        .prop_map(|(nums, kernel_args, durations, misc, firmware)| {
            let mut c = Config::default();
            (
                c.vm.vcpus,
                c.vm.memory_mib,
                c.vm.agent_port,
                c.vm.rootfs_upper_mib,
            ) = (nums.0 % 270, nums.1, nums.2, nums.3);
            (c.vm.hotplug_slots, c.vm.console_log_max_kib) = (nums.4 % 30, nums.5);
            c.vm.kernel_args = kernel_args;
            let t = &mut c.timeouts;
            for (slot, d) in [
                &mut t.vm_start,
                &mut t.device_detection,
                &mut t.shutdown_grace,
                &mut t.event_reconnect,
                &mut t.task_client_retry,
                &mut t.io_wait,
                &mut t.qmp_command,
                &mut t.cni_plugin,
                &mut t.nft,
                &mut t.kill,
                &mut t.agent_call,
            ]
            .into_iter()
            .zip(durations)
            {
                *slot = d;
            }
            c.paths.state_dir = PathBuf::from(misc.0);
            c.network.cni_ifname = misc.1;
            c.network.cni_attempts = misc.2 % 12;
            c.network.isolate = misc.3;
            c.storage.layer_cache_max_mib = misc.4;
            c.paths.firmware = firmware.map(PathBuf::from);
            c
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_text_never_panics(text in ".{0,200}") {
        if let Err(e) = Config::from_json(&text, "t.json") {
            prop_assert!(e.to_string().contains("t.json"), "{e}");
        }
    }

    #[test]
    fn arbitrary_values_never_panic(v in json_value()) {
        if let Ok(c) = Config::from_json(&v.to_string(), "t.json") {
            round_trips(&c)?;
        }
    }

    /// One key of a valid config replaced by an arbitrary value: either it is accepted (and
    /// round-trips) or the error names that key.
    #[test]
    fn one_bad_key_is_named(pick in any::<prop::sample::Index>(), v in json_value()) {
        let paths = key_paths();
        let path = &paths[pick.index(paths.len())];
        let mut doc: Value = serde_json::from_str(&Config::default().to_json_pretty()).unwrap();
        set(&mut doc, path, v.clone());
        match Config::from_json(&doc.to_string(), "t.json") {
            Ok(c) => round_trips(&c)?,
            Err(e) => {
                let e = e.to_string();
                prop_assert!(e.contains(path.as_str()), "{path} = {v}: {e}");
            }
        }
    }

    /// Any config that validates comes back equal from its own pretty JSON.
    #[test]
    fn configs_round_trip(c in config()) {
        if Config::from_json(&c.to_json_pretty(), "t").is_ok() {
            round_trips(&c)?;
        }
    }

    #[test]
    fn durations_round_trip(secs in any::<u64>(), ms in 0u32..1000) {
        let d = Duration::from_secs(secs) + Duration::from_millis(ms.into());
        prop_assert_eq!(duration::parse(&duration::format(d)), Ok(d));
    }

    #[test]
    fn duration_text_never_panics(text in "[0-9a-z ]{0,30}|[0-9]{15,30}(ms|s|m|h)[0-9]{0,25}(ms|s|m|h)?") {
        let _ = duration::parse(&text);
    }
}

#[test]
fn timeouts_above_a_day_are_refused_naming_the_key() {
    let e = Config::from_json(r#"{"timeouts": {"kill": "25h"}}"#, "t")
        .unwrap_err()
        .to_string();
    assert!(e.contains("timeouts.kill") && e.contains("maximum"), "{e}");
    let e = Config::from_json(r#"{"timeouts": {"nft": "0s"}}"#, "t")
        .unwrap_err()
        .to_string();
    assert!(e.contains("timeouts.nft"), "{e}");
    // Huge but parseable: refused by the bound rather than overflowing a deadline later.
    let e = Config::from_json(
        r#"{"timeouts": {"io_wait": "18446744073709551615s999ms"}}"#,
        "t",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("timeouts.io_wait"), "{e}");
    assert!(Config::from_json(r#"{"timeouts": {"vm_start": "24h"}}"#, "t").is_ok());
}

#[test]
fn oversized_config_files_are_refused_unread() {
    let e = Config::from_file(std::path::Path::new("/dev/zero"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/dev/zero") && e.contains("larger than"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.json");
    let mut text = String::from("{\"vm\": {\"kernel_args\": [");
    while (text.len() as u64) <= MAX_CONFIG_BYTES {
        text.push_str("\"quiet\",");
    }
    text.push_str("\"quiet\"]}}");
    std::fs::write(&path, &text).unwrap();
    let e = Config::from_file(&path).unwrap_err().to_string();
    assert!(e.contains("big.json") && e.contains("larger than"), "{e}");
}
