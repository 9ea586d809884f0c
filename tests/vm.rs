//! Boots the real guest (kernel + initrd with spinbox-agent as /init) under QEMU and talks to
//! the agent over vsock — vhost-user (vhost-device-vsock) on hosts without `/dev/vhost-vsock`,
//! the kernel's vhost-vsock where it exists — then proves nothing is left behind.

use std::time::{Duration, Instant};

use spinbox_tests::{
    assert_no_leaks, guest_dir, open_fd_list, run_vm_test, settled_fd_count, test_config,
};
use spinbox_vmm::accel::{HostCaps, VsockKind};
use spinbox_vmm::{ShutdownEvent, Vm, VmError};

fn expected_kernel_release(guest: &std::path::Path) -> Option<String> {
    std::fs::read_to_string(guest.join("kernel-release"))
        .ok()
        .map(|s| s.trim().to_owned())
}

#[test]
fn boots_answers_health_over_vhost_user_vsock_and_shuts_down_clean() {
    run_vm_test(async {
        let Some(guest) = guest_dir() else { return };
        let root = tempfile::tempdir().unwrap();
        let mut config = test_config(&guest, root.path());
        config.vm.vsock = spinbox_config::VsockMode::VhostUser;
        let fds_before = settled_fd_count().await;

        let started = Instant::now();
        let vm = Vm::start("boot-test", &config).await.expect("VM start");
        let wall = started.elapsed();
        let boot = vm.boot_info().clone();
        println!(
            "boot-to-agent-ready: {} ms from QEMU spawn ({} ms inside the guest, {} ms for Vm::start); accel={} vsock={}",
            boot.host_spawn_to_ready_ms,
            boot.guest_boot_to_ready_ms,
            wall.as_millis(),
            boot.accel,
            boot.vsock
        );
        assert_eq!(boot.vsock, "vhost-user");
        assert_eq!(boot.agent_version, env!("CARGO_PKG_VERSION"));
        if let Some(release) = expected_kernel_release(&guest) {
            assert_eq!(
                boot.kernel_release, release,
                "the guest runs our kernel, not the host's"
            );
        }
        // A kernel with modules (Debian's: the guest dir's modules.list) has the agent load
        // the vsock transport; one with everything built in (the minimal kernel) loads none.
        let modular = std::fs::read_to_string(guest.join("modules.list"))
            .is_ok_and(|l| l.lines().any(|m| !m.trim().is_empty()));
        if modular {
            assert!(
                boot.modules_loaded.iter().any(|m| m.contains("vsock")),
                "agent loaded the vsock transport: {:?}",
                boot.modules_loaded
            );
        } else {
            assert!(
                boot.modules_loaded.is_empty(),
                "a kernel without modules, yet the agent loaded {:?}",
                boot.modules_loaded
            );
        }

        // The processes and sockets are where the record says, and owner-only.
        let qemu = vm.qemu_process();
        let backend = vm
            .vsock_backend_process()
            .expect("vhost-user backend process");
        assert!(qemu.is_alive() && backend.is_alive());
        let dir = vm.state_dir().to_owned();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert!(dir.join("qmp.sock").exists() && dir.join("vsock.sock").exists());
        let rec = spinbox_vmm::state::read_record(&dir).unwrap();
        assert_eq!(rec.qemu, Some(qemu));
        assert_eq!(rec.vsock_backend, Some(backend));

        // QMP works on the connection the runtime made.
        let status = vm.qmp().execute("query-status", None).await.unwrap();
        assert_eq!(status["status"], "running");
        // A second health call on the same connection.
        let h = vm.health().await.unwrap();
        assert!(h.uptime_ms >= h.boot_to_ready_ms);

        let report = vm.shutdown().await;
        println!(
            "shutdown: graceful={} in {} ms: {:?}",
            report.graceful, report.duration_ms, report.events
        );
        // The record on disk says the same: graceful, initiated then complete, nothing between.
        let record = read_shutdown_record(&dir);
        assert_eq!(record["complete"], true, "{record}");
        assert_eq!(record["graceful"], true, "{record}");
        let events: Vec<&str> = record["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event"].as_str().unwrap())
            .collect();
        assert_eq!(
            events,
            ["shutdown_initiated", "shutdown_complete"],
            "{record}"
        );
        assert_eq!(record["events"][1]["last_step"], "ctrl-alt-del", "{record}");
        // A second shutdown returns the first one's result without climbing again.
        let again = vm.shutdown().await;
        assert_eq!(again.started_unix_ms, report.started_unix_ms);
        let errors = vm.release().await;
        assert!(errors.is_empty(), "{errors:?}");
        assert!(
            report.graceful,
            "a well-behaved guest powers off without force: {:?}",
            report.events
        );
        assert!(
            !report
                .events
                .iter()
                .any(|e| matches!(e, ShutdownEvent::ShutdownEscalation { .. })),
            "no escalation expected: {:?}",
            report.events
        );
        assert!(!qemu.is_alive(), "QEMU gone");
        assert!(!backend.is_alive(), "vhost-device-vsock gone");
        assert!(!dir.exists(), "state directory removed");
        assert_no_leaks(root.path());
        assert_eq!(
            settled_fd_count().await,
            fds_before,
            "fd count changed: {:#?}",
            open_fd_list()
        );
    });
}

