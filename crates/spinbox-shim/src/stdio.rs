//! A process's stdio between containerd and the guest.
//!
//! containerd hands the shim paths (fifos, or files); each stream travels on its own vsock
//! connection to the agent's stdio port, announced by a header line. Bytes are copied by
//! tokio tasks; RPC payloads never carry them.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use spinbox_agent_api::{stdio_header, StdioStream};
use spinbox_vmm::vsock::VsockTransport;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;

/// The stdio paths containerd gave for a process (empty = not wanted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// The copy tasks of one process's streams.
#[derive(Default)]
pub struct StdioPumps {
    pub stdin: Option<JoinHandle<io::Result<u64>>>,
    pub stdout: Option<JoinHandle<io::Result<u64>>>,
    pub stderr: Option<JoinHandle<io::Result<u64>>>,
}

impl StdioPumps {
    /// Waits until stdout and stderr reached EOF (every byte delivered), at most `limit`.
    /// Returns false if the limit ran out first (the copies are then aborted).
    pub async fn drain_output(&mut self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        let mut complete = true;
        for (name, slot) in [("stdout", &mut self.stdout), ("stderr", &mut self.stderr)] {
            let Some(handle) = slot.take() else { continue };
            let abort = handle.abort_handle();
            match tokio::time::timeout_at(deadline, handle).await {
                Ok(Ok(Ok(bytes))) => tracing::debug!(stream = name, bytes, "output drained"),
                Ok(Ok(Err(e))) => tracing::warn!(stream = name, error = %e, "output copy failed"),
                Ok(Err(e)) => tracing::warn!(stream = name, error = %e, "output task failed"),
                Err(_) => {
                    abort.abort();
                    complete = false;
                    tracing::warn!(
                        stream = name,
                        ?limit,
                        "output still open after timeouts.io_wait; cut off"
                    );
                }
            }
        }
        complete
    }

    /// Stops every copy (delete / shutdown).
    pub fn abort(&mut self) {
        for h in [self.stdin.take(), self.stdout.take(), self.stderr.take()]
            .into_iter()
            .flatten()
        {
            h.abort();
        }
    }
}

async fn open_stream(
    transport: &VsockTransport,
    port: u32,
    container_id: &str,
    exec_id: &str,
    which: StdioStream,
    limit: Duration,
) -> io::Result<ttrpc::r#async::transport::Socket> {
    let mut s = transport.connect(port, limit).await?;
    s.write_all(stdio_header(container_id, exec_id, which).as_bytes())
        .await?;
    Ok(s)
}

/// Opens a containerd output path for writing: a fifo (containerd holds its read end) or a
/// plain file (appended).
async fn open_output(path: &Path) -> io::Result<Box<dyn AsyncWrite + Send + Unpin>> {
    let meta = tokio::fs::metadata(path).await;
    let is_fifo = meta
        .as_ref()
        .map(|m| std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()))
        .unwrap_or(false);
    if is_fifo {
        let tx = tokio::net::unix::pipe::OpenOptions::new().open_sender(path)?;
        Ok(Box::new(tx))
    } else {
        let f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await?;
        Ok(Box::new(f))
    }
}

/// Opens containerd's stdin path for reading. Opening a fifo for reading waits for its writer
/// (containerd opens it concurrently); that wait runs on the blocking pool, not the runtime.
async fn open_input(path: PathBuf) -> io::Result<Box<dyn AsyncRead + Send + Unpin>> {
    let meta = tokio::fs::metadata(&path).await?;
    if std::os::unix::fs::FileTypeExt::is_fifo(&meta.file_type()) {
        let file = tokio::task::spawn_blocking(move || std::fs::File::open(&path))
            .await
            .map_err(|e| io::Error::other(e.to_string()))??;
        let rx = tokio::net::unix::pipe::Receiver::from_file(file)?;
        Ok(Box::new(rx))
    } else {
        Ok(Box::new(tokio::fs::File::open(&path).await?))
    }
}

/// Connects the streams containerd asked for and starts copying. Output streams are fully
/// connected before this returns, so nothing the process writes can be lost.
pub async fn connect(
    transport: &VsockTransport,
    port: u32,
    container_id: &str,
    exec_id: &str,
    paths: &StdioPaths,
    limit: Duration,
) -> io::Result<StdioPumps> {
    let mut pumps = StdioPumps::default();
    for (which, path) in [
        (StdioStream::Stdout, &paths.stdout),
        (StdioStream::Stderr, &paths.stderr),
    ] {
        if path.is_empty() {
            continue;
        }
        let mut out = open_output(Path::new(path))
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("opening {path}: {e}")))?;
        let mut stream = open_stream(transport, port, container_id, exec_id, which, limit)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("{} stream: {e}", which.as_str())))?;
        let handle = tokio::spawn(async move {
            let n = tokio::io::copy(&mut stream, &mut out).await?;
            out.flush().await?;
            Ok(n)
        });
        match which {
            StdioStream::Stdout => pumps.stdout = Some(handle),
            _ => pumps.stderr = Some(handle),
        }
    }
    if !paths.stdin.is_empty() {
        let mut stream = open_stream(
            transport,
            port,
            container_id,
            exec_id,
            StdioStream::Stdin,
            limit,
        )
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("stdin stream: {e}")))?;
        let path = PathBuf::from(&paths.stdin);
        pumps.stdin = Some(tokio::spawn(async move {
            let mut input = open_input(path).await?;
            let n = tokio::io::copy(&mut input, &mut stream).await?;
            // EOF from containerd: the process sees EOF too.
            stream.shutdown().await?;
            Ok(n)
        }));
    }
    Ok(pumps)
}
