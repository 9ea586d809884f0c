//! Interactive and operational task calls through containerd: exec (output, status, missing
//! binary, stdin, concurrency, kill of one exec, events), metrics, OOM events, pause/resume,
//! and Update (over the shim's own task API, as CRI's UpdateContainerResources reaches it).
//! Each test ends with the shared leak check.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use spinbox_tests::ctr::{Ctr, Detached, EventLog, IMAGE, RUNTIME};
use spinbox_tests::VM_TESTS;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn exec_runs_in_the_container_with_status_stdin_concurrency_and_events() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let events = EventLog::start(&ctr);
    {
        let c = Detached::run(
            &ctr,
            RUNTIME,
            "ix-exec",
            &[],
            &["sh", "-c", "echo init > /tmp/mark; exec sleep 300"],
        )
        .await;

        // Output, and the container's own filesystem (it sees what the init wrote).
        let out = c.exec("e-echo", &["sh", "-c", "echo hello; cat /tmp/mark"], None);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "hello\ninit\n");

        // The init's pid namespace: the init is PID 1 there.
        let out = c.exec("e-ps", &["cat", "/proc/1/cmdline"], None);
        assert!(
            text(&out.stdout).starts_with("sleep"),
            "{}",
            text(&out.stdout)
        );

        // Exit status propagates.
        let out = c.exec("e-fail", &["sh", "-c", "exit 3"], None);
        assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));

        // A missing binary: a clear error naming it.
        let out = c.exec("e-missing", &["/no/such/binary"], None);
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(err.contains("/no/such/binary"), "{err}");

        // stdin reaches the exec.
        let out = c.exec("e-stdin", &["head", "-n", "1"], Some(b"piped line\nmore\n"));
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "piped line\n");

        // Five at once, each with its own output.
        let handles: Vec<_> = (0..5)
            .map(|i| {
                let args: Vec<String> = [
                    "--address",
                    &ctr.address,
                    "task",
                    "exec",
                    "--exec-id",
                    &format!("e-par{i}"),
                    "ix-exec",
                    "sh",
                    "-c",
                    &format!("sleep 1; echo par{i}"),
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                std::thread::spawn(move || {
                    Command::new("ctr")
                        .args(&args)
                        .stdin(Stdio::null())
                        .output()
                        .expect("ctr exec")
                })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            let out = h.join().unwrap();
            assert!(out.status.success(), "par{i}: {}", text(&out.stderr));
            assert_eq!(text(&out.stdout), format!("par{i}\n"));
        }

        // Killing one exec leaves the others and the container alone.
        let mut long = ctr
            .cmd()
            .args([
                "task",
                "exec",
                "--exec-id",
                "e-long",
                "ix-exec",
                "sleep",
                "100",
            ])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let other = ctr
            .cmd()
            .args([
                "task",
                "exec",
                "--exec-id",
                "e-other",
                "ix-exec",
                "sh",
                "-c",
                "sleep 3; echo survived",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        assert!(
            events
                .wait_for("/tasks/exec-started", "e-long", Duration::from_secs(15))
                .await
        );
        let out = ctr.run(
            &[
                "task",
                "kill",
                "--exec-id",
                "e-long",
                "-s",
                "SIGKILL",
                "ix-exec",
            ],
            None,
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        let status = long.wait().unwrap();
        assert_eq!(status.code(), Some(137));
        let out = other.wait_with_output().unwrap();
        assert_eq!(text(&out.stdout), "survived\n");
        assert!(ctr
            .task_line("ix-exec")
            .is_some_and(|l| l.contains("RUNNING")));

        assert!(!events.matching("/tasks/exec-added", "e-echo").is_empty());
        assert!(!events.matching("/tasks/exec-started", "e-echo").is_empty());
        assert!(
            events
                .matching("/tasks/exit", "e-fail")
                .iter()
                .any(|l| l.contains("\"id\":\"e-fail\"") && l.contains("\"exit_status\":3")),
            "{:?}",
            events.matching("/tasks/exit", "e-fail")
        );
    }
    ctr.assert_clean();
}

/// `ctr task metrics` reads the guest's cgroup: memory usage grows when the container
/// allocates (a 48 MB file in its tmpfs /dev/shm counts as its memory).
#[tokio::test]
async fn metrics_show_memory_growing_with_an_allocation() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    {
        let c = Detached::run(&ctr, RUNTIME, "ix-metrics", &[], &["sleep", "300"]).await;
        let usage = || {
            let out = ctr.run(&["task", "metrics", "--format", "json", "ix-metrics"], None);
            assert!(out.status.success(), "{}", text(&out.stderr));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metrics JSON");
            v["memory"]["usage"]
                .as_u64()
                .unwrap_or_else(|| panic!("no memory.usage: {v}"))
        };
        let before = usage();
        assert!(before > 0, "memory usage of a running container is not 0");
        let out = c.exec(
            "m-alloc",
            &["sh", "-c", "head -c 48000000 /dev/zero > /dev/shm/blob"],
            None,
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        let after = usage();
        assert!(
            after >= before + 40_000_000,
            "usage {before} -> {after}: did not grow by the 48 MB allocated"
        );
        let out = ctr.run(&["task", "metrics", "ix-metrics"], None);
        assert!(text(&out.stdout).contains("pids"), "{}", text(&out.stdout));
    }
    ctr.assert_clean();
}

/// 32 MiB limit, 64 MiB allocated (dd's one 64 MiB buffer, anonymous memory): the guest's
/// OOM killer acts and containerd sees /tasks/oom for the container, then its exit.
#[tokio::test]
async fn oom_kill_in_the_guest_reaches_containerd() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let events = EventLog::start(&ctr);
    {
        let _c = Detached::run(
            &ctr,
            RUNTIME,
            "ix-oom",
            &["--memory-limit", "33554432"],
            &[
                "sh",
                "-c",
                "sleep 2; exec dd if=/dev/zero of=/dev/null bs=64M count=1",
            ],
        )
        .await;
        assert!(
            events
                .wait_for("/tasks/oom", "ix-oom", Duration::from_secs(30))
                .await,
            "no /tasks/oom event; events: {:?}",
            events.matching("", "")
        );
    }
    assert!(
        events
            .wait_for("/tasks/exit", "ix-oom", Duration::from_secs(10))
            .await
    );
    ctr.assert_clean();
}

/// pause freezes the container (a counter stops), State says PAUSED; resume lets it go on.
#[tokio::test]
async fn pause_stops_a_counter_and_resume_lets_it_go_on() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let events = EventLog::start(&ctr);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("counter.log");
    let log_uri = format!("file://{}", log.display());
    {
        let _c = Detached::run(
            &ctr,
            RUNTIME,
            "ix-pause",
            &["--log-uri", &log_uri],
            &[
                "sh",
                "-c",
                "i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done",
            ],
        )
        .await;
        let last = || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .last()
                .and_then(|l| l.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(last() > 0, "the counter never ran");
        let out = ctr.run(&["task", "pause", "ix-pause"], None);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let line = ctr.task_line("ix-pause").unwrap_or_default();
        assert!(line.contains("PAUSED"), "{line}");
        let frozen = last();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(last(), frozen, "the counter advanced while paused");
        let out = ctr.run(&["task", "resume", "ix-pause"], None);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(ctr
            .task_line("ix-pause")
            .is_some_and(|l| l.contains("RUNNING")));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(last() > frozen, "the counter did not go on after resume");
        assert!(!events.matching("/tasks/paused", "ix-pause").is_empty());
        assert!(!events.matching("/tasks/resumed", "ix-pause").is_empty());
    }
    ctr.assert_clean();
}

/// Update (the shim's task API, which CRI's UpdateContainerResources reaches): a new memory
/// limit shows in the container's cgroup; one beyond the VM's memory is refused naming it.
#[tokio::test]
async fn update_changes_the_cgroup_limit_and_refuses_more_than_the_vm_has() {
    use containerd_shim_protos::api::UpdateTaskRequest;
    use containerd_shim_protos::protobuf::well_known_types::any::Any;
    use containerd_shim_protos::protobuf::MessageField;
    use containerd_shim_protos::shim_async::{Client, TaskClient};

    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    {
        let _c = Detached::run(&ctr, RUNTIME, "ix-update", &[], &["sleep", "300"]).await;
        let socket = ctr.shim_socket("default", "ix-update");
        let client = Client::connect(&format!("unix://{}", socket.display()))
            .await
            .expect("shim socket");
        let task = TaskClient::new(client);
        let update = |limit: u64| {
            let mut any = Any::new();
            any.type_url =
                "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into();
            any.value =
                serde_json::to_vec(&serde_json::json!({"memory": {"limit": limit}})).unwrap();
            let mut req = UpdateTaskRequest::new();
            req.id = "ix-update".into();
            req.resources = MessageField::some(any);
            req
        };
        let ctx = || ttrpc::context::with_timeout(10_000_000_000);
        // The limit the guest's cgroup has (memory.max), as `ctr task metrics` reads it.
        let limit = || {
            let out = ctr.run(&["task", "metrics", "--format", "json", "ix-update"], None);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metrics JSON");
            v["memory"]["usage_limit"].as_u64().unwrap_or(0)
        };
        assert_eq!(limit(), u64::MAX, "no limit before the update");
        task.update(ctx(), &update(64 << 20))
            .await
            .expect("update to 64 MiB");
        assert_eq!(limit(), 64 << 20);
        let err = task
            .update(ctx(), &update(64 << 30))
            .await
            .expect_err("a limit beyond the VM");
        assert!(err.to_string().contains("memory"), "{err}");
    }
    ctr.assert_clean();
}

/// A detached tmux session (80x24) whose first window runs a command: the real terminal that
/// `ctr run -t` and `ctr task attach` need. Killed on drop, so a failed test leaves no session.
struct Tmux {
    session: String,
}

impl Tmux {
    fn start(name: &str, command: &str) -> Tmux {
        let tmux = Tmux {
            session: format!("spinbox-{name}-{}", std::process::id()),
        };
        let out = tmux.run(&[
            "new-session",
            "-d",
            "-s",
            &tmux.session,
            "-x",
            "80",
            "-y",
            "24",
            command,
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        tmux
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .args(args)
            .output()
            .expect("tmux (apt-get install tmux)")
    }

    /// The session's active window, or `session:window`.
    fn target(&self, window: Option<u32>) -> String {
        match window {
            Some(w) => format!("{}:{w}", self.session),
            None => self.session.clone(),
        }
    }

    fn new_window(&self, window: Option<u32>, command: &str) {
        let out = self.run(&["new-window", "-t", &self.target(window), command]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }

    /// Types `line` and Enter.
    fn type_line(&self, window: Option<u32>, line: &str) {
        self.run(&["send-keys", "-t", &self.target(window), line, "Enter"]);
    }

    fn screen(&self, window: Option<u32>) -> String {
        text(
            &self
                .run(&["capture-pane", "-p", "-t", &self.target(window)])
                .stdout,
        )
    }

    /// Waits up to `limit` for `needle` on the window's screen and returns the screen.
    async fn wait_screen(&self, window: Option<u32>, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.screen(window);
            if s.contains(needle) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{needle:?} never on screen:\n{s}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-session", "-t", &self.session]);
    }
}

/// `ctr run -t` in a real terminal (tmux): an interactive `sh` whose typed input echoes, and
/// whose `stty size` follows a resize of the terminal (SIGWINCH → ResizePty → the guest pty).
#[tokio::test]
async fn tty_shell_echoes_input_and_follows_resizes() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let tmux = Tmux::start(
        "tty",
        &format!(
            "ctr --address {} run -t --rm --runtime {RUNTIME} {IMAGE} ix-tty sh",
            ctr.address
        ),
    );
    let limit = Duration::from_secs(30);
    // The shell's prompt, then typed input echoed by the guest's terminal.
    tmux.wait_screen(None, "#", limit).await;
    tmux.type_line(None, "echo typed-$((6*7))");
    tmux.wait_screen(None, "typed-42", limit).await;
    tmux.type_line(None, "stty size");
    tmux.wait_screen(None, "24 80", limit).await;
    tmux.run(&[
        "resize-window",
        "-t",
        &tmux.session,
        "-x",
        "100",
        "-y",
        "30",
    ]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    tmux.type_line(None, "stty size");
    tmux.wait_screen(None, "30 100", limit).await;

    // `ctr task exec -t` into it: a second terminal, sized like its window.
    tmux.new_window(
        None,
        &format!(
            "ctr --address {} task exec -t --exec-id ix-tty-exec ix-tty sh",
            ctr.address
        ),
    );
    tmux.wait_screen(None, "#", limit).await;
    tmux.type_line(None, "echo in-exec-$((2*21)); stty size");
    tmux.wait_screen(None, "in-exec-42", limit).await;
    let size = text(
        &tmux
            .run(&[
                "display-message",
                "-p",
                "-t",
                &tmux.session,
                "#{window_height} #{window_width}",
            ])
            .stdout,
    );
    tmux.wait_screen(None, size.trim(), limit).await;
    tmux.type_line(None, "exit");
    let deadline = Instant::now() + Duration::from_secs(20);
    while text(&tmux.run(&["list-windows", "-t", &tmux.session]).stdout)
        .lines()
        .count()
        > 1
    {
        assert!(Instant::now() < deadline, "the exec's window never closed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tmux.type_line(None, "exit");
    let deadline = Instant::now() + Duration::from_secs(20);
    while ctr.task_line("ix-tty").is_some() {
        assert!(Instant::now() < deadline, "ix-tty still listed after exit");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // `ctr run --rm` removes the container after the task: killing its terminal before that
    // would leave the container behind.
    while String::from_utf8_lossy(&ctr.run(&["containers", "ls", "-q"], None).stdout)
        .lines()
        .any(|l| l.trim() == "ix-tty")
    {
        assert!(
            Instant::now() < deadline,
            "ix-tty's container still there after exit"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(tmux);
    ctr.assert_clean();
}

/// A detached TTY container (`ctr run -d -t`) is attached to, detached from (the client
/// killed) and attached to again: each client types into the same shell and sees its output.
#[tokio::test]
async fn detached_tty_container_can_be_attached_again() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    // `ctr run -t` wants a terminal even when detaching: give it one, and keep the window.
    let tmux = Tmux::start(
        "attach",
        &format!(
            "ctr --address {} run -d -t --runtime {RUNTIME} {IMAGE} ix-attach sh; sleep 600",
            ctr.address
        ),
    );
    {
        let _c = Detached {
            ctr: &ctr,
            id: "ix-attach".into(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ctr
            .task_line("ix-attach")
            .is_some_and(|l| l.contains("RUNNING"))
        {
            assert!(Instant::now() < deadline, "ix-attach never RUNNING");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for (round, n) in [(1, 11), (2, 22)] {
            tmux.new_window(
                Some(round),
                &format!(
                    "ctr --address {} task attach ix-attach; sleep 600",
                    ctr.address
                ),
            );
            tokio::time::sleep(Duration::from_millis(1500)).await;
            tmux.type_line(Some(round), &format!("echo round-$(({n}*2))"));
            let want = format!("round-{}", n * 2);
            tmux.wait_screen(Some(round), &want, Duration::from_secs(20))
                .await;
            // Detach by killing the client.
            let _ = Command::new("pkill")
                .args(["-KILL", "-f", "task attach ix-attach"])
                .status();
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert!(
                ctr.task_line("ix-attach")
                    .is_some_and(|l| l.contains("RUNNING")),
                "the shell must outlive its client"
            );
        }
    }
    drop(tmux);
    ctr.assert_clean();
}

/// The spec's seccomp profile (`ctr --seccomp`: containerd's default) binds the container's
/// init and its exec processes, as under runc: a user namespace (`unshare -U`), which the guest
/// kernel itself allows, is refused without CAP_SYS_ADMIN.
#[tokio::test]
async fn seccomp_profile_binds_init_and_exec_like_runc() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let probe = [
        "sh",
        "-c",
        "grep '^Seccomp:' /proc/self/status; \
         unshare -U true 2>/dev/null && echo unshare-allowed || echo unshare-denied",
    ];
    let confined = "Seccomp:\t2\nunshare-denied\n";
    let out = ctr.run_container(RUNTIME, "int-seccomp", &["--seccomp"], &probe, None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), confined);
    let runc = ctr.run_container(
        "io.containerd.runc.v2",
        "int-seccomp-runc",
        &["--seccomp"],
        &probe,
        None,
    );
    assert_eq!(out.stdout, runc.stdout, "as under runc");
    let open = ctr.run_container(RUNTIME, "int-noseccomp", &[], &probe, None);
    assert_eq!(
        text(&open.stdout),
        "Seccomp:\t0\nunshare-allowed\n",
        "without the profile the guest allows it"
    );
    {
        let d = Detached::run(
            &ctr,
            RUNTIME,
            "int-seccomp-exec",
            &["--seccomp"],
            &["sleep", "300"],
        )
        .await;
        let e = d.exec("probe", &probe, None);
        assert!(e.status.success(), "{}", text(&e.stderr));
        assert_eq!(text(&e.stdout), confined, "the exec is bound too");
    }
    ctr.assert_clean();
}
