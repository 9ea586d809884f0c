//! Exec processes: ExecProcess creates one stopped, in every namespace of the container's
//! init and in the container's cgroup; the other process RPCs then name it by exec id.
//!
//! The spawn runs on a dedicated thread that ends with it: that thread enters the init's pid
//! namespace for its children (setns CLONE_NEWPID through the init's pidfd) and clones
//! container-exec there (see [`launch::spawn_exec`]), so no pooled thread is left changed.
//! container-exec, a fresh single-threaded process, joins the other namespaces itself.

use std::os::fd::AsFd as _;
use std::sync::Arc;

use spinbox_agent_api::agent::ExecProcessRequest;
use tokio::net::unix::pipe;
use ttrpc::Code;

use super::launch::{self, Launched};
use super::process::{Proc, StatusPipe, Stdio, EXEC_OUTPUT_DRAIN};
use super::spec::{self, ExecConfig, ProcessConfig};
use super::{lock, pipe_pair, Container, Manager, RpcError, RpcResult};
use crate::log::{debug, info, warning};

/// Exec ids travel in stdio headers (space-separated, "-" = the init): the same alphabet as
/// container ids.
pub fn validate_exec_id(exec_id: &str) -> Result<(), String> {
    let mut chars = exec_id.chars();
    let ok_first = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let ok_rest = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !ok_first || !ok_rest || exec_id.len() > 128 {
        return Err(format!(
            "invalid exec id {exec_id:?}: want [A-Za-z0-9][A-Za-z0-9_.-]*, at most 128 bytes"
        ));
    }
    Ok(())
}

/// The process an ExecProcess asks for: `process` checked and decoded, the terminal as the
/// request says (it decides the stdio wiring). Warnings go to `warnings`.
pub fn exec_process(
    req: &ExecProcessRequest,
    warnings: &mut Vec<String>,
) -> Result<ProcessConfig, String> {
    let mut process = spec::parse_process(&req.process, warnings).map_err(|e| format!("{e:#}"))?;
    if process.terminal != req.terminal {
        warnings.push(format!(
            "process.terminal is {} but the request says {}; following the request",
            process.terminal, req.terminal
        ));
        process.terminal = req.terminal;
    }
    Ok(process)
}

impl Manager {
    /// ExecProcess: a new process in the container's namespaces and cgroup, created stopped
    /// (StartProcess runs it).
    pub async fn exec(&self, req: ExecProcessRequest) -> RpcResult<()> {
        let id = req.container_id.as_str();
        let exec_id = req.exec_id.as_str();
        let label = format!("container {id:?} exec {exec_id:?}");
        validate_exec_id(exec_id)
            .map_err(|e| RpcError::new(Code::INVALID_ARGUMENT, format!("container {id:?}: {e}")))?;
        let c = self.get(id)?;
        let mut warnings = Vec::new();
        let mut process = exec_process(&req, &mut warnings)
            .map_err(|e| RpcError::new(Code::INVALID_ARGUMENT, format!("{label}: {e}")))?;
        // The container's seccomp profile binds its exec processes too (runc does the same).
        process.seccomp = c.seccomp.clone();
        for w in &warnings {
            warning!("{label}: {w}");
        }
        if c.has_exited() {
            return Err(RpcError::new(
                Code::FAILED_PRECONDITION,
                format!("{label}: the container's init has exited"),
            ));
        }
        {
            let mut execs = lock(&c.execs);
            if execs.contains_key(exec_id) {
                return Err(RpcError::new(
                    Code::ALREADY_EXISTS,
                    format!("{label} already exists"),
                ));
            }
            execs.insert(exec_id.to_string(), None);
        }
        let made = launch_exec(&c, &req, process, &label).await;
        let orphan = {
            let mut execs = lock(&c.execs);
            // The reservation is gone when the container or this exec was removed meanwhile.
            let reserved = matches!(execs.get(exec_id), Some(None));
            match made {
                Ok(p) if reserved => {
                    info!("{label}: created (pid {})", p.pid);
                    execs.insert(exec_id.to_string(), Some(p));
                    return Ok(());
                }
                Ok(p) => p,
                Err(e) => {
                    if reserved {
                        execs.remove(exec_id);
                    }
                    warning!("{label}: exec failed: {}", e.message);
                    return Err(e);
                }
            }
        };
        orphan.shut_down().await;
        Err(RpcError::new(
            Code::ABORTED,
            format!("{label}: removed while being created"),
        ))
    }
}

