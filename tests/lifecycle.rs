//! Fault injection against a real containerd driven by `ctr`: QEMU killed under a running
//! container, creates that fail in each phase, many create/delete cycles — and after each,
//! nothing left behind (the shared leak check), containerd's fds included.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use spinbox_tests::ctr::{Ctr, IMAGE, RUNTIME};
use spinbox_tests::VM_TESTS;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The config the suite's shim runs with, as JSON (`$SPINBOX_E2E_CONFIG`).
fn base_config() -> serde_json::Value {
    let path = std::env::var_os("SPINBOX_E2E_CONFIG").expect("SPINBOX_E2E_CONFIG");
    serde_json::from_slice(&std::fs::read(path).expect("read the shim's config")).unwrap()
}

/// Writes a variant of the shim's config for `ctr run --runtime-config-path`, with its own
/// state/log/data roots under `dir` so that what it leaves can be checked.
fn config_variant(dir: &Path, name: &str, change: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let mut c = base_config();
    let root = dir.join(name);
    for (key, sub) in [
        ("state_dir", "state"),
        ("log_dir", "log"),
        ("data_dir", "data"),
    ] {
        c["paths"][key] = root.join(sub).display().to_string().into();
    }
    change(&mut c);
    std::fs::create_dir_all(&root).unwrap();
    let path = root.join("config.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
    path
}

/// Nothing under a variant's roots but the config itself (and a data/layers cache).
fn assert_variant_clean(dir: &Path, name: &str) {
    let root = dir.join(name);
    for sub in ["state", "data/containers"] {
        if let Ok(entries) = std::fs::read_dir(root.join(sub)) {
            let left: Vec<_> = entries.flatten().map(|e| e.path()).collect();
            assert!(left.is_empty(), "{name}: left in {sub}: {left:?}");
        }
    }
    spinbox_tests::assert_log_dir_clean(&root.join("log"), spinbox_tests::suite_records_kept());
    let procs = spinbox_tests::processes_mentioning(&root.display().to_string());
    assert!(procs.is_empty(), "{name}: processes left: {procs:?}");
}

#[tokio::test]
async fn killed_qemu_stops_the_task_promptly_with_a_nonzero_status() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let id = "lc-qemukill";
    let out = ctr.run(
        &["run", "-d", "--runtime", RUNTIME, IMAGE, id, "sleep", "300"],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(ctr.task_line(id).is_some_and(|l| l.contains("RUNNING")));
    let qemu = ctr.qemu_pid(id).expect("QEMU of the container");

    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 QEMU");
    loop {
        if ctr.task_line(id).is_some_and(|l| l.contains("STOPPED")) {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(2),
            "task not STOPPED 2 s after QEMU died: {:?}",
            ctr.task_line(id)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = killed.elapsed();
    println!(
        "QEMU killed → task STOPPED in containerd after {} ms",
        seen.as_millis()
    );
    // The shim cleaned up by itself: VM helpers and state are gone before any delete.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !spinbox_tests::processes_mentioning(
        &ctr.spinbox_root
            .join("state")
            .join(id)
            .display()
            .to_string(),
    )
    .is_empty()
    {
        assert!(Instant::now() < deadline, "VM helpers outlived QEMU");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Delete reports the task's status: non-zero (137, as for SIGKILL); ctr prints it.
    let rm = ctr.run(&["task", "rm", id], None);
    let said = text(&rm.stderr);
    assert!(rm.status.success(), "{said}");
    assert!(said.contains("exit code 137"), "{said}");
    assert!(ctr.run(&["containers", "rm", id], None).status.success());
    ctr.assert_clean();
    ctr.assert_no_shim_sockets(&[id]);
}

#[tokio::test]
async fn create_failing_in_each_phase_names_it_and_leaves_nothing() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let broken_cache = |c: &mut serde_json::Value| {
        // The layer cache cannot be created: mount preparation fails.
        let data = PathBuf::from(c["paths"]["data_dir"].as_str().unwrap().to_owned());
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("layers"), "not a directory").unwrap();
    };
    // A writable directory bind: the container needs a virtiofsd.
    let volume = tempfile::tempdir().unwrap();
    let bind = format!(
        "type=bind,src={},dst=/data,options=rbind:rw",
        volume.path().display()
    );
    let cases: Vec<(&str, PathBuf, &[&str])> = vec![
        (
            "virtiofsd-missing",
            config_variant(dir.path(), "virtiofsd-missing", |c| {
                c["paths"]["virtiofsd"] = "/nonexistent/virtiofsd".into();
            }),
            &["vm phase", "paths.virtiofsd", "/nonexistent/virtiofsd"],
        ),
        (
            "virtiofsd-fails",
            config_variant(dir.path(), "virtiofsd-fails", |c| {
                // Starts, then exits at once: spawned and recorded, then rolled back.
                c["paths"]["virtiofsd"] = "/bin/false".into();
            }),
            &["vm phase", "virtiofsd exited before serving"],
        ),
        (
            "kernel",
            config_variant(dir.path(), "kernel", |c| {
                c["paths"]["kernel"] = "/nonexistent/vmlinux".into();
            }),
            &["vm phase", "paths.kernel", "/nonexistent/vmlinux"],
        ),
        (
            "agent",
            config_variant(dir.path(), "agent", |c| {
                // The agent serves another port: from the host it never answers.
                c["vm"]["kernel_args"] = serde_json::json!(["spinbox.agent_port=4000"]);
                c["timeouts"]["vm_start"] = "4s".into();
            }),
            &["vm phase", "timeouts.vm_start"],
        ),
        (
            "mounts",
            config_variant(dir.path(), "mounts", broken_cache),
            &["mounts phase", "layers"],
        ),
    ];
    for (name, config, expect) in cases {
        let id = format!("lc-fail-{name}");
        let started = Instant::now();
        let mut args = vec![
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--runtime-config-path",
            config.to_str().unwrap(),
        ];
        if name.starts_with("virtiofsd") {
            args.extend(["--mount", bind.as_str()]);
        }
        args.extend([IMAGE, id.as_str(), "true"]);
        let out = ctr.run(&args, None);
        let err = text(&out.stderr);
        println!(
            "{name}: failed after {} ms: {}",
            started.elapsed().as_millis(),
            err.trim()
        );
        assert!(!out.status.success(), "{name}: create must fail");
        for e in expect {
            assert!(err.contains(e), "{name}: error names {e:?}: {err}");
        }
        let _ = ctr.run(&["task", "rm", "-f", &id], None);
        let _ = ctr.run(&["containers", "rm", &id], None);
        assert_variant_clean(dir.path(), name);
        ctr.assert_clean();
        ctr.assert_no_shim_sockets(&[&id]);
    }
}

fn containerd_fds(ctr: &Ctr) -> usize {
    let pid =
        std::fs::read_to_string(ctr.containerd_dir.join("containerd.pid")).expect("containerd.pid");
    std::fs::read_dir(format!("/proc/{}/fd", pid.trim()))
        .expect("containerd's fds")
        .count()
}

#[tokio::test]
async fn many_create_start_delete_cycles_leave_nothing() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let cycles: usize = std::env::var("SPINBOX_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    // One cycle first, so that containerd's lazily opened files (content store, plugin
    // sockets) are open before counting.
    let warm = ctr.run_container(RUNTIME, "lc-cycle-warm", &[], &["true"], None);
    assert!(warm.status.success(), "{}", text(&warm.stderr));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds_before = containerd_fds(&ctr);
    let started = Instant::now();
    for i in 0..cycles {
        let id = format!("lc-cycle-{i}");
        let out = ctr.run_container(RUNTIME, &id, &[], &["echo", &id], None);
        assert!(out.status.success(), "cycle {i}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), format!("{id}\n"), "cycle {i}");
        if i % 10 == 9 {
            ctr.assert_clean();
        }
    }
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds_after = containerd_fds(&ctr);
    println!(
        "{cycles} cycles in {:.1} s ({} ms each); containerd fds {fds_before} → {fds_after}",
        took.as_secs_f64(),
        took.as_millis() / cycles.max(1) as u128
    );
    ctr.assert_clean();
    // Every VM went down gracefully, as the shim's structured log lines (in containerd's log)
    // say: no escalation.
    let log = std::fs::read_to_string(ctr.containerd_dir.join("containerd.log")).unwrap();
    for i in 0..cycles {
        let vm = format!("vm_id=\"lc-cycle-{i}\"");
        let complete = log
            .lines()
            .find(|l| l.contains(&vm) && l.contains("event=\"shutdown_complete\""))
            .unwrap_or_else(|| panic!("no shutdown_complete line for cycle {i}"));
        assert!(complete.contains("graceful=\"true\""), "{complete}");
        assert!(
            !log.lines()
                .any(|l| l.contains(&vm) && l.contains("shutdown_escalation")),
            "cycle {i} escalated"
        );
    }
    // A leak of one fd per cycle would show as `cycles`; a few may be containerd's own
    // pooled connections opened on demand.
    assert!(
        fds_after <= fds_before + 3,
        "containerd's fds grew from {fds_before} to {fds_after} over {cycles} cycles"
    );
}
