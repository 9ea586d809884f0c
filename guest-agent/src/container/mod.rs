//! Containers in the guest: the registry behind the container RPCs.
//!
//! CreateContainer assembles the root filesystem, writes the host's file copies ([`files`]),
//! creates the cgroup and clones a container-init ([`child`]) into new namespaces; it returns
//! once that process has done the whole OCI setup and waits for the start byte. StartProcess sends the byte and returns once
//! the execve succeeded (or with its error). The exit is collected by PID 1's reaper and
//! published, once stdout/stderr were flushed to the host, to every WaitProcess.
//!
//! Locks: `Manager::state` and each container's small std mutexes are held only for map or
//! field updates, never across an await; the status pipe's tokio mutex serialises its readers
//! (CreateContainer, then StartProcess).

pub mod caps;
pub mod cgroup;
pub mod child;
pub mod files;
pub mod launch;
pub mod rootfs;
pub mod spec;
pub mod stdio;

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd as _, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use spinbox_agent_api::agent::CreateContainerRequest;
use spinbox_agent_api::StdioStream;
use tokio::io::AsyncReadExt as _;
use tokio::net::unix::pipe;
use tokio::sync::{oneshot, watch, Notify};
use tokio::task::AbortHandle;
use ttrpc::Code;

use self::cgroup::Cgroup;
use self::rootfs::MountedRootfs;
use self::stdio::StdioConn;
use crate::log::{debug, info, warning};
use crate::reaper::ExitInfo;

/// How long container-init may take to set up before CreateContainer gives up.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long StartProcess waits for the execve's outcome.
const EXEC_TIMEOUT: Duration = Duration::from_secs(30);
/// RemoveContainer: wait for the killed init, then for the output pumps.
const KILL_WAIT: Duration = Duration::from_secs(10);
const DRAIN_WAIT: Duration = Duration::from_secs(2);

/// An RPC failure: a ttrpc status code and a message naming what failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub code: Code,
    pub message: String,
}

impl RpcError {
    pub fn new(code: Code, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
        }
    }
}

impl From<RpcError> for ttrpc::Error {
    fn from(e: RpcError) -> ttrpc::Error {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code, e.message))
    }
}

type RpcResult<T> = Result<T, RpcError>;

/// Exec processes are a later step; every RPC names the init process with exec_id "".
fn init_only(id: &str, exec_id: &str) -> RpcResult<()> {
    if exec_id.is_empty() {
        Ok(())
    } else {
        Err(RpcError::new(
            Code::UNIMPLEMENTED,
            format!("container {id:?}: exec {exec_id:?}: exec processes are not supported yet"),
        ))
    }
}

/// The code for a container-init error: a missing executable is NOT_FOUND.
fn setup_error_code(message: &str) -> Code {
    if message.contains("exec \"")
        && (message.contains("not found") || message.contains("No such file"))
    {
        Code::NOT_FOUND
    } else {
        Code::FAILED_PRECONDITION
    }
}

/// The read end of container-init's status pipe, read line by line.
struct StatusPipe {
    rx: pipe::Receiver,
    buf: Vec<u8>,
}

impl StatusPipe {
    /// The next line, or None at EOF (no more writers: the execve succeeded or the process
    /// is gone).
    async fn next_line(&mut self) -> std::io::Result<Option<String>> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Ok(Some(
                    String::from_utf8_lossy(&line[..line.len() - 1]).into_owned(),
                ));
            }
            let mut chunk = [0u8; 4096];
            let n = self.rx.read(&mut chunk).await?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                let line = String::from_utf8_lossy(&self.buf).into_owned();
                self.buf.clear();
                return Ok(Some(line));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

struct Container {
    id: String,
    pid: i32,
    pidfd: OwnedFd,
    cgroup: Cgroup,
    rootfs: Mutex<Option<MountedRootfs>>,
    /// Write end of the start pipe, until StartProcess uses it.
    start: Mutex<Option<OwnedFd>>,
    status: tokio::sync::Mutex<StatusPipe>,
    /// Streams requested and not yet connected (StdioStream is not Hash; at most three).
    slots: Mutex<Vec<(StdioStream, oneshot::Sender<StdioConn>)>>,
    stdin_close: Arc<Notify>,
    /// Set when the init was reaped.
    reaped: watch::Receiver<Option<ExitInfo>>,
    /// Set once reaped and its output flushed: what WaitProcess reports.
    exited: watch::Receiver<Option<ExitInfo>>,
    tasks: Vec<AbortHandle>,
}

