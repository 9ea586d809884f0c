//! Shared helpers for spinbox's integration tests: where the guest image is, a config that
//! points at it, and the leak check every test ends with.
//!
//! The guest (kernel + initrd) is built by `make guest`; tests find it in `$SPINBOX_GUEST_DIR`
//! (default `<workspace>/build/guest`). `make test` sets `SPINBOX_REQUIRE_VM=1`, which turns a
//! missing guest or binary into a failure instead of a skip.

pub mod cri;
pub mod ctr;

use std::path::{Path, PathBuf};

use spinbox_config::Config;

/// The guest image directory, or `None` (after saying why) when VM tests must skip.
pub fn guest_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("SPINBOX_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/guest"));
    let missing: Vec<String> = ["vmlinux", "initrd.img"]
        .iter()
        .filter(|f| !dir.join(f).is_file())
        .map(|f| dir.join(f).display().to_string())
        .collect();
    let tools: Vec<&str> = ["qemu-system-x86_64", "vhost-device-vsock"]
        .into_iter()
        .filter(|t| which(t).is_none())
        .collect();
    if missing.is_empty() && tools.is_empty() {
        return Some(dir);
    }
    let why = format!(
        "guest image or tools missing (run `make guest`): files {missing:?}, binaries {tools:?}"
    );
    if std::env::var_os("SPINBOX_REQUIRE_VM").is_some() {
        panic!("{why}");
    }
    eprintln!("skipped: {why}");
    None
}

/// The config the suite's shim runs with (`$SPINBOX_E2E_CONFIG`), changed by `change` and
/// written to `dir/<name>.json`, for `ctr run --runtime-config-path`: returns that path.
pub fn config_variant_file(
    dir: &Path,
    name: &str,
    change: impl FnOnce(&mut serde_json::Value),
) -> String {
    let base = std::env::var_os("SPINBOX_E2E_CONFIG").expect("SPINBOX_E2E_CONFIG");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(base).expect("the suite's config"))
            .expect("the suite's config is JSON");
    change(&mut config);
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_vec(&config).expect("JSON")).expect("writing a config");
    path.display().to_string()
}

/// The `spinbox` CLI tests/run.sh built.
fn spinbox_bin() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("debug/spinbox")
}

/// Runs `spinbox ARGS` (built by tests/run.sh) with `config` as `SPINBOX_CONFIG`.
pub fn spinbox_cli(config: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(spinbox_bin())
        .args(args)
        .env("SPINBOX_CONFIG", config)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run spinbox (built by tests/run.sh)")
}

/// Runs `spinbox gc` (built by tests/run.sh) with `config`; asserts it succeeded and returns
/// what it said.
pub fn spinbox_gc(config: &str) -> String {
    let out = spinbox_cli(config, &["gc"]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "spinbox gc: {said}");
    said
}

/// `spinbox ps --json` with `config`: asserts it succeeded and returns its rows.
pub fn spinbox_ps(config: &str) -> Vec<serde_json::Value> {
    let out = spinbox_cli(config, &["ps", "--json"]);
    assert!(
        out.status.success(),
        "spinbox ps --json: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "spinbox ps --json is not a JSON array ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `spinbox inspect --json ID` with `config`: its object, or what it said on stderr when it
/// failed.
pub fn spinbox_inspect(config: &str, id: &str) -> Result<serde_json::Value, String> {
    let out = spinbox_cli(config, &["inspect", "--json", id]);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "spinbox inspect --json {id} is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    }))
}

/// `vm.shutdown_records_kept` of the suite's config (`$SPINBOX_E2E_CONFIG`), or the default.
pub fn suite_records_kept() -> usize {
    let config = match std::env::var_os("SPINBOX_E2E_CONFIG") {
        Some(path) => Config::from_file(Path::new(&path)).expect("the suite's config"),
        None => Config::default(),
    };
    config.vm.shutdown_records_kept as usize
}

/// Asserts a log directory holds nothing of a VM that is gone: no console log, nothing at
/// all but `shutdown/`, the kept shutdown records — a bounded history, not a leak: at most
/// `kept` per VM id, each 0600 in a 0700 directory, nothing else there.
pub fn assert_log_dir_clean(log_dir: &Path, kept: usize) {
    use std::os::unix::fs::PermissionsExt;
    let history = spinbox_vmm::history::dir(log_dir);
    if let Ok(entries) = std::fs::read_dir(log_dir) {
        let left: Vec<_> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| *p != history)
            .collect();
        assert!(left.is_empty(), "left in {}: {left:?}", log_dir.display());
    }
    let Ok(entries) = std::fs::read_dir(&history) else {
        return;
    };
    let mode = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0)
    };
    assert_eq!(mode(&history), 0o700, "{} is not 0700", history.display());
    let mut per_id: std::collections::BTreeMap<String, usize> = Default::default();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((id, _)) = spinbox_vmm::history::parse_file_name(&name) else {
            panic!("not a kept shutdown record: {}", e.path().display());
        };
        assert_eq!(mode(&e.path()), 0o600, "{} is not 0600", e.path().display());
        *per_id.entry(id.to_owned()).or_default() += 1;
    }
    let over: Vec<_> = per_id.iter().filter(|(_, n)| **n > kept).collect();
    assert!(
        over.is_empty(),
        "more than vm.shutdown_records_kept = {kept} shutdown records kept: {over:?}"
    );
}

