//! Container stdio on dedicated vsock streams. The host connects to the stdio port, sends
//! `STDIO <container> <exec|-> <stdin|stdout|stderr>\n`, and the connection then carries that
//! stream's raw bytes. Output is pumped pipe -> vsock and ends with shutdown(SHUT_WR) when the
//! pipe reaches EOF; input vsock -> pipe, and the pipe is closed on EOF from the host or on
//! CloseStdin. For a terminal process the "pipe" is the pty master (see [`super::pty`]): its
//! shutdown writes the terminal's EOF character.
//!
//! An output stream the host asks for with ` port` goes by the VM's virtio serial port of
//! that name instead when it is a pipe: the pipe is spliced into the port (the kernel hands
//! the pipe's pages to the device, nothing is copied), and the connection carries only the
//! route byte and, at EOF, the byte count (see [`spinbox_agent_api::stdio_header`]).

use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use spinbox_agent_api::{output_port_name, parse_stdio_header, StdioStream};
use spinbox_agent_api::{ROUTE_INLINE, ROUTE_PORT};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::unix::pipe;
use tokio::sync::{oneshot, Notify};
use tokio_vsock::{VsockAddr, VsockListener, VsockStream};

use super::pty::PtyReader;
use super::Manager;
use crate::log::{debug, warning};

/// Longest header line accepted.
const MAX_HEADER: usize = 512;
/// How long a new connection may take to send its header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// After CloseStdin, how long the stdin stream may stay idle before the pipe is closed (data
/// the host sent just before the RPC still gets through).
const CLOSE_DRAIN_IDLE: Duration = Duration::from_millis(100);

/// Read size of the output pumps (the largest vsock packet the guest sends is 64 KiB).
const OUTPUT_CHUNK: usize = 64 * 1024;

/// Most bytes one splice into a serial port moves (the pipes hold 1 MiB).
const SPLICE_CHUNK: usize = 1 << 20;

/// A splice into a serial port costs the emulated guest about as much as copying a few
/// hundred KiB (syscall, virtqueue kick, the device's interrupt), whatever it carries. So
/// while output streams (the previous splice was less than [`STREAMING_GAP`] ago) and the
/// pipe holds less than [`BATCH_BYTES`], the pump waits [`BATCH_WAIT`] for more; sparse
/// output (the first data after a pause) goes at once. Measured under TCG: 256 MiB through
/// 4096 splices of 64 KiB took 1.7 s of guest time, through 272 of ~1 MiB 0.5 s.
const STREAMING_GAP: Duration = Duration::from_millis(2);
const BATCH_BYTES: usize = 512 * 1024;
const BATCH_WAIT: Duration = Duration::from_millis(1);

/// Where the serial ports are listed (`vportNpM/name`) and opened (`/dev/vportNpM`).
const VIRTIO_PORTS: &str = "/sys/class/virtio-ports";

/// How long a ` port` request waits for its port to appear (the driver adds ports after the
/// device is up) before the stream goes inline.
const PORT_WAIT: Duration = Duration::from_millis(500);

/// What the host asked for an output stream.
pub enum PortRequest {
    /// A plain header: the bytes go on the connection.
    No,
    /// A ` port` header, with the stream's port when this VM has it and it was free.
    Asked(Option<OwnedFd>),
}

/// A stdio connection from the host, as the pumps get it.
pub struct StdioConn {
    pub conn: VsockStream,
    pub port: PortRequest,
}

/// The host side of a stream for the pumps: bytes both ways, and for output maybe a port.
pub trait HostStream: AsyncRead + AsyncWrite + Unpin + Send {
    /// The port request, taken once (later calls: [`PortRequest::No`]).
    fn take_port_request(&mut self) -> PortRequest {
        PortRequest::No
    }

    /// A descriptor of the connection of its own, for a blocking thread to poll.
    fn dup_fd(&self) -> io::Result<OwnedFd> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this stream has no descriptor",
        ))
    }
}

impl HostStream for StdioConn {
    fn take_port_request(&mut self) -> PortRequest {
        std::mem::replace(&mut self.port, PortRequest::No)
    }

