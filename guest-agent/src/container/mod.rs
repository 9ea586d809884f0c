//! Containers in the guest: the registry behind the container RPCs.
//!
//! CreateContainer assembles the root filesystem, writes the host's file copies ([`files`]),
//! creates the cgroup and clones a container-init ([`child`]) into new namespaces (a pod's
//! container shares those the spec names by path with its sandbox container, and the pod's
//! /dev/shm: [`sandbox`]); it returns once that process has done the whole OCI setup and
//! waits for the start byte. StartProcess sends the byte and returns once the execve
//! succeeded (or with its error). The exit is collected by PID 1's reaper and published, once
//! stdout/stderr were flushed to the host, to every WaitProcess.
//!
//! ExecProcess does the same for an exec process ([`exec`]): a container-exec born in the
//! init's pid namespace and the container's cgroup, which joins the init's other namespaces.
//! Every process RPC names its process by exec id ("" for the init); each process is a
//! [`process::Proc`]. With `terminal` a process gets a pseudo-terminal ([`pty`]).
//!
//! Locks: `Manager::state`, each container's `execs` and each process's small std mutexes
//! are held only for map or field updates, never across an await; a process's status pipe's
//! tokio mutex serialises its readers (Create/ExecProcess, then StartProcess).

pub mod caps;
pub mod cgroup;
pub mod child;
pub mod devices;
pub mod exec;
pub mod files;
pub mod launch;
pub mod mounts;
pub mod ops;
pub mod process;
pub mod pty;
pub mod resolve;
pub mod rootfs;
pub mod sandbox;
pub mod seccomp;
pub mod shares;
pub mod spec;
pub mod stdio;
#[cfg(target_arch = "x86_64")]
mod syscalls_x86_64;

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use spinbox_agent_api::agent::CreateContainerRequest;
use spinbox_agent_api::StdioStream;
use tokio::net::unix::pipe;
use ttrpc::Code;

use self::cgroup::Cgroup;
use self::process::{Proc, StatusPipe, Stdio};
use self::rootfs::MountedRootfs;
use self::stdio::StdioConn;
use crate::log::{debug, info, warning};
use crate::reaper::ExitInfo;

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

/// The code for a container-init/container-exec error: a missing executable is NOT_FOUND.
fn setup_error_code(message: &str) -> Code {
    if message.contains("exec \"")
        && (message.contains("not found") || message.contains("No such file"))
    {
        Code::NOT_FOUND
    } else {
        Code::FAILED_PRECONDITION
    }
}

