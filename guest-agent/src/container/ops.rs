//! Operations on a running container's cgroup: stats, pause/resume (freezer), update of the
//! limits, and OOM events (memory.events watched, never polled).
//!
//! Both waits are event-driven: the kernel raises IN_MODIFY on a cgroup's `cgroup.events`
//! when its frozen state changes, and on `memory.events` when a counter moves. Pause/resume
//! wait on a private inotify fd (in spawn_blocking, bounded); OOM events come from one
//! dedicated thread blocked in read(2) on a shared inotify fd that watches every container's
//! memory.events.

use std::collections::{HashMap, VecDeque};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use ttrpc::Code;

use super::cgroup::{self, VmCapacity};
use super::spec::Resources;
use super::{lock, Container, Manager, RpcError, RpcResult};
use crate::log::{debug, info, warning};

/// How long pause/resume wait for the cgroup to report the new state.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);
/// OOM events kept for GetOomEvent; past this the oldest are dropped.
const OOM_QUEUE_MAX: usize = 1024;

/// The cgroup v2 files StatsContainer returns (those that exist), enough for containerd's
/// cgroups v2 Metrics: pids, cpu (usage, user, system, throttling), memory (usage, limit,
/// swap, peak, stat fields, events), io, and the pressure (PSI) files.
const STAT_FILES: &[&str] = &[
    "cgroup.events",
    "cgroup.freeze",
    "cgroup.stat",
    "cpu.stat",
    "cpu.max",
    "cpu.weight",
    "cpu.pressure",
    "memory.current",
    "memory.max",
    "memory.high",
    "memory.low",
    "memory.min",
    "memory.peak",
    "memory.stat",
    "memory.events",
    "memory.events.local",
    "memory.swap.current",
    "memory.swap.max",
    "memory.swap.peak",
    "memory.swap.events",
    "memory.pressure",
    "pids.current",
    "pids.max",
    "pids.peak",
    "pids.events",
    "io.stat",
    "io.max",
    "io.weight",
    "io.pressure",
];

/// A value in a flat-keyed cgroup file (`key value` lines: cgroup.events, memory.events).
fn keyed_value(content: &str, key: &str) -> Option<u64> {
    content.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        if words.next() == Some(key) {
            words.next()?.parse().ok()
        } else {
            None
        }
    })
}

/// `oom_kill` in memory.events: the OOM kills in the cgroup and below (what containerd
/// reports as TaskOOM; `oom` counts OOM situations, which need not kill anything).
fn oom_kills(memory_events: &str) -> Option<u64> {
    keyed_value(memory_events, "oom_kill")
}

/// Reads the stat files of the cgroup at `dir`. Blocking.
fn read_stats(dir: &Path) -> io::Result<HashMap<String, String>> {
    if !dir.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} is gone", dir.display()),
        ));
    }
    let mut out = HashMap::new();
    for name in STAT_FILES {
        match std::fs::read_to_string(dir.join(name)) {
            Ok(content) => {
                out.insert((*name).to_string(), content);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            // Some files refuse reads on some kernels (EOPNOTSUPP): leave them out.
            Err(e) => debug!("stats: reading {}: {e}", dir.join(name).display()),
        }
    }
    Ok(out)
}

// ---- inotify ----

/// An inotify instance (raw libc: nix's inotify feature is not enabled).
struct Inotify {
    fd: OwnedFd,
}

/// A decoded event: watch descriptor and mask.
#[derive(Debug, Clone, Copy)]
struct Event {
    wd: i32,
    mask: u32,
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} contains a NUL byte", path.display()),
        )
    })
}