/// Spawns container-exec and waits for its READY.
async fn launch_exec(
    c: &Container,
    req: &ExecProcessRequest,
    process: ProcessConfig,
    label: &str,
) -> RpcResult<Arc<Proc>> {
    let internal = |what: &str, e: &dyn std::fmt::Display| {
        RpcError::new(Code::INTERNAL, format!("{label}: {what}: {e}"))
    };
    let io = |what: &'static str| move |e: std::io::Error| internal(what, &e);
    let stdio =
        Stdio::prepare(req.stdin, req.stdout, req.stderr, req.terminal).map_err(io("stdio"))?;
    let (start_r, start_w) = pipe_pair().map_err(io("start pipe"))?;
    let (status_r, status_w) = pipe_pair().map_err(io("status pipe"))?;
    let status_rx = pipe::Receiver::from_owned_fd(status_r).map_err(io("status pipe"))?;
    let config = ExecConfig {
        container_id: c.id.clone(),
        exec_id: req.exec_id.clone(),
        process,
    };
    let json = serde_json::to_vec(&config).map_err(|e| internal("encoding the exec config", &e))?;
    let init_pidfd = c.init.pidfd.try_clone().map_err(io("init pidfd"))?;
    let cgroup_dir = c
        .cgroup
        .open_dir()
        .map_err(|e| internal("cgroup", &format!("{e:#}")))?;
    let (child_fds, ends) = stdio.split(start_r, status_w);

    // A thread of its own: setns(CLONE_NEWPID) changes it for good.
    let spawned = launch::on_own_thread("exec-spawn", move || {
        launch::spawn_exec(&json, child_fds, init_pidfd, cgroup_dir.as_fd())
    })
    .await
    .map_err(io("the spawn thread"))?;
    let launched: Launched = match spawned {
        Ok(l) => l,
        Err(e) => {
            // The init dying under us (its pid namespace refuses new members) is the
            // caller's precondition, anything else ours.
            let code = if c.has_exited() {
                Code::FAILED_PRECONDITION
            } else {
                Code::INTERNAL
            };
            return Err(RpcError::new(
                code,
                format!("{label}: starting container-exec: {e:#}"),
            ));
        }
    };
    debug!("{label}: container-exec is pid {}", launched.pid);

    let mut status = StatusPipe::new(status_rx);
    if let Err(e) = status.await_ready(label).await {
        Proc::kill_launched(launched).await;
        return Err(e);
    }
    let stream_label = format!("{} {}", c.id, req.exec_id);
    Ok(Arc::new(Proc::wire(
        label.to_string(),
        &stream_label,
        launched,
        ends,
        start_w,
        status,
        Some(EXEC_OUTPUT_DRAIN),
    )))
}

/// RemoveContainer with an exec id: kill it if still running, forget it. Idempotent.
pub(super) async fn remove(c: &Container, exec_id: &str) -> RpcResult<()> {
    // Taken out first, so the RPCs that follow no longer find it; a reservation (ExecProcess
    // in progress) dropped here makes that ExecProcess kill what it made.
    let Some(entry) = lock(&c.execs).remove(exec_id) else {
        return Ok(());
    };
    let Some(p) = entry else {
        return Ok(());
    };
    let problems = p.shut_down().await;
    if problems.is_empty() {
        info!("{}: removed", p.label);
        Ok(())
    } else {
        let msg = format!("{}: remove: {}", p.label, problems.join("; "));
        warning!("{msg}");
        Err(RpcError::new(Code::INTERNAL, msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_ids() {
        for ok in ["e1", "exec-1", "0a1b", "a.b_c"] {
            assert!(validate_exec_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-", "a b", "a\nb", "-x", ".x", "a/b"] {
            let e = validate_exec_id(bad).unwrap_err();
            assert!(e.contains("exec id"), "{bad}: {e}");
        }
        assert!(validate_exec_id(&"a".repeat(129)).is_err());
    }

    fn req(process: &str, terminal: bool) -> ExecProcessRequest {
        ExecProcessRequest {
            container_id: "c".into(),
            exec_id: "e".into(),
            process: process.as_bytes().to_vec(),
            stdout: true,
            terminal,
            ..Default::default()
        }
    }

    #[test]
    fn exec_process_from_request() {
        let mut warnings = Vec::new();
        let p = exec_process(
            &req(r#"{"args": ["sh"], "terminal": true}"#, true),
            &mut warnings,
        )
        .unwrap();
        assert!(p.terminal);
        assert!(warnings.is_empty());
        // The request decides the wiring.
        let p = exec_process(
            &req(r#"{"args": ["sh"], "terminal": true}"#, false),
            &mut warnings,
        )
        .unwrap();
        assert!(!p.terminal);
        assert!(warnings[0].contains("process.terminal"));
        let e = exec_process(&req(r#"{"args": []}"#, false), &mut warnings).unwrap_err();
        assert!(e.contains("process.args"), "{e}");
        let e = exec_process(&req("", false), &mut warnings).unwrap_err();
        assert!(e.contains("OCI process"), "{e}");
    }
}