struct Container {
    id: String,
    /// The init's pid.
    pid: i32,
    cgroup: Cgroup,
    rootfs: Mutex<Option<MountedRootfs>>,
    init: Arc<Proc>,
    /// The compiled `linux.seccomp`, for exec processes.
    seccomp: Option<seccomp::Filter>,
    /// Exec processes by exec id; None while its ExecProcess is in progress.
    execs: Mutex<HashMap<String, Option<Arc<Proc>>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Container {
    /// Whether the init has exited (then so has every process of the container).
    fn has_exited(&self) -> bool {
        self.init.has_exited()
    }

    /// The process an RPC names: the init for "", else an exec process.
    fn process(&self, exec_id: &str) -> RpcResult<Arc<Proc>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        match lock(&self.execs).get(exec_id) {
            Some(Some(p)) => Ok(p.clone()),
            _ => Err(RpcError::new(
                Code::NOT_FOUND,
                format!("container {:?}: exec {exec_id:?} not found", self.id),
            )),
        }
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
    /// The pod whose /dev/shm tmpfs to remove (the container's own, when it made it).
    pod_shm: Option<String>,
}

impl Rollback {
    async fn run(mut self) {
        let rootfs = self.rootfs.take();
        let cgroup = self.cgroup.take();
        let files_of = self.files_of.take();
        let pod_shm = self.pod_shm.take();
        let problems = tokio::task::spawn_blocking(move || {
            let mut problems = Vec::new();
            if let Some(cg) = cgroup {
                cg.kill();
                problems.extend(cg.remove(Duration::from_secs(2)));
            }
            if let Some(pod) = pod_shm {
                problems.extend(sandbox::remove(&pod));
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

/// Capacity of the stdio pipes: a writer blocks less and the pump reads larger chunks.
const PIPE_SIZE: libc::c_int = 1 << 20;

fn pipe_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: F_SETPIPE_SZ on a pipe we own; a refusal (pipe-user-pages limits) keeps 64 KiB.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
    Ok((r, w))
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

    /// CreateContainer: returns the init's pid and the plan's warnings.
    pub async fn create(&self, req: CreateContainerRequest) -> RpcResult<(u32, Vec<String>)> {
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
        let (container, warnings) =
            result.inspect_err(|e| warning!("container {id}: create failed: {}", e.message))?;
        let pid = container.pid;
        ops::on_created(&container);
        st.containers.insert(id.clone(), container);
        info!("container {id}: created (pid {pid})");
        Ok((u32::try_from(pid).unwrap_or(0), warnings))
    }

    async fn create_inner(
        &self,
        req: &CreateContainerRequest,
    ) -> RpcResult<(Arc<Container>, Vec<String>)> {
        let id = req.container_id.as_str();
        let invalid = |e: anyhow::Error| {
            RpcError::new(Code::INVALID_ARGUMENT, format!("container {id:?}: {e:#}"))
        };
        let Some(rootfs_req) = req.rootfs.as_ref() else {
            return Err(invalid(anyhow::anyhow!("no rootfs given")));
        };
        files::validate(&req.files).map_err(invalid)?;
        shares::validate(&req.shares).map_err(invalid)?;
        let spec = spec::parse_spec(&req.oci_spec).map_err(invalid)?;
        let sandbox = self.sandbox_of(req)?;
        let pod = sandbox::pod_of(id, &req.sandbox_id);
        let pod_shm = sandbox::shm_dir(pod).display().to_string();
        let rootfs_path = Path::new(rootfs::CONTAINERS_DIR).join(id).join("rootfs");
        let rootfs_str = rootfs_path.display().to_string();
        // Shares first: a source the host shares is served live, whatever else names it.
        let mut file_copies = shares::guest_paths(&req.shares);
        file_copies.extend(files::guest_paths(id, &req.files));
        let mut plan = spec::plan(
            id,
            &spec,
            &spec::PlanContext {
                rootfs: &rootfs_str,
                rootfs_ro: rootfs_req.read_only,
                share_vm_network: req.share_vm_network,
                file_copies: &file_copies,
                source_exists: &|p| Path::new(p).exists(),
                in_sandbox: sandbox.is_some(),
                pod_shm: &pod_shm,
            },
        )
        .map_err(invalid)?;
        if plan.init.process.terminal != req.terminal {
            plan.warnings.push(format!(
                "process.terminal is {} but the request says {}; following the request",
                plan.init.process.terminal, req.terminal
            ));
            plan.init.process.terminal = req.terminal;
        }
        for w in &plan.warnings {
            warning!("container {id}: {w}");
        }
        if !req.shares.is_empty() {
            let shares = req.shares.clone();
            tokio::task::spawn_blocking(move || shares::mount_all(&shares))
                .await
                .map_err(|e| anyhow::anyhow!("share mount task: {e}"))
                .and_then(|r| r)
                .map_err(|e| {
                    RpcError::new(
                        Code::FAILED_PRECONDITION,
                        format!("container {id:?}: {e:#}"),
                    )
                })?;
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
            pod_shm: None,
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
        if plan.uses_pod_shm {
            if pod == id {
                rollback.pod_shm = Some(pod.to_string());
            }
            let owned_pod = pod.to_string();
            let mounted = tokio::task::spawn_blocking(move || sandbox::ensure_shm(&owned_pod))
                .await
                .map_err(|e| anyhow::anyhow!("pod shm task: {e}"))
                .and_then(|r| r);
            if let Err(e) = mounted {
                rollback.run().await;
                return Err(RpcError::new(
                    Code::FAILED_PRECONDITION,
                    format!("container {id:?}: /dev/shm of pod {pod:?}: {e:#}"),
                ));
            }
        }
        match self
            .launch(id, req, &plan, sandbox.as_deref(), &mut rollback)
            .await
        {
            Ok(c) => Ok((c, plan.warnings)),
            Err(e) => {
                rollback.run().await;
                Err(e)
            }
        }
    }

    /// The sandbox container a request names (`sandbox_id`), which must exist.
    fn sandbox_of(&self, req: &CreateContainerRequest) -> RpcResult<Option<Arc<Container>>> {
        if req.sandbox_id.is_empty() {
            return Ok(None);
        }
        self.get(&req.sandbox_id).map(Some).map_err(|_| {
            RpcError::new(
                Code::NOT_FOUND,
                format!(
                    "container {:?}: sandbox container {:?} not found",
                    req.container_id, req.sandbox_id
                ),
            )
        })
    }

    async fn launch(
        &self,
        id: &str,
        req: &CreateContainerRequest,
        plan: &spec::ContainerPlan,
        sandbox: Option<&Container>,
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
        let device_cgroup = cgroup_dir.try_clone().map_err(|e| internal("cgroup", &e))?;
        rollback.cgroup = Some(cgroup);

        let io = |what: &'static str| move |e: std::io::Error| internal(what, &e);
        let stdio =
            Stdio::prepare(req.stdin, req.stdout, req.stderr, req.terminal).map_err(io("stdio"))?;
        let (start_r, start_w) = pipe_pair().map_err(io("start pipe"))?;
        let (status_r, status_w) = pipe_pair().map_err(io("status pipe"))?;
        let status_rx = pipe::Receiver::from_owned_fd(status_r).map_err(io("status pipe"))?;
        let json =
            serde_json::to_vec(&plan.init).map_err(|e| internal("encoding the init config", &e))?;
        let join = match (plan.sandbox_namespaces, sandbox) {
            (0, _) => None,
            (namespaces, Some(sb)) => {
                if sb.has_exited() {
                    return Err(sandbox_gone(id, sb, namespaces));
                }
                let pidfd = sb.init.pidfd.try_clone().map_err(io("sandbox pidfd"))?;
                Some(launch::Join { pidfd, namespaces })
            }
            (_, None) => return Err(internal("sandbox namespaces", &"no sandbox container")),
        };
        let (child_fds, ends) = stdio.split(start_r, status_w);

        let new_namespaces = plan.new_namespaces;
        // A thread of its own: joining the sandbox's namespaces changes it for good.
        let spawned = launch::on_own_thread("init-spawn", move || {
            launch::spawn(
                &json,
                child_fds,
                new_namespaces,
                join,
                Some(cgroup_dir.as_fd()),
            )
        })
        .await
        .map_err(io("the spawn thread"))?;
        let launched = spawned.map_err(|e| match sandbox {
            // Its namespaces went with its init.
            Some(sb) if plan.sandbox_namespaces != 0 && sb.has_exited() => {
                sandbox_gone(id, sb, plan.sandbox_namespaces)
            }
            _ => internal("starting container-init", &format!("{e:#}")),
        })?;
        let pid = launched.pid;
        debug!("container {id}: container-init is pid {pid}");

        let label = format!("container {id:?}");
        let mut status = StatusPipe::new(status_rx);
        if let Err(e) = status.await_ready(&label).await {
            Proc::kill_launched(launched).await;
            return Err(e);
        }
        // The device rules bind from here on: container-init made the spec's nodes (as runc
        // does before it sets the device rules) and waits for the start byte; every exec is
        // born in this cgroup later.
        let rules = plan.device_rules.clone();
        let attached =
            tokio::task::spawn_blocking(move || devices::attach(device_cgroup.as_fd(), &rules))
                .await
                .map_err(|e| anyhow::anyhow!("device program task: {e}"))
                .and_then(|r| r);
        if let Err(e) = attached {
            Proc::kill_launched(launched).await;
            return Err(RpcError::new(
                Code::FAILED_PRECONDITION,
                format!("container {id:?}: linux.resources.devices: {e:#}"),
            ));
        }
        debug!("container {id}: device program attached");
        // Set up: wire stdio and the exit publisher. No bound on the output flush: the init's
        // exit ends the pid namespace, so every writer goes (in the sandbox's pid namespace
        // the agent kills the rest of the container instead, see kill_rest_on_init_exit).
        let init = Proc::wire(label, id, launched, ends, start_w, status, None);

        let Some(cgroup) = rollback.cgroup.take() else {
            return Err(internal("cgroup", &"lost"));
        };
        let container = Arc::new(Container {
            id: id.to_string(),
            pid,
            cgroup,
            rootfs: Mutex::new(rollback.rootfs.take()),
            init: Arc::new(init),
            seccomp: plan.init.process.seccomp.clone(),
            execs: Mutex::new(HashMap::new()),
        });
        if plan.sandbox_namespaces & libc::CLONE_NEWPID != 0 {
            kill_rest_on_init_exit(&container);
        }
        Ok(container)
    }

    /// StartProcess: lets the process exec; returns its pid, or the exec's error.
    pub async fn start(&self, id: &str, exec_id: &str) -> RpcResult<u32> {
        let p = self.get(id)?.process(exec_id)?;
        p.start().await
    }

    /// WaitProcess: the exit, once the output was flushed.
    pub async fn wait(&self, id: &str, exec_id: &str) -> RpcResult<ExitInfo> {
        let p = self.get(id)?.process(exec_id)?;
        p.wait().await
    }

    /// SignalProcess: the named process, or with `all` every process of the container
    /// (whichever process is named).
    pub fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> RpcResult<()> {
        let c = self.get(id)?;
        let p = c.process(exec_id)?;
        let sig = valid_signal(signal).ok_or_else(|| {
            RpcError::new(
                Code::INVALID_ARGUMENT,
                format!("{}: bad signal {signal}", p.label),
            )
        })?;
        if !all {
            return p.signal(sig);
        }
        if c.has_exited() {
            return Err(RpcError::new(
                Code::NOT_FOUND,
                format!("container {id:?}: the process has already exited"),
            ));
        }
        for pid in c.cgroup.procs() {
            if i32::try_from(pid).ok() == Some(c.pid) {
                continue;
            }
            if let Ok(pid) = i32::try_from(pid) {
                // SAFETY: kill(2) with a pid and a signal number.
                unsafe { libc::kill(pid, sig) };
            }
        }
        match launch::pidfd_signal(c.init.pidfd.as_fd(), sig) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            Err(e) => Err(RpcError::new(
                Code::INTERNAL,
                format!("container {id:?}: signal {sig}: {e}"),
            )),
        }
    }

    /// CloseStdin.
    pub fn close_stdin(&self, id: &str, exec_id: &str) -> RpcResult<()> {
        self.get(id)?.process(exec_id)?.close_stdin();
        Ok(())
    }

    /// ListPids: the container cgroup's processes, whichever process is named (containerd's
    /// Pids is per container).
    pub fn list_pids(&self, id: &str, exec_id: &str) -> RpcResult<Vec<u32>> {
        let c = self.get(id)?;
        c.process(exec_id)?;
        Ok(c.cgroup.procs())
    }

    /// ResizePty: the window size of a process's pseudo-terminal.
    pub fn resize_pty(&self, id: &str, exec_id: &str, width: u32, height: u32) -> RpcResult<()> {
        self.get(id)?.process(exec_id)?.resize(width, height)
    }

    /// RemoveContainer: with an exec id, kill that exec process if it still runs and forget
    /// it; else kill what is left of the container, wait for it, unmount, forget. Idempotent.
    pub async fn remove(&self, id: &str, exec_id: &str) -> RpcResult<()> {
        let Ok(c) = self.get(id) else {
            return Ok(());
        };
        if !exec_id.is_empty() {
            return exec::remove(&c, exec_id).await;
        }
        ops::on_removed(&c);
        if !c.has_exited() {
            c.cgroup.kill();
        }
        // The init and every exec process (a reservation dropped here makes its ExecProcess
        // kill what it made).
        let mut procs = vec![c.init.clone()];
        procs.extend(lock(&c.execs).drain().filter_map(|(_, p)| p));
        let mut problems: Vec<String> =
            futures::future::join_all(procs.iter().map(|p| p.shut_down()))
                .await
                .into_iter()
                .flatten()
                .collect();
        let container = c.clone();
        let teardown = tokio::task::spawn_blocking(move || {
            // The file copies first: the rootfs teardown removes the container's directory.
            let mut problems = files::remove(&container.id);
            if let Some(mut r) = lock(&container.rootfs).take() {
                problems.extend(r.teardown());
            }
            problems.extend(container.cgroup.remove(Duration::from_secs(2)));
            // The pod's /dev/shm goes with its sandbox container (binds elsewhere keep it).
            problems.extend(sandbox::remove(&container.id));
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

    /// Hands a connected stdio stream to its process's pump.
    pub fn attach_stdio(
        &self,
        id: &str,
        exec_id: &str,
        stream: StdioStream,
        conn: StdioConn,
    ) -> anyhow::Result<()> {
        let p = self
            .get(id)
            .and_then(|c| c.process(exec_id))
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        p.attach(stream, conn)
    }
}

/// The error for a sandbox container whose init has exited, with its namespaces.
fn sandbox_gone(id: &str, sandbox: &Container, namespaces: libc::c_int) -> RpcError {
    RpcError::new(
        Code::FAILED_PRECONDITION,
        format!(
            "container {id:?}: the sandbox container {:?} has exited: its {} namespaces are gone",
            sandbox.id,
            launch::namespace_names(namespaces)
        ),
    )
}

/// A container in its sandbox's pid namespace does not end with its init (that namespace is
/// the sandbox's): as containerd's runc shim does for a shared pid namespace, the rest of the
/// container is killed when the init exits, which also closes the init's output.
fn kill_rest_on_init_exit(c: &Arc<Container>) {
    let weak = Arc::downgrade(c);
    let init = c.init.clone();
    tokio::spawn(async move {
        if !init.until_reaped().await {
            return;
        }
        let Some(c) = weak.upgrade() else {
            return;
        };
        if !c.cgroup.procs().is_empty() {
            debug!(
                "container {}: the init exited in the sandbox's pid namespace; killing the rest",
                c.id
            );
            c.cgroup.kill();
        }
    });
}

/// A signal number SignalProcess accepts.
fn valid_signal(signal: u32) -> Option<i32> {
    i32::try_from(signal)
        .ok()
        .filter(|s| (1..=libc::SIGRTMAX()).contains(s))
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
        // container-exec's own prefix is not a failed execve.
        assert_eq!(
            setup_error_code(
                "container \"c\", exec process \"e\": chdir to process.cwd \"/x\": ENOENT: No such file or directory"
            ),
            Code::FAILED_PRECONDITION
        );
        assert_eq!(
            setup_error_code(
                "container \"c\", exec process \"e\": exec \"nope\": executable file not found in $PATH"
            ),
            Code::NOT_FOUND
        );
    }

    #[test]
    fn signals() {
        assert_eq!(valid_signal(9), Some(9));
        assert_eq!(valid_signal(0), None);
        assert_eq!(valid_signal(u32::MAX), None);
        assert_eq!(valid_signal(1000), None);
    }
}