impl Inotify {
    fn new(nonblocking: bool) -> io::Result<Inotify> {
        let mut flags = libc::IN_CLOEXEC;
        if nonblocking {
            flags |= libc::IN_NONBLOCK;
        }
        // SAFETY: inotify_init1 takes flags only.
        let fd = unsafe { libc::inotify_init1(flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by inotify_init1 and is owned by nobody else.
        Ok(Inotify {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn add_watch(&self, path: &Path, mask: u32) -> io::Result<i32> {
        let c = cstring(path)?;
        // SAFETY: a valid inotify fd and a NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), mask) };
        if wd < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(wd)
        }
    }

    fn rm_watch(&self, wd: i32) -> io::Result<()> {
        // SAFETY: a valid inotify fd; a stale wd is answered with EINVAL.
        if unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), wd) } < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// One read(2): blocks on a blocking instance; on a non-blocking one an empty list
    /// means nothing is pending. EINTR is retried.
    fn read_events(&self) -> io::Result<Vec<Event>> {
        let mut buf = [0u8; 4096];
        let n = loop {
            // SAFETY: reading into a buffer of the given length.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast::<libc::c_void>(),
                    buf.len(),
                )
            };
            if n >= 0 {
                break usize::try_from(n).unwrap_or(0);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(Vec::new()),
                _ => return Err(e),
            }
        };
        Ok(parse_events(&buf[..n]))
    }

