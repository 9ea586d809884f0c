//! A process's stdio between containerd and the guest.
//!
//! containerd hands the shim paths (fifos, or files); each stream travels on its own vsock
//! connection to the agent's stdio port, announced by a header line. Bytes are copied by
//! tokio tasks; RPC payloads never carry them.
//!
//! A container's own stdout and stderr (its init's, without a terminal) take the VM's
//! output serial ports when it has them (`vm.output_ports`): the vsock connection then
//! carries only the agent's route byte and, at EOF, the stream's byte count, and the bytes
//! come from the port's socket (see [`spinbox_agent_api::stdio_header`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use spinbox_agent_api::{stdio_header, StdioHeader, StdioStream, ROUTE_INLINE, ROUTE_PORT};
use spinbox_vmm::process::{place_fds, PassFd};
use spinbox_vmm::vm::OutputPorts;
use spinbox_vmm::vsock::VsockTransport;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// After CloseIO, stdin is copied on until its input has been idle this long: the client
/// wrote what it had before it asked to close, and its writer stays open until CloseIO returns.
const STDIN_DRAIN_IDLE: Duration = Duration::from_millis(50);

/// Read size from an output serial port's socket.
const PORT_READ: usize = 256 * 1024;

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
    /// containerd's stdin fifo, while our open of it may still be waiting for a writer.
    pub stdin_fifo: Option<PathBuf>,
    /// Tells the stdin copy to finish once its input is drained (CloseIO).
    pub stdin_close: Option<Arc<Notify>>,
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

    /// Ends stdin (CloseIO) without losing what the client wrote before it asked: the copy
    /// reads on until its input is idle ([`STDIN_DRAIN_IDLE`]) or at EOF, then shuts the
    /// stream down (the process's EOF); a pending open is released. Waits for that, at most
    /// `limit`, then aborts the copy.
    pub async fn close_stdin(&mut self, limit: Duration) {
        if let Some(fifo) = self.stdin_fifo.take() {
            unblock_fifo_open(&fifo);
        }
        if let Some(close) = self.stdin_close.take() {
            close.notify_one();
        }
        if let Some(h) = self.stdin.take() {
            let abort = h.abort_handle();
            match tokio::time::timeout(limit, h).await {
                Ok(Ok(Ok(bytes))) => tracing::debug!(bytes, "stdin closed"),
                Ok(Ok(Err(e))) => tracing::debug!(error = %e, "stdin copy ended"),
                Ok(Err(_)) => {}
                Err(_) => {
                    abort.abort();
                    tracing::warn!(?limit, "stdin copy still busy after CloseIO; cut off");
                }
            }
        }
    }

    /// Stops feeding stdin at once (teardown): the copy is aborted, a pending open released.
    pub fn abort_stdin(&mut self) {
        if let Some(fifo) = self.stdin_fifo.take() {
            unblock_fifo_open(&fifo);
        }
        self.stdin_close = None;
        if let Some(h) = self.stdin.take() {
            h.abort();
        }
    }

    /// Stops every copy (delete / shutdown).
    pub fn abort(&mut self) {
        self.abort_stdin();
        for h in [self.stdout.take(), self.stderr.take()]
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
    header: &str,
    limit: Duration,
) -> io::Result<ttrpc::r#async::transport::Socket> {
    let mut s = transport.connect(port, limit).await?;
    s.write_all(header.as_bytes()).await?;
    Ok(s)
}

/// One output stream to `out`: from the connection, or when the agent routed it to the
/// serial port whose host end is `port`, from the port until the byte count the connection
/// ends with.
async fn copy_output<W: AsyncWrite + Unpin>(
    mut conn: ttrpc::r#async::transport::Socket,
    port: Option<std::os::unix::net::UnixStream>,
    out: &mut W,
    report: Option<(FirstOutput, StdioStream)>,
) -> io::Result<u64> {
    let Some(port) = port else {
        return tokio::io::copy(&mut FirstByte::new(conn, report, "vsock"), out).await;
    };
    let mut route = [0u8; 1];
    conn.read_exact(&mut route)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("the agent's route answer: {e}")))?;
    match route[0] {
        ROUTE_INLINE => tokio::io::copy(&mut FirstByte::new(conn, report, "vsock"), out).await,
        ROUTE_PORT => {
            port.set_nonblocking(true)?;
            let port = tokio::net::UnixStream::from_std(port)?;
            copy_from_port(conn, FirstByte::new(port, report, "port"), out).await
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the agent answered the port request with {other:#04x}"),
        )),
    }
}

