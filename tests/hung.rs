//! A hung or frozen guest cannot hold the host: a SIGKILL the guest does not deliver lands
//! anyway (the VM is forced down within `timeouts.kill` + the ladder's last steps), a task
//! that was created and never started is killed, waited for and deleted like under runc,
//! and the console log stays under its cap whatever the guest writes. Each test ends with
//! the shared leak check.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use containerd_shim_protos::api::{
    CreateTaskRequest, DeleteRequest, KillRequest, ShutdownRequest, StateRequest, WaitRequest,
};
use containerd_shim_protos::shim_async::{Client, TaskClient};
use containerd_shim_protos::types::mount::Mount;
use containerd_shim_protos::types::task::Status as TaskStatus;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use spinbox_tests::ctr::{Ctr, EventLog, IMAGE, RUNTIME};
use spinbox_tests::VM_TESTS;

/// `timeouts.kill` of the config these tests run with.
const KILL: Duration = Duration::from_secs(2);
/// The forced ladder: QMP quit's reply wait on a stopped QEMU (`timeouts.qmp_command`, 3 s),
/// then SIGKILL; and slack for a loaded two-core host.
const LADDER: Duration = Duration::from_secs(3 + 7);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The suite's config with `timeouts.kill` = 2 s.
fn kill_config(dir: &Path) -> String {
    spinbox_tests::config_variant_file(dir, "kill", |c| {
        c["timeouts"]["kill"] = "2s".into();
    })
}

/// `ctr run -d` of a `sleep 300` container `id` with the config at `config`.
fn run_sleeper(ctr: &Ctr, config: &str, extra: &[&str], id: &str) {
    let mut args = vec![
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--runtime-config-path",
        config,
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[IMAGE, id, "sleep", "300"]);
    let out = ctr.run(&args, None);
    assert!(out.status.success(), "{id}: {}", text(&out.stderr));
}

fn freeze(pid: i32) {
    kill(Pid::from_raw(pid), Signal::SIGSTOP).expect("SIGSTOP QEMU");
}

#[tokio::test]
async fn sigkill_of_a_container_whose_vm_is_frozen_lands_within_the_kill_timeout() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let config = kill_config(dir.path());
    let id = "hg-frozen";
    run_sleeper(&ctr, &config, &[], id);
    let qemu = ctr.qemu_pid(id).expect("QEMU of the container");
    // QEMU runs in its seccomp sandbox and without capabilities (docs/SECURITY.md).
    let status = std::fs::read_to_string(format!("/proc/{qemu}/status")).unwrap();
    for field in [
        "CapEff:\t0000000000000000",
        "CapPrm:\t0000000000000000",
        "CapBnd:\t0000000000000000",
        "NoNewPrivs:\t1",
        "Seccomp:\t2",
    ] {
        assert!(
            status.contains(field),
            "QEMU's status lacks {field:?}:\n{status}"
        );
    }
    let events = EventLog::start(&ctr);
    freeze(qemu);

    let killed = Instant::now();
    let k = ctr.run(&["task", "kill", "-s", "SIGKILL", id], None);
    assert!(k.status.success(), "kill: {}", text(&k.stderr));
    assert!(
        killed.elapsed() < KILL + Duration::from_secs(3),
        "Kill took {:?}",
        killed.elapsed()
    );
    while !ctr.task_line(id).is_some_and(|l| l.contains("STOPPED")) {
        assert!(
            killed.elapsed() < KILL + LADDER,
            "task not STOPPED {:?} after SIGKILL of a frozen VM: {:?}",
            killed.elapsed(),
            ctr.task_line(id)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "frozen VM: SIGKILL → task STOPPED in {} ms",
        killed.elapsed().as_millis()
    );
    assert!(
        events
            .wait_for("/tasks/exit", id, Duration::from_secs(5))
            .await,
        "no TaskExit"
    );
    let rm = ctr.run(&["task", "rm", "-f", id], None);
    let said = text(&rm.stderr);
    assert!(rm.status.success(), "{said}");
    assert!(said.contains("exit code 137"), "{said}");
    assert!(ctr.run(&["containers", "rm", id], None).status.success());
    assert!(
        !Path::new(&format!("/proc/{qemu}")).exists(),
        "the frozen QEMU survived"
    );
    ctr.assert_clean();
    ctr.assert_no_shim_sockets(&[id]);
}

/// A shim of `binary` started as containerd starts one (`start` in the bundle directory),
/// driven over its task API: Create … Kill … Wait … Delete, the sequence containerd runs for
/// a task created and never started.
struct DirectShim {
    task: TaskClient,
    id: String,
}