    fn dup_fd(&self) -> io::Result<OwnedFd> {
        self.conn.as_fd().try_clone_to_owned()
    }
}

impl AsyncRead for StdioConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.conn).poll_read(cx, buf)
    }
}

impl AsyncWrite for StdioConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.conn).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.conn).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.conn).poll_shutdown(cx)
    }
}

/// The agent's end of a process's output: a pipe, or a terminal's master.
pub enum OutputEnd {
    Pipe(pipe::Receiver),
    Terminal(PtyReader),
}

impl AsyncRead for OutputEnd {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            OutputEnd::Pipe(p) => Pin::new(p).poll_read(cx, buf),
            OutputEnd::Terminal(t) => Pin::new(t).poll_read(cx, buf),
        }
    }
}

/// Listens on the stdio port and hands each stream to its container.
pub fn listen(port: u32, manager: Arc<Manager>) -> Result<()> {
    let listener = VsockListener::bind(VsockAddr::new(libc::VMADDR_CID_ANY, port))
        .with_context(|| format!("listening on vsock port {port} for stdio"))?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((conn, peer)) => {
                    let manager = manager.clone();
                    tokio::spawn(async move {
                        if let Err(e) = route(conn, &manager).await {
                            warning!("stdio connection from {peer:?}: {e:#}");
                        }
                    });
                }
                Err(e) => {
                    warning!("accepting a stdio connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(())
}

async fn route(mut conn: VsockStream, manager: &Manager) -> Result<()> {
    let line = tokio::time::timeout(HEADER_TIMEOUT, read_header(&mut conn))
        .await
        .context("no header in time")??;
    let Some(header) = parse_stdio_header(&line) else {
        bail!("bad header {line:?}");
    };
    let (container, exec, stream) = (&header.container, &header.exec, header.stream);
    debug!(
        "stdio {} for {container}/{exec:?} connected{}",
        stream.as_str(),
        if header.port { " (port asked)" } else { "" }
    );
    let port = match output_port_name(stream).filter(|_| header.port) {
        None => PortRequest::No,
        Some(name) => PortRequest::Asked(open_port(name).await),
    };
    manager.attach_stdio(container, exec, stream, StdioConn { conn, port })
}

/// Opens the serial port `name` for writing, waiting up to [`PORT_WAIT`] for it to appear.
/// None: this VM has no such port, or it is already open (the driver allows one opener).
async fn open_port(name: &'static str) -> Option<OwnedFd> {
    let deadline = tokio::time::Instant::now() + PORT_WAIT;
    loop {
        let found = tokio::task::spawn_blocking(move || find_port(name)).await;
        match found {
            Ok(Ok(Some(fd))) => return Some(fd),
            Ok(Ok(None)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(Ok(None)) => {
                debug!("serial port {name}: not in this VM; the stream goes inline");
                return None;
            }
            Ok(Err(e)) => {
                warning!("serial port {name}: {e:#}; the stream goes inline");
                return None;
            }
            Err(e) => {
                warning!("serial port {name}: {e}");
                return None;
            }
        }
    }
}

/// The port named `name`, opened write-only and non-blocking, if it exists.
fn find_port(name: &str) -> Result<Option<OwnedFd>> {
    let entries = match std::fs::read_dir(VIRTIO_PORTS) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).context(VIRTIO_PORTS),
    };
    for entry in entries {
        let entry = entry.context(VIRTIO_PORTS)?;
        let Ok(port_name) = std::fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if port_name.trim_end() != name {
            continue;
        }
        let dev = std::path::Path::new("/dev").join(entry.file_name());
        let file = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
            .open(&dev)
            .with_context(|| format!("opening {}", dev.display()))?;
        return Ok(Some(OwnedFd::from(file)));
    }
    Ok(None)
}

/// Reads the header line byte by byte, so no stream data is consumed with it.
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<String> {
    let mut line = Vec::with_capacity(64);
    loop {
        let b = r.read_u8().await.context("reading the header")?;
        if b == b'\n' {
            break;
        }
        line.push(b);
        if line.len() > MAX_HEADER {
            bail!("header longer than {MAX_HEADER} bytes");
        }
    }
    String::from_utf8(line).context("header is not UTF-8")
}

/// Pipe -> stream until the pipe's EOF (every writer closed), then shutdown(SHUT_WR). Waits
/// for the stream first: until the host connects, output stays in the pipe. A pipe whose
/// host asked for, and got, its serial port is spliced into the port instead.
pub async fn pump_output<S: HostStream>(out: OutputEnd, stream: oneshot::Receiver<S>, what: &str) {
    let Ok(mut conn) = stream.await else {
        debug!("{what}: no stream will come; output discarded");
        return;
    };
    let copied = match (conn.take_port_request(), out) {
        (PortRequest::Asked(Some(port)), OutputEnd::Pipe(pipe)) => {
            match splice_to_port(pipe, port, &mut conn).await {
                Ok(total) => {
                    debug!("{what}: {total} bytes by the serial port");
                    conn.write_all(&total.to_le_bytes()).await
                }
                Err(e) => Err(e),
            }
        }
        (PortRequest::Asked(_), mut out) => match conn.write_all(&[ROUTE_INLINE]).await {
            Ok(()) => copy_output(&mut out, &mut conn).await,
            Err(e) => Err(e),
        },
        (PortRequest::No, mut out) => copy_output(&mut out, &mut conn).await,
    };
    if let Err(e) = copied {
        // The host went away: drop the pipe, writers get EPIPE.
        debug!("{what}: {e}");
        return;
    }
    if let Err(e) = conn.shutdown().await {
        debug!("{what}: shutdown: {e}");
    }
}

/// Pipe -> serial port by splice(2) until the pipe's EOF; returns the bytes moved. Answers
/// [`ROUTE_PORT`] on `conn` first; fails when the host closes `conn` (it went away) or the
/// port's host end. The loop runs on a blocking thread with the pipe taken off the
/// reactor: the reactor would wake for every write the process makes, and under emulation
/// those wake-ups cost more than the splices.
async fn splice_to_port<S: HostStream>(
    pipe: pipe::Receiver,
    port: OwnedFd,
    conn: &mut S,
) -> io::Result<u64> {
    conn.write_all(&[ROUTE_PORT]).await?;
    conn.flush().await?;
    let pipe = pipe.into_nonblocking_fd()?;
    let host = conn.dup_fd()?;
    // Aborting the pump (RemoveContainer) drops the guard, which stops the thread.
    let guard = StopOnDrop::new()?;
    let stop = guard.0.try_clone()?;
    tokio::task::spawn_blocking(move || splice_loop(&pipe, &port, &host, &stop))
        .await
        .map_err(io::Error::other)?
}

/// An eventfd that is signalled when this is dropped: the blocking side of a pump polls it.
struct StopOnDrop(OwnedFd);

impl StopOnDrop {
    fn new() -> io::Result<StopOnDrop> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor nobody else owns.
        Ok(StopOnDrop(unsafe {
            <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
        }))
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a valid buffer to our eventfd.
        unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
}

/// The blocking side of [`splice_to_port`]: waits with poll(2), batches while output
/// streams (see [`STREAMING_GAP`]), splices. Ends at the pipe's EOF, or with an error when
/// the host leaves or `stop` is signalled.
fn splice_loop(pipe: &OwnedFd, port: &OwnedFd, host: &OwnedFd, stop: &OwnedFd) -> io::Result<u64> {
    let (pipe, port, host) = (pipe.as_raw_fd(), port.as_raw_fd(), host.as_raw_fd());
    let host_events = libc::POLLIN | libc::POLLRDHUP;
    let stop = (stop.as_raw_fd(), libc::POLLIN);
    let mut total = 0u64;
    let mut last_splice: Option<std::time::Instant> = None;
    loop {
        let [p, h, s] = poll_wait([(pipe, libc::POLLIN), (host, host_events), stop])?;
        if s != 0 {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "the pump was stopped",
            ));
        }
        if h != 0 {
            return Err(host_left());
        }
        if p & libc::POLLIN == 0 {
            if p & (libc::POLLHUP | libc::POLLERR) != 0 {
                return Ok(total);
            }
            continue;
        }
        let streaming = last_splice.is_some_and(|t| t.elapsed() < STREAMING_GAP);
        if streaming && pipe_bytes(pipe)? < BATCH_BYTES {
            std::thread::sleep(BATCH_WAIT);
        }
        let [o, h, s] = poll_wait([(port, libc::POLLOUT), (host, host_events), stop])?;
        if s != 0 {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "the pump was stopped",
            ));
        }
        if h != 0 {
            return Err(host_left());
        }
        if o & libc::POLLOUT == 0 {
            if o & (libc::POLLHUP | libc::POLLERR) != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the serial port's host end is closed",
                ));
            }
            continue;
        }
        match splice(pipe, port, SPLICE_CHUNK) {
            Ok(n) => {
                total += n as u64;
                last_splice = Some(std::time::Instant::now());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The host sends nothing after its header, so its connection turning readable during a
/// port transfer means it went away.
fn host_left() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the host closed the stream")
}

/// poll(2) on `N` fds without a timeout (EINTR retried): their revents.
fn poll_wait<const N: usize>(fds: [(RawFd, libc::c_short); N]) -> io::Result<[libc::c_short; N]> {
    let mut p = fds.map(|(fd, events)| libc::pollfd {
        fd,
        events,
        revents: 0,
    });
    loop {
        // SAFETY: N valid pollfds.
        if unsafe { libc::poll(p.as_mut_ptr(), N as libc::nfds_t, -1) } >= 0 {
            return Ok(p.map(|p| p.revents));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// How many bytes the pipe holds (FIONREAD).
fn pipe_bytes(fd: RawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// splice(2) from a pipe to `out`, non-blocking.
fn splice(pipe: RawFd, out: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain fds, no offsets.
    let n = unsafe {
        libc::splice(
            pipe,
            std::ptr::null_mut(),
            out,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Pipe -> stream with one large buffer: every write becomes one vsock packet (up to the
/// peer's credit), so a larger read means fewer packets, notifications and interrupts.
async fn copy_output<R: AsyncRead + Unpin, S: AsyncWrite + Unpin>(
    pipe: &mut R,
    conn: &mut S,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; OUTPUT_CHUNK];
    loop {
        let n = pipe.read(&mut buf).await?;
        if n == 0 {
            return conn.flush().await;
        }
        conn.write_all(&buf[..n]).await?;
    }
}

/// Stream -> pipe until the host's EOF, or until `close` is notified (CloseStdin) and the
/// stream then stays idle for a moment; then the pipe is shut down and closed, which is the
/// process's EOF.
pub async fn pump_input<S: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut pipe: W,
    stream: oneshot::Receiver<S>,
    close: Arc<Notify>,
    what: &str,
) {
    copy_input(&mut pipe, stream, close, what).await;
    if let Err(e) = pipe.shutdown().await {
        debug!("{what}: shutdown: {e}");
    }
    debug!("{what}: closed");
}

async fn copy_input<S: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    pipe: &mut W,
    stream: oneshot::Receiver<S>,
    close: Arc<Notify>,
    what: &str,
) {
    // A stream that already arrived wins over a close: its data was sent before CloseStdin.
    let mut conn = tokio::select! {
        biased;
        s = stream => match s {
            Ok(s) => s,
            Err(_) => return,
        },
        _ = close.notified() => return,
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut closing = false;
    loop {
        let n = if closing {
            match tokio::time::timeout(CLOSE_DRAIN_IDLE, conn.read(&mut buf)).await {
                Ok(r) => r,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                biased;
                r = conn.read(&mut buf) => r,
                _ = close.notified() => { closing = true; continue; }
            }
        };
        match n {
            Ok(0) => break,
            Ok(n) => {
                if let Err(e) = pipe.write_all(&buf[..n]).await {
                    debug!("{what}: {e}");
                    break;
                }
            }
            Err(e) => {
                debug!("{what}: {e}");
                break;
            }
        }
    }
}

/// The label for logs: `c1 stdout`, `c1 e1 stdin`.
pub fn label(process: &str, stream: StdioStream) -> String {
    format!("{process} {}", stream.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::unix::pipe;

    #[tokio::test]
    async fn header_is_read_without_overreading() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(b"STDIO c1 - stdin\nrest").await.unwrap();
        drop(a);
        assert_eq!(read_header(&mut b).await.unwrap(), "STDIO c1 - stdin");
        let mut rest = String::new();
        b.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "rest");
    }

    #[tokio::test]
    async fn header_limits() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        a.write_all(&[b'x'; 600]).await.unwrap();
        assert!(read_header(&mut b).await.is_err());
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(b"STDIO").await.unwrap();
        drop(a);
        assert!(read_header(&mut b).await.is_err(), "EOF before newline");
    }

    fn pipe_pair() -> (pipe::Sender, pipe::Receiver) {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        (
            pipe::Sender::from_owned_fd(w).unwrap(),
            pipe::Receiver::from_owned_fd(r).unwrap(),
        )
    }

    impl HostStream for tokio::io::DuplexStream {}

    /// A host connection that asks for a port.
    struct Asking(tokio::net::UnixStream, Option<PortRequest>);

    impl HostStream for Asking {
        fn take_port_request(&mut self) -> PortRequest {
            self.1.take().unwrap_or(PortRequest::No)
        }

        fn dup_fd(&self) -> io::Result<OwnedFd> {
            self.0.as_fd().try_clone_to_owned()
        }
    }

    impl AsyncRead for Asking {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Asking {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    /// A port stand-in: one end of a socket pair (splice feeds a socket as it feeds a
    /// serial port), the other end read by the test.
    fn port_pair() -> (OwnedFd, tokio::net::UnixStream) {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        theirs.set_nonblocking(true).unwrap();
        ours.set_nonblocking(true).unwrap();
        (
            OwnedFd::from(ours),
            tokio::net::UnixStream::from_std(theirs).unwrap(),
        )
    }

    #[tokio::test]
    async fn output_pump_splices_into_the_port_and_reports_the_count() {
        let (mut w, r) = pipe_pair();
        let (port, mut port_reader) = port_pair();
        let (tx, rx) = oneshot::channel();
        let (ours, mut host) = tokio::net::UnixStream::pair().unwrap();
        let task = tokio::spawn(async move {
            pump_output(OutputEnd::Pipe(r), rx, "t").await;
        });
        tx.send(Asking(ours, Some(PortRequest::Asked(Some(port)))))
            .map_err(|_| ())
            .unwrap();
        // More than a socket buffer holds: the pump has to wait for the reader.
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let expected = payload.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&payload).await.unwrap();
        });
        let mut route = [0u8; 1];
        host.read_exact(&mut route).await.unwrap();
        assert_eq!(route[0], ROUTE_PORT);
        let mut got = vec![0u8; expected.len()];
        port_reader.read_exact(&mut got).await.unwrap();
        assert!(got == expected, "the port carried other bytes");
        writer.await.unwrap();
        let mut count = Vec::new();
        host.read_to_end(&mut count).await.unwrap();
        assert_eq!(count, (expected.len() as u64).to_le_bytes());
        task.await.unwrap();
    }

    #[tokio::test]
    async fn output_pump_without_its_port_answers_inline() {
        let (mut w, r) = pipe_pair();
        let (tx, rx) = oneshot::channel();
        let (ours, mut host) = tokio::net::UnixStream::pair().unwrap();
        let task = tokio::spawn(async move { pump_output(OutputEnd::Pipe(r), rx, "t").await });
        tx.send(Asking(ours, Some(PortRequest::Asked(None))))
            .map_err(|_| ())
            .unwrap();
        w.write_all(b"inline").await.unwrap();
        drop(w);
        let mut got = Vec::new();
        host.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"Iinline");
        task.await.unwrap();
    }

    /// A port pump whose port nobody reads, stalled with a full pipe behind it: the pump's
    /// task, the host's connection (the route byte read), the writer filling the pipe until
    /// EPIPE, and the port's other end (kept open).
    async fn stalled_port_pump() -> (
        tokio::task::JoinHandle<()>,
        tokio::net::UnixStream,
        tokio::task::JoinHandle<()>,
        tokio::net::UnixStream,
    ) {
        let (mut w, r) = pipe_pair();
        let (port, port_reader) = port_pair();
        let (tx, rx) = oneshot::channel();
        let (ours, mut host) = tokio::net::UnixStream::pair().unwrap();
        let task = tokio::spawn(async move { pump_output(OutputEnd::Pipe(r), rx, "t").await });
        tx.send(Asking(ours, Some(PortRequest::Asked(Some(port)))))
            .map_err(|_| ())
            .unwrap();
        let mut route = [0u8; 1];
        host.read_exact(&mut route).await.unwrap();
        let fill = tokio::spawn(async move {
            let chunk = vec![7u8; 64 * 1024];
            while w.write_all(&chunk).await.is_ok() {}
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        (task, host, fill, port_reader)
    }

    #[tokio::test]
    async fn output_pump_stops_when_the_host_leaves_a_port_transfer() {
        let (task, host, fill, port_reader) = stalled_port_pump().await;
        drop(host);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the pump gave up")
            .unwrap();
        // The pipe is closed with the pump: the writer gets EPIPE and stops.
        tokio::time::timeout(Duration::from_secs(5), fill)
            .await
            .expect("the writer saw EPIPE")
            .unwrap();
        drop(port_reader);
    }

    #[tokio::test]
    async fn aborting_a_port_pump_stops_its_thread() {
        let (task, mut host, fill, port_reader) = stalled_port_pump().await;
        task.abort();
        // The thread let go of its copy of the connection and of the pipe.
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), host.read_to_end(&mut rest))
            .await
            .expect("the host's connection closed")
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), fill)
            .await
            .expect("the writer saw EPIPE")
            .unwrap();
        drop(port_reader);
    }

    #[tokio::test]
    async fn output_pump_copies_then_shuts_down() {
        let (mut w, r) = pipe_pair();
        let (tx, rx) = oneshot::channel();
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move { pump_output(OutputEnd::Pipe(r), rx, "t").await });
        w.write_all(b"early ").await.unwrap();
        tx.send(ours).map_err(|_| ()).unwrap();
        w.write_all(b"late").await.unwrap();
        drop(w);
        let mut got = String::new();
        theirs.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "early late");
        task.await.unwrap();
    }

    #[tokio::test]
    async fn input_pump_closes_pipe_on_eof_and_on_close() {
        let (w, mut r) = pipe_pair();
        let (tx, rx) = oneshot::channel();
        let (mut host, ours) = tokio::io::duplex(1024);
        let close = Arc::new(Notify::new());
        let task = tokio::spawn(pump_input(w, rx, close.clone(), "t"));
        tx.send(ours).map_err(|_| ()).unwrap();
        host.write_all(b"a\nb\n").await.unwrap();
        host.shutdown().await.unwrap();
        let mut got = String::new();
        r.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "a\nb\n");
        task.await.unwrap();

        // CloseStdin with the stream still open: what was sent arrives, then EOF.
        let (w, mut r) = pipe_pair();
        let (tx, rx) = oneshot::channel();
        let (mut host, ours) = tokio::io::duplex(1024);
        let task = tokio::spawn(pump_input(w, rx, close.clone(), "t"));
        tx.send(ours).map_err(|_| ()).unwrap();
        host.write_all(b"x").await.unwrap();
        close.notify_one();
        let mut got = String::new();
        r.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "x");
        task.await.unwrap();
        drop(host);

        // CloseStdin before any stream: closed at once.
        let (w, mut r) = pipe_pair();
        let (_tx, rx) = oneshot::channel::<tokio::io::DuplexStream>();
        let close = Arc::new(Notify::new());
        close.notify_one();
        pump_input(w, rx, close, "t").await;
        let mut got = String::new();
        r.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "");
    }
}