/// Port -> `out` until as many bytes as the count `conn` ends with (8 bytes, little-endian)
/// have arrived: the port itself has no end of stream.
async fn copy_from_port<C, P, W>(mut conn: C, mut port: P, out: &mut W) -> io::Result<u64>
where
    C: AsyncRead + Unpin,
    P: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let count = async move {
        let mut b = [0u8; 8];
        conn.read_exact(&mut b).await.map(|_| u64::from_le_bytes(b))
    };
    tokio::pin!(count);
    let mut expected: Option<u64> = None;
    let mut copied = 0u64;
    let mut buf = vec![0u8; PORT_READ];
    loop {
        if let Some(total) = expected {
            if copied >= total {
                break;
            }
        }
        let want = match expected {
            Some(total) => usize::try_from(total - copied)
                .unwrap_or(PORT_READ)
                .min(PORT_READ),
            None => PORT_READ,
        };
        tokio::select! {
            r = &mut count, if expected.is_none() => {
                let total = r.map_err(|e| io::Error::new(
                    e.kind(),
                    format!("the stream ended without its byte count after {copied} bytes: {e}"),
                ))?;
                if total < copied {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the agent counted {total} bytes, the port carried {copied}"),
                    ));
                }
                expected = Some(total);
            }
            r = port.read(&mut buf[..want]) => {
                let n = r?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the serial port closed after {copied} bytes"),
                    ));
                }
                out.write_all(&buf[..n]).await?;
                copied += n as u64;
            }
        }
    }
    Ok(copied)
}

/// The process whose streams [`connect`] opens: its container, exec id ("" for the init) and
/// containerd namespace.
#[derive(Debug, Clone, Copy)]
pub struct ProcessRef<'a> {
    pub container_id: &'a str,
    pub exec_id: &'a str,
    pub namespace: &'a str,
}

/// Logs, once per process, when its first output byte reached the host: the last step of
/// the boot timeline (`first output id=… stream=… since_create_ms=…`).
#[derive(Clone)]
pub struct FirstOutput {
    id: String,
    since: std::time::Instant,
    seen: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FirstOutput {
    /// For container `id`, whose create began at `since`.
    pub fn new(id: &str, since: std::time::Instant) -> FirstOutput {
        FirstOutput {
            id: id.to_owned(),
            since,
            seen: Default::default(),
        }
    }

    /// `route`: `port` (the VM's serial port) or `vsock`.
    fn arrived(&self, stream: StdioStream, route: &'static str) {
        if !self.seen.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::info!(
                id = %self.id,
                stream = stream.as_str(),
                route,
                since_create_ms = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX),
                "first output"
            );
        }
    }
}

/// A guest stream that reports its first byte to a [`FirstOutput`]. The copy itself stays
/// `tokio::io::copy`, which keeps reading from the guest while a write to containerd's fifo
/// waits (a read-then-write loop with 64 KiB reads measured no faster).
struct FirstByte<R> {
    inner: R,
    report: Option<(FirstOutput, StdioStream, &'static str)>,
}

impl<R> FirstByte<R> {
    fn new(inner: R, report: Option<(FirstOutput, StdioStream)>, route: &'static str) -> Self {
        FirstByte {
            inner,
            report: report.map(|(f, s)| (f, s, route)),
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for FirstByte<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            if let Some((first, stream, route)) = self.report.take() {
                first.arrived(stream, route);
            }
        }
        polled
    }
}

/// A fifo's write end, with a read end of our own kept open beside it: a client that goes
/// away (`ctr run -d`, a detached `ctr task attach`) does not break the pipe, and the next
/// client to open the fifo reads on (as containerd's runc shim keeps its fifos).
struct FifoOut {
    tx: tokio::net::unix::pipe::Sender,
    _keep_open: std::fs::File,
}

impl AsyncWrite for FifoOut {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.tx).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.tx).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.tx).poll_shutdown(cx)
    }
}

/// Opens a containerd output path for writing: a fifo (containerd's client holds its read
/// end; we keep one too, see [`FifoOut`]) or a plain file (appended).
async fn open_output(path: &Path) -> io::Result<Box<dyn AsyncWrite + Send + Unpin>> {
    let meta = tokio::fs::metadata(path).await;
    let is_fifo = meta
        .as_ref()
        .map(|m| std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()))
        .unwrap_or(false);
    if is_fifo {
        use std::os::unix::fs::OpenOptionsExt;
        // A non-blocking read open of a fifo returns at once, writer or not.
        let keep_open = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        let tx = tokio::net::unix::pipe::OpenOptions::new().open_sender(path)?;
        Ok(Box::new(FifoOut {
            tx,
            _keep_open: keep_open,
        }))
    } else {
        let f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await?;
        Ok(Box::new(f))
    }
}

