//! End to end through a real containerd driven by `ctr`: containers run in spinbox microVMs
//! and behave, from the user's side, like runc — same output, exit codes, signals — and leave
//! nothing behind. Each test ends with the shared leak check.

use std::time::{Duration, Instant};

use spinbox_tests::ctr::{Ctr, IMAGE, RUNTIME};
use spinbox_tests::VM_TESTS;

const RUNC: &str = "io.containerd.runc.v2";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn echo_and_exit_codes_match_runc() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;

    // Watch containerd's event stream while the container runs.
    let mut events = ctr
        .cmd()
        .arg("events")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("ctr events");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let out = ctr.run_container(
        RUNTIME,
        "e2e-echo",
        &[],
        &["echo", "hello from spinbox"],
        None,
    );
    println!(
        "ctr run --rm echo took {} ms",
        started.elapsed().as_millis()
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello from spinbox\n");
    let runc = ctr.run_container(
        RUNC,
        "e2e-echo-runc",
        &[],
        &["echo", "hello from spinbox"],
        None,
    );
    assert_eq!(out.stdout, runc.stdout, "same output as runc");

    // The boot timeline: every step of the create, then the first output byte.
    let log = std::fs::read_to_string(ctr.containerd_dir.join("containerd.log")).unwrap();
    let field = |line: &str, key: &str| -> Option<u64> {
        line.split(|c: char| c.is_whitespace() || c == '"')
            .map(|w| w.strip_prefix("steps=").unwrap_or(w))
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
    };
    let timeline = log
        .lines()
        .rfind(|l| l.contains("create timeline id=e2e-echo "))
        .expect("a create timeline line for e2e-echo");
    for step in [
        "bundle_ms",
        "mounts_ms",
        "network_ms",
        "vm_ms",
        "container_ms",
        "stdio_ms",
        "vm_prepare_ms",
        "qemu_spawn_to_qmp_ms",
        "qemu_spawn_to_ready_ms",
        "guest_boot_to_ready_ms",
    ] {
        assert!(field(timeline, step).is_some(), "{step} in {timeline}");
    }
    let total = field(timeline, "total_ms").expect("total_ms");
    let (qmp, ready) = (
        field(timeline, "qemu_spawn_to_qmp_ms").unwrap_or(0),
        field(timeline, "qemu_spawn_to_ready_ms").unwrap_or(0),
    );
    assert!(qmp > 0 && qmp < ready && ready < total, "{timeline}");
    let first = log
        .lines()
        .rfind(|l| l.contains("first output id=e2e-echo "))
        .expect("a first output line for e2e-echo");
    let since = field(first, "since_create_ms").expect("since_create_ms");
    assert!(since >= total, "first output after create: {first}");
    let _ = events.kill();
    let seen = events.wait_with_output().expect("ctr events output");
    let seen: Vec<String> = text(&seen.stdout)
        .lines()
        .filter(|l| l.contains("e2e-echo") && !l.contains("e2e-echo-runc"))
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with("/tasks/"))
                .map(str::to_owned)
        })
        .collect();
    for topic in [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exit",
        "/tasks/delete",
    ] {
        assert!(
            seen.iter().any(|t| t == topic),
            "{topic} published: {seen:?}"
        );
    }
    let pos = |t: &str| seen.iter().position(|x| x == t).unwrap_or(usize::MAX);
    assert!(
        pos("/tasks/create") < pos("/tasks/start")
            && pos("/tasks/start") < pos("/tasks/exit")
            && pos("/tasks/exit") < pos("/tasks/delete"),
        "in order: {seen:?}"
    );

    let out = ctr.run_container(
        RUNTIME,
        "e2e-exit",
        &[],
        &["sh", "-c", "echo out; echo err >&2; exit 42"],
        None,
    );
    assert_eq!(out.status.code(), Some(42), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\n");
    assert!(text(&out.stderr).contains("err"), "{}", text(&out.stderr));

    // The guest's kernel, not the host's.
    let out = ctr.run_container(RUNTIME, "e2e-uname", &[], &["uname", "-r"], None);
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    assert!(out.status.success());
    assert_ne!(
        text(&out.stdout).trim(),
        host.trim(),
        "runs on the guest kernel"
    );
    ctr.assert_clean();
}