#[test]
fn two_vms_at_once_get_distinct_sockets_and_both_answer() {
    run_vm_test(async {
        let Some(guest) = guest_dir() else { return };
        let root = tempfile::tempdir().unwrap();
        let config = test_config(&guest, root.path());

        let (a, b) = tokio::join!(Vm::start("twin-a", &config), Vm::start("twin-b", &config));
        let (a, b) = (a.expect("VM a"), b.expect("VM b"));
        assert_ne!(a.state_dir(), b.state_dir());
        assert_ne!(
            a.transport(),
            b.transport(),
            "each VM has its own vsock endpoint"
        );
        assert_ne!(a.qemu_process().pid, b.qemu_process().pid);
        let (ha, hb) = tokio::join!(a.health(), b.health());
        assert_eq!(ha.unwrap().agent_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(hb.unwrap().agent_version, env!("CARGO_PKG_VERSION"));
        println!(
            "two VMs in parallel: ready after {} ms and {} ms",
            a.boot_info().host_spawn_to_ready_ms,
            b.boot_info().host_spawn_to_ready_ms
        );
        let (ra, rb) = tokio::join!(a.release(), b.release());
        assert!(ra.is_empty() && rb.is_empty(), "{ra:?} {rb:?}");
        assert_no_leaks(root.path());
    });
}

#[test]
fn agent_that_never_answers_fails_within_vm_start_and_leaves_nothing() {
    run_vm_test(async {
        let Some(guest) = guest_dir() else { return };
        let root = tempfile::tempdir().unwrap();
        let mut config = test_config(&guest, root.path());
        // The agent takes the last `spinbox.agent_port` on its command line: it serves on 4000
        // while the host keeps dialling 1024, so from the host it never answers.
        config.vm.kernel_args = vec!["spinbox.agent_port=4000".into()];
        config.timeouts.vm_start = Duration::from_secs(4);
        let fds_before = settled_fd_count().await;

        let started = Instant::now();
        let err = match Vm::start("silent", &config).await {
            Ok(vm) => {
                vm.release().await;
                panic!("start must fail when the agent never answers");
            }
            Err(e) => e,
        };
        let took = started.elapsed();
        let text = err.to_string();
        println!(
            "start failed after {} ms: {}",
            took.as_millis(),
            text.lines().next().unwrap_or("")
        );
        assert!(matches!(err, VmError::AgentTimeout { .. }), "{text}");
        assert!(
            text.contains("timeouts.vm_start") && text.contains("1024"),
            "{text}"
        );
        // Bounded by vm_start (plus spawn and rollback), not by anything longer.
        assert!(took >= Duration::from_secs(4), "gave up early: {took:?}");
        assert!(
            took < Duration::from_secs(4 + 6),
            "took {took:?} with vm_start = 4s"
        );
        assert_no_leaks(root.path());
        assert_eq!(
            settled_fd_count().await,
            fds_before,
            "{:#?}",
            open_fd_list()
        );
    });
}

#[test]
fn bad_kernel_path_is_named_and_nothing_is_created() {
    run_vm_test(async {
        let Some(guest) = guest_dir() else { return };
        let root = tempfile::tempdir().unwrap();
        let mut config = test_config(&guest, root.path());
        config.paths.kernel = root.path().join("no-such-vmlinuz");
        let err = Vm::start("nokernel", &config)
            .await
            .err()
            .expect("must fail");
        let text = err.to_string();
        assert!(
            text.contains("paths.kernel") && text.contains("no-such-vmlinuz"),
            "{text}"
        );
        assert!(!root.path().join("state/nokernel").exists());
        assert_no_leaks(root.path());

        let err = Vm::start("../escape", &config)
            .await
            .err()
            .expect("must fail");
        assert!(matches!(err, VmError::InvalidId { .. }), "{err}");
    });
}

#[test]
fn qemu_that_fails_to_start_reports_its_stderr_and_rolls_back() {
    run_vm_test(async {
        let Some(guest) = guest_dir() else { return };
        let root = tempfile::tempdir().unwrap();
        let mut config = test_config(&guest, root.path());
        // Not a kernel image: QEMU refuses it and exits.
        let bogus = root.path().join("bogus-kernel");
        std::fs::write(&bogus, b"not a kernel").unwrap();
        config.paths.kernel = bogus;
        let err = Vm::start("badimage", &config)
            .await
            .err()
            .expect("must fail");
        let text = err.to_string();
        assert!(matches!(err, VmError::QemuExited { .. }), "{text}");
        assert!(
            text.to_lowercase().contains("kernel"),
            "QEMU's own reason is carried: {text}"
        );
        assert_no_leaks(root.path());
    });
}

#[test]
fn vm_death_is_seen_at_once() {
    run_vm_test(async {
        let Some(guest) = guest_dir() else { return };
        let root = tempfile::tempdir().unwrap();
        let config = test_config(&guest, root.path());
        let vm = Vm::start("dies", &config).await.expect("VM start");
        let mut exit = vm.exit_watch();
        let qemu = vm.qemu_process();
        let killed = Instant::now();
        assert!(qemu.signal(nix_sigkill()).unwrap());
        tokio::time::timeout(Duration::from_secs(1), exit.wait_for(|s| s.is_some()))
            .await
            .expect("exit seen within a second")
            .unwrap();
        println!(
            "QEMU death noticed after {} ms",
            killed.elapsed().as_millis()
        );
        let report = vm.shutdown().await;
        assert!(!report.graceful);
        assert!(
            matches!(
                report.events.last(),
                Some(ShutdownEvent::ShutdownComplete {
                    last_step: spinbox_vmm::ShutdownStep::AlreadyExited,
                    ..
                })
            ),
            "{:?}",
            report.events
        );
        let errors = vm.release().await;
        assert!(errors.is_empty(), "{errors:?}");
        assert_no_leaks(root.path());
    });
}

fn read_shutdown_record(dir: &std::path::Path) -> serde_json::Value {
    let data = std::fs::read(dir.join(spinbox_vmm::state::SHUTDOWN_RECORD_FILE))
        .expect("shutdown.json in the state directory");
    serde_json::from_slice(&data).expect("shutdown.json is JSON")
}

fn nix_sigkill() -> nix::sys::signal::Signal {
    nix::sys::signal::Signal::SIGKILL
}

#[test]
fn kernel_vhost_vsock_boot_where_available() {
    run_vm_test(async {
        let Some(guest) = guest_dir() else { return };
        if HostCaps::probe().vhost_vsock {
            let root = tempfile::tempdir().unwrap();
            let mut config = test_config(&guest, root.path());
            config.vm.vsock = spinbox_config::VsockMode::Vhost;
            let vm = Vm::start("kvsock", &config)
                .await
                .expect("VM start on vhost-vsock");
            assert_eq!(vm.boot_info().vsock, "vhost-vsock");
            assert!(
                matches!(vm.transport(), spinbox_vmm::vsock::VsockTransport::Kernel { cid } if *cid >= 3)
            );
            let errors = vm.release().await;
            assert!(errors.is_empty(), "{errors:?}");
            assert_no_leaks(root.path());
        } else {
            assert_eq!(
                spinbox_vmm::accel::resolve_vsock(
                    spinbox_config::VsockMode::Auto,
                    &HostCaps::probe()
                ),
                VsockKind::VhostUser
            );
            eprintln!("skipped: /dev/vhost-vsock is absent (no vhost_vsock module); the kernel vsock path is covered by unit tests");
        }
    });
}

/// The escalation steps and the last step of a shutdown record, in order.
fn ladder_path(record: &serde_json::Value) -> (Vec<String>, String) {
    let events = record["events"].as_array().expect("events");
    let steps = events
        .iter()
        .filter(|e| e["event"] == "shutdown_escalation")
        .map(|e| e["step"].as_str().unwrap_or("?").to_owned())
        .collect();
    let last = events.last().expect("an event");
    assert_eq!(last["event"], "shutdown_complete", "{record}");
    (steps, last["last_step"].as_str().unwrap_or("?").to_owned())
}

#[test]
fn guest_ignoring_poweroff_is_forced_and_shutdown_grace_sets_the_pace() {
    run_vm_test(async {
        let Some(guest) = guest_dir() else { return };
        let root = tempfile::tempdir().unwrap();
        let mut config = test_config(&guest, root.path());
        // Test hook: the agent ignores ctrl-alt-del and the ACPI power button.
        config.vm.kernel_args = vec!["spinbox.test_ignore_poweroff=1".into()];
        let mut short = config.clone();
        short.timeouts.shutdown_grace = Duration::from_millis(500);
        let mut long = config.clone();
        long.timeouts.shutdown_grace = Duration::from_millis(2500);

        let (a, b) = tokio::join!(
            Vm::start("deaf-short", &short),
            Vm::start("deaf-long", &long)
        );
        let (a, b) = (a.expect("VM short"), b.expect("VM long"));
        let (ra, rb) = tokio::join!(a.shutdown(), b.shutdown());
        for (vm, report, grace) in [(&a, &ra, 500u64), (&b, &rb, 2500)] {
            let record = read_shutdown_record(vm.state_dir());
            println!(
                "grace {grace} ms: shutdown took {} ms: {record}",
                report.duration_ms
            );
            let (steps, last) = ladder_path(&record);
            assert_eq!(steps, ["ctrl-alt-del", "acpi-powerdown"], "{record}");
            assert_eq!(last, "qmp-quit", "{record}");
            assert_eq!(record["graceful"], false);
            // Each power-off step waited the configured grace, no more.
            for e in record["events"].as_array().unwrap() {
                if e["event"] == "shutdown_escalation" {
                    let waited = e["waited_ms"].as_u64().unwrap();
                    assert!(
                        waited >= grace && waited < grace + 1500,
                        "waited {waited} ms with grace {grace} ms: {record}"
                    );
                }
            }
        }
        // Two steps of grace each: 4 s apart, whatever else the machine does.
        let gap = rb.duration_ms as i64 - ra.duration_ms as i64;
        assert!(
            (3000..6000).contains(&gap),
            "shutdown_grace 0.5 s → {} ms, 2.5 s → {} ms",
            ra.duration_ms,
            rb.duration_ms
        );
        let (ea, eb) = tokio::join!(a.release(), b.release());
        assert!(ea.is_empty() && eb.is_empty(), "{ea:?} {eb:?}");
        assert_no_leaks(root.path());
    });
}

#[test]
fn stopped_qemu_climbs_the_whole_ladder_to_sigkill() {
    run_vm_test(async {
        let Some(guest) = guest_dir() else { return };
        let root = tempfile::tempdir().unwrap();
        let mut config = test_config(&guest, root.path());
        config.timeouts.shutdown_grace = Duration::from_millis(700);
        config.timeouts.qmp_command = Duration::from_millis(700);
        let vm = Vm::start("frozen", &config).await.expect("VM start");
        let qemu = vm.qemu_process();
        // A QEMU that answers nothing: not QMP, not the guest.
        assert!(qemu.signal(nix::sys::signal::Signal::SIGSTOP).unwrap());
        let report = vm.shutdown().await;
        let record = read_shutdown_record(vm.state_dir());
        println!(
            "stopped QEMU: shutdown took {} ms: {record}",
            report.duration_ms
        );
        let (steps, last) = ladder_path(&record);
        assert_eq!(
            steps,
            [
                "agent-prepare",
                "ctrl-alt-del",
                "acpi-powerdown",
                "qmp-quit"
            ],
            "{record}"
        );
        assert_eq!(last, "sigkill");
        assert_eq!(record["graceful"], false);
        // Ordered in time, too.
        let at: Vec<u64> = record["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["at_ms"].as_u64().unwrap())
            .collect();
        assert!(at.windows(2).all(|w| w[0] <= w[1]), "{at:?}");
        // Bounded by the ladder: grace + 3 × qmp_command + the kill, with slack.
        assert!(
            report.duration_ms < 700 * 4 + 3000,
            "took {} ms",
            report.duration_ms
        );
        assert!(!qemu.is_alive());
        let errors = vm.release().await;
        assert!(errors.is_empty(), "{errors:?}");
        assert_no_leaks(root.path());
    });
}

#[test]
fn floor_powers_off_by_itself_and_one_past_vm_start_is_killed() {
    run_vm_test(async {
        let Some(guest) = guest_dir() else { return };
        let root = tempfile::tempdir().unwrap();
        let mut config = test_config(&guest, root.path());
        std::fs::create_dir_all(&config.paths.log_dir).unwrap();
        let console = config.paths.log_dir.join("floor.console.log");
        let host = HostCaps::probe();

        let (c, k, h) = (config.clone(), console.clone(), host);
        let took = tokio::task::spawn_blocking(move || {
            spinbox_vmm::boot_floor(&c, &h, &k, c.timeouts.vm_start)
        })
        .await
        .unwrap()
        .expect("the floor guest powers off by itself");
        println!("floor: {} ms", took.as_millis());
        assert!(took < config.timeouts.vm_start, "{took:?}");

        // Far too short for any boot: QEMU is killed and the error names the knob.
        config.timeouts.vm_start = Duration::from_millis(300);
        let (c, k) = (config.clone(), console.clone());
        let started = Instant::now();
        let err = tokio::task::spawn_blocking(move || {
            spinbox_vmm::boot_floor(&c, &host, &k, c.timeouts.vm_start)
        })
        .await
        .unwrap()
        .expect_err("a 300 ms bound cannot hold a boot under TCG");
        assert!(
            matches!(err, spinbox_vmm::FloorError::TimedOut { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("timeouts.vm_start"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        std::fs::remove_file(&console).unwrap();
        assert_no_leaks(root.path());
    });
}