/// Copies stdin until EOF; once `close` is notified (CloseIO), only until the input has been
/// idle for [`STDIN_DRAIN_IDLE`]. `ctr run` asks to close the moment its own stdin ends, which
/// can be before this copy has read what it wrote into the fifo: aborting the copy then lost
/// that input.
async fn copy_stdin<R, W>(input: &mut R, out: &mut W, close: &Notify) -> io::Result<u64>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    let mut closing = false;
    loop {
        let n = if closing {
            match tokio::time::timeout(STDIN_DRAIN_IDLE, input.read(&mut buf)).await {
                Ok(read) => read?,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                biased;
                read = input.read(&mut buf) => read?,
                _ = close.notified() => {
                    closing = true;
                    continue;
                }
            }
        };
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).await?;
        total += n as u64;
    }
    out.flush().await?;
    Ok(total)
}

/// A reader blocked in `open(fifo, O_RDONLY)` waits for a writer that may never come (the
/// client went away). Opening the write end ourselves, without blocking, releases it; the
/// reader then sees EOF. Without a blocked reader the open fails with ENXIO, which is fine.
fn unblock_fifo_open(path: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path);
}

/// Opens containerd's stdin path for reading. Opening a fifo for reading waits for its writer
/// (containerd's client opens it concurrently); that wait runs on a thread of its own, so
/// neither the runtime nor its blocking pool (which the shim's exit waits for) is held, and
/// [`StdioPumps::abort`] can release it.
///
/// For a terminal, the fifo is then held open for writing by us as well: a client that
/// detaches does not end the terminal's input, and `ctr task attach` can type into it again
/// (CloseIO still ends it).
async fn open_input(
    path: PathBuf,
    terminal: bool,
) -> io::Result<Box<dyn AsyncRead + Send + Unpin>> {
    let meta = tokio::fs::metadata(&path).await?;
    if std::os::unix::fs::FileTypeExt::is_fifo(&meta.file_type()) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let open_path = path.clone();
        std::thread::Builder::new()
            .name("stdin-open".into())
            .spawn(move || {
                let _ = tx.send(std::fs::File::open(&open_path));
            })?;
        let file = rx
            .await
            .map_err(|_| io::Error::other("stdin open thread vanished"))??;
        let rx = tokio::net::unix::pipe::Receiver::from_file(file)?;
        if terminal {
            use std::os::unix::fs::OpenOptionsExt;
            let keep_open = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&path)?;
            return Ok(Box::new(FifoIn {
                rx,
                _keep_open: keep_open,
            }));
        }
        Ok(Box::new(rx))
    } else {
        Ok(Box::new(tokio::fs::File::open(&path).await?))
    }
}

/// A terminal's input fifo with a write end of our own (see [`open_input`]).
struct FifoIn {
    rx: tokio::net::unix::pipe::Receiver,
    _keep_open: std::fs::File,
}

impl AsyncRead for FifoIn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.rx).poll_read(cx, buf)
    }
}

mod uri;
pub use uri::{parse_output, OutputTarget};