#[tokio::test]
async fn env_cwd_and_stdin_behave_like_runc() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let args = ["--env", "GREETING=hi there", "--cwd", "/etc"];
    // No hostname in the spec: the new UTS namespace starts with the host's name under runc.
    let cmd = ["sh", "-c", "echo \"$GREETING\"; pwd; hostname"];
    let out = ctr.run_container(RUNTIME, "e2e-env", &args, &cmd, None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let runc = ctr.run_container(RUNC, "e2e-env-runc", &args, &cmd, None);
    let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
    assert_eq!(text(&out.stdout), format!("hi there\n/etc\n{host}\n"));
    assert_eq!(out.stdout, runc.stdout);

    let out = ctr.run_container(
        RUNTIME,
        "e2e-stdin",
        &[],
        &["head", "-n1"],
        Some(b"first line\nsecond\n"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "first line\n");
    ctr.assert_clean();
}

/// `ctr run` asks containerd to close stdin (CloseIO) the moment its own stdin ends, which on a
/// busy host can come before the shim has read what ctr wrote into the fifo: that input must
/// still reach the process. Two busy threads make the host busy; before the shim drained stdin
/// on CloseIO, about half of these runs read 0 bytes.
#[tokio::test]
async fn piped_stdin_survives_an_early_close_on_a_busy_host() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hogs: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            })
        })
        .collect();
    let counts: Vec<String> = (0..4)
        .map(|i| {
            let out = ctr.run_container(
                RUNTIME,
                &format!("e2e-stdin-busy{i}"),
                &[],
                &["wc", "-c"],
                Some(b"first line\nsecond\n"),
            );
            text(&out.stdout).trim().to_string()
        })
        .collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in hogs {
        h.join().unwrap();
    }
    assert_eq!(
        counts,
        vec!["18"; 4],
        "bytes each container read from stdin"
    );
    ctr.assert_clean();
}

/// Bulk output arrives byte-exact on both streams, interleaved, by both routes: the VM's
/// serial ports (the default, `vm.output_ports`) and vsock (`vm.output_ports: false`,
/// through `--runtime-config-path`). The shim's `first output` line names the route taken.
#[tokio::test]
async fn large_stdout_and_stderr_arrive_byte_exact_by_port_and_by_vsock() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let vsock_config = spinbox_tests::config_variant_file(dir.path(), "vsock", |c| {
        c["vm"]["output_ports"] = false.into();
    });

    // 16 MiB of a known pattern on each stream: 1 MiB of a repeated line, written 16 times
    // to each (generating it byte by byte in an emulated CPU would measure the generator).
    let size: usize = 16 << 20;
    let cmd = "yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c 1048576 >/tmp/p; \
               for i in $(seq 16); do cat /tmp/p; cat /tmp/p >&2; done";
    let line = b"0123456789abcdefghijklmnopqrstuvwxyz\n";
    let chunk: Vec<u8> = line.iter().copied().cycle().take(1 << 20).collect();
    let expected: Vec<u8> = chunk.iter().copied().cycle().take(size).collect();
    for (id, route, extra) in [
        ("e2e-bulk-port", "port", vec![]),
        (
            "e2e-bulk-vsock",
            "vsock",
            vec!["--runtime-config-path", vsock_config.as_str()],
        ),
    ] {
        let started = Instant::now();
        let out = ctr.run_container(RUNTIME, id, &extra, &["sh", "-c", cmd], None);
        let took = started.elapsed();
        assert!(out.status.success(), "{id}: {}", text(&out.stderr));
        assert_eq!(
            (out.stdout.len(), out.stderr.len()),
            (size, size),
            "{id}: every byte arrived"
        );
        assert!(out.stdout == expected, "{id}: stdout byte-exact");
        assert!(out.stderr == expected, "{id}: stderr byte-exact");
        let log = std::fs::read_to_string(ctr.containerd_dir.join("containerd.log")).unwrap();
        let first = log
            .lines()
            .find(|l| l.contains("first output") && l.contains(&format!("id={id} ")))
            .unwrap_or_else(|| panic!("{id}: no first-output line"));
        assert!(
            first.contains(&format!("route=\"{route}\"")),
            "{id}: expected route {route}: {first}"
        );
        println!(
            "{id}: 2 x 16 MiB by {route} in {} ms (including VM boot)",
            took.as_millis()
        );
    }
    ctr.assert_clean();
}