fn take_slot(c: &Container, stream: StdioStream) -> Option<oneshot::Sender<StdioConn>> {
    let mut slots = lock(&c.slots);
    let i = slots.iter().position(|(s, _)| *s == stream)?;
    Some(slots.swap_remove(i).1)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Container {
    fn has_exited(&self) -> bool {
        self.reaped.borrow().is_some()
    }
}

#[derive(Default)]
struct State {
    containers: HashMap<String, Arc<Container>>,
    /// Ids whose CreateContainer is in progress.
    creating: HashSet<String>,
}

#[derive(Default)]
pub struct Manager {
    state: Mutex<State>,
}

/// Undoes a half-made container when CreateContainer fails.
struct Rollback {
    rootfs: Option<MountedRootfs>,
    cgroup: Option<Cgroup>,
    /// The container id whose file copies to delete.
    files_of: Option<String>,
}

impl Rollback {
    async fn run(mut self) {
        let rootfs = self.rootfs.take();
        let cgroup = self.cgroup.take();
        let files_of = self.files_of.take();
        let problems = tokio::task::spawn_blocking(move || {
            let mut problems = Vec::new();
            if let Some(cg) = cgroup {
                cg.kill();
                problems.extend(cg.remove(Duration::from_secs(2)));
            }
            // Before the rootfs: its teardown removes the container's directory.
            if let Some(id) = files_of {
                problems.extend(files::remove(&id));
            }
            if let Some(mut r) = rootfs {
                problems.extend(r.teardown());
            }
            problems
        })
        .await
        .unwrap_or_else(|e| vec![format!("rollback task: {e}")]);
        for p in problems {
            warning!("rolling back: {p}");
        }
    }
}

fn pipe_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)
}

fn dev_null(write: bool) -> std::io::Result<OwnedFd> {
    let f = std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .open("/dev/null")?;
    Ok(f.into())
}

impl Manager {
    pub fn new() -> Arc<Manager> {
        Arc::new(Manager::default())
    }

    fn get(&self, id: &str) -> RpcResult<Arc<Container>> {
        lock(&self.state)
            .containers
            .get(id)
            .cloned()
            .ok_or_else(|| RpcError::new(Code::NOT_FOUND, format!("container {id:?} not found")))
    }

    /// CreateContainer: returns the init's pid.
    pub async fn create(&self, req: CreateContainerRequest) -> RpcResult<u32> {
        let id = req.container_id.clone();
        rootfs::validate_id(&id)
            .map_err(|e| RpcError::new(Code::INVALID_ARGUMENT, e.to_string()))?;
        {
            let mut st = lock(&self.state);
            if st.containers.contains_key(&id) || st.creating.contains(&id) {
                return Err(RpcError::new(
                    Code::ALREADY_EXISTS,
                    format!("container {id:?} already exists"),
                ));
            }
            st.creating.insert(id.clone());
        }
        let result = self.create_inner(&req).await;
        let mut st = lock(&self.state);
        st.creating.remove(&id);
        let container =
            result.inspect_err(|e| warning!("container {id}: create failed: {}", e.message))?;
        let pid = container.pid;
        st.containers.insert(id.clone(), container);
        info!("container {id}: created (pid {pid})");
        Ok(u32::try_from(pid).unwrap_or(0))
    }