/// Starts a `binary://` logger: its fd 3 reads stdout, fd 4 stderr, and it closes fd 5 once it
/// is ready. Returns the write ends for stdout and stderr.
async fn start_binary_logger(
    program: &Path,
    args: &[(String, String)],
    container_id: &str,
    namespace: &str,
) -> io::Result<(std::fs::File, std::fs::File)> {
    use std::os::fd::AsRawFd;
    let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mut cmd = tokio::process::Command::new(program);
    for (k, v) in args {
        if v.is_empty() {
            cmd.arg(k);
        } else {
            cmd.arg(k).arg(v);
        }
    }
    cmd.env("CONTAINER_ID", container_id)
        .env("CONTAINER_NAMESPACE", namespace)
        .stdin(std::process::Stdio::null());
    let fds = [
        (out_r.as_raw_fd(), 3),
        (err_r.as_raw_fd(), 4),
        (ready_w.as_raw_fd(), 5),
    ]
    .map(|(src, dst)| PassFd { src, dst });
    // SAFETY: place_fds only calls fcntl and dup2 between fork and exec. (One dup2 pass
    // clobbered a pipe whose own number was 3 or 4, and the logger lost a stream.)
    unsafe {
        cmd.pre_exec(move || place_fds(&fds));
    }
    let child = cmd.spawn().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("starting logger {}: {e}", program.display()),
        )
    })?;
    drop((out_r, err_r, ready_w));
    // The logger says it is ready by closing fd 5: read until EOF, off the runtime.
    let ready = std::fs::File::from(ready_r);
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut buf = [0u8; 16];
        let mut r = &ready;
        while matches!(r.read(&mut buf), Ok(n) if n > 0) {}
    })
    .await
    .map_err(|e| io::Error::other(e.to_string()))?;
    // The logger lives on by itself and exits when its pipes close.
    tokio::spawn(async move {
        let mut child = child;
        let _ = child.wait().await;
    });
    Ok((std::fs::File::from(out_w), std::fs::File::from(err_w)))
}