    /// Waits up to `timeout` for the fd to be readable; false on timeout.
    fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // Round up so a sub-millisecond remainder does not spin.
        let ms = i32::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
        loop {
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r >= 0 {
                return Ok(r > 0);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Decodes the `struct inotify_event` records read(2) returned.
fn parse_events(buf: &[u8]) -> Vec<Event> {
    let header = std::mem::size_of::<libc::inotify_event>();
    let mut out = Vec::new();
    let mut off = 0;
    while off + header <= buf.len() {
        // SAFETY: `header` bytes are in bounds; read_unaligned copes with the alignment of a
        // byte buffer and inotify_event is plain old data.
        let ev: libc::inotify_event =
            unsafe { std::ptr::read_unaligned(buf[off..].as_ptr().cast()) };
        out.push(Event {
            wd: ev.wd,
            mask: ev.mask,
        });
        let name_len = usize::try_from(ev.len).unwrap_or(buf.len());
        off = off.saturating_add(header).saturating_add(name_len);
    }
    out
}

// ---- freezer ----

/// The `frozen` state cgroup.events reports for the cgroup at `dir`.
fn read_frozen(dir: &Path) -> io::Result<Option<bool>> {
    let events = std::fs::read_to_string(dir.join("cgroup.events"))?;
    Ok(keyed_value(&events, "frozen").map(|v| v == 1))
}

#[derive(Debug)]
enum FreezeError {
    /// The cgroup did not reach the state within the timeout.
    Timeout,
    Io(String, io::Error),
}

/// Writes `cgroup.freeze` and waits, on inotify, until cgroup.events reports the state.
/// Blocking. Writing the state the cgroup already has is fine (idempotent).
fn set_frozen(dir: &Path, frozen: bool, timeout: Duration) -> Result<(), FreezeError> {
    let events_file = dir.join("cgroup.events");
    let io_err = |what: &str, p: &Path| {
        let what = format!("{what} {}", p.display());
        move |e: io::Error| FreezeError::Io(what, e)
    };
    // Watch first, then write and check: no change can slip between the check and the wait.
    let inotify = Inotify::new(true).map_err(|e| FreezeError::Io("inotify_init1".into(), e))?;
    inotify
        .add_watch(&events_file, libc::IN_MODIFY)
        .map_err(io_err("watching", &events_file))?;
    let freeze_file = dir.join("cgroup.freeze");
    std::fs::write(&freeze_file, if frozen { "1" } else { "0" })
        .map_err(io_err("writing", &freeze_file))?;
    let deadline = Instant::now() + timeout;
    loop {
        if read_frozen(dir).map_err(io_err("reading", &events_file))? == Some(frozen) {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(FreezeError::Timeout);
        }
        if inotify
            .wait_readable(left)
            .map_err(io_err("waiting on", &events_file))?
        {
            // Drain; what changed is read from the file itself.
            while !inotify
                .read_events()
                .map_err(io_err("reading events of", &events_file))?
                .is_empty()
            {}
        }
    }
}

// ---- OOM events ----

struct Watched {
    id: String,
    file: PathBuf,
    /// oom_kill last seen.
    last: u64,
}

/// One inotify fd watching every container's memory.events, read by a dedicated thread, and
/// the queue of container ids GetOomEvent hands out, oldest first.
struct OomWatcher {
    inotify: Inotify,
    /// By watch descriptor. Held across inotify_add_watch so the thread never sees a wd
    /// before its entry.
    watches: Mutex<HashMap<i32, Watched>>,
    queue: Mutex<VecDeque<String>>,
    notify: Notify,
}

static OOM_WATCHER: OnceLock<Option<Arc<OomWatcher>>> = OnceLock::new();

/// The process-wide watcher, started on first use; None if it could not start (logged).
fn oom_watcher() -> Option<&'static Arc<OomWatcher>> {
    OOM_WATCHER
        .get_or_init(|| {
            OomWatcher::start()
                .inspect_err(|e| warning!("OOM events are unavailable: {e}"))
                .ok()
        })
        .as_ref()
}

impl OomWatcher {
    fn start() -> io::Result<Arc<OomWatcher>> {
        let w = Arc::new(OomWatcher {
            inotify: Inotify::new(false)?,
            watches: Mutex::new(HashMap::new()),
            queue: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
        });
        let thread = w.clone();
        std::thread::Builder::new()
            .name("oom-watch".into())
            .spawn(move || thread.run())?;
        Ok(w)
    }

    fn run(&self) {
        loop {
            let events = match self.inotify.read_events() {
                Ok(events) => events,
                Err(e) => {
                    warning!("OOM watcher: reading inotify events: {e}; no more OOM events");
                    return;
                }
            };
            for ev in events {
                if ev.mask & libc::IN_MODIFY != 0 {
                    self.check(ev.wd);
                }
                if ev.mask & libc::IN_IGNORED != 0 {
                    // The file went away (cgroup removed) or the watch was removed.
                    lock(&self.watches).remove(&ev.wd);
                }
            }
        }
    }

    /// Watches `file` (a memory.events) for container `id`, and reports OOM kills already
    /// counted (the cgroup is new, so any were the container's).
    fn register(&self, id: &str, file: PathBuf) -> io::Result<()> {
        let wd = {
            let mut watches = lock(&self.watches);
            let wd = self.inotify.add_watch(&file, libc::IN_MODIFY)?;
            watches.insert(
                wd,
                Watched {
                    id: id.to_string(),
                    file,
                    last: 0,
                },
            );
            wd
        };
        self.check(wd);
        Ok(())
    }

    /// Stops watching container `id`, after a last look at its counter.
    fn unregister(&self, id: &str) {
        let wds: Vec<i32> = lock(&self.watches)
            .iter()
            .filter(|(_, w)| w.id == id)
            .map(|(wd, _)| *wd)
            .collect();
        for wd in wds {
            self.check(wd);
            lock(&self.watches).remove(&wd);
            // EINVAL: already gone with its file.
            if let Err(e) = self.inotify.rm_watch(wd) {
                if e.raw_os_error() != Some(libc::EINVAL) {
                    debug!("container {id}: removing the memory.events watch: {e}");
                }
            }
        }
    }

    /// Re-reads the memory.events of watch `wd`; queues its container if oom_kill grew.
    fn check(&self, wd: i32) {
        let mut watches = lock(&self.watches);
        let Some(w) = watches.get_mut(&wd) else {
            return;
        };
        // A truncated read mid-update or a vanished file is not news.
        let Some(kills) = std::fs::read_to_string(&w.file)
            .ok()
            .as_deref()
            .and_then(oom_kills)
        else {
            return;
        };
        if kills > w.last {
            info!("container {}: OOM kill (oom_kill {kills})", w.id);
            let id = w.id.clone();
            w.last = kills;
            drop(watches);
            self.push(id);
        } else {
            w.last = kills;
        }
    }

    fn push(&self, id: String) {
        let mut q = lock(&self.queue);
        if q.len() >= OOM_QUEUE_MAX {
            if let Some(old) = q.pop_front() {
                warning!("OOM event queue full: dropping the event of container {old}");
            }
        }
        q.push_back(id);
        drop(q);
        // Stores a permit if nobody waits: no wakeup is lost.
        self.notify.notify_one();
    }

    /// The next queued container id, oldest first.
    async fn next(&self) -> String {
        loop {
            let popped = {
                let mut q = lock(&self.queue);
                q.pop_front().map(|id| (id, !q.is_empty()))
            };
            if let Some((id, more)) = popped {
                if more {
                    self.notify.notify_one();
                }
                return id;
            }
            self.notify.notified().await;
        }
    }
}

/// Called once a container is created (its cgroup exists): starts what watches it.
pub(super) fn on_created(c: &Arc<Container>) {
    let Some(w) = oom_watcher() else {
        return;
    };
    let file = c.cgroup.path().join("memory.events");
    if let Err(e) = w.register(&c.id, file.clone()) {
        warning!(
            "container {}: no OOM events: watching {}: {e}",
            c.id,
            file.display()
        );
    }
}

/// Called when a container is removed, before its cgroup goes.
pub(super) fn on_removed(c: &Arc<Container>) {
    if let Some(w) = OOM_WATCHER.get().and_then(Option::as_ref) {
        w.unregister(&c.id);
    }
}

// ---- the RPCs ----

fn internal(id: &str, what: &str, e: &dyn std::fmt::Display) -> RpcError {
    RpcError::new(Code::INTERNAL, format!("container {id:?}: {what}: {e}"))
}

/// Writes the cgroup files of an update. Blocking.
fn write_limits(id: &str, dir: &Path, files: &[(String, String)]) -> RpcResult<()> {
    for (file, value) in files {
        let p = dir.join(file);
        if let Err(e) = std::fs::write(&p, value) {
            let missing = e.kind() == io::ErrorKind::NotFound;
            if missing && file == "memory.swap.max" {
                warning!(
                    "container {id}: {} missing (no swap accounting); ignored",
                    p.display()
                );
                continue;
            }
            let code = match e.raw_os_error() {
                _ if missing => Code::INVALID_ARGUMENT,
                Some(libc::EINVAL | libc::ERANGE | libc::EBUSY | libc::EACCES) => {
                    Code::INVALID_ARGUMENT
                }
                _ => Code::INTERNAL,
            };
            let why = if missing {
                "no such cgroup file (unknown, or its controller is not enabled)".to_string()
            } else {
                e.to_string()
            };
            return Err(RpcError::new(
                code,
                format!("container {id:?}: setting {file} = {value:?}: {why}"),
            ));
        }
    }
    Ok(())
}

impl Manager {
    /// StatsContainer: the cgroup v2 files, by name.
    pub async fn stats(&self, id: &str) -> RpcResult<HashMap<String, String>> {
        let c = self.get(id)?;
        let dir = c.cgroup.path().to_path_buf();
        match tokio::task::spawn_blocking(move || read_stats(&dir)).await {
            Ok(Ok(files)) => Ok(files),
            Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => Err(RpcError::new(
                Code::NOT_FOUND,
                format!("container {id:?}: cgroup: {e}"),
            )),
            Ok(Err(e)) => Err(internal(id, "reading the cgroup", &e)),
            Err(e) => Err(internal(id, "stats task", &e)),
        }
    }

    pub async fn pause(&self, id: &str) -> RpcResult<()> {
        self.freeze(id, true).await
    }

    pub async fn resume(&self, id: &str) -> RpcResult<()> {
        self.freeze(id, false).await
    }

    async fn freeze(&self, id: &str, frozen: bool) -> RpcResult<()> {
        let c = self.get(id)?;
        let verb = if frozen { "pause" } else { "resume" };
        // Resuming stays allowed: it thaws whatever is left.
        if frozen && c.has_exited() {
            return Err(RpcError::new(
                Code::FAILED_PRECONDITION,
                format!("container {id:?}: cannot pause: the process has already exited"),
            ));
        }
        let dir = c.cgroup.path().to_path_buf();
        let result = tokio::task::spawn_blocking(move || {
            let r = set_frozen(&dir, frozen, FREEZE_TIMEOUT);
            if frozen && matches!(r, Err(FreezeError::Timeout)) {
                // Do not leave it half-frozen.
                let _ = std::fs::write(dir.join("cgroup.freeze"), "0");
            }
            r
        })
        .await
        .map_err(|e| internal(id, &format!("{verb} task"), &e))?;
        match result {
            Ok(()) => {
                info!(
                    "container {id}: {}",
                    if frozen { "paused" } else { "resumed" }
                );
                Ok(())
            }
            Err(FreezeError::Timeout) => Err(RpcError::new(
                Code::DEADLINE_EXCEEDED,
                format!(
                    "container {id:?}: {verb}: the cgroup did not report frozen {} within {}s",
                    u8::from(frozen),
                    FREEZE_TIMEOUT.as_secs()
                ),
            )),
            Err(FreezeError::Io(what, e)) => {
                let code = if e.kind() == io::ErrorKind::NotFound {
                    // No cgroup.freeze (kernel < 5.2) or the cgroup is gone.
                    Code::FAILED_PRECONDITION
                } else {
                    Code::INTERNAL
                };
                Err(RpcError::new(
                    code,
                    format!("container {id:?}: {verb}: {what}: {e}"),
                ))
            }
        }
    }

    /// UpdateContainer: `resources` is OCI linux.resources as JSON.
    pub async fn update(&self, id: &str, resources: &[u8]) -> RpcResult<()> {
        let c = self.get(id)?;
        let invalid = |what: String| {
            RpcError::new(
                Code::INVALID_ARGUMENT,
                format!("container {id:?}: update: {what}"),
            )
        };
        if resources.iter().all(u8::is_ascii_whitespace) {
            return Err(invalid("no linux.resources given".into()));
        }
        let r: Resources = serde_json::from_slice(resources)
            .map_err(|e| invalid(format!("linux.resources: {e}")))?;
        let files = cgroup::limits(&r).map_err(|e| invalid(format!("linux.resources: {e:#}")))?;
        if !r.devices.is_empty() {
            // As runc's update: the device rules stay those of the create (containerd's CRI
            // sends the whole resources object, devices included, with every update).
            warning!("container {id}: update: linux.resources.devices left as created");
        }
        for w in cgroup::unapplied(&r) {
            warning!("container {id}: update: {w}");
        }
        if files.is_empty() {
            return Ok(());
        }
        let summary = files
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ");
        let dir = c.cgroup.path().to_path_buf();
        let owned_id = id.to_string();
        tokio::task::spawn_blocking(move || {
            let vm = VmCapacity::read()
                .map_err(|e| internal(&owned_id, "reading the VM's capacity", &format!("{e:#}")))?;
            cgroup::check_fits(&r, vm).map_err(|e| {
                RpcError::new(
                    Code::INVALID_ARGUMENT,
                    format!("container {owned_id:?}: update: {e:#}"),
                )
            })?;
            write_limits(&owned_id, &dir, &files)
        })
        .await
        .map_err(|e| internal(id, "update task", &e))??;
        info!("container {id}: updated {summary}");
        Ok(())
    }

    /// GetOomEvent: the id of the next container whose cgroup recorded an OOM kill.
    pub async fn next_oom_event(&self) -> RpcResult<String> {
        match oom_watcher() {
            Some(w) => Ok(w.next().await),
            // Logged when it failed to start: there will be no events.
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn keyed_files() {
        let events = "low 0\nhigh 3\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(oom_kills(events), Some(1));
        assert_eq!(keyed_value(events, "oom"), Some(2));
        assert_eq!(keyed_value(events, "max"), Some(12));
        assert_eq!(oom_kills("low 0\noom 4\n"), None);
        assert_eq!(oom_kills(""), None);
        assert_eq!(oom_kills("oom_kill x\n"), None);
        assert_eq!(keyed_value("populated 1\nfrozen 1\n", "frozen"), Some(1));
    }

    #[test]
    fn inotify_records() {
        let header = std::mem::size_of::<libc::inotify_event>();
        let mut buf = Vec::new();
        for (wd, mask, name_len) in [(3i32, libc::IN_MODIFY, 0u32), (7, libc::IN_IGNORED, 16)] {
            let ev = libc::inotify_event {
                wd,
                mask,
                cookie: 0,
                len: name_len,
            };
            // SAFETY: test; viewing a POD struct as bytes.
            let bytes =
                unsafe { std::slice::from_raw_parts(std::ptr::addr_of!(ev).cast::<u8>(), header) };
            buf.extend_from_slice(bytes);
            buf.extend(std::iter::repeat_n(0u8, name_len as usize));
        }
        let evs = parse_events(&buf);
        assert_eq!(evs.len(), 2);
        assert_eq!((evs[0].wd, evs[0].mask), (3, libc::IN_MODIFY));
        assert_eq!((evs[1].wd, evs[1].mask), (7, libc::IN_IGNORED));
        assert!(parse_events(&buf[..header - 1]).is_empty());
    }

    fn scratch_dir(tag: &str) -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "spinbox-ops-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    async fn next_within(w: &OomWatcher, ms: u64) -> Option<String> {
        tokio::time::timeout(Duration::from_millis(ms), w.next())
            .await
            .ok()
    }

    /// The watcher on plain files: writing a file raises IN_MODIFY as the kernel does for
    /// memory.events.
    #[tokio::test]
    async fn oom_watcher_on_files() {
        let dir = scratch_dir("oom");
        let a = dir.join("a.events");
        let b = dir.join("b.events");
        std::fs::write(&a, "low 0\noom 0\noom_kill 0\n").unwrap();
        // Kills counted before registration are reported once.
        std::fs::write(&b, "oom 2\noom_kill 2\n").unwrap();
        let w = OomWatcher::start().unwrap();
        w.register("a", a.clone()).unwrap();
        w.register("b", b.clone()).unwrap();
        assert_eq!(next_within(&w, 2000).await.as_deref(), Some("b"));
        assert_eq!(next_within(&w, 200).await, None);

        // `oom` alone is not a kill.
        std::fs::write(&a, "low 0\noom 1\noom_kill 0\n").unwrap();
        assert_eq!(next_within(&w, 300).await, None);
        std::fs::write(&a, "low 0\noom 2\noom_kill 1\n").unwrap();
        assert_eq!(next_within(&w, 2000).await.as_deref(), Some("a"));
        // Rewritten with the same count: nothing new.
        std::fs::write(&a, "low 1\noom 2\noom_kill 1\n").unwrap();
        assert_eq!(next_within(&w, 300).await, None);

        // Queued in order.
        std::fs::write(&b, "oom 3\noom_kill 3\n").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        std::fs::write(&a, "oom 3\noom_kill 2\n").unwrap();
        assert_eq!(next_within(&w, 2000).await.as_deref(), Some("b"));
        assert_eq!(next_within(&w, 2000).await.as_deref(), Some("a"));

        // Unregistered: no more events (a last increase seen at removal is reported).
        w.unregister("a");
        std::fs::write(&a, "oom 9\noom_kill 9\n").unwrap();
        assert_eq!(next_within(&w, 300).await, None);
        assert!(lock(&w.watches).values().all(|x| x.id != "a"));

        // A removed file drops its watch.
        std::fs::remove_file(&b).unwrap();
        for _ in 0..100 {
            if lock(&w.watches).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(lock(&w.watches).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn oom_queue_wakes_waiters() {
        let w = OomWatcher::start().unwrap();
        let w2 = w.clone();
        let waiter = tokio::spawn(async move { w2.next().await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        w.push("x".into());
        w.push("y".into());
        let first = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first, "x");
        assert_eq!(next_within(&w, 1000).await.as_deref(), Some("y"));
        for i in 0..OOM_QUEUE_MAX + 2 {
            w.push(i.to_string());
        }
        assert_eq!(lock(&w.queue).len(), OOM_QUEUE_MAX);
        assert_eq!(next_within(&w, 1000).await.as_deref(), Some("2"));
    }

    /// A scratch cgroup v2 directory, removed (its processes killed) on drop.
    struct ScratchCgroup {
        path: PathBuf,
        child: Option<Child>,
    }

    impl ScratchCgroup {
        /// None (with the reason printed) where this host has no usable cgroup v2.
        fn new(tag: &str) -> Option<ScratchCgroup> {
            let root = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
                .into_iter()
                .map(Path::new)
                .find(|r| r.join("cgroup.controllers").exists());
            let Some(root) = root else {
                eprintln!("skipped: no cgroup v2 hierarchy at /sys/fs/cgroup(/unified)");
                return None;
            };
            let path = root.join(format!("spinbox-agent-test-{}-{tag}", std::process::id()));
            if let Err(e) = std::fs::create_dir(&path) {
                eprintln!("skipped: mkdir {}: {e}", path.display());
                return None;
            }
            let cg = ScratchCgroup { path, child: None };
            if !cg.path.join("cgroup.freeze").exists() {
                eprintln!("skipped: no cgroup.freeze (kernel without the v2 freezer)");
                return None;
            }
            Some(cg)
        }

        /// Moves a `sleep` into the cgroup; false (reason printed) if not allowed.
        fn add_sleeper(&mut self) -> bool {
            let child = Command::new("sleep").arg("60").spawn().unwrap();
            let pid = child.id();
            self.child = Some(child);
            match std::fs::write(self.path.join("cgroup.procs"), pid.to_string()) {
                Ok(()) => true,
                Err(e) => {
                    eprintln!(
                        "skipped: moving pid {pid} into {}: {e}",
                        self.path.display()
                    );
                    false
                }
            }
        }

        fn pid_state(&self) -> Option<String> {
            let pid = self.child.as_ref()?.id();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            Some(stat.rsplit_once(") ")?.1.split(' ').next()?.to_string())
        }
    }

    impl Drop for ScratchCgroup {
        fn drop(&mut self) {
            let _ = std::fs::write(self.path.join("cgroup.freeze"), "0");
            let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            for _ in 0..100 {
                match std::fs::remove_dir(&self.path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    _ => return,
                }
            }
            eprintln!("could not remove {}", self.path.display());
        }
    }

    #[test]
    fn freeze_empty_cgroup() {
        let Some(cg) = ScratchCgroup::new("empty") else {
            return;
        };
        let t = Duration::from_secs(5);
        set_frozen(&cg.path, true, t).unwrap();
        assert_eq!(read_frozen(&cg.path).unwrap(), Some(true));
        set_frozen(&cg.path, true, t).unwrap();
        set_frozen(&cg.path, false, t).unwrap();
        assert_eq!(read_frozen(&cg.path).unwrap(), Some(false));
        set_frozen(&cg.path, false, t).unwrap();

        let stats = read_stats(&cg.path).unwrap();
        assert_eq!(stats.get("cgroup.freeze").map(|s| s.trim()), Some("0"));
        assert!(stats.contains_key("cgroup.events"));
        assert!(!stats.contains_key("no.such"));
    }

    #[test]
    fn freeze_cgroup_with_a_process() {
        let Some(mut cg) = ScratchCgroup::new("sleeper") else {
            return;
        };
        if !cg.add_sleeper() {
            return;
        }
        let t = Duration::from_secs(5);
        set_frozen(&cg.path, true, t).unwrap();
        assert_eq!(read_frozen(&cg.path).unwrap(), Some(true));
        // A frozen task sleeps in the freezer (state S or D), it is not running.
        assert!(matches!(cg.pid_state().as_deref(), Some("S" | "D")));
        set_frozen(&cg.path, true, t).unwrap();
        set_frozen(&cg.path, false, t).unwrap();
        assert_eq!(read_frozen(&cg.path).unwrap(), Some(false));
    }

    #[test]
    fn freeze_errors() {
        let dir = scratch_dir("nocg");
        match set_frozen(&dir, true, Duration::from_millis(100)) {
            Err(FreezeError::Io(what, e)) => {
                assert!(what.contains("cgroup.events"), "{what}");
                assert_eq!(e.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("{other:?}"),
        }
        // A plain file that never says "frozen 1": the bounded wait times out.
        std::fs::write(dir.join("cgroup.events"), "populated 0\nfrozen 0\n").unwrap();
        let start = Instant::now();
        assert!(matches!(
            set_frozen(&dir, true, Duration::from_millis(200)),
            Err(FreezeError::Timeout)
        ));
        assert!(start.elapsed() >= Duration::from_millis(200));
        // ...and a change it is told of ends the wait.
        let d2 = dir.clone();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            std::fs::write(d2.join("cgroup.events"), "populated 0\nfrozen 1\n").unwrap();
        });
        set_frozen(&dir, true, Duration::from_secs(5)).unwrap();
        writer.join().unwrap();
        assert!(matches!(
            read_stats(&dir.join("missing")),
            Err(e) if e.kind() == io::ErrorKind::NotFound
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