    async fn create_inner(&self, req: &CreateContainerRequest) -> RpcResult<Arc<Container>> {
        let id = req.container_id.as_str();
        let invalid = |e: anyhow::Error| {
            RpcError::new(Code::INVALID_ARGUMENT, format!("container {id:?}: {e:#}"))
        };
        if req.terminal {
            return Err(RpcError::new(
                Code::UNIMPLEMENTED,
                format!("container {id:?}: terminal (TTY) is not supported yet"),
            ));
        }
        let Some(rootfs_req) = req.rootfs.as_ref() else {
            return Err(invalid(anyhow::anyhow!("no rootfs given")));
        };
        files::validate(&req.files).map_err(invalid)?;
        let spec = spec::parse_spec(&req.oci_spec).map_err(invalid)?;
        let rootfs_path = Path::new(rootfs::CONTAINERS_DIR).join(id).join("rootfs");
        let rootfs_str = rootfs_path.display().to_string();
        let file_copies = files::guest_paths(id, &req.files);
        let plan = spec::plan(
            id,
            &spec,
            &spec::PlanContext {
                rootfs: &rootfs_str,
                rootfs_ro: rootfs_req.read_only,
                share_vm_network: req.share_vm_network,
                file_copies: &file_copies,
                source_exists: &|p| Path::new(p).exists(),
            },
        )
        .map_err(invalid)?;
        for w in &plan.warnings {
            warning!("container {id}: {w}");
        }

        let mounted = rootfs::assemble(id, rootfs_req).await.map_err(|e| {
            RpcError::new(
                Code::FAILED_PRECONDITION,
                format!("container {id:?}: rootfs: {e:#}"),
            )
        })?;
        let mut rollback = Rollback {
            rootfs: Some(mounted),
            cgroup: None,
            files_of: None,
        };
        if !req.files.is_empty() {
            // Written into the container's directory, which assemble() just made.
            rollback.files_of = Some(id.to_string());
            let (copy_id, copies) = (id.to_string(), req.files.clone());
            let written = tokio::task::spawn_blocking(move || files::write(&copy_id, &copies))
                .await
                .map_err(|e| anyhow::anyhow!("file copies task: {e}"))
                .and_then(|r| r);
            if let Err(e) = written {
                rollback.run().await;
                return Err(RpcError::new(
                    Code::INTERNAL,
                    format!("container {id:?}: file copies: {e:#}"),
                ));
            }
            debug!("container {id}: {} file copies written", req.files.len());
        }
        match self.launch(id, req, &plan, &mut rollback).await {
            Ok(c) => Ok(c),
            Err(e) => {
                rollback.run().await;
                Err(e)
            }
        }
    }

