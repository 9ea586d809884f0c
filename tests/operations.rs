//! The operator's view, end to end: `spinbox ps` and `spinbox inspect` against the VMs of
//! real containers run through the suite's containerd (with `ctr`, and a pod through CRI),
//! and the shutdown records kept after a VM is gone. Each test ends with the shared leak
//! check.

// The pod tests' harness (CRI connection, pods, leak checks); only part of it is used here.
#[allow(dead_code)]
#[path = "pod/world.rs"]
mod world;

use std::time::{Duration, Instant};

use serde_json::Value;
use spinbox_tests::ctr::{Ctr, Detached, RUNTIME};
use spinbox_tests::{spinbox_inspect, spinbox_ps, VM_TESTS};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The config the suite's shim runs with, which `spinbox` reads too.
fn suite_config() -> String {
    std::env::var("SPINBOX_E2E_CONFIG").expect("SPINBOX_E2E_CONFIG")
}

fn row<'a>(rows: &'a [Value], id: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["vm_id"] == id)
        .unwrap_or_else(|| panic!("no row for {id} in {rows:#?}"))
}

fn alive(pid: &Value) -> bool {
    pid.as_u64()
        .is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
}

/// The pid of the suite's containerd: the process started with its config
/// (deploy/private-containerd.sh), or the pid file that script wrote.
fn containerd_pid(ctr: &Ctr) -> i32 {
    let config = ctr.containerd_dir.join("config.toml").display().to_string();
    let by_cmdline = spinbox_tests::processes_mentioning(&format!("--config {config}"))
        .into_iter()
        .filter(|p| !p.contains("containerd-shim"))
        .find_map(|p| p.split(':').next()?.parse().ok());
    by_cmdline
        .or_else(|| {
            std::fs::read_to_string(ctr.containerd_dir.join("containerd.pid"))
                .ok()?
                .trim()
                .parse()
                .ok()
        })
        .expect("the suite's containerd pid")
}

/// containerd held stopped (SIGSTOP) until dropped (SIGCONT) — on every path, a failing
/// assertion's unwinding included, so the suite's containerd never stays frozen.
struct Frozen(nix::unistd::Pid);

