//! Exec processes: `ctr task exec --exec-id X`. Each runs in the container's namespaces in the
//! guest with its own stdio streams; the shim tracks its status and exit, and its exit is
//! reported only after its output reached containerd (as for the init).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use spinbox_agent_api::agent::{ExecProcessRequest, ProcessRequest, SignalProcessRequest};
use spinbox_agent_api::agent_ttrpc::AgentClient;
use tokio::sync::watch;

use crate::container::{
    agent_err, arm_kill_watchdog, ctx, wait_exit, ContainerError, ExitInfo, Status, VM_DEATH_DRAIN,
    VM_DIED_STATUS,
};
use crate::sandbox::Sandbox;
use crate::stdio::{StdioPaths, StdioPumps};

/// One exec process of a container.
pub struct Exec {
    pub container_id: String,
    pub exec_id: String,
    pub stdio: StdioPaths,
    sandbox: Arc<Sandbox>,
    pumps: Arc<tokio::sync::Mutex<StdioPumps>>,
    status: Mutex<(Status, u32)>,
    exit: watch::Receiver<Option<ExitInfo>>,
    exit_tx: Mutex<Option<watch::Sender<Option<ExitInfo>>>>,
    rpc_limit: Duration,
    io_wait: Duration,
    kill_limit: Duration,
}

fn req(id: &str, exec_id: &str) -> ProcessRequest {
    ProcessRequest {
        container_id: id.to_owned(),
        exec_id: exec_id.to_owned(),
        ..Default::default()
    }
}