    async fn launch(
        &self,
        id: &str,
        req: &CreateContainerRequest,
        plan: &spec::ContainerPlan,
        rollback: &mut Rollback,
    ) -> RpcResult<Arc<Container>> {
        let internal = |what: &str, e: &dyn std::fmt::Display| {
            RpcError::new(Code::INTERNAL, format!("container {id:?}: {what}: {e}"))
        };
        let limits = plan.cgroup_limits.clone();
        let cg_id = id.to_string();
        let cgroup = tokio::task::spawn_blocking(move || Cgroup::create(&cg_id, &limits))
            .await
            .map_err(|e| internal("cgroup task", &e))?
            .map_err(|e| {
                RpcError::new(
                    Code::FAILED_PRECONDITION,
                    format!("container {id:?}: cgroup: {e:#}"),
                )
            })?;
        let cgroup_dir = cgroup
            .open_dir()
            .map_err(|e| internal("cgroup", &format!("{e:#}")))?;
        rollback.cgroup = Some(cgroup);

        let io = |what: &'static str| move |e: std::io::Error| internal(what, &e);
        let mut keep_stdin = None;
        let mut keep_out = Vec::new();
        let child_stdin = if req.stdin {
            let (r, w) = pipe_pair().map_err(io("stdin pipe"))?;
            keep_stdin = Some(pipe::Sender::from_owned_fd(w).map_err(io("stdin pipe"))?);
            r
        } else {
            dev_null(false).map_err(io("/dev/null"))?
        };
        let mut output = |wanted: bool, stream: StdioStream| -> RpcResult<OwnedFd> {
            if wanted {
                let (r, w) = pipe_pair().map_err(io("output pipe"))?;
                keep_out.push((
                    stream,
                    pipe::Receiver::from_owned_fd(r).map_err(io("output pipe"))?,
                ));
                Ok(w)
            } else {
                dev_null(true).map_err(io("/dev/null"))
            }
        };
        let child_stdout = output(req.stdout, StdioStream::Stdout)?;
        let child_stderr = output(req.stderr, StdioStream::Stderr)?;
        let (start_r, start_w) = pipe_pair().map_err(io("start pipe"))?;
        let (status_r, status_w) = pipe_pair().map_err(io("status pipe"))?;
        let status_rx = pipe::Receiver::from_owned_fd(status_r).map_err(io("status pipe"))?;
        let json =
            serde_json::to_vec(&plan.init).map_err(|e| internal("encoding the init config", &e))?;

        let mut ns =
            libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
        if plan.init.new_net_ns {
            ns |= libc::CLONE_NEWNET;
        }
        let launched = launch::spawn(
            &json,
            launch::ChildFds {
                stdin: child_stdin,
                stdout: child_stdout,
                stderr: child_stderr,
                start: start_r,
                status: status_w,
            },
            u64::try_from(ns).unwrap_or(0),
            Some(cgroup_dir.as_fd()),
        )
        .map_err(|e| internal("starting container-init", &format!("{e:#}")))?;
        drop(cgroup_dir);
        let pid = launched.pid;
        debug!("container {id}: container-init is pid {pid}");

        let mut status = StatusPipe {
            rx: status_rx,
            buf: Vec::new(),
        };
        let outcome = tokio::time::timeout(SETUP_TIMEOUT, status.next_line()).await;
        let failure = match outcome {
            Ok(Ok(Some(line))) if line == "READY" => None,
            Ok(Ok(Some(line))) => Some(match line.strip_prefix("ERROR ") {
                Some(msg) => RpcError::new(setup_error_code(msg), msg.to_string()),
                None => internal("container-init", &format!("unexpected status {line:?}")),
            }),
            Ok(Ok(None)) => Some(internal(
                "container-init",
                &"exited during setup without a word",
            )),
            Ok(Err(e)) => Some(internal("reading container-init's status", &e)),
            Err(_) => Some(internal(
                "container-init",
                &format!("no answer within {}s", SETUP_TIMEOUT.as_secs()),
            )),
        };
        if let Some(err) = failure {
            let _ = launch::pidfd_signal(launched.pidfd.as_fd(), libc::SIGKILL);
            let _ = tokio::time::timeout(KILL_WAIT, launched.exit).await;
            return Err(err);
        }

        // Set up: wire stdio and the exit publisher.
        let stdin_close = Arc::new(Notify::new());
        let mut slots = Vec::new();
        let mut tasks = Vec::new();
        if let Some(w) = keep_stdin {
            let (tx, rx) = oneshot::channel();
            slots.push((StdioStream::Stdin, tx));
            let label = stdio::label(id, StdioStream::Stdin);
            let close = stdin_close.clone();
            let h = tokio::spawn(async move { stdio::pump_input(w, rx, close, &label).await });
            tasks.push(h.abort_handle());
        }
        let mut output_pumps = Vec::new();
        for (stream, r) in keep_out {
            let (tx, rx) = oneshot::channel();
            slots.push((stream, tx));
            let label = stdio::label(id, stream);
            let h = tokio::spawn(async move { stdio::pump_output(r, rx, &label).await });
            tasks.push(h.abort_handle());
            output_pumps.push(h);
        }
        let (reaped_tx, reaped_rx) = watch::channel(None);
        let (exited_tx, exited_rx) = watch::channel(None);
        let exit = launched.exit;
        let label = id.to_string();
        tokio::spawn(async move {
            let Ok(info) = exit.await else {
                warning!("container {label}: the reaper dropped its exit");
                return;
            };
            reaped_tx.send_replace(Some(info));
            for p in output_pumps {
                let _ = p.await;
            }
            info!("container {label}: exited with status {}", info.status);
            exited_tx.send_replace(Some(info));
        });

        let Some(cgroup) = rollback.cgroup.take() else {
            return Err(internal("cgroup", &"lost"));
        };
        Ok(Arc::new(Container {
            id: id.to_string(),
            pid,
            pidfd: launched.pidfd,
            cgroup,
            rootfs: Mutex::new(rollback.rootfs.take()),
            start: Mutex::new(Some(start_w)),
            status: tokio::sync::Mutex::new(status),
            slots: Mutex::new(slots),
            stdin_close,
            reaped: reaped_rx,
            exited: exited_rx,
            tasks,
        }))
    }