#[tokio::test]
async fn detached_container_runs_lists_pids_and_is_killed() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let id = "e2e-detached";
    let out = ctr.run(
        &["run", "-d", "--runtime", RUNTIME, IMAGE, id, "sleep", "300"],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ls = text(&ctr.run(&["task", "ls"], None).stdout);
    assert!(
        ls.lines()
            .any(|l| l.starts_with(id) && l.contains("RUNNING")),
        "{ls}"
    );
    let ps = text(&ctr.run(&["task", "ps", id], None).stdout);
    assert!(ps.lines().count() >= 2, "task ps lists the process: {ps}");

    let out = ctr.run(&["task", "kill", "-s", "SIGKILL", id], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_stopped(&ctr, id).await;
    let st = ctr.run(&["task", "rm", id], None);
    assert!(st.status.success(), "{}", text(&st.stderr));
    let st = ctr.run(&["containers", "rm", id], None);
    assert!(st.status.success(), "{}", text(&st.stderr));
    ctr.assert_clean();
}

async fn wait_stopped(ctr: &Ctr, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let line = ctr.task_line(id);
        if line.as_deref().is_some_and(|l| l.contains("STOPPED")) {
            return;
        }
        assert!(Instant::now() < deadline, "{id} not STOPPED: {line:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `ctr run` (attached) in the background; returns its output once it exits.
fn spawn_attached(
    ctr: &Ctr,
    runtime: &str,
    id: &str,
    cmd: &[&str],
) -> std::thread::JoinHandle<std::process::Output> {
    let mut args = vec![
        "run".to_string(),
        "--rm".into(),
        "--runtime".into(),
        runtime.into(),
        IMAGE.into(),
        id.into(),
    ];
    args.extend(cmd.iter().map(|s| s.to_string()));
    let mut c = ctr.cmd();
    c.args(&args).stdin(std::process::Stdio::null());
    std::thread::spawn(move || c.output().expect("ctr run"))
}

/// SIGTERM reaches the container's processes as under runc, and the status ctr reports is
/// the one runc reports. The container's PID 1 (sh) has no TERM handler, so, exactly as
/// under runc, only its child dies of the signal (`--all`), and sh exits with the child's
/// wait status, 128 + 15.
#[tokio::test]
async fn sigterm_status_matches_runc() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let cmd = ["sh", "-c", "sleep 300 & wait $!"];
    let mut statuses = Vec::new();
    for (runtime, id) in [(RUNTIME, "e2e-term"), (RUNC, "e2e-term-runc")] {
        let run = spawn_attached(&ctr, runtime, id, &cmd);
        let deadline = Instant::now() + Duration::from_secs(30);
        // Wait until the child is there to be signalled.
        loop {
            let ps = text(&ctr.run(&["task", "ps", id], None).stdout);
            if ps.lines().count() >= 3 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{id}: processes did not start: {ps}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let out = ctr.run(&["task", "kill", "--all", "-s", "SIGTERM", id], None);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let out = run.join().expect("ctr run thread");
        statuses.push(out.status.code());
    }
    assert_eq!(statuses[0], Some(143), "spinbox: {statuses:?}");
    assert_eq!(statuses[0], statuses[1], "same as runc");
    ctr.assert_clean();
}

#[tokio::test]
async fn missing_command_fails_naming_it_and_leaves_nothing() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let out = ctr.run_container(RUNTIME, "e2e-nope", &[], &["/bin/no-such-command"], None);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("/bin/no-such-command"),
        "error names the command: {err}"
    );
    // ctr run --rm does not remove a container whose task failed to start.
    let _ = ctr.run(&["task", "rm", "-f", "e2e-nope"], None);
    let _ = ctr.run(&["containers", "rm", "e2e-nope"], None);
    ctr.assert_clean();
}

#[tokio::test]
async fn two_containers_of_one_image_share_cached_layers() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let layers = ctr.spinbox_root.join("data/layers");
    let images = || -> Vec<(std::path::PathBuf, u64)> {
        let mut v: Vec<_> = std::fs::read_dir(&layers)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "erofs"))
                    .map(|e| {
                        use std::os::unix::fs::MetadataExt;
                        (e.path(), e.metadata().map(|m| m.ino()).unwrap_or(0))
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    // Make sure the image's layer is in the cache (an earlier test may have done it).
    let out = ctr.run_container(RUNTIME, "e2e-warm", &[], &["true"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let before = images();
    assert_eq!(before.len(), 1, "one layer, one cached image: {before:?}");

    for id in ["e2e-a", "e2e-b"] {
        let out = ctr.run(
            &["run", "-d", "--runtime", RUNTIME, IMAGE, id, "sleep", "300"],
            None,
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let ls = text(&ctr.run(&["task", "ls"], None).stdout);
    assert_eq!(
        ls.lines().filter(|l| l.contains("RUNNING")).count(),
        2,
        "{ls}"
    );
    assert_eq!(
        images(),
        before,
        "the second container reused the first's layer image"
    );
    for id in ["e2e-a", "e2e-b"] {
        let out = ctr.run(&["task", "kill", "-s", "SIGKILL", id], None);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    for id in ["e2e-a", "e2e-b"] {
        wait_stopped(&ctr, id).await;
        assert!(ctr.run(&["task", "rm", id], None).status.success());
        assert!(ctr.run(&["containers", "rm", id], None).status.success());
    }
    ctr.assert_clean();
}

#[tokio::test]
async fn user_groups_from_a_full_spec_and_read_only_rootfs_match_runc() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    // ctr 1.6 has no --user: hand it a whole spec, whose root is the image mounted on the host.
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    let rootfs_s = rootfs.to_str().unwrap();
    let out = ctr.run(&["images", "mount", "--rw", IMAGE, rootfs_s], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let spec = ctr.run(&["oci", "spec"], None);
    assert!(spec.status.success());
    let mut spec: serde_json::Value =
        serde_json::from_slice(&spec.stdout).expect("ctr oci spec is JSON");
    spec["process"]["user"] =
        serde_json::json!({"uid": 65534, "gid": 65534, "additionalGids": [1234]});
    spec["process"]["args"] = serde_json::json!(["id"]);
    spec["process"]["env"] = serde_json::json!(["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]);
    spec["process"]["terminal"] = serde_json::json!(false);
    spec["root"] = serde_json::json!({"path": rootfs_s, "readonly": false});
    let path = dir.path().join("spec.json");
    std::fs::write(&path, serde_json::to_vec(&spec).unwrap()).unwrap();
    let path = path.to_str().unwrap();
    let out = ctr.run_container(RUNTIME, "e2e-user", &["--config", path], &[], None);
    let runc = ctr.run_container(RUNC, "e2e-user-runc", &["--config", path], &[], None);
    let unmount = ctr.run(&["images", "unmount", "--rm", rootfs_s], None);
    assert!(unmount.status.success(), "{}", text(&unmount.stderr));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(runc.status.success(), "{}", text(&runc.stderr));
    let id = text(&out.stdout);
    assert!(
        id.starts_with("uid=65534(nobody) gid=65534(nogroup)"),
        "{id}"
    );
    assert!(id.contains("1234(extra)"), "{id}");
    assert_eq!(out.stdout, runc.stdout, "same identity as under runc");

    let probe = ["sh", "-c", "touch /probe 2>/dev/null && echo writable || echo read-only; touch /tmp/x 2>/dev/null; echo done"];
    let out = ctr.run_container(RUNTIME, "e2e-ro", &["--read-only"], &probe, None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let runc = ctr.run_container(RUNC, "e2e-ro-runc", &["--read-only"], &probe, None);
    assert!(
        text(&out.stdout).starts_with("read-only\n"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(out.stdout, runc.stdout);
    let out = ctr.run_container(RUNTIME, "e2e-rw", &[], &probe, None);
    assert!(
        text(&out.stdout).starts_with("writable\n"),
        "{}",
        text(&out.stdout)
    );
    ctr.assert_clean();
}

/// `--privileged` (Kubernetes' privileged pods get the same spec unless the runtime class sets
/// privileged_without_host_devices): every capability, and the host's device list — /dev/ptmx
/// among it — which the guest must not let break the container's own /dev/ptmx -> pts/ptmx.
#[tokio::test]
async fn privileged_container_matches_runc() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let probe = [
        "sh",
        "-c",
        "grep -E '^Cap(Eff|Bnd)' /proc/self/status; ls -l /dev/ptmx | cut -c1; \
         [ -c /dev/null ] && echo null; mkdir -p /mnt/t && mount -t tmpfs tmpfs /mnt/t && echo mounted",
    ];
    let out = ctr.run_container(RUNTIME, "e2e-priv", &["--privileged"], &probe, None);
    let runc = ctr.run_container(RUNC, "e2e-priv-runc", &["--privileged"], &probe, None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(runc.status.success(), "{}", text(&runc.stderr));
    let seen = text(&out.stdout);
    assert!(seen.ends_with("\nl\nnull\nmounted\n"), "{seen}");
    assert_eq!(
        seen,
        text(&runc.stdout),
        "same capabilities and /dev as runc"
    );
    ctr.assert_clean();
}

/// A small host directory bound read-only (how Kubernetes mounts secrets, config maps and
/// service account tokens: a timestamped directory, a `..data` link, links to its files) is
/// copied into the guest and reads as under runc; writing to it fails as under runc.
#[tokio::test]
async fn read_only_directory_binds_arrive_as_copies() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let v = dir.path().join("..2026_11_23_01_00_00.1");
    std::fs::create_dir_all(v.join("nested")).unwrap();
    std::fs::write(v.join("token"), b"t0k3n").unwrap();
    std::fs::write(v.join("nested/ca.crt"), b"-----BEGIN CERTIFICATE-----\n").unwrap();
    std::os::unix::fs::symlink("..2026_11_23_01_00_00.1", dir.path().join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/token", dir.path().join("token")).unwrap();
    let mount = format!(
        "type=bind,src={},dst=/var/run/secrets/sa,options=rbind:ro",
        dir.path().display()
    );
    let probe = [
        "sh",
        "-c",
        "cd /var/run/secrets/sa && cat token && echo && cat ..data/nested/ca.crt && ls -a && \
         readlink token && (echo x > token) 2>/dev/null || echo read-only",
    ];
    let out = ctr.run_container(RUNTIME, "e2e-rodir", &["--mount", &mount], &probe, None);
    let runc = ctr.run_container(RUNC, "e2e-rodir-runc", &["--mount", &mount], &probe, None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let seen = text(&out.stdout);
    assert!(
        seen.starts_with("t0k3n\n-----BEGIN CERTIFICATE-----\n"),
        "{seen}"
    );
    assert!(seen.ends_with("..data/token\nread-only\n"), "{seen}");
    assert_eq!(seen, text(&runc.stdout), "the same tree as under runc");
    assert_eq!(std::fs::read(v.join("token")).unwrap(), b"t0k3n");
    ctr.assert_clean();
}

/// What the guest does not apply as the spec says is logged in containerd's log, by container:
/// an AppArmor profile (the guest runs no AppArmor) and a writable bind mount of a host
/// directory (none is shared with the VM).
/// A host directory bound writable (hostPath and emptyDir volumes, `docker run -v`) is shared
/// live through virtio-fs: the container reads what the host put there, its writes (files,
/// directories, modes, root ownership) land in the host directory as under runc, and a file
/// the host writes while the container runs shows up in it.
#[tokio::test]
async fn writable_directory_binds_are_shared_live_like_runc() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("host.txt"), "from the host\n").unwrap();
    let mount = format!(
        "type=bind,src={},dst=/data,options=rbind:rw",
        dir.path().display()
    );
    let probe = [
        "sh",
        "-c",
        "cat /data/host.txt && echo written >/data/new.txt && chmod 640 /data/new.txt && \
         mkdir -p /data/d/e && echo deep >/data/d/e/f && ls -lnR /data | grep -v '^total' | \
         awk '{print $1, $3, $4, $NF}'",
    ];
    let mut seen = Vec::new();
    for (runtime, id) in [(RUNTIME, "e2e-share"), (RUNC, "e2e-share-runc")] {
        let out = ctr.run_container(runtime, id, &["--mount", &mount], &probe, None);
        assert!(out.status.success(), "{id}: {}", text(&out.stderr));
        let new = dir.path().join("new.txt");
        assert_eq!(std::fs::read_to_string(&new).unwrap(), "written\n", "{id}");
        let meta = std::fs::metadata(&new).unwrap();
        assert_eq!(
            (
                std::os::unix::fs::MetadataExt::uid(&meta),
                std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777
            ),
            (0, 0o640),
            "{id}: owner and mode on the host"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("d/e/f")).unwrap(),
            "deep\n",
            "{id}"
        );
        seen.push(text(&out.stdout));
        std::fs::remove_file(&new).unwrap();
        std::fs::remove_dir_all(dir.path().join("d")).unwrap();
    }
    assert!(seen[0].starts_with("from the host\n"), "{}", seen[0]);
    assert_eq!(seen[0], seen[1], "the same tree as runc");

    // Live: the container waits for a file the host writes after it started.
    let wait = [
        "sh",
        "-c",
        "i=0; while [ ! -e /data/late ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; \
         cat /data/late",
    ];
    let late = dir.path().join("late");
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(4));
        std::fs::write(late, "written later\n").unwrap();
    });
    let out = ctr.run_container(RUNTIME, "e2e-share-live", &["--mount", &mount], &wait, None);
    writer.join().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "written later\n");
    ctr.assert_clean();
}

#[tokio::test]
async fn unapplied_spec_parts_are_logged_by_the_shim() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    // A fifo: neither a file nor a directory, so neither copied nor shared.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let mount = format!(
        "type=bind,src={},dst=/data,options=rbind:rw",
        fifo.display()
    );
    let out = ctr.run_container(
        RUNTIME,
        "e2e-warn",
        &["--apparmor-profile", "spinbox-test", "--mount", &mount],
        &["sh", "-c", "[ -e /data ] && echo data || echo no-data"],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "no-data\n");
    let log = std::fs::read_to_string(ctr.containerd_dir.join("containerd.log")).unwrap();
    let warned = |needle: &str| {
        log.lines().any(|l| {
            l.contains("level=warn")
                && l.contains("id=e2e-warn")
                && l.contains("spec not applied as written")
                && l.contains(needle)
        })
    };
    assert!(
        warned("process.apparmorProfile \"spinbox-test\" ignored"),
        "AppArmor warning in the log"
    );
    assert!(
        warned(&format!(
            "mount /data: bind source \"{}\" is not in the guest",
            fifo.display()
        )),
        "mount warning in the log"
    );
    ctr.assert_clean();
}

/// A shim killed with SIGKILL takes its VM with it (parent-death signal); containerd then runs
/// `containerd-shim-spinbox-v2 delete`, which reclaims what the record names; the same id runs
/// again at once.
#[tokio::test]
async fn killed_shim_leaves_nothing_and_the_id_runs_again() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let id = "e2e-shimkill";
    let out = ctr.run(
        &["run", "-d", "--runtime", RUNTIME, IMAGE, id, "sleep", "300"],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shim_marker = format!("-id {id} -address {}", ctr.address);
    let shims = spinbox_tests::processes_mentioning(&shim_marker);
    assert_eq!(shims.len(), 1, "one shim: {shims:?}");
    let vm_marker = ctr
        .spinbox_root
        .join("state")
        .join(id)
        .display()
        .to_string();
    assert!(
        !spinbox_tests::processes_mentioning(&vm_marker).is_empty(),
        "VM running"
    );
    let pid: i32 = shims[0]
        .split(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("shim pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 the shim");

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ls = text(&ctr.run(&["task", "ls"], None).stdout);
        let vm = spinbox_tests::processes_mentioning(&vm_marker);
        if !ls.contains(id) && vm.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after kill -9 of the shim: tasks {ls}, VM {vm:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ctr.wait_no_shim(id).await;
    assert!(ctr.run(&["containers", "rm", id], None).status.success());
    ctr.assert_clean();
    ctr.assert_no_shim_sockets(&[id]);

    let out = ctr.run_container(RUNTIME, id, &[], &["echo", "again"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "again\n");
    ctr.assert_clean();
}
