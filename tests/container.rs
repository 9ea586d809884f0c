//! Runs containers end to end through the agent API, with no containerd: a busybox rootfs
//! packed as an EROFS lower plus an ext4 upper, cold-plugged into one real guest, and a series
//! of containers (distinct ids, removed in turn) that exercise the OCI semantics the agent
//! implements: args/env/cwd, user and groups, exit codes and signals, stdio over vsock
//! streams, read-only roots, hostname, rlimits, capabilities, cgroup limits.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use spinbox_agent_api::agent::{
    CreateContainerRequest, ProcessRequest, Rootfs, SignalProcessRequest,
};
use spinbox_agent_api::{stdio_header, StdioStream, DEFAULT_STDIO_PORT};
use spinbox_tests::{assert_no_leaks, guest_dir, test_config, VM_TESTS};
use spinbox_vmm::accel::HostCaps;
use spinbox_vmm::{DiskAttach, Vm, VmOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LOWER: &str = "sbx-lower0";
const UPPER: &str = "sbx-upper";
const RPC_TIMEOUT: Duration = Duration::from_secs(60);

/// Applets linked into the test rootfs.
const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "head", "id", "sleep", "ls", "env", "pwd", "hostname", "touch", "grep",
    "true", "false", "mount",
];

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(RPC_TIMEOUT.as_nanos() as i64)
}

