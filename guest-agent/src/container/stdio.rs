//! Container stdio on dedicated vsock streams. The host connects to the stdio port, sends
//! `STDIO <container> <exec|-> <stdin|stdout|stderr>\n`, and the connection then carries that
//! stream's raw bytes. Output is pumped pipe -> vsock and ends with shutdown(SHUT_WR) when the
//! pipe reaches EOF; input vsock -> pipe, and the pipe is closed on EOF from the host or on
//! CloseStdin. For a terminal process the "pipe" is the pty master (see [`super::pty`]): its
//! shutdown writes the terminal's EOF character.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use spinbox_agent_api::{parse_stdio_header, StdioStream};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::{oneshot, Notify};
use tokio_vsock::{VsockAddr, VsockListener, VsockStream};

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

/// The connection type the pumps get.
pub type StdioConn = VsockStream;

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

async fn route(mut conn: StdioConn, manager: &Manager) -> Result<()> {
    let line = tokio::time::timeout(HEADER_TIMEOUT, read_header(&mut conn))
        .await
        .context("no header in time")??;
    let Some((container, exec, stream)) = parse_stdio_header(&line) else {
        bail!("bad header {line:?}");
    };
    debug!(
        "stdio {} for {container}/{exec:?} connected",
        stream.as_str()
    );
    manager.attach_stdio(&container, &exec, stream, conn)
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
/// for the stream first: until the host connects, output stays in the pipe.
pub async fn pump_output<R: AsyncRead + Unpin, S: AsyncWrite + Unpin>(
    mut pipe: R,
    stream: oneshot::Receiver<S>,
    what: &str,
) {
    let Ok(mut conn) = stream.await else {
        debug!("{what}: no stream will come; output discarded");
        return;
    };
    if let Err(e) = copy_output(&mut pipe, &mut conn).await {
        // The host went away: drop the pipe, writers get EPIPE.
        debug!("{what}: {e}");
        return;
    }
    if let Err(e) = conn.shutdown().await {
        debug!("{what}: shutdown: {e}");
    }
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

    #[tokio::test]
    async fn output_pump_copies_then_shuts_down() {
        let (mut w, r) = pipe_pair();
        let (tx, rx) = oneshot::channel();
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move { pump_output(r, rx, "t").await });
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
