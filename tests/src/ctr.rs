//! Driving the private containerd with `ctr`, as a user would.
//!
//! `make test` starts one private containerd for the whole suite (deploy/private-containerd.sh)
//! and passes its socket in `$SPINBOX_CONTAINERD_ADDRESS`, with the spinbox state root the shim
//! was configured with in `$SPINBOX_E2E_ROOT`.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const IMAGE: &str = "docker.io/library/spinbox-busybox:latest";
pub const RUNTIME: &str = "io.containerd.spinbox.v2";

/// The private containerd of this test run.
pub struct Ctr {
    pub address: String,
    /// State root the shim uses (state/, log/, data/ below it).
    pub spinbox_root: PathBuf,
    /// containerd's own directory (shim processes mention it on their command line).
    pub containerd_dir: PathBuf,
}

impl Ctr {
    /// `None` (after saying why) when the suite runs without a private containerd.
    pub fn from_env() -> Option<Ctr> {
        let (Some(address), Some(root)) = (
            std::env::var_os("SPINBOX_CONTAINERD_ADDRESS"),
            std::env::var_os("SPINBOX_E2E_ROOT"),
        ) else {
            let why = "no private containerd (run through `make test`, which starts one)";
            if std::env::var_os("SPINBOX_REQUIRE_VM").is_some() {
                panic!("{why}");
            }
            eprintln!("skipped: {why}");
            return None;
        };
        let address = address.to_string_lossy().into_owned();
        let containerd_dir = PathBuf::from(&address)
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default();
        Some(Ctr {
            address,
            spinbox_root: PathBuf::from(root),
            containerd_dir,
        })
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(&self.address);
        c
    }