impl DirectShim {
    async fn start(ctr: &Ctr, binary: &Path, id: &str, bundle: &Path, config: &str) -> DirectShim {
        let containerd = spinbox_tests::which("containerd").expect("containerd on PATH");
        // The shim's log: a fifo in the bundle that containerd reads (shims exit without it).
        let log = bundle.join("log");
        nix::unistd::mkfifo(&log, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo log");
        std::thread::spawn(move || {
            use std::io::Read;
            if let Ok(mut f) = std::fs::File::open(&log) {
                let mut sink = Vec::new();
                let _ = f.read_to_end(&mut sink);
            }
        });
        let out = Command::new(binary)
            .args(["-namespace", "default", "-address", &ctr.address])
            .arg("-publish-binary")
            .arg(&containerd)
            .args(["-id", id, "start"])
            .current_dir(bundle)
            .env("TTRPC_ADDRESS", format!("{}.ttrpc", ctr.address))
            .env("GRPC_ADDRESS", &ctr.address)
            .env("NAMESPACE", "default")
            .env("SPINBOX_CONFIG", config)
            .output()
            .expect("shim start");
        assert!(out.status.success(), "shim start: {}", text(&out.stderr));
        let address = text(&out.stdout).trim().to_owned();
        let client = Client::connect(&address)
            .await
            .unwrap_or_else(|e| panic!("shim at {address}: {e}"));
        DirectShim {
            task: TaskClient::new(client),
            id: id.to_owned(),
        }
    }

    fn ctx() -> ttrpc::context::Context {
        ttrpc::context::with_timeout(60_000_000_000)
    }

    async fn shutdown(self) {
        let mut req = ShutdownRequest::new();
        req.id = self.id.clone();
        let _ = self.task.shutdown(Self::ctx(), &req).await;
    }
}

/// A bundle for container `id` (made by `ctr containers create`): its spec with the root at
/// `rootfs`, and its snapshot's mounts as the Create request's rootfs.
fn bundle_of(ctr: &Ctr, id: &str, dir: &Path) -> (PathBuf, Vec<Mount>) {
    let info = ctr.run(&["containers", "info", id], None);
    assert!(info.status.success(), "{}", text(&info.stderr));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("info JSON");
    let mut spec = info["Spec"].clone();
    assert!(spec.is_object(), "no Spec in `ctr containers info`");
    spec["root"]["path"] = "rootfs".into();
    let bundle = dir.join(id);
    std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec(&spec).unwrap(),
    )
    .unwrap();
    // `mount -t TYPE SOURCE TARGET -o OPTIONS`, one line per mount.
    let mounts = ctr.run(&["snapshots", "mounts", "/unused", id], None);
    assert!(mounts.status.success(), "{}", text(&mounts.stderr));
    let rootfs = text(&mounts.stdout)
        .lines()
        .filter(|l| l.starts_with("mount "))
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let at = |flag: &str| {
                words
                    .iter()
                    .position(|w| *w == flag)
                    .and_then(|i| words.get(i + 1))
                    .map(|w| w.to_string())
                    .unwrap_or_default()
            };
            let mut m = Mount::new();
            m.type_ = at("-t");
            m.source = words
                .iter()
                .position(|w| *w == "-t")
                .and_then(|i| words.get(i + 2))
                .map(|w| w.to_string())
                .unwrap_or_default();
            m.options = at("-o").split(',').map(str::to_owned).collect();
            m
        })
        .collect();
    (bundle, rootfs)
}