impl Frozen {
    fn stop(pid: i32) -> Frozen {
        let pid = nix::unistd::Pid::from_raw(pid);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP containerd");
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// The pid of container `id`'s shim.
fn shim_pid(ctr: &Ctr, id: &str) -> i32 {
    let marker = format!("-id {id} -address {}", ctr.address);
    let shims = spinbox_tests::processes_mentioning(&marker);
    assert_eq!(shims.len(), 1, "one shim of {id}: {shims:?}");
    shims[0]
        .split(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("shim pid")
}

#[tokio::test]
async fn ps_lists_running_vms_and_one_whose_shim_is_gone_as_orphaned() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let config = suite_config();
    let (id_a, id_b) = ("ops-ps-a", "ops-ps-b");
    let a = Detached::run(&ctr, RUNTIME, id_a, &[], &["sleep", "300"]).await;
    let b = Detached::run(&ctr, RUNTIME, id_b, &[], &["sleep", "300"]).await;

    let started = Instant::now();
    let rows = spinbox_ps(&config);
    println!(
        "spinbox ps --json took {} ms",
        started.elapsed().as_millis()
    );
    for id in [id_a, id_b] {
        let r = row(&rows, id);
        assert_eq!(r["state"], "running", "{r:#}");
        assert_eq!(r["namespace"], "default", "{r:#}");
        assert_eq!(r["containers"], serde_json::json!([id]), "{r:#}");
        assert!(alive(&r["qemu_pid"]), "QEMU alive: {r:#}");
        assert_eq!(
            r["qemu_pid"].as_i64(),
            ctr.qemu_pid(id).map(i64::from),
            "the QEMU of {id}: {r:#}"
        );
        assert!(alive(&r["shim_pid"]), "shim alive: {r:#}");
        assert!(r["memory_mib"].as_u64().is_some_and(|m| m >= 512), "{r:#}");
        assert!(r["vcpus"].as_u64().is_some_and(|v| v >= 1), "{r:#}");
        assert!(r["rss_kib"].as_u64().is_some_and(|k| k > 0), "{r:#}");
        assert!(r["uptime_s"].is_u64(), "{r:#}");
        // The suite's CNI network (tests/run.sh): 10.87.250.0/24.
        let addresses = r["addresses"].as_array().cloned().unwrap_or_default();
        assert!(
            addresses
                .iter()
                .any(|a| a.as_str().is_some_and(|a| a.starts_with("10.87.250."))),
            "{r:#}"
        );
        assert_eq!(r["error"], Value::Null, "{r:#}");
    }
    let table = spinbox_tests::spinbox_cli(&config, &["ps"]);
    assert!(table.status.success(), "{}", text(&table.stderr));
    let table = text(&table.stdout);
    println!("{table}");
    assert!(table.starts_with("VM ID"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(id_a) && l.contains("running")),
        "{table}"
    );
    let bad = spinbox_tests::spinbox_cli(&config, &["ps", "--jsn"]);
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("--jsn"), "{}", text(&bad.stderr));

    // containerd frozen, so that its cleanup of a dead shim (`shim delete`) waits: the VM's
    // state directory stays as the killed shim left it.
    let frozen = Frozen::stop(containerd_pid(&ctr));
    let shim = shim_pid(&ctr, id_b);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 the shim");
    let deadline = Instant::now() + Duration::from_secs(10);
    let rows = loop {
        let rows = spinbox_ps(&config);
        if row(&rows, id_b)["state"] == "orphaned" {
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "{id_b} not orphaned after its shim was killed: {:#}",
            row(&rows, id_b)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let orphan = row(&rows, id_b);
    assert_eq!(orphan["shim_pid"], Value::Null, "{orphan:#}");
    assert_eq!(
        orphan["containers"],
        serde_json::json!([id_b]),
        "{orphan:#}"
    );
    assert_eq!(row(&rows, id_a)["state"], "running");
    let inspected = spinbox_inspect(&config, id_b).expect("inspect an orphan");
    assert_eq!(inspected["state"], "orphaned", "{inspected:#}");
    // `spinbox stop` of the orphan: no shim to go through, so it is stopped and reclaimed
    // directly — forced (exit 1), and its shutdown kept like any other.
    let out = spinbox_tests::spinbox_cli(&config, &["stop", "--json", id_b]);
    let said = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said} {}", text(&out.stderr));
    let lines: Vec<Value> = said
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let names: Vec<&str> = lines.iter().filter_map(|l| l["event"].as_str()).collect();
    assert_eq!(names.first(), Some(&"ShutdownInitiated"), "{said}");
    assert_eq!(names.last(), Some(&"ShutdownComplete"), "{said}");
    assert_eq!(
        lines.last().map(|l| &l["graceful"]),
        Some(&Value::Bool(false))
    );
    assert!(
        !ctr.spinbox_root.join("state").join(id_b).exists(),
        "reclaimed"
    );
    let gone = spinbox_inspect(&config, id_b).expect("inspect the stopped orphan");
    assert_eq!(gone["shutdown"]["graceful"], false, "{gone:#}");
    drop(frozen);

    // containerd's cleanup of the dead shim: the task goes, the VM's records are reclaimed.
    let vm_marker = ctr
        .spinbox_root
        .join("state")
        .join(id_b)
        .display()
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = ctr.task_line(id_b);
        let vm = spinbox_tests::processes_mentioning(&vm_marker);
        let state_left = ctr.spinbox_root.join("state").join(id_b).exists();
        if listed.is_none() && vm.is_empty() && !state_left {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the shim's death: task {listed:?}, VM {vm:?}, state directory left: {state_left}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ctr.wait_no_shim(id_b).await;
    drop(b);
    drop(a);
    let rows = spinbox_ps(&config);
    assert!(
        !rows
            .iter()
            .any(|r| r["vm_id"] == id_a || r["vm_id"] == id_b),
        "{rows:#?}"
    );
    ctr.assert_clean();
}

/// The events of a shutdown record, by name.
fn events(record: &Value) -> Vec<String> {
    record["events"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter_map(|e| e["event"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn inspect_shows_a_running_vms_records_and_a_gone_ones_kept_shutdown() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let config = suite_config();

    // A container that ran and is deleted: its state directory is gone, its shutdown kept.
    let gone = "ops-inspect-gone";
    let out = ctr.run_container(RUNTIME, gone, &[], &["true"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let j = spinbox_inspect(&config, gone).expect("inspect a VM that is gone");
    println!("{j:#}");
    assert_eq!(j["state"], "gone", "{j:#}");
    assert_eq!(j["record"], Value::Null);
    let shutdown = &j["shutdown"];
    assert_eq!(shutdown["vm_id"], gone, "{j:#}");
    assert_eq!(shutdown["complete"], true, "{j:#}");
    assert_eq!(shutdown["graceful"], true, "{j:#}");
    let names = events(shutdown);
    assert_eq!(
        names.first().map(String::as_str),
        Some("shutdown_initiated"),
        "{names:?}"
    );
    assert_eq!(
        names.last().map(String::as_str),
        Some("shutdown_complete"),
        "{names:?}"
    );
    // Its process had exited: the prepared guest was quit, not powered off, with no
    // escalation (docs/LIFECYCLE.md, Vm::shutdown_idle).
    assert_eq!(names.len(), 2, "{names:?}");
    assert_eq!(shutdown["events"][1]["last_step"], "agent-prepare", "{j:#}");
    let history = j["shutdown_history"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(history.len(), 1, "{j:#}");
    assert_eq!(&history[0], shutdown);
    let said = spinbox_tests::spinbox_cli(&config, &["inspect", gone]);
    assert!(said.status.success(), "{}", text(&said.stderr));
    assert!(
        text(&said.stdout).contains("is gone"),
        "{}",
        text(&said.stdout)
    );

    // A running one: its records, its configuration and its shape.
    let live = "ops-inspect-live";
    let d = Detached::run(&ctr, RUNTIME, live, &[], &["sleep", "300"]).await;
    let j = spinbox_inspect(&config, live).expect("inspect a running VM");
    assert_eq!(j["state"], "running", "{j:#}");
    assert_eq!(j["record"]["id"], live, "{j:#}");
    assert_eq!(j["record"]["namespace"], "default", "{j:#}");
    assert_eq!(
        j["record"]["containers"],
        serde_json::json!([live]),
        "{j:#}"
    );
    assert!(
        j["config"]["vm"]["memory_mib"]
            .as_u64()
            .is_some_and(|m| m >= 512),
        "{j:#}"
    );
    assert_eq!(
        j["config"]["paths"]["state_dir"],
        ctr.spinbox_root.join("state").display().to_string(),
        "{j:#}"
    );
    assert!(
        j["shape"]["vcpus"].as_u64().is_some_and(|v| v >= 1),
        "{j:#}"
    );
    assert!(
        j["shape"]["memory_mib"].as_u64().is_some_and(|m| m >= 512),
        "{j:#}"
    );
    assert!(j["network"].is_object(), "{j:#}");
    assert_eq!(j["shutdown"], Value::Null, "{j:#}");
    assert_eq!(j["error"], Value::Null, "{j:#}");

    // An id never seen: an error naming it and the places looked in.
    let e = spinbox_inspect(&config, "ops-never-seen").expect_err("an unknown id fails");
    assert!(e.contains("ops-never-seen"), "{e}");
    assert!(e.contains("shutdown"), "{e}");
    let e = spinbox_inspect(&config, "../etc").expect_err("an invalid id fails");
    assert!(e.contains("../etc"), "{e}");

    drop(d);
    let j = spinbox_inspect(&config, live).expect("inspect the deleted VM");
    assert_eq!(j["state"], "gone", "{j:#}");
    assert_eq!(j["shutdown"]["complete"], true, "{j:#}");
    ctr.assert_clean();
}

#[tokio::test]
async fn kept_shutdown_records_are_bounded_per_id() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let config = suite_config();
    let dir = tempfile::tempdir().unwrap();
    let keep_one = spinbox_tests::config_variant_file(dir.path(), "keep-one", |c| {
        c["vm"]["shutdown_records_kept"] = 1.into();
    });
    let keep_none = spinbox_tests::config_variant_file(dir.path(), "keep-none", |c| {
        c["vm"]["shutdown_records_kept"] = 0.into();
    });
    let id = "ops-kept";
    let kept_dir = ctr.spinbox_root.join("log").join("shutdown");
    let kept = || spinbox_vmm::history::list(&ctr.spinbox_root.join("log"), id).unwrap();
    let mut started = Vec::new();
    for _ in 0..2 {
        let out = ctr.run_container(
            RUNTIME,
            id,
            &["--runtime-config-path", keep_one.as_str()],
            &["true"],
            None,
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        let now = kept();
        assert_eq!(
            now.len(),
            1,
            "one record kept in {}: {now:?}",
            kept_dir.display()
        );
        started.push(now[0].0);
    }
    assert!(started[1] > started[0], "the newest is kept: {started:?}");
    let j = spinbox_inspect(&config, id).expect("inspect");
    assert_eq!(j["shutdown"]["started_unix_ms"], started[1], "{j:#}");

    let out = ctr.run_container(
        RUNTIME,
        id,
        &["--runtime-config-path", keep_none.as_str()],
        &["true"],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(kept().is_empty(), "0 keeps none");
    assert!(spinbox_inspect(&config, id).is_err());
    ctr.assert_clean();
}

/// A pod's VM is one row whose containers follow the pod: the sandbox, then each member as it
/// joins, and a removed member leaves the list (and its hot-plugged disks the record).
#[test]
fn ps_follows_a_pods_containers_as_they_join_and_leave() {
    // Held across the harness's own checks before and after the test.
    let _serial = VM_TESTS.blocking_lock();
    world::run(
        world::Runtime::Spinbox,
        |mut t: world::PodTest| async move {
            let config = suite_config();
            let pod = t.run_pod("ops", false).await;
            let one = t
                .run_container(&pod, "one", "exec sleep 3600", false, None)
                .await;
            let two = t
                .run_container(&pod, "two", "exec sleep 3600", false, None)
                .await;
            let ip = t.pod_ip(&pod).await;

            let rows = spinbox_ps(&config);
            let r = row(&rows, &pod.id);
            assert_eq!(r["state"], "running", "{r:#}");
            assert_eq!(r["namespace"], "k8s.io", "{r:#}");
            assert_eq!(
                r["containers"],
                serde_json::json!([pod.id, one, two]),
                "the sandbox first, then the members: {r:#}"
            );
            assert!(
                r["addresses"].as_array().is_some_and(|a| a
                    .iter()
                    .any(|a| a.as_str().is_some_and(|a| a.starts_with(&format!("{ip}/"))))),
                "the pod's IP {ip}: {r:#}"
            );
            let j = spinbox_inspect(&config, &pod.id).expect("inspect the pod's VM");
            let users = |j: &Value| -> Vec<String> {
                j["hotplug"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|d| d["users"].as_array().cloned().unwrap_or_default())
                    .filter_map(|u| u.as_str().map(str::to_owned))
                    .collect()
            };
            let plugged = users(&j);
            assert!(
                plugged.contains(&one) && plugged.contains(&two),
                "the members' disks: {j:#}"
            );

            t.cri
                .stop_container(&two, 0)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            t.cri
                .remove_container(&two)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let rows = spinbox_ps(&config);
            let r = row(&rows, &pod.id);
            assert_eq!(r["containers"], serde_json::json!([pod.id, one]), "{r:#}");
            let j = spinbox_inspect(&config, &pod.id).expect("inspect the pod's VM");
            assert!(!users(&j).contains(&two), "{j:#}");

            let id = pod.id.clone();
            t.remove_pod(pod, &[two.as_str()]).await;
            let j = spinbox_inspect(&config, &id).expect("inspect the removed pod's VM");
            assert_eq!(j["state"], "gone", "{j:#}");
            t.assert_all_clean("after the test").await;
        },
    );
}