    /// Runs ctr with `args`, feeding `stdin` if given.
    pub fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut c = self.cmd();
        c.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("spawning ctr");
        if let Some(data) = stdin {
            let mut input = child.stdin.take().expect("stdin pipe");
            // ctr 1.6 never closes the container's stdin; the writer just goes away.
            let data = data.to_vec();
            std::thread::spawn(move || {
                let _ = input.write_all(&data);
            });
        }
        child.wait_with_output().expect("waiting for ctr")
    }

    /// `ctr run --rm` with the given runtime, returning the output.
    pub fn run_container(
        &self,
        runtime: &str,
        id: &str,
        extra: &[&str],
        cmd: &[&str],
        stdin: Option<&[u8]>,
    ) -> Output {
        // ctr 1.6 connects stdin by default; it has no -i.
        let mut args = vec!["run", "--rm", "--runtime", runtime];
        args.extend_from_slice(extra);
        // A full spec (--config) brings its own root: no image then.
        if !extra.contains(&"--config") {
            args.push(IMAGE);
        }
        args.push(id);
        args.extend_from_slice(cmd);
        self.run(&args, stdin)
    }

    /// The task's line in `ctr task ls` (its first column is the id), if containerd has it.
    pub fn task_line(&self, id: &str) -> Option<String> {
        let out = self.run(&["task", "ls"], None);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .map(str::to_owned)
    }

    /// The pid of the QEMU that runs container (or pod) `id`, found by its state directory.
    pub fn qemu_pid(&self, id: &str) -> Option<i32> {
        let marker = self
            .spinbox_root
            .join("state")
            .join(id)
            .display()
            .to_string();
        crate::processes_mentioning(&marker)
            .iter()
            .find(|p| p.contains("qemu-system"))
            .and_then(|p| p.split(':').next()?.parse().ok())
    }

    /// The shim socket containerd-shim derives for a container: `/run/containerd/s/` +
    /// sha256(`<containerd address>/<namespace>/<id>`).
    pub fn shim_socket(&self, namespace: &str, id: &str) -> PathBuf {
        use sha2::Digest;
        let key = format!("{}/{namespace}/{id}", self.address);
        let hash = sha2::Sha256::digest(key.as_bytes());
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        PathBuf::from("/run/containerd/s").join(hex)
    }

    /// Asserts the shims of these containers removed their sockets.
    pub fn assert_no_shim_sockets(&self, ids: &[&str]) {
        for id in ids {
            let sock = self.shim_socket("default", id);
            assert!(
                !sock.exists(),
                "shim socket of {id} left: {}",
                sock.display()
            );
        }
    }

    /// Waits (up to 20 s) until no shim process of `id` runs for this containerd — after a
    /// shim died, containerd's cleanup (`shim delete`) releases the VM and network first.
    pub async fn wait_no_shim(&self, id: &str) {
        let marker = format!("-id {id} ");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while crate::processes_mentioning(&marker)
            .iter()
            .any(|p| p.contains(&self.address))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "a shim of {id} still runs (shim delete?)"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Asserts nothing of spinbox's is left: no QEMU / helper / shim process, no VM state,
    /// no container data, no console log, no container or task known to containerd; the log
    /// directory holds at most `vm.shutdown_records_kept` shutdown records per VM id.
    ///
    /// A shim still finishing (containerd's `shim delete` after the task went, a shim exiting
    /// after Shutdown) gets up to 20 s to be gone; one still there after that is a leak.
    pub fn assert_clean(&self) {
        let shims = || -> Vec<String> {
            crate::processes_mentioning("containerd-shim-spinbox-v2")
                .into_iter()
                .filter(|p| p.contains(&self.address))
                .collect()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !shims().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let left = shims();
        assert!(left.is_empty(), "shims left: {left:#?}");
        let root = self.spinbox_root.display().to_string();
        let procs = crate::processes_mentioning(&root);
        assert!(procs.is_empty(), "VM processes left: {procs:#?}");
        for sub in ["state", "data/containers"] {
            let d = self.spinbox_root.join(sub);
            if let Ok(entries) = std::fs::read_dir(&d) {
                let left: Vec<_> = entries.flatten().map(|e| e.path()).collect();
                assert!(left.is_empty(), "left in {}: {left:?}", d.display());
            }
        }
        // The kept shutdown records (log/shutdown) are a bounded history, not a leak.
        crate::assert_log_dir_clean(&self.spinbox_root.join("log"), crate::suite_records_kept());
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let ours: Vec<&str> = mounts.lines().filter(|l| l.contains(&root)).collect();
        assert!(ours.is_empty(), "mounts left: {ours:?}");
        crate::assert_no_network_leaks(&self.spinbox_root.join("ipam"));
        let tasks = self.run(&["task", "ls", "-q"], None);
        assert!(
            String::from_utf8_lossy(&tasks.stdout).trim().is_empty(),
            "tasks left"
        );
        let ctrs = self.run(&["containers", "ls", "-q"], None);
        assert!(
            String::from_utf8_lossy(&ctrs.stdout).trim().is_empty(),
            "containers left"
        );
    }
}

/// `ctr events` in the background, its lines collected.
pub struct EventLog {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl EventLog {
    pub fn start(ctr: &Ctr) -> EventLog {
        let mut child = ctr
            .cmd()
            .arg("events")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("ctr events");
        let out = child.stdout.take().expect("events stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        EventLog { child, lines }
    }

    pub fn matching(&self, topic: &str, needle: &str) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(topic) && l.contains(needle))
            .cloned()
            .collect()
    }

    pub async fn wait_for(&self, topic: &str, needle: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if !self.matching(topic, needle).is_empty() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A detached container, killed and removed at the end (also when the test fails).
pub struct Detached<'a> {
    pub ctr: &'a Ctr,
    pub id: String,
}

impl<'a> Detached<'a> {
    pub async fn run(
        ctr: &'a Ctr,
        runtime: &str,
        id: &str,
        extra: &[&str],
        cmd: &[&str],
    ) -> Detached<'a> {
        let mut args = vec!["run", "-d", "--runtime", runtime];
        args.extend_from_slice(extra);
        args.push(IMAGE);
        args.push(id);
        args.extend_from_slice(cmd);
        let out = ctr.run(&args, None);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ctr.task_line(id).is_some_and(|l| l.contains("RUNNING")) {
            assert!(Instant::now() < deadline, "{id} never RUNNING");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Detached {
            ctr,
            id: id.to_owned(),
        }
    }

    pub fn exec(&self, exec_id: &str, cmd: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
        let mut args = vec!["task", "exec", "--exec-id", exec_id, self.id.as_str()];
        args.extend_from_slice(cmd);
        self.ctr.run(&args, stdin)
    }
}

impl Drop for Detached<'_> {
    fn drop(&mut self) {
        let ctr = self.ctr;
        if ctr.task_line(&self.id).is_some() {
            let _ = ctr.run(&["task", "kill", "-s", "SIGKILL", &self.id], None);
            for _ in 0..150 {
                if ctr
                    .task_line(&self.id)
                    .is_none_or(|l| l.contains("STOPPED"))
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // Removal may race containerd's own bookkeeping under load: retry, bounded.
        for _ in 0..100 {
            if ctr.task_line(&self.id).is_some() {
                let _ = ctr.run(&["task", "rm", &self.id], None);
            }
            let out = ctr.run(&["containers", "rm", &self.id], None);
            let listed = ctr.run(&["containers", "ls", "-q"], None);
            if out.status.success()
                || !String::from_utf8_lossy(&listed.stdout)
                    .lines()
                    .any(|l| l.trim() == self.id)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