/// What a created, never started task reports: Kill's exit (Wait), the state, and Delete's
/// exit, with how long the Delete took.
async fn created_kill_wait_delete(
    ctr: &Ctr,
    shim_binary: &Path,
    id: &str,
    dir: &Path,
    config: &str,
    frozen: bool,
) -> (u32, u32, Duration) {
    let out = ctr.run(&["containers", "create", IMAGE, id, "sleep", "300"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (bundle, rootfs) = bundle_of(ctr, id, dir);
    let shim = DirectShim::start(ctr, shim_binary, id, &bundle, config).await;
    let ctx = DirectShim::ctx;
    let mut create = CreateTaskRequest::new();
    create.id = id.to_owned();
    create.bundle = bundle.display().to_string();
    create.rootfs = rootfs;
    shim.task.create(ctx(), &create).await.expect("Create");
    if frozen {
        freeze(ctr.qemu_pid(id).expect("QEMU of the task"));
    }
    let mut kill = KillRequest::new();
    kill.id = id.to_owned();
    kill.signal = Signal::SIGKILL as u32;
    let started = Instant::now();
    shim.task.kill(ctx(), &kill).await.expect("Kill");
    let mut wait = WaitRequest::new();
    wait.id = id.to_owned();
    let waited = tokio::time::timeout(KILL + LADDER, shim.task.wait(ctx(), &wait))
        .await
        .expect("Wait returned")
        .expect("Wait");
    println!(
        "{id}: Kill + Wait of a created task: {} ms",
        started.elapsed().as_millis()
    );
    let mut state = StateRequest::new();
    state.id = id.to_owned();
    let st = shim.task.state(ctx(), &state).await.expect("State");
    assert_eq!(st.status.enum_value(), Ok(TaskStatus::STOPPED), "{id}");
    let mut delete = DeleteRequest::new();
    delete.id = id.to_owned();
    let deleting = Instant::now();
    let deleted = shim.task.delete(ctx(), &delete).await.expect("Delete");
    let took = deleting.elapsed();
    shim.shutdown().await;
    let rm = ctr.run(&["containers", "rm", id], None);
    assert!(rm.status.success(), "{}", text(&rm.stderr));
    (waited.exit_status, deleted.exit_status, took)
}

/// The same sequence through runc's shim and ours: the same exits (137: the kill ends the
/// process waiting to start), ours with the VM frozen under the task.
#[tokio::test]
async fn created_never_started_task_is_killed_waited_and_deleted_like_runc() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let config = kill_config(dir.path());
    let ours =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/containerd-shim-spinbox-v2");
    let runc_shim = spinbox_tests::which("containerd-shim-runc-v2").expect("runc's shim");
    let events = EventLog::start(&ctr);
    let runc = created_kill_wait_delete(
        &ctr,
        &runc_shim,
        "hg-created-runc",
        dir.path(),
        &config,
        false,
    )
    .await;
    // Ours with the VM frozen under the task: nothing may wait for the guest.
    let (waited, deleted, took) =
        created_kill_wait_delete(&ctr, &ours, "hg-created", dir.path(), &config, true).await;
    println!("runc: {runc:?}; spinbox: wait {waited}, delete {deleted}, Delete took {took:?}");
    assert_eq!(
        (waited, deleted),
        (runc.0, runc.1),
        "exit statuses differ from runc's"
    );
    assert_eq!(waited, 137);
    // Delete: RemoveContainer's bound (timeouts.shutdown_grace, 3 s), then the forced ladder;
    // never timeouts.io_wait for output a never-started process cannot have.
    assert!(
        took < Duration::from_secs(3) + LADDER,
        "Delete took {took:?}"
    );
    assert!(
        events
            .wait_for(
                "/tasks/exit",
                "\"container_id\":\"hg-created\"",
                Duration::from_secs(5)
            )
            .await,
        "no TaskExit for the killed created task: {:?}",
        events.matching("/tasks/exit", "")
    );
    ctr.assert_clean();
    ctr.assert_no_shim_sockets(&["hg-created", "hg-created-runc"]);
}

/// The resident memory of process `pid`, in KiB.
fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_guest_flooding_its_console_leaves_a_log_under_the_cap_and_the_shim_flat() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let cap_kib = 32;
    let config = spinbox_tests::config_variant_file(dir.path(), "console", |c| {
        c["vm"]["console_log_max_kib"] = cap_kib.into();
    });
    let id = "hg-console";
    run_sleeper(&ctr, &config, &["--privileged"], id);
    let shim = spinbox_tests::processes_mentioning(&format!("-id {id} "))
        .iter()
        .find(|p| p.contains("containerd-shim-spinbox-v2"))
        .and_then(|p| p.split(':').next()?.parse::<i32>().ok())
        .expect("the shim of the container");
    let before = rss_kib(shim);
    // The serial port under TCG moves some 30 KB/s: 16 times the cap proves the bound
    // without a flood of 100 MiB taking an hour (tested at full speed in vm/console.rs).
    let kib = 512;
    let flood = ctr.run(
        &[
            "task",
            "exec",
            "--exec-id",
            "flood",
            id,
            "sh",
            "-c",
            &format!("head -c {kib}k /dev/zero | tr '\\0' x > /dev/ttyS0; echo flooded"),
        ],
        None,
    );
    assert!(
        text(&flood.stdout).contains("flooded"),
        "{} {}",
        text(&flood.stdout),
        text(&flood.stderr)
    );
    let after = rss_kib(shim);
    let log = ctr
        .spinbox_root
        .join("log")
        .join(format!("{id}.console.log"));
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let on_disk = size(&log) + size(&spinbox_vmm::vm::rotated_console_log(&log));
    println!(
        "{kib} KiB to the console: {on_disk} bytes on disk (cap {cap_kib} KiB); shim RSS {before} → {after} KiB"
    );
    assert!(
        on_disk <= cap_kib * 1024,
        "{on_disk} bytes for a cap of {cap_kib} KiB"
    );
    assert!(on_disk > 0, "nothing of the console was kept");
    assert!(
        after < before + 16 * 1024,
        "the shim grew from {before} to {after} KiB"
    );
    let k = ctr.run(&["task", "kill", "-s", "SIGKILL", id], None);
    assert!(k.status.success(), "{}", text(&k.stderr));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ctr.task_line(id).is_some_and(|l| l.contains("STOPPED")) {
        assert!(Instant::now() < deadline, "not STOPPED after SIGKILL");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ctr.run(&["task", "rm", id], None).status.success());
    assert!(ctr.run(&["containers", "rm", id], None).status.success());
    ctr.assert_clean();
}
