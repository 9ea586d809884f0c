//! `spinbox stop`: VMs taken down from outside their shims, their shutdown events printed in
//! order as they happen, containerd seeing the tasks stop; a guest that ignores the power-off
//! steps escalates, a frozen VM does not hold the others up, and a second stop reports the
//! first's outcome. Each test ends with the shared leak check.

use spinbox_tests::ctr::{Ctr, Detached, RUNTIME};
use spinbox_tests::VM_TESTS;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `spinbox stop --json` of `ids` (after `extra` options): its exit code and the events it
/// printed.
fn stop(config: &str, extra: &[&str], ids: &[&str]) -> (i32, Vec<serde_json::Value>) {
    let mut args = vec!["stop", "--json"];
    args.extend_from_slice(extra);
    args.extend_from_slice(ids);
    let out = spinbox_tests::spinbox_cli(config, &args);
    let lines = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    (out.status.code().unwrap_or(-1), lines)
}

fn events_of<'a>(lines: &'a [serde_json::Value], id: &str) -> Vec<&'a serde_json::Value> {
    lines.iter().filter(|l| l["vm_id"] == id).collect()
}

fn names(events: &[&serde_json::Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["event"].as_str().unwrap_or("?").to_owned())
        .collect()
}

fn suite_config() -> String {
    std::env::var("SPINBOX_E2E_CONFIG").expect("SPINBOX_E2E_CONFIG")
}

/// Waits for containerd to show the task STOPPED, then removes it.
async fn expect_stopped_and_remove(ctr: &Ctr, id: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let line = ctr.task_line(id).unwrap_or_default();
        if line.contains("STOPPED") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{id} not STOPPED after spinbox stop: {line:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ctr.run(&["task", "rm", id], None).status.success());
    assert!(ctr.run(&["containers", "rm", id], None).status.success());
}

#[tokio::test]
async fn stop_of_a_well_behaved_vm_is_initiated_then_complete_and_twice_the_same() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let config = suite_config();
    let id = "st-graceful";
    let c = Detached::run(&ctr, RUNTIME, id, &[], &["sleep", "300"]).await;
    let (code, lines) = stop(&config, &[], &[id]);
    let events = events_of(&lines, id);
    assert_eq!(
        names(&events),
        ["ShutdownInitiated", "ShutdownComplete"],
        "{lines:#?}"
    );
    assert_eq!(events[1]["graceful"], true);
    // Its `sleep` was running: the guest powered off (SIGTERM to its processes first), not
    // quit as an idle one is.
    assert_eq!(events[1]["last_step"], "ctrl-alt-del", "{lines:#?}");
    assert!(events[0]["at"].as_str().is_some_and(|a| a.ends_with('Z')));
    assert_eq!(code, 0, "exit code of a graceful stop");
    expect_stopped_and_remove(&ctr, id).await;
    drop(c);
    // Again, on the VM now gone: the same outcome, from the kept record.
    let (again, lines2) = stop(&config, &[], &[id]);
    assert_eq!(again, 0);
    assert_eq!(names(&events_of(&lines2, id)), names(&events));
    assert_eq!(
        lines2[1]["at"], lines[1]["at"],
        "the same shutdown reported"
    );
    // An id that never ran: failed, naming it.
    let (code, lines) = stop(&config, &[], &["st-never"]);
    assert_eq!(code, 2);
    assert_eq!(lines[0]["event"], "StopFailed");
    assert!(lines[0]["reason"].as_str().unwrap().contains("st-never"));
    ctr.assert_clean();
}

#[tokio::test]
async fn stop_escalates_past_a_guest_that_ignores_power_off_and_a_frozen_vm_holds_no_one_up() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    // The shim's grace stays at its 3 s default: `--timeout 1s` gives each step 1 s.
    let deaf = spinbox_tests::config_variant_file(dir.path(), "deaf", |c| {
        c["vm"]["kernel_args"] = serde_json::json!(["spinbox.test_ignore_poweroff=1"]);
    });
    // The graceful steps keep their grace (three VMs powering off at once on two cores take
    // more than a second); a frozen QEMU's QMP is given up on quickly.
    let quick = spinbox_tests::config_variant_file(dir.path(), "quick", |c| {
        c["timeouts"]["qmp_command"] = "1s".into();
    });
    let with = |config: &str| vec!["--runtime-config-path".to_owned(), config.to_owned()];
    let run = |id: &'static str, config: &str| {
        let extra = with(config);
        let ctr = &ctr;
        async move {
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            Detached::run(ctr, RUNTIME, id, &extra, &["sleep", "300"]).await
        }
    };
    // A guest that ignores ctrl-alt-del and the power button: every escalation, in order.
    let deaf_vm = run("st-deaf", &deaf).await;
    let (code, lines) = stop(&deaf, &["--timeout", "1s"], &["st-deaf"]);
    let events = events_of(&lines, "st-deaf");
    assert_eq!(
        names(&events),
        [
            "ShutdownInitiated",
            "ShutdownEscalation",
            "ShutdownEscalation",
            "ShutdownComplete"
        ],
        "{lines:#?}"
    );
    assert_eq!(events[1]["step"], "ctrl-alt-del");
    assert_eq!(events[2]["step"], "acpi-powerdown");
    for e in &events[1..3] {
        let waited = e["waited_ms"].as_u64().unwrap();
        assert!((900..3000).contains(&waited), "waited {waited} ms: {e}");
    }
    assert_eq!(events[3]["graceful"], false);
    assert_eq!(events[3]["last_step"], "qmp-quit");
    assert_eq!(code, 1, "exit code of a forced stop");
    expect_stopped_and_remove(&ctr, "st-deaf").await;
    drop(deaf_vm);

    // Three at once, one of them frozen: the other two are down within their graceful time.
    let vms = [
        run("st-a", &quick).await,
        run("st-frozen", &quick).await,
        run("st-b", &quick).await,
    ];
    let qemu = ctr.qemu_pid("st-frozen").expect("QEMU of st-frozen");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("SIGSTOP QEMU");
    let started = std::time::Instant::now();
    let (code, lines) = stop(&quick, &[], &["st-a", "st-frozen", "st-b"]);
    println!(
        "three stops, one frozen: {} ms, {lines:#?}",
        started.elapsed().as_millis()
    );
    let complete_at = |id: &str| {
        let events = events_of(&lines, id);
        let last = events
            .last()
            .unwrap_or_else(|| panic!("no events for {id}"));
        assert_eq!(last["event"], "ShutdownComplete", "{id}: {events:#?}");
        (
            last["at"].as_str().unwrap().to_owned(),
            last["graceful"].as_bool().unwrap(),
        )
    };
    let (a_at, a_graceful) = complete_at("st-a");
    let (b_at, b_graceful) = complete_at("st-b");
    let (f_at, f_graceful) = complete_at("st-frozen");
    assert!(a_graceful && b_graceful && !f_graceful);
    // RFC 3339 in UTC with fixed widths: ordered as text.
    assert!(a_at < f_at && b_at < f_at, "{a_at} {b_at} before {f_at}");
    // Lines print as events happen: both graceful completions before the frozen one's.
    let order: Vec<&str> = lines
        .iter()
        .filter(|l| l["event"] == "ShutdownComplete")
        .map(|l| l["vm_id"].as_str().unwrap())
        .collect();
    assert_eq!(order.last(), Some(&"st-frozen"), "{order:?}");
    assert_eq!(code, 1);
    for id in ["st-a", "st-frozen", "st-b"] {
        expect_stopped_and_remove(&ctr, id).await;
    }
    drop(vms);
    ctr.assert_clean();
}