impl Exec {
    /// ExecProcess in the guest, then the stdio streams; the process waits to be started.
    #[allow(clippy::too_many_arguments)]
    pub async fn create(
        sandbox: Arc<Sandbox>,
        container_id: &str,
        exec_id: &str,
        process_json: Vec<u8>,
        stdio: StdioPaths,
        namespace: &str,
        limits: (Duration, Duration, Duration, Duration),
    ) -> Result<Exec, ContainerError> {
        let (rpc_limit, connect_limit, io_wait, kill_limit) = limits;
        let agent = sandbox.agent();
        let request = ExecProcessRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            process: process_json,
            stdin: !stdio.stdin.is_empty(),
            stdout: !stdio.stdout.is_empty(),
            stderr: !stdio.stderr.is_empty(),
            terminal: stdio.terminal,
            ..Default::default()
        };
        agent
            .exec_process(ctx(rpc_limit), &request)
            .await
            .map_err(|e| agent_err("ExecProcess", e))?;
        let pumps = match crate::stdio::connect(
            sandbox.transport(),
            spinbox_agent_api::DEFAULT_STDIO_PORT,
            &crate::stdio::ProcessRef {
                container_id,
                exec_id,
                namespace,
            },
            &stdio,
            connect_limit,
            None,
            None,
        )
        .await
        {
            Ok(p) => p,
            Err(e) => {
                let _ = agent
                    .remove_container(ctx(rpc_limit), &req(container_id, exec_id))
                    .await;
                return Err(ContainerError::Stdio(e));
            }
        };
        let (exit_tx, exit) = watch::channel(None);
        Ok(Exec {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            stdio,
            sandbox,
            pumps: Arc::new(tokio::sync::Mutex::new(pumps)),
            status: Mutex::new((Status::Created, 0)),
            exit,
            exit_tx: Mutex::new(Some(exit_tx)),
            rpc_limit,
            io_wait,
            kill_limit,
        })
    }

    fn agent(&self) -> &AgentClient {
        self.sandbox.agent()
    }

    pub fn status(&self) -> (Status, u32) {
        *self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_status(&self, s: Status, pid: u32) {
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = (s, pid);
    }

    pub fn exit_info(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    /// Runs the process; `on_exit` runs once, after all its output reached containerd.
    pub async fn start<F>(self: &Arc<Self>, on_exit: F) -> Result<u32, ContainerError>
    where
        F: FnOnce(u32, ExitInfo) + Send + 'static,
    {
        let exit_tx = self
            .exit_tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| ContainerError::AlreadyStarted(self.exec_id.clone()))?;
        let resp = self
            .agent()
            .start_process(ctx(self.rpc_limit), &req(&self.container_id, &self.exec_id))
            .await
            .map_err(|e| agent_err("StartProcess", e));
        let pid = match resp {
            Ok(r) => r.pid,
            Err(e) => {
                self.set_status(Status::Stopped, 0);
                let _ = exit_tx.send(Some(ExitInfo {
                    status: 127,
                    at: SystemTime::now(),
                }));
                return Err(e);
            }
        };
        self.set_status(Status::Running, pid);
        let me = Arc::clone(self);
        let mut vm_exit = self.sandbox.exit_watch();
        tokio::spawn(async move {
            let request = req(&me.container_id, &me.exec_id);
            let died = || ExitInfo {
                status: VM_DIED_STATUS,
                at: SystemTime::now(),
            };
            let (info, drain) = tokio::select! {
                waited = me.agent().wait_process(ttrpc::context::Context::default(), &request) => match waited {
                    Ok(w) => (ExitInfo {
                        status: w.exit_status,
                        at: SystemTime::UNIX_EPOCH + Duration::from_nanos(w.exited_at_unix_nanos),
                    }, me.io_wait),
                    Err(e) => {
                        tracing::warn!(id = %me.container_id, exec = %me.exec_id, error = %e, "WaitProcess of an exec failed");
                        (died(), VM_DEATH_DRAIN)
                    }
                },
                _ = vm_exit.wait_for(|s| s.is_some()) => (died(), VM_DEATH_DRAIN),
            };
            me.pumps.lock().await.drain_output(drain).await;
            me.set_status(Status::Stopped, pid);
            let _ = exit_tx.send(Some(info));
            on_exit(pid, info);
        });
        Ok(pid)
    }

    pub async fn wait(&self) -> ExitInfo {
        wait_exit(self.exit.clone()).await
    }

    pub async fn kill(&self, signal: u32) -> Result<(), ContainerError> {
        if self.status().0 != Status::Running {
            return Err(ContainerError::Lifecycle {
                id: format!("{}/{}", self.container_id, self.exec_id),
                error: crate::lifecycle::LifecycleError::VmNotRunning,
            });
        }
        let request = SignalProcessRequest {
            container_id: self.container_id.clone(),
            exec_id: self.exec_id.clone(),
            signal,
            ..Default::default()
        };
        let sigkill = signal == nix::sys::signal::Signal::SIGKILL as u32;
        if sigkill {
            arm_kill_watchdog(
                &self.sandbox,
                format!("exec {} of {}", self.exec_id, self.container_id),
                self.exit.clone(),
                self.kill_limit,
            );
        }
        match self
            .agent()
            .signal_process(ctx(self.kill_limit), &request)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if sigkill && !crate::container::answered(&e) => {
                tracing::warn!(id = %self.container_id, exec = %self.exec_id, error = %e, "the guest did not take the SIGKILL");
                Ok(())
            }
            Err(e) => Err(agent_err("SignalProcess", e)),
        }
    }

    pub async fn close_stdin(&self) -> Result<(), ContainerError> {
        self.pumps.lock().await.close_stdin(self.io_wait).await;
        if self.status().0 == Status::Stopped {
            return Ok(());
        }
        self.agent()
            .close_stdin(ctx(self.rpc_limit), &req(&self.container_id, &self.exec_id))
            .await
            .map(|_| ())
            .map_err(|e| agent_err("CloseStdin", e))
    }

    pub async fn resize(&self, width: u32, height: u32) -> Result<(), ContainerError> {
        let request = spinbox_agent_api::agent::ResizePtyRequest {
            container_id: self.container_id.clone(),
            exec_id: self.exec_id.clone(),
            width,
            height,
            ..Default::default()
        };
        self.agent()
            .resize_pty(ctx(self.rpc_limit), &request)
            .await
            .map(|_| ())
            .map_err(|e| agent_err("ResizePty", e))
    }

    /// Forgets the exec: its streams stop, the guest drops it (killing it if it still runs).
    pub async fn remove(&self) -> Result<(), ContainerError> {
        self.pumps.lock().await.abort();
        self.agent()
            .remove_container(ctx(self.rpc_limit), &req(&self.container_id, &self.exec_id))
            .await
            .map(|_| ())
            .map_err(|e| agent_err("RemoveContainer (exec)", e))
    }

    /// Teardown of the container: streams stop; the guest goes with the VM.
    pub async fn abort(&self) {
        self.pumps.lock().await.abort();
    }
}