/// Connects the streams containerd asked for and starts copying. Output streams are fully
/// connected before this returns, so nothing the process writes can be lost. With
/// `output_ports` (a container's init without a terminal) stdout and stderr ask for the
/// VM's serial ports.
pub async fn connect(
    transport: &VsockTransport,
    port: u32,
    process: &ProcessRef<'_>,
    paths: &StdioPaths,
    limit: Duration,
    first_output: Option<FirstOutput>,
    output_ports: Option<OutputPorts>,
) -> io::Result<StdioPumps> {
    let ProcessRef {
        container_id,
        exec_id,
        namespace,
    } = *process;
    let mut pumps = StdioPumps::default();
    let (mut stdout_port, mut stderr_port) = match output_ports {
        Some(p) if !paths.terminal => (Some(p.stdout), Some(p.stderr)),
        _ => (None, None),
    };
    // containerd gives the same binary:// URI for stdout and stderr: one logger for both.
    let mut logger: Option<(Option<std::fs::File>, Option<std::fs::File>)> = None;
    for (which, path) in [
        (StdioStream::Stdout, &paths.stdout),
        (StdioStream::Stderr, &paths.stderr),
    ] {
        if path.is_empty() {
            continue;
        }
        let mut out: Box<dyn AsyncWrite + Send + Unpin> = match parse_output(path)? {
            OutputTarget::Path(p) => open_output(&p)
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("opening {path}: {e}")))?,
            OutputTarget::Binary { program, args } => {
                if logger.is_none() {
                    let (o, e) =
                        start_binary_logger(&program, &args, container_id, namespace).await?;
                    logger = Some((Some(o), Some(e)));
                }
                let slot = match (which, logger.as_mut()) {
                    (StdioStream::Stdout, Some(l)) => l.0.take(),
                    (_, Some(l)) => l.1.take(),
                    (_, None) => None,
                };
                let file = slot.ok_or_else(|| io::Error::other("logger pipe already used"))?;
                Box::new(tokio::net::unix::pipe::Sender::from_file(file)?)
            }
        };
        let serial = match which {
            StdioStream::Stdout => stdout_port.take(),
            _ => stderr_port.take(),
        };
        let header = StdioHeader {
            container: container_id.to_owned(),
            exec: exec_id.to_owned(),
            stream: which,
            port: serial.is_some(),
        };
        let stream = open_stream(transport, port, &header.line(), limit)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("{} stream: {e}", which.as_str())))?;
        let report = first_output.clone().map(|f| (f, which));
        let handle = tokio::spawn(async move {
            let n = copy_output(stream, serial, &mut out, report).await?;
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
            &stdio_header(container_id, exec_id, StdioStream::Stdin),
            limit,
        )
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("stdin stream: {e}")))?;
        let path = PathBuf::from(paths.stdin.strip_prefix("file://").unwrap_or(&paths.stdin));
        pumps.stdin_fifo = Some(path.clone());
        let close = Arc::new(Notify::new());
        pumps.stdin_close = Some(close.clone());
        let terminal = paths.terminal;
        pumps.stdin = Some(tokio::spawn(async move {
            let mut input = open_input(path, terminal).await?;
            let n = copy_stdin(&mut input, &mut stream, &close).await?;
            // EOF from containerd, or CloseIO: the process sees EOF too.
            stream.shutdown().await?;
            Ok(n)
        }));
    }
    Ok(pumps)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CloseIO right after the client's last write, its writer still open: what it wrote
    /// arrives, then the copy ends (ctr run with piped stdin). Without a close, the copy
    /// waits for more.
    #[tokio::test]
    async fn stdin_close_delivers_what_was_written_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("stdin");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let mut input = {
            // The client's writer: opened (and written) on a thread of its own, since opening
            // a fifo blocks until the other side opens.
            let path = fifo.clone();
            let writer = std::thread::spawn(move || {
                let mut w = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                std::io::Write::write_all(&mut w, b"first line\nsecond\n").unwrap();
                w
            });
            let input = open_input(fifo.clone(), false).await.unwrap();
            (input, writer.join().unwrap())
        };
        let close = Notify::new();
        close.notify_one();
        let mut out = Vec::new();
        let started = std::time::Instant::now();
        let n = copy_stdin(&mut input.0, &mut out, &close).await.unwrap();
        assert_eq!((n, out.as_slice()), (18, &b"first line\nsecond\n"[..]));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "ended while the writer is open"
        );

        let open = Notify::new();
        let mut more = Vec::new();
        let pending = tokio::time::timeout(
            Duration::from_millis(200),
            copy_stdin(&mut input.0, &mut more, &open),
        )
        .await;
        assert!(pending.is_err(), "without CloseIO or EOF the copy waits");
    }

    /// The port's bytes are delivered up to the count the connection ends with, whether the
    /// count comes before the last bytes or after them; a short port or a count below what
    /// arrived is an error.
    #[tokio::test]
    async fn port_copy_ends_at_the_agents_count() {
        let payload: Vec<u8> = (0..700_000u32).map(|i| (i % 253) as u8).collect();
        for count_first in [true, false] {
            let (mut conn_agent, conn) = tokio::io::duplex(64);
            let (mut port_agent, port) = tokio::io::duplex(64 * 1024);
            let data = payload.clone();
            let agent = tokio::spawn(async move {
                let count = (data.len() as u64).to_le_bytes();
                if count_first {
                    conn_agent.write_all(&count).await.unwrap();
                }
                port_agent.write_all(&data).await.unwrap();
                if !count_first {
                    conn_agent.write_all(&count).await.unwrap();
                }
                // Neither side closes: the count alone ends the copy.
                (conn_agent, port_agent)
            });
            let mut out = Vec::new();
            let n = tokio::time::timeout(
                Duration::from_secs(10),
                copy_from_port(conn, port, &mut out),
            )
            .await
            .expect("the copy ended at the count")
            .unwrap();
            assert_eq!(n, payload.len() as u64);
            assert!(
                out == payload,
                "other bytes arrived (count first: {count_first})"
            );
            drop(agent.await.unwrap());
        }

        // The port closes before the counted bytes arrived.
        let (mut conn_agent, conn) = tokio::io::duplex(64);
        let (mut port_agent, port) = tokio::io::duplex(1024);
        conn_agent.write_all(&100u64.to_le_bytes()).await.unwrap();
        port_agent.write_all(b"short").await.unwrap();
        drop(port_agent);
        let err = copy_from_port(conn, port, &mut Vec::new())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("closed after 5 bytes"), "{err}");

        // The connection ends without a count.
        let (conn_agent, conn) = tokio::io::duplex(64);
        let (mut port_agent, port) = tokio::io::duplex(1024);
        port_agent.write_all(b"abc").await.unwrap();
        drop(conn_agent);
        let err = copy_from_port(conn, port, &mut Vec::new())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("without its byte count"), "{err}");
        drop(port_agent);
    }

    #[tokio::test]
    async fn binary_logger_gets_both_streams_and_signals_ready() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("log");
        // A logger in sh: reports ready by closing fd 5, then copies fd 3 and fd 4.
        let script = dir.path().join("logger.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nexec 5>&-\ncat <&3 >{0}.out\ncat <&4 >{0}.err\n",
                out.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (o, e) = start_binary_logger(&script, &[], "c1", "default")
            .await
            .unwrap();
        use std::io::Write;
        (&o).write_all(b"to stdout").unwrap();
        (&e).write_all(b"to stderr").unwrap();
        drop((o, e));
        for _ in 0..100 {
            if std::fs::read_to_string(dir.path().join("log.err")).unwrap_or_default()
                == "to stderr"
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            std::fs::read_to_string(dir.path().join("log.out")).unwrap(),
            "to stdout"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("log.err")).unwrap(),
            "to stderr"
        );
    }
}