    /// StartProcess: lets the init exec; returns its pid, or the exec's error.
    pub async fn start(&self, id: &str, exec_id: &str) -> RpcResult<u32> {
        init_only(id, exec_id)?;
        let c = self.get(id)?;
        if c.has_exited() {
            return Err(RpcError::new(
                Code::FAILED_PRECONDITION,
                format!("container {id:?}: the process has already exited"),
            ));
        }
        let Some(start) = lock(&c.start).take() else {
            return Err(RpcError::new(
                Code::FAILED_PRECONDITION,
                format!("container {id:?}: already started"),
            ));
        };
        // One byte into an empty pipe never blocks.
        if let Err(e) = nix::unistd::write(&start, &[1]) {
            return Err(RpcError::new(
                Code::FAILED_PRECONDITION,
                format!("container {id:?}: signalling start: {e} (container-init is gone)"),
            ));
        }
        drop(start);
        let mut status = c.status.lock().await;
        match tokio::time::timeout(EXEC_TIMEOUT, status.next_line()).await {
            Ok(Ok(None)) => {
                info!("container {id}: started (pid {})", c.pid);
                Ok(u32::try_from(c.pid).unwrap_or(0))
            }
            Ok(Ok(Some(line))) => {
                let msg = line.strip_prefix("ERROR ").unwrap_or(&line).to_string();
                warning!("container {id}: start failed: {msg}");
                Err(RpcError::new(setup_error_code(&msg), msg))
            }
            Ok(Err(e)) => Err(RpcError::new(
                Code::INTERNAL,
                format!("container {id:?}: reading the exec status: {e}"),
            )),
            Err(_) => Err(RpcError::new(
                Code::DEADLINE_EXCEEDED,
                format!(
                    "container {id:?}: exec did not complete within {}s",
                    EXEC_TIMEOUT.as_secs()
                ),
            )),
        }
    }

    /// WaitProcess: the exit, once the output was flushed.
    pub async fn wait(&self, id: &str, exec_id: &str) -> RpcResult<ExitInfo> {
        init_only(id, exec_id)?;
        let mut exited = self.get(id)?.exited.clone();
        let result = exited.wait_for(|v| v.is_some()).await.map(|v| *v);
        match result {
            Ok(Some(info)) => Ok(info),
            _ => Err(RpcError::new(
                Code::ABORTED,
                format!("container {id:?}: removed before its exit was known"),
            )),
        }
    }