/// A busybox root: /bin/busybox and its applets, /etc/passwd and /etc/group.
fn busybox_rootfs(dir: &Path) {
    for d in [
        "bin", "etc", "proc", "sys", "dev", "tmp", "root", "home/app",
    ] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).expect("busybox-static installed");
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(a)).unwrap();
    }
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("etc/group"),
        "root:x:0:\napp:x:1000:\nextra:x:1234:\nnogroup:x:65534:\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    // Executable bit, but nothing the kernel can run.
    std::fs::write(dir.join("bin/garbage"), b"\x00\x01\x02 not a program").unwrap();
    std::fs::set_permissions(
        dir.join("bin/garbage"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
}

const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// A spec like containerd's default one, running `args`.
fn spec(args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/local/bin:/usr/bin:/bin", "FOO=bar"],
            "cwd": "/",
            "capabilities": {
                "bounding": DEFAULT_CAPS,
                "effective": DEFAULT_CAPS,
                "permitted": DEFAULT_CAPS,
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "spinbox-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
            {"destination": "/etc/resolv.conf", "type": "bind",
             "source": "/var/lib/containerd/no-such/resolv.conf", "options": ["rbind", "ro"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                           {"type": "cgroup"}],
            "resources": {"memory": {"limit": 67108864}, "pids": {"limit": 100}},
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

fn rootfs(upper: bool, read_only: bool) -> Rootfs {
    Rootfs {
        lower_serials: vec![LOWER.into()],
        upper_serial: if upper { UPPER.into() } else { String::new() },
        read_only,
        ..Default::default()
    }
}

#[derive(Debug)]
struct Outcome {
    stdout: String,
    stderr: String,
    status: u32,
}

fn rpc_err(e: &ttrpc::Error) -> (ttrpc::Code, String) {
    match e {
        ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
        other => (ttrpc::Code::UNKNOWN, other.to_string()),
    }
}

/// Creates `id`, wires its stdio, starts it, feeds `stdin`, collects output and the exit,
/// removes it.
async fn run(
    vm: &Vm,
    id: &str,
    spec: &Value,
    root: Rootfs,
    stdin: Option<&[u8]>,
) -> Result<Outcome, String> {
    run_with(vm, id, spec, root, stdin, false).await
}

/// [`run`]; with `close_by_rpc` stdin ends by the CloseStdin RPC while its stream stays open.
async fn run_with(
    vm: &Vm,
    id: &str,
    spec: &Value,
    root: Rootfs,
    stdin: Option<&[u8]>,
    close_by_rpc: bool,
) -> Result<Outcome, String> {
    let agent = vm.agent();
    let req = CreateContainerRequest {
        container_id: id.into(),
        oci_spec: serde_json::to_vec(spec).unwrap(),
        rootfs: Some(root).into(),
        stdin: stdin.is_some(),
        stdout: true,
        stderr: true,
        ..Default::default()
    };
    agent
        .create_container(ctx(), &req)
        .await
        .map_err(|e| format!("create {id}: {:?}", rpc_err(&e)))?;
    let result = async {
        let mut streams = Vec::new();
        for s in [StdioStream::Stdout, StdioStream::Stderr, StdioStream::Stdin] {
            if s == StdioStream::Stdin && stdin.is_none() {
                continue;
            }
            let mut conn = vm
                .transport()
                .connect(DEFAULT_STDIO_PORT, Duration::from_secs(10))
                .await
                .map_err(|e| format!("{id}: connecting {}: {e}", s.as_str()))?;
            conn.write_all(stdio_header(id, "", s).as_bytes())
                .await
                .map_err(|e| format!("{id}: header: {e}"))?;
            streams.push(conn);
        }
        let stdin_conn = if stdin.is_some() { streams.pop() } else { None };
        let mut err_conn = streams.pop().unwrap();
        let mut out_conn = streams.pop().unwrap();
        let out = tokio::spawn(async move {
            let mut v = Vec::new();
            out_conn.read_to_end(&mut v).await.map(|_| v)
        });
        let err = tokio::spawn(async move {
            let mut v = Vec::new();
            err_conn.read_to_end(&mut v).await.map(|_| v)
        });
        let pid = vm
            .agent()
            .start_process(ctx(), &process(id))
            .await
            .map_err(|e| format!("start {id}: {:?}", rpc_err(&e)))?
            .pid;
        assert!(pid > 0);
        let mut held = None;
        if let (Some(mut conn), Some(data)) = (stdin_conn, stdin) {
            conn.write_all(data)
                .await
                .map_err(|e| format!("{id}: stdin: {e}"))?;
            if close_by_rpc {
                vm.agent()
                    .close_stdin(ctx(), &process(id))
                    .await
                    .map_err(|e| format!("close stdin {id}: {:?}", rpc_err(&e)))?;
                held = Some(conn);
            } else {
                conn.shutdown()
                    .await
                    .map_err(|e| format!("{id}: stdin shutdown: {e}"))?;
                // Keep the connection until the process is done with it.
                tokio::spawn(async move {
                    let mut sink = Vec::new();
                    let _ = conn.read_to_end(&mut sink).await;
                });
            }
        }
        let wait = vm
            .agent()
            .wait_process(ctx(), &process(id))
            .await
            .map_err(|e| format!("wait {id}: {:?}", rpc_err(&e)))?;
        drop(held);
        assert!(
            wait.exited_at_unix_nanos > 1_600_000_000_000_000_000,
            "exit time is wall clock"
        );
        // The reply comes after the output was flushed: both streams are at EOF already.
        let stdout = tokio::time::timeout(Duration::from_secs(5), out)
            .await
            .map_err(|_| format!("{id}: stdout not at EOF after WaitProcess"))?
            .unwrap()
            .map_err(|e| format!("{id}: reading stdout: {e}"))?;
        let stderr = tokio::time::timeout(Duration::from_secs(5), err)
            .await
            .map_err(|_| format!("{id}: stderr not at EOF after WaitProcess"))?
            .unwrap()
            .map_err(|e| format!("{id}: reading stderr: {e}"))?;
        Ok::<_, String>(Outcome {
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            status: wait.exit_status,
        })
    }
    .await;
    remove(vm, id).await?;
    let o = result?;
    println!(
        "{id}: status {} stdout {:?} stderr {:?}",
        o.status, o.stdout, o.stderr
    );
    Ok(o)
}

fn process(id: &str) -> ProcessRequest {
    ProcessRequest {
        container_id: id.into(),
        ..Default::default()
    }
}

async fn remove(vm: &Vm, id: &str) -> Result<(), String> {
    vm.agent()
        .remove_container(ctx(), &process(id))
        .await
        .map(|_| ())
        .map_err(|e| format!("remove {id}: {:?}", rpc_err(&e)))
}

macro_rules! check {
    ($cond:expr, $($msg:tt)*) => {
        if !$cond {
            return Err(format!($($msg)*));
        }
    };
}

async fn cases(vm: &Vm) -> Result<(), String> {
    // Plain output and exit 0; the output is exactly what was written.
    let o = run(
        vm,
        "echo",
        &spec(&["echo", "hello"]),
        rootfs(true, false),
        None,
    )
    .await?;
    check!(
        o.stdout == "hello\n" && o.stderr.is_empty() && o.status == 0,
        "echo: {o:?}"
    );

    // Exit codes, and stderr on its own stream.
    let o = run(
        vm,
        "exit42",
        &spec(&["sh", "-c", "echo oops >&2; exit 42"]),
        rootfs(true, false),
        None,
    )
    .await?;
    check!(
        o.status == 42 && o.stderr == "oops\n" && o.stdout.is_empty(),
        "exit 42: {o:?}"
    );

    // User, groups, cwd, env, HOME from /etc/passwd, hostname, rlimits, pid namespace.
    let mut s = spec(&[
        "sh",
        "-c",
        "id; pwd; echo $FOO $HOME; hostname; ulimit -n; echo $$",
    ]);
    s["process"]["user"] = json!({"uid": 65534, "gid": 65534, "additionalGids": [1234]});
    s["process"]["cwd"] = json!("/tmp");
    let o = run(vm, "ident", &s, rootfs(true, false), None).await?;
    let lines: Vec<&str> = o.stdout.lines().collect();
    check!(o.status == 0 && lines.len() == 6, "ident: {o:?}");
    check!(
        lines[0].starts_with("uid=65534(nobody) gid=65534(nogroup) groups=")
            && lines[0].contains("1234(extra)"),
        "id: {:?}",
        lines[0]
    );
    check!(lines[1] == "/tmp", "cwd: {:?}", lines[1]);
    check!(lines[2] == "bar /nonexistent", "env: {:?}", lines[2]);
    check!(lines[3] == "spinbox-test", "hostname: {:?}", lines[3]);
    check!(lines[4] == "1024", "RLIMIT_NOFILE: {:?}", lines[4]);
    check!(
        lines[5] == "1",
        "the container is PID 1 of its namespace: {:?}",
        lines[5]
    );

    // Capabilities as listed (containerd's default set), no_new_privs, cgroup limits seen
    // through the container's own cgroup namespace, masked and read-only paths.
    let o = run(
        vm,
        "confine",
        &spec(&["sh", "-c", "grep -E '^(CapBnd|CapEff|NoNewPrivs)' /proc/self/status; cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max /proc/kcore; (echo x > /proc/sys/kernel/hostname) 2>/dev/null || echo ro-ok; ls /dev"]),
        rootfs(true, false),
        None,
    )
    .await?;
    check!(o.status == 0, "confine: {o:?}");
    check!(
        o.stdout.contains("CapBnd:\t00000000a80425fb"),
        "bounding set: {o:?}"
    );
    check!(
        o.stdout.contains("CapEff:\t00000000a80425fb"),
        "effective set: {o:?}"
    );
    check!(o.stdout.contains("NoNewPrivs:\t1"), "no_new_privs: {o:?}");
    check!(o.stdout.contains("67108864\n100\n"), "cgroup limits: {o:?}");
    check!(o.stdout.contains("ro-ok"), "/proc/sys is read-only: {o:?}");
    for dev in [
        "null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm", "mqueue", "fd",
    ] {
        check!(
            o.stdout.lines().any(|l| l == dev),
            "/dev/{dev} missing: {o:?}"
        );
    }

    // A network namespace of its own (no path): only lo, and it is up. The whole root from
    // one disk (block_serial), here the EROFS layer itself.
    let mut s = spec(&[
        "sh",
        "-c",
        "ls /sys/class/net; cat /sys/class/net/lo/flags; head -n1 /etc/group",
    ]);
    s["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "network"}));
    let block = Rootfs {
        block_serial: LOWER.into(),
        block_fstype: "erofs".into(),
        ..Default::default()
    };
    let o = run(vm, "netns", &s, block, None).await?;
    check!(
        o.stdout == "lo\n0x9\nroot:x:0:\n" && o.status == 0,
        "netns + block rootfs: {o:?}"
    );

    // stdin: piped in, EOF after the host's shutdown.
    let o = run(
        vm,
        "stdin",
        &spec(&["head", "-n1"]),
        rootfs(true, false),
        Some(b"a\nb\n"),
    )
    .await?;
    check!(o.stdout == "a\n" && o.status == 0, "stdin: {o:?}");
    let o = run(
        vm,
        "cat",
        &spec(&["cat"]),
        rootfs(true, false),
        Some(b"all of it\n"),
    )
    .await?;
    check!(o.stdout == "all of it\n" && o.status == 0, "cat: {o:?}");

    let o = run_with(
        vm,
        "closestdin",
        &spec(&["cat"]),
        rootfs(true, false),
        Some(b"then closed\n"),
        true,
    )
    .await?;
    check!(
        o.stdout == "then closed\n" && o.status == 0,
        "CloseStdin: {o:?}"
    );
    // No stdin requested: /dev/null.
    let o = run(vm, "nostdin", &spec(&["cat"]), rootfs(true, false), None).await?;
    check!(o.stdout.is_empty() && o.status == 0, "stdin=false: {o:?}");

    // A writable root keeps writes in the upper layer; a read-only one refuses them.
    let o = run(
        vm,
        "write",
        &spec(&["sh", "-c", "echo data > /x && cat /x"]),
        rootfs(true, false),
        None,
    )
    .await?;
    check!(o.stdout == "data\n" && o.status == 0, "rw root: {o:?}");
    let o = run(
        vm,
        "ro-host",
        &spec(&["sh", "-c", "touch /y"]),
        rootfs(true, true),
        None,
    )
    .await?;
    check!(
        o.status != 0 && o.stderr.contains("Read-only"),
        "Rootfs.read_only: {o:?}"
    );
    let mut s = spec(&["sh", "-c", "touch /y"]);
    s["root"]["readonly"] = json!(true);
    let o = run(vm, "ro-spec", &s, rootfs(true, false), None).await?;
    check!(
        o.status != 0 && o.stderr.contains("Read-only"),
        "root.readonly: {o:?}"
    );
    let o = run(
        vm,
        "lower-only",
        &spec(&["sh", "-c", "cat /x 2>/dev/null; touch /y"]),
        rootfs(false, false),
        None,
    )
    .await?;
    check!(
        o.status != 0 && o.stdout.is_empty(),
        "lower only (no upper data, read-only): {o:?}"
    );

    // A missing executable fails with an error naming it, at create or at start.
    let err = match run(vm, "nope", &spec(&["/bin/nope"]), rootfs(true, false), None).await {
        Ok(o) => return Err(format!("/bin/nope ran: {o:?}")),
        Err(e) => e,
    };
    println!("nope: {err}");
    check!(
        err.contains("/bin/nope") && err.contains("No such file"),
        "nope: {err}"
    );
    let err = match run(vm, "nope2", &spec(&["nope"]), rootfs(true, false), None).await {
        Ok(o) => return Err(format!("nope ran: {o:?}")),
        Err(e) => e,
    };
    println!("nope2: {err}");
    check!(err.contains("executable file not found"), "nope2: {err}");
    // Found but not executable by the kernel: the execve itself fails, seen at StartProcess.
    let err = match run(
        vm,
        "garbage",
        &spec(&["/bin/garbage"]),
        rootfs(true, false),
        None,
    )
    .await
    {
        Ok(o) => return Err(format!("/bin/garbage ran: {o:?}")),
        Err(e) => e,
    };
    println!("garbage: {err}");
    check!(
        err.starts_with("start garbage")
            && err.contains("/bin/garbage")
            && err.contains("Exec format error"),
        "garbage: {err}"
    );

    // Removing a container that was never started kills its waiting init.
    let req = CreateContainerRequest {
        container_id: "unstarted".into(),
        oci_spec: serde_json::to_vec(&spec(&["echo", "never"])).unwrap(),
        rootfs: Some(rootfs(true, false)).into(),
        ..Default::default()
    };
    vm.agent()
        .create_container(ctx(), &req)
        .await
        .map_err(|e| format!("{:?}", rpc_err(&e)))?;
    remove(vm, "unstarted").await?;
    let err = vm
        .agent()
        .list_pids(ctx(), &process("unstarted"))
        .await
        .unwrap_err();
    check!(
        rpc_err(&err).0 == ttrpc::Code::NOT_FOUND,
        "removed: {err:?}"
    );

    signals_and_pids(vm).await?;

    // Unknown ids: NOT_FOUND for waits, OK for removal (idempotent).
    let err = vm
        .agent()
        .wait_process(ctx(), &process("ghost"))
        .await
        .unwrap_err();
    check!(
        rpc_err(&err).0 == ttrpc::Code::NOT_FOUND,
        "wait ghost: {err:?}"
    );
    remove(vm, "ghost").await?;
    // An exec of a container that is gone: NOT_FOUND naming the container.
    let mut req = process("echo");
    req.exec_id = "e1".into();
    let err = vm.agent().start_process(ctx(), &req).await.unwrap_err();
    check!(
        rpc_err(&err).0 == ttrpc::Code::NOT_FOUND && rpc_err(&err).1.contains("echo"),
        "exec of a removed container: {err:?}"
    );
    // A terminal container is created (its pty in the guest) and removed again.
    let mut tty = spec(&["true"]);
    tty["process"]["terminal"] = json!(true);
    let req = CreateContainerRequest {
        container_id: "tty".into(),
        oci_spec: serde_json::to_vec(&tty).unwrap(),
        rootfs: Some(rootfs(true, false)).into(),
        terminal: true,
        ..Default::default()
    };
    let created = vm.agent().create_container(ctx(), &req).await;
    check!(created.is_ok(), "terminal container: {created:?}");
    remove(vm, "tty").await?;
    Ok(())
}

/// A long-running container: a wait from before the start, ListPids, a second container
/// beside it, SignalProcess to all -> 137 for every waiter.
async fn signals_and_pids(vm: &Vm) -> Result<(), String> {
    let id = "sleeper";
    let req = CreateContainerRequest {
        container_id: id.into(),
        oci_spec: serde_json::to_vec(&spec(&["sh", "-c", "sleep 100 & exec sleep 101"])).unwrap(),
        rootfs: Some(rootfs(true, false)).into(),
        ..Default::default()
    };
    let created = vm
        .agent()
        .create_container(ctx(), &req)
        .await
        .map_err(|e| format!("{:?}", rpc_err(&e)))?;
    let result = async {
        // containerd waits right after create, before start.
        let wait_req = process(id);
        let early_wait = vm.agent().wait_process(ctx(), &wait_req);
        let rest = async {
            let started = vm
                .agent()
                .start_process(ctx(), &process(id))
                .await
                .map_err(|e| format!("{:?}", rpc_err(&e)))?;
            check!(
                started.pid == created.pid,
                "start pid {} != create pid {}",
                started.pid,
                created.pid
            );
            let err = vm
                .agent()
                .start_process(ctx(), &process(id))
                .await
                .unwrap_err();
            check!(
                rpc_err(&err).0 == ttrpc::Code::FAILED_PRECONDITION,
                "second start: {err:?}"
            );
            // The shell forks its background sleep, then execs the other.
            let mut pids = Vec::new();
            for _ in 0..50 {
                pids = vm
                    .agent()
                    .list_pids(ctx(), &process(id))
                    .await
                    .map_err(|e| format!("{:?}", rpc_err(&e)))?
                    .pids;
                if pids.len() == 2 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            check!(
                pids.len() == 2 && pids.contains(&created.pid),
                "ListPids: {pids:?} (init {})",
                created.pid
            );
            // Another container runs beside it (no upper: the upper disk is in use).
            let o = run(
                vm,
                "beside",
                &spec(&["echo", "beside"]),
                rootfs(false, false),
                None,
            )
            .await?;
            check!(o.stdout == "beside\n" && o.status == 0, "beside: {o:?}");
            let sig = SignalProcessRequest {
                container_id: id.into(),
                signal: 9,
                all: true,
                ..Default::default()
            };
            vm.agent()
                .signal_process(ctx(), &sig)
                .await
                .map_err(|e| format!("{:?}", rpc_err(&e)))?;
            vm.agent()
                .wait_process(ctx(), &process(id))
                .await
                .map_err(|e| format!("{:?}", rpc_err(&e)))
        };
        let (a, b) = tokio::join!(early_wait, rest);
        let (a, b) = (a.map_err(|e| format!("{:?}", rpc_err(&e)))?, b?);
        check!(
            a.exit_status == 137 && b.exit_status == 137,
            "SIGKILL: {a:?} {b:?}"
        );
        check!(
            a.exited_at_unix_nanos == b.exited_at_unix_nanos,
            "both waits see one exit"
        );
        let sig = SignalProcessRequest {
            container_id: id.into(),
            signal: 15,
            ..Default::default()
        };
        let err = vm.agent().signal_process(ctx(), &sig).await.unwrap_err();
        check!(
            rpc_err(&err).0 == ttrpc::Code::NOT_FOUND,
            "signal after exit: {err:?}"
        );
        Ok(())
    }
    .await;
    remove(vm, id).await?;
    remove(vm, id).await?;
    result
}

/// A disk plugged into the running guest (as for a container joining a pod) serves a
/// container's writable layer; unplugged, the guest lets it go and it is gone for the next.
async fn hotplugged_disk(vm: &Vm, image: &Path) -> Result<(), String> {
    use spinbox_vmm::hotplug::{plug_disk, port_id, unplug_disk};
    const HOT: &str = "u-hot";
    let disk = DiskAttach {
        path: image.to_owned(),
        serial: HOT.into(),
        read_only: false,
    };
    let started = std::time::Instant::now();
    plug_disk(vm.qmp(), &port_id(1), "hd1", &disk)
        .await
        .map_err(|e| e.to_string())?;
    println!("plug took {} ms", started.elapsed().as_millis());
    let root = Rootfs {
        lower_serials: vec![LOWER.into()],
        upper_serial: HOT.into(),
        ..Default::default()
    };
    let o = run(
        vm,
        "hot1",
        &spec(&[
            "sh",
            "-c",
            "echo on-hot-disk > /marker; cat /marker; grep -c ' / ' /proc/mounts",
        ]),
        root.clone(),
        None,
    )
    .await?;
    check!(
        o.status == 0 && o.stdout.starts_with("on-hot-disk\n"),
        "container on a hot-plugged upper: {o:?}"
    );
    let started = std::time::Instant::now();
    unplug_disk(vm.qmp(), "hd1", Duration::from_secs(20))
        .await
        .map_err(|e| e.to_string())?;
    println!("unplug took {} ms", started.elapsed().as_millis());
    // Plugged again on the same port: the port was freed, the data is still there.
    plug_disk(vm.qmp(), &port_id(1), "hd1", &disk)
        .await
        .map_err(|e| format!("re-plug on a freed port: {e}"))?;
    let o = run(vm, "hot2", &spec(&["cat", "/marker"]), root, None).await?;
    check!(
        o.status == 0 && o.stdout == "on-hot-disk\n",
        "the replugged disk keeps what was written: {o:?}"
    );
    unplug_disk(vm.qmp(), "hd1", Duration::from_secs(20))
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_run_with_oci_semantics_in_one_guest() {
    let Some(guest) = guest_dir() else { return };
    let _serial = VM_TESTS.lock().await;
    let root = tempfile::tempdir().unwrap();
    let config = test_config(&guest, root.path());

    let tree = root.path().join("busybox-root");
    busybox_rootfs(&tree);
    let cache = spinbox_storage::LayerCache::new(root.path().join("layers"));
    let (lower, _) = cache.get_or_build(&tree).await.expect("EROFS layer");
    let upper: PathBuf = root.path().join("upper.img");
    spinbox_storage::build_upper_image(None, &upper, 256)
        .await
        .expect("upper image");
    let options = VmOptions {
        disks: vec![
            DiskAttach {
                path: lower,
                serial: LOWER.into(),
                read_only: true,
            },
            DiskAttach {
                path: upper,
                serial: UPPER.into(),
                read_only: false,
            },
        ],
        nics: Vec::new(),
        shares: Vec::new(),
        hotplug_ports: 2,
    };
    let hot_upper: PathBuf = root.path().join("upper-hot.img");
    spinbox_storage::build_upper_image(None, &hot_upper, 64)
        .await
        .expect("upper image");
    let vm = Vm::start_with("containers", &config, &options, &HostCaps::probe())
        .await
        .expect("VM start");
    let vm_boot_ms = vm.boot_info().host_spawn_to_ready_ms;
    let started = std::time::Instant::now();
    let mut outcome = cases(&vm).await;
    println!("container cases took {} ms", started.elapsed().as_millis());
    if outcome.is_ok() {
        outcome = hotplugged_disk(&vm, &hot_upper).await;
    }
    if outcome.is_err() || std::env::var_os("SPINBOX_SHOW_CONSOLE").is_some() {
        let console = std::fs::read_to_string(vm.console_log()).unwrap_or_default();
        println!("---- guest console ----\n{console}\n---- end ----");
    }
    let report = vm.shutdown().await;
    println!(
        "boot-to-ready {} ms; shutdown graceful={} in {} ms",
        vm_boot_ms, report.graceful, report.duration_ms
    );
    let errors = vm.release().await;
    outcome.unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    assert!(report.graceful, "{:?}", report.events);
    assert_no_leaks(root.path());
}
