//! One process of a container, the init or an exec, as the process RPCs see it: its pidfd,
//! the start and status pipes of its container-init/container-exec stage, its stdio (pipes or
//! a pseudo-terminal) with the slots the host's streams fill, and its exit.
//!
//! The exit is published in two steps: `reaped` as soon as the reaper collected it, `exited`
//! once its output was also flushed to the host's streams (what WaitProcess reports). For an
//! exec process the flush is bounded: a background child it left behind may keep its stdout
//! open for ever (the init needs no bound: its exit ends the container's pid namespace).

use std::os::fd::{AsFd as _, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use spinbox_agent_api::StdioStream;
use tokio::io::{AsyncReadExt as _, AsyncWrite};
use tokio::net::unix::pipe;
use tokio::sync::{oneshot, watch, Notify};
use tokio::task::AbortHandle;
use ttrpc::Code;

use super::launch::{self, Launched};
use super::stdio::{self, StdioConn};
use super::{dev_null, lock, pipe_pair, pty, setup_error_code, RpcError, RpcResult};
use crate::log::{debug, info, warning};
use crate::reaper::ExitInfo;

/// How long container-init/container-exec may take to set up.
pub(super) const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long StartProcess waits for the execve's outcome.
const EXEC_TIMEOUT: Duration = Duration::from_secs(30);
/// Removal: wait for the killed process, then for the output pumps.
pub(super) const KILL_WAIT: Duration = Duration::from_secs(10);
const DRAIN_WAIT: Duration = Duration::from_secs(2);
/// An exec process's output flush after its exit, at most.
pub(super) const EXEC_OUTPUT_DRAIN: Duration = Duration::from_secs(3);

/// The read end of a status pipe, read line by line.
pub(super) struct StatusPipe {
    rx: pipe::Receiver,
    buf: Vec<u8>,
}

impl StatusPipe {
    pub(super) fn new(rx: pipe::Receiver) -> StatusPipe {
        StatusPipe {
            rx,
            buf: Vec::new(),
        }
    }

    /// The next line, or None at EOF (no more writers: the execve succeeded or the process
    /// is gone).
    pub(super) async fn next_line(&mut self) -> std::io::Result<Option<String>> {
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

    /// Waits for the first status line of a process being set up: Ok on READY, else the
    /// error it reported (or why there was none). `label` names the process.
    pub(super) async fn await_ready(&mut self, label: &str) -> RpcResult<()> {
        let internal = |what: &str, e: &dyn std::fmt::Display| {
            RpcError::new(Code::INTERNAL, format!("{label}: {what}: {e}"))
        };
        match tokio::time::timeout(SETUP_TIMEOUT, self.next_line()).await {
            Ok(Ok(Some(line))) if line == "READY" => Ok(()),
            Ok(Ok(Some(line))) => Err(match line.strip_prefix("ERROR ") {
                Some(msg) => RpcError::new(setup_error_code(msg), msg.to_string()),
                None => internal("setup", &format!("unexpected status {line:?}")),
            }),
            Ok(Ok(None)) => Err(internal("setup", &"exited during setup without a word")),
            Ok(Err(e)) => Err(internal("reading the setup status", &e)),
            Err(_) => Err(internal(
                "setup",
                &format!("no answer within {}s", SETUP_TIMEOUT.as_secs()),
            )),
        }
    }
}

type Input = Box<dyn AsyncWrite + Send + Unpin>;
type Output = stdio::OutputEnd;

/// A process's stdio before it is launched: the child's fds 0-2 and the agent's ends.
pub(super) struct Stdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    input: Option<Input>,
    /// Output ends and the stream each goes to; None: drained and discarded.
    outputs: Vec<(Option<StdioStream>, Output)>,
    /// A terminal process's pty master (for TIOCSWINSZ).
    pty: Option<OwnedFd>,
}

impl Stdio {
    /// Pipes for the requested streams (/dev/null for the others), or with `terminal` a pty
    /// whose slave is all three (the host then connects only stdin and stdout). Needs the
    /// tokio runtime (the agent's ends are registered with it).
    pub(super) fn prepare(
        stdin: bool,
        stdout: bool,
        stderr: bool,
        terminal: bool,
    ) -> std::io::Result<Stdio> {
        if terminal {
            return Stdio::terminal(stdin, stdout);
        }
        let mut input: Option<Input> = None;
        let child_stdin = if stdin {
            let (r, w) = pipe_pair()?;
            input = Some(Box::new(pipe::Sender::from_owned_fd(w)?));
            r
        } else {
            dev_null(false)?
        };
        let mut outputs: Vec<(Option<StdioStream>, Output)> = Vec::new();
        let mut output = |wanted: bool, stream: StdioStream| -> std::io::Result<OwnedFd> {
            if wanted {
                let (r, w) = pipe_pair()?;
                outputs.push((
                    Some(stream),
                    stdio::OutputEnd::Pipe(pipe::Receiver::from_owned_fd(r)?),
                ));
                Ok(w)
            } else {
                dev_null(true)
            }
        };
        let child_stdout = output(stdout, StdioStream::Stdout)?;
        let child_stderr = output(stderr, StdioStream::Stderr)?;
        Ok(Stdio {
            stdin: child_stdin,
            stdout: child_stdout,
            stderr: child_stderr,
            input,
            outputs,
            pty: None,
        })
    }

    fn terminal(stdin: bool, stdout: bool) -> std::io::Result<Stdio> {
        let pair = pty::open()?;
        let input: Option<Input> = if stdin {
            Some(Box::new(pty::PtyWriter::new(pair.master.try_clone()?)?))
        } else {
            None
        };
        // Read even when nobody listens: a full pty would block the process.
        let reader = stdio::OutputEnd::Terminal(pty::PtyReader::new(pair.master.try_clone()?)?);
        let outputs = vec![(stdout.then_some(StdioStream::Stdout), reader)];
        Ok(Stdio {
            stdin: pair.slave.try_clone()?,
            stdout: pair.slave.try_clone()?,
            stderr: pair.slave,
            input,
            outputs,
            pty: Some(pair.master),
        })
    }

    /// The child's ends, for [`launch`], and the agent's ends.
    pub(super) fn split(self, start: OwnedFd, status: OwnedFd) -> (launch::ChildFds, AgentEnds) {
        (
            launch::ChildFds {
                stdin: self.stdin,
                stdout: self.stdout,
                stderr: self.stderr,
                start,
                status,
            },
            AgentEnds {
                input: self.input,
                outputs: self.outputs,
                pty: self.pty,
            },
        )
    }
}

/// The agent's side of a launched process's stdio.
pub(super) struct AgentEnds {
    input: Option<Input>,
    outputs: Vec<(Option<StdioStream>, Output)>,
    pty: Option<OwnedFd>,
}

pub(super) struct Proc {
    /// `container "c1"` or `container "c1" exec "e1"`, for messages.
    pub label: String,
    pub pid: i32,
    pub pidfd: OwnedFd,
    /// Write end of the start pipe, until StartProcess uses it.
    start: Mutex<Option<OwnedFd>>,
    status: tokio::sync::Mutex<StatusPipe>,
    /// Streams requested and not yet connected (StdioStream is not Hash; at most three).
    slots: Mutex<Vec<(StdioStream, oneshot::Sender<StdioConn>)>>,
    stdin_close: Arc<Notify>,
    /// Set when it was reaped.
    reaped: watch::Receiver<Option<ExitInfo>>,
    /// Set once reaped and its output flushed: what WaitProcess reports.
    exited: watch::Receiver<Option<ExitInfo>>,
    tasks: Vec<AbortHandle>,
    pty: Option<OwnedFd>,
}

impl Proc {
    /// Wires a process that reported READY: the stdio pumps and the exit publisher.
    /// `stream_label` prefixes the pumps' log lines (`c1`, `c1 e1`); `drain_bound` limits
    /// the output flush after the exit (None: until every output reached EOF).
    pub(super) fn wire(
        label: String,
        stream_label: &str,
        launched: Launched,
        ends: AgentEnds,
        start: OwnedFd,
        status: StatusPipe,
        drain_bound: Option<Duration>,
    ) -> Proc {
        let stdin_close = Arc::new(Notify::new());
        let mut slots = Vec::new();
        let mut tasks = Vec::new();
        if let Some(w) = ends.input {
            let (tx, rx) = oneshot::channel();
            slots.push((StdioStream::Stdin, tx));
            let what = stdio::label(stream_label, StdioStream::Stdin);
            let close = stdin_close.clone();
            let h = tokio::spawn(async move { stdio::pump_input(w, rx, close, &what).await });
            tasks.push(h.abort_handle());
        }
        let mut output_pumps = Vec::new();
        for (stream, r) in ends.outputs {
            let h = match stream {
                Some(stream) => {
                    let (tx, rx) = oneshot::channel();
                    slots.push((stream, tx));
                    let what = stdio::label(stream_label, stream);
                    tokio::spawn(async move { stdio::pump_output(r, rx, &what).await })
                }
                None => tokio::spawn(async move {
                    let mut r = r;
                    let _ = tokio::io::copy(&mut r, &mut tokio::io::sink()).await;
                }),
            };
            tasks.push(h.abort_handle());
            output_pumps.push(h);
        }
        let (reaped_tx, reaped_rx) = watch::channel(None);
        let (exited_tx, exited_rx) = watch::channel(None);
        let exit = launched.exit;
        let who = label.clone();
        tokio::spawn(async move {
            let Ok(info) = exit.await else {
                warning!("{who}: the reaper dropped its exit");
                return;
            };
            reaped_tx.send_replace(Some(info));
            let flushed = futures::future::join_all(output_pumps);
            match drain_bound {
                None => {
                    flushed.await;
                }
                Some(bound) => {
                    if tokio::time::timeout(bound, flushed).await.is_err() {
                        debug!(
                            "{who}: output still open {}s after the exit (a background process?); reporting the exit",
                            bound.as_secs()
                        );
                    }
                }
            }
            info!("{who}: exited with status {}", info.status);
            exited_tx.send_replace(Some(info));
        });
        Proc {
            label,
            pid: launched.pid,
            pidfd: launched.pidfd,
            start: Mutex::new(Some(start)),
            status: tokio::sync::Mutex::new(status),
            slots: Mutex::new(slots),
            stdin_close,
            reaped: reaped_rx,
            exited: exited_rx,
            tasks,
            pty: ends.pty,
        }
    }

    pub(super) fn has_exited(&self) -> bool {
        self.reaped.borrow().is_some()
    }

    /// Waits until it was reaped; false if that will never be known (the reaper dropped it).
    pub(super) async fn until_reaped(&self) -> bool {
        let mut reaped = self.reaped.clone();
        let known = reaped.wait_for(|v| v.is_some()).await.is_ok();
        known
    }

    /// StartProcess: lets it exec; returns its pid, or the exec's error.
    pub(super) async fn start(&self) -> RpcResult<u32> {
        let label = &self.label;
        if self.has_exited() {
            return Err(RpcError::new(
                Code::FAILED_PRECONDITION,
                format!("{label}: the process has already exited"),
            ));
        }
        let Some(start) = lock(&self.start).take() else {
            return Err(RpcError::new(
                Code::FAILED_PRECONDITION,
                format!("{label}: already started"),
            ));
        };
        // One byte into an empty pipe never blocks.
        if let Err(e) = nix::unistd::write(&start, &[1]) {
            return Err(RpcError::new(
                Code::FAILED_PRECONDITION,
                format!("{label}: signalling start: {e} (the process is gone)"),
            ));
        }
        drop(start);
        let mut status = self.status.lock().await;
        match tokio::time::timeout(EXEC_TIMEOUT, status.next_line()).await {
            Ok(Ok(None)) => {
                info!("{label}: started (pid {})", self.pid);
                Ok(u32::try_from(self.pid).unwrap_or(0))
            }
            Ok(Ok(Some(line))) => {
                let msg = line.strip_prefix("ERROR ").unwrap_or(&line).to_string();
                warning!("{label}: start failed: {msg}");
                Err(RpcError::new(setup_error_code(&msg), msg))
            }
            Ok(Err(e)) => Err(RpcError::new(
                Code::INTERNAL,
                format!("{label}: reading the exec status: {e}"),
            )),
            Err(_) => Err(RpcError::new(
                Code::DEADLINE_EXCEEDED,
                format!(
                    "{label}: exec did not complete within {}s",
                    EXEC_TIMEOUT.as_secs()
                ),
            )),
        }
    }

    /// WaitProcess: the exit, once the output was flushed.
    pub(super) async fn wait(&self) -> RpcResult<ExitInfo> {
        let mut exited = self.exited.clone();
        let result = exited.wait_for(|v| v.is_some()).await.map(|v| *v);
        match result {
            Ok(Some(info)) => Ok(info),
            _ => Err(RpcError::new(
                Code::ABORTED,
                format!("{}: removed before its exit was known", self.label),
            )),
        }
    }

    /// SignalProcess for this process alone.
    pub(super) fn signal(&self, sig: i32) -> RpcResult<()> {
        let gone = || {
            RpcError::new(
                Code::NOT_FOUND,
                format!("{}: the process has already exited", self.label),
            )
        };
        if self.has_exited() {
            return Err(gone());
        }
        match launch::pidfd_signal(self.pidfd.as_fd(), sig) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Err(gone()),
            Err(e) => Err(RpcError::new(
                Code::INTERNAL,
                format!("{}: signal {sig}: {e}", self.label),
            )),
        }
    }

    /// CloseStdin.
    pub(super) fn close_stdin(&self) {
        // A stream not yet connected never will be: drop its slot so the pump ends.
        self.take_slot(StdioStream::Stdin);
        self.stdin_close.notify_one();
    }

    pub(super) fn take_slot(&self, stream: StdioStream) -> Option<oneshot::Sender<StdioConn>> {
        let mut slots = lock(&self.slots);
        let i = slots.iter().position(|(s, _)| *s == stream)?;
        Some(slots.swap_remove(i).1)
    }

    /// Hands a connected stream to its pump.
    pub(super) fn attach(&self, stream: StdioStream, conn: StdioConn) -> anyhow::Result<()> {
        let Some(tx) = self.take_slot(stream) else {
            anyhow::bail!(
                "{}: {} was not requested or is already connected",
                self.label,
                stream.as_str()
            );
        };
        tx.send(conn)
            .map_err(|_| anyhow::anyhow!("{}: {} pump is gone", self.label, stream.as_str()))
    }

    /// ResizePty.
    pub(super) fn resize(&self, width: u32, height: u32) -> RpcResult<()> {
        let Some(master) = &self.pty else {
            return Err(RpcError::new(
                Code::FAILED_PRECONDITION,
                format!("{}: the process has no terminal", self.label),
            ));
        };
        let size = pty::window_size(width, height)
            .map_err(|e| RpcError::new(Code::INVALID_ARGUMENT, format!("{}: {e}", self.label)))?;
        match pty::set_window_size(master.as_fd(), &size) {
            Ok(()) => Ok(()),
            // A resize racing the exit is moot.
            Err(_) if self.has_exited() => Ok(()),
            Err(e) => Err(RpcError::new(
                Code::INTERNAL,
                format!("{}: TIOCSWINSZ: {e}", self.label),
            )),
        }
    }

    /// For removal: SIGKILL it if still running and wait for the reap, give connected
    /// streams a moment to flush, then stop the pumps. Returns what went wrong.
    pub(super) async fn shut_down(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.has_exited() {
            let _ = launch::pidfd_signal(self.pidfd.as_fd(), libc::SIGKILL);
            let mut reaped = self.reaped.clone();
            if tokio::time::timeout(KILL_WAIT, reaped.wait_for(|v| v.is_some()))
                .await
                .is_err()
            {
                problems.push(format!(
                    "{} (pid {}) did not die within {}s of SIGKILL",
                    self.label,
                    self.pid,
                    KILL_WAIT.as_secs()
                ));
            }
        }
        // Streams never connected will not be: let their pumps end.
        lock(&self.slots).clear();
        lock(&self.start).take();
        let mut exited = self.exited.clone();
        let _ = tokio::time::timeout(DRAIN_WAIT, exited.wait_for(|v| v.is_some())).await;
        for t in &self.tasks {
            t.abort();
        }
        problems
    }

    /// For a failed setup: kill the half-made process and wait for its reap.
    pub(super) async fn kill_launched(launched: Launched) {
        let _ = launch::pidfd_signal(launched.pidfd.as_fd(), libc::SIGKILL);
        let _ = tokio::time::timeout(KILL_WAIT, launched.exit).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn status_lines() {
        let (r, w) = pipe_pair().unwrap();
        let mut s = StatusPipe::new(pipe::Receiver::from_owned_fd(r).unwrap());
        nix::unistd::write(&w, b"READY\nERROR boom").unwrap();
        drop(w);
        assert_eq!(s.next_line().await.unwrap().as_deref(), Some("READY"));
        assert_eq!(s.next_line().await.unwrap().as_deref(), Some("ERROR boom"));
        assert_eq!(s.next_line().await.unwrap(), None);
    }

    #[tokio::test]
    async fn ready_or_the_reported_error() {
        let status = |text: &'static [u8]| {
            let (r, w) = pipe_pair().unwrap();
            nix::unistd::write(&w, text).unwrap();
            drop(w);
            StatusPipe::new(pipe::Receiver::from_owned_fd(r).unwrap())
        };
        assert!(status(b"READY\n").await_ready("p").await.is_ok());
        let e = status(b"ERROR container \"c\", exec process \"e\": exec \"/nope\": No such file or directory\n")
            .await_ready("p")
            .await
            .unwrap_err();
        assert_eq!(e.code, Code::NOT_FOUND);
        assert!(e.message.contains("/nope"));
        let e = status(b"").await_ready("p").await.unwrap_err();
        assert_eq!(e.code, Code::INTERNAL);
        assert!(e.message.starts_with("p: "), "{}", e.message);
        let e = status(b"what\n").await_ready("p").await.unwrap_err();
        assert!(e.message.contains("unexpected status"));
    }

    #[tokio::test]
    async fn pipes_for_requested_streams_only() {
        let s = Stdio::prepare(true, true, false, false).unwrap();
        assert!(s.input.is_some());
        let streams: Vec<_> = s.outputs.iter().map(|(s, _)| *s).collect();
        assert_eq!(streams, vec![Some(StdioStream::Stdout)]);
        assert!(s.pty.is_none());
        let s = Stdio::prepare(false, false, false, false).unwrap();
        assert!(s.input.is_none() && s.outputs.is_empty());
    }

    #[tokio::test]
    async fn terminal_has_stdin_and_stdout_only() {
        let Ok(s) = Stdio::prepare(true, true, true, true) else {
            eprintln!("no /dev/ptmx here; skipped");
            return;
        };
        assert!(s.input.is_some() && s.pty.is_some());
        let streams: Vec<_> = s.outputs.iter().map(|(s, _)| *s).collect();
        assert_eq!(streams, vec![Some(StdioStream::Stdout)]);
        let s = Stdio::prepare(false, false, false, true).unwrap();
        let streams: Vec<_> = s.outputs.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            streams,
            vec![None],
            "the pty is drained even without a stream"
        );
    }
}