    /// SignalProcess.
    pub fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> RpcResult<()> {
        init_only(id, exec_id)?;
        let c = self.get(id)?;
        let sig = i32::try_from(signal)
            .ok()
            .filter(|s| (1..=libc::SIGRTMAX()).contains(s))
            .ok_or_else(|| {
                RpcError::new(
                    Code::INVALID_ARGUMENT,
                    format!("container {id:?}: bad signal {signal}"),
                )
            })?;
        if c.has_exited() {
            return Err(RpcError::new(
                Code::NOT_FOUND,
                format!("container {id:?}: the process has already exited"),
            ));
        }
        if all {
            for pid in c.cgroup.procs() {
                if i32::try_from(pid).ok() == Some(c.pid) {
                    continue;
                }
                if let Ok(p) = i32::try_from(pid) {
                    // SAFETY: kill(2) with a pid and a signal number.
                    unsafe { libc::kill(p, sig) };
                }
            }
        }
        match launch::pidfd_signal(c.pidfd.as_fd(), sig) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                if all {
                    Ok(())
                } else {
                    Err(RpcError::new(
                        Code::NOT_FOUND,
                        format!("container {id:?}: the process has already exited"),
                    ))
                }
            }
            Err(e) => Err(RpcError::new(
                Code::INTERNAL,
                format!("container {id:?}: signal {sig}: {e}"),
            )),
        }
    }

    /// CloseStdin.
    pub fn close_stdin(&self, id: &str, exec_id: &str) -> RpcResult<()> {
        init_only(id, exec_id)?;
        let c = self.get(id)?;
        // A stream not yet connected never will be: drop its slot so the pump ends.
        take_slot(&c, StdioStream::Stdin);
        c.stdin_close.notify_one();
        Ok(())
    }

    /// ListPids: the container cgroup's processes.
    pub fn list_pids(&self, id: &str, exec_id: &str) -> RpcResult<Vec<u32>> {
        init_only(id, exec_id)?;
        let c = self.get(id)?;
        Ok(c.cgroup.procs())
    }

    /// RemoveContainer: kill what is left, wait for it, unmount, forget. Idempotent.
    pub async fn remove(&self, id: &str, exec_id: &str) -> RpcResult<()> {
        init_only(id, exec_id)?;
        let Ok(c) = self.get(id) else {
            return Ok(());
        };
        let mut problems = Vec::new();
        if !c.has_exited() {
            c.cgroup.kill();
            let _ = launch::pidfd_signal(c.pidfd.as_fd(), libc::SIGKILL);
            let mut reaped = c.reaped.clone();
            if tokio::time::timeout(KILL_WAIT, reaped.wait_for(|v| v.is_some()))
                .await
                .is_err()
            {
                problems.push(format!(
                    "the init (pid {}) did not die within {}s of SIGKILL",
                    c.pid,
                    KILL_WAIT.as_secs()
                ));
            }
        }
        // Streams never connected will not be: let their pumps end; give connected ones a
        // moment to flush, then stop them.
        lock(&c.slots).clear();
        lock(&c.start).take();
        let mut exited = c.exited.clone();
        let _ = tokio::time::timeout(DRAIN_WAIT, exited.wait_for(|v| v.is_some())).await;
        for t in &c.tasks {
            t.abort();
        }
        let container = c.clone();
        let teardown = tokio::task::spawn_blocking(move || {
            // The file copies first: the rootfs teardown removes the container's directory.
            let mut problems = files::remove(&container.id);
            if let Some(mut r) = lock(&container.rootfs).take() {
                problems.extend(r.teardown());
            }
            problems.extend(container.cgroup.remove(Duration::from_secs(2)));
            problems
        })
        .await
        .unwrap_or_else(|e| vec![format!("teardown task: {e}")]);
        problems.extend(teardown);
        lock(&self.state).containers.remove(id);
        if problems.is_empty() {
            info!("container {}: removed", c.id);
            Ok(())
        } else {
            let msg = format!("container {id:?}: remove: {}", problems.join("; "));
            warning!("{msg}");
            Err(RpcError::new(Code::INTERNAL, msg))
        }
    }

    /// Hands a connected stdio stream to its container's pump.
    pub fn attach_stdio(
        &self,
        id: &str,
        exec_id: &str,
        stream: StdioStream,
        conn: StdioConn,
    ) -> anyhow::Result<()> {
        if !exec_id.is_empty() {
            anyhow::bail!("{id}/{exec_id}: exec processes are not supported yet");
        }
        let c = self.get(id).map_err(|e| anyhow::anyhow!("{}", e.message))?;
        let Some(tx) = take_slot(&c, stream) else {
            anyhow::bail!(
                "container {id:?}: {} was not requested or is already connected",
                stream.as_str()
            );
        };
        tx.send(conn)
            .map_err(|_| anyhow::anyhow!("container {id:?}: {} pump is gone", stream.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes() {
        assert_eq!(
            setup_error_code("container \"c\": exec \"/bin/nope\": No such file or directory"),
            Code::NOT_FOUND
        );
        assert_eq!(
            setup_error_code("container \"c\": exec \"x\": executable file not found in $PATH"),
            Code::NOT_FOUND
        );
        assert_eq!(
            setup_error_code("container \"c\": exec \"/etc\": Permission denied"),
            Code::FAILED_PRECONDITION
        );
        assert_eq!(
            setup_error_code("mount proc: EPERM"),
            Code::FAILED_PRECONDITION
        );
        assert_eq!(init_only("c", "e1").unwrap_err().code, Code::UNIMPLEMENTED);
        assert!(init_only("c", "").is_ok());
    }

    #[tokio::test]
    async fn status_lines() {
        let (r, w) = pipe_pair().unwrap();
        let mut s = StatusPipe {
            rx: pipe::Receiver::from_owned_fd(r).unwrap(),
            buf: Vec::new(),
        };
        nix::unistd::write(&w, b"READY\nERROR boom").unwrap();
        drop(w);
        assert_eq!(s.next_line().await.unwrap().as_deref(), Some("READY"));
        assert_eq!(s.next_line().await.unwrap().as_deref(), Some("ERROR boom"));
        assert_eq!(s.next_line().await.unwrap(), None);
    }
}