/// Looks a program up on `$PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// A config for tests: the built guest, binaries from `$PATH`, state and logs under `root`,
/// TCG (these machines have no KVM; `auto` would pick the same) and vhost-user vsock.
pub fn test_config(guest: &Path, root: &Path) -> Config {
    let mut c = Config::default();
    c.paths.kernel = guest.join("vmlinux");
    c.paths.initrd = guest.join("initrd.img");
    c.paths.state_dir = root.join("state");
    c.paths.log_dir = root.join("log");
    if let Some(q) = which("qemu-system-x86_64") {
        c.paths.qemu = q;
    }
    if let Some(v) = which("vhost-device-vsock") {
        c.paths.vhost_device_vsock = v;
    }
    c.vm.accel = spinbox_config::Accel::Auto;
    c.vm.vsock = spinbox_config::VsockMode::Auto;
    c
}

/// Processes whose command line mentions `needle` (a test's private state root).
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    let me = std::process::id().to_string();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) || name == me {
            continue;
        }
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            // Zombies keep no cmdline, so anything here is really running.
            found.push(format!("{name}: {}", cmd.trim()));
        }
    }
    found
}

/// No network state of spinbox's left on the host: no namespace it created
/// (`/run/netns/spinbox-*`), no spinbox nft table (empty ones included), no host-local
/// allocation under `ipam_dir` (the suite's CNI dataDir).
pub fn assert_no_network_leaks(ipam_dir: &Path) {
    let netns: Vec<String> = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("spinbox-"))
        .collect();
    assert!(netns.is_empty(), "network namespaces left: {netns:?}");
    // spinbox deletes its tables with the last container's rules.
    let out = std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
        .expect("running nft");
    let tables = String::from_utf8_lossy(&out.stdout);
    assert!(
        !tables.lines().any(|l| l.trim_end().ends_with(" spinbox")),
        "spinbox nft tables left: {tables}"
    );
    let allocations: Vec<String> = std::fs::read_dir(ipam_dir)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|net| {
            std::fs::read_dir(net.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lock" && !n.starts_with("last_reserved_ip"))
        .collect();
    assert!(
        allocations.is_empty(),
        "IP allocations left: {allocations:?}"
    );
}

/// Asserts that nothing a VM test created under `root` survives: no process mentioning it, no
/// state directory entry, no console log (kept shutdown records within their bound).
pub fn assert_no_leaks(root: &Path) {
    let needle = root.display().to_string();
    let procs = processes_mentioning(&needle);
    assert!(procs.is_empty(), "processes left behind: {procs:#?}");
    let d = root.join("state");
    if let Ok(entries) = std::fs::read_dir(&d) {
        let left: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        assert!(left.is_empty(), "files left in {}: {left:?}", d.display());
    }
    assert_log_dir_clean(
        &root.join("log"),
        Config::default().vm.shutdown_records_kept as usize,
    );
    let fds: Vec<String> = open_fd_list()
        .into_iter()
        .filter(|f| f.contains(&needle))
        .collect();
    assert!(fds.is_empty(), "fds still open on test files: {fds:?}");
}

/// VM tests take this lock: they run one at a time (two cores boot one TCG guest fastest) and
/// the fd accounting of one test is not disturbed by another's.
pub static VM_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs a VM test alone in this test binary: takes the process-wide lock *before* building
/// its runtime, so no other test's runtime (its epoll, eventfd and socket fds) comes or goes
/// while this one counts its fds.
pub fn run_vm_test<F: std::future::Future<Output = ()>>(test: F) {
    static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _alone = ALONE.lock().unwrap_or_else(|p| p.into_inner());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("test runtime");
    rt.block_on(test);
    drop(rt);
}

/// Counts this process's open fds, after making sure the runtime's lazily created process
/// and signal machinery already exists (it stays for the process's life and is not a leak).
pub async fn settled_fd_count() -> usize {
    let _ = tokio::process::Command::new("true").status().await;
    open_fd_list().len()
}

/// This process's fds as "fd -> target" lines.
pub fn open_fd_list() -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
        for e in entries.flatten() {
            let target = std::fs::read_link(e.path())
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            out.push(format!("{} -> {target}", e.file_name().to_string_lossy()));
        }
    }
    out
}
