//! Pseudo-terminals for terminal processes. The agent opens the pair: the slave becomes the
//! process's fds 0-2 (and, in the child, its controlling terminal); the master stays here and
//! is bridged to the host's streams: stdin stream -> master, master -> stdout stream. A pty has
//! no separate stderr.
//!
//! A read on the master fails with EIO once no process holds the slave any more: that is the
//! output's EOF ([`PtyReader`]). The end of the input is the terminal's EOF character, written
//! when the stdin stream ends ([`PtyWriter`]).

use std::io;
use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::unix::pipe;

/// The terminal's EOF character when the termios cannot be read (^D).
const DEFAULT_VEOF: u8 = 4;

/// A freshly allocated pair. The master is non-blocking and close-on-exec; the slave is
/// close-on-exec (it is dup2'ed onto the child's fds 0-2, which clears that there).
pub struct Pty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
}

/// Opens /dev/ptmx and its slave (TIOCGPTPEER: no path lookup in /dev/pts).
pub fn open() -> io::Result<Pty> {
    // SAFETY: a NUL-terminated path and flags; returns a new fd or -1.
    let fd = unsafe {
        libc::open(
            c"/dev/ptmx".as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(io_context("opening /dev/ptmx"));
    }
    // SAFETY: `fd` is a fresh fd we own.
    let master = unsafe { OwnedFd::from_raw_fd(fd) };
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK takes a pointer to an int; 0 unlocks the slave.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } != 0 {
        return Err(io_context("unlocking the pty (TIOCSPTLCK)"));
    }
    // SAFETY: TIOCGPTPEER takes open(2) flags and returns a new fd for the slave, or -1.
    let slave = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if slave < 0 {
        return Err(io_context("opening the pty slave (TIOCGPTPEER)"));
    }
    // SAFETY: `slave` is a fresh fd we own.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    Ok(Pty { master, slave })
}

fn io_context(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// The window size for ResizePty: columns and rows must fit a `struct winsize`.
pub fn window_size(width: u32, height: u32) -> Result<libc::winsize, String> {
    let cols = u16::try_from(width).map_err(|_| format!("width {width} is out of range"))?;
    let rows = u16::try_from(height).map_err(|_| format!("height {height} is out of range"))?;
    Ok(libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    })
}

/// TIOCSWINSZ on the master (the kernel sends SIGWINCH to the terminal's foreground group).
pub fn set_window_size(master: BorrowedFd<'_>, size: &libc::winsize) -> io::Result<()> {
    // SAFETY: TIOCSWINSZ with a pointer to a valid winsize.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, size as *const _) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The master's read side; EIO (no process holds the slave any more) reads as EOF.
pub struct PtyReader(pipe::Receiver);

impl PtyReader {
    /// `master` must be non-blocking (as [`open`] makes it). Needs the tokio runtime.
    pub fn new(master: OwnedFd) -> io::Result<PtyReader> {
        pipe::Receiver::from_owned_fd_unchecked(master).map(PtyReader)
    }
}

impl AsyncRead for PtyReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.0).poll_read(cx, buf)) {
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Poll::Ready(Ok(())),
            other => Poll::Ready(other),
        }
    }
}

/// The master's write side; shutdown writes the terminal's EOF character once (what a user
/// typing ^D does), so a reader in canonical mode sees the end of its input.
pub struct PtyWriter {
    inner: pipe::Sender,
    eof_sent: bool,
}

impl PtyWriter {
    /// `master` must be non-blocking (as [`open`] makes it). Needs the tokio runtime.
    pub fn new(master: OwnedFd) -> io::Result<PtyWriter> {
        Ok(PtyWriter {
            inner: pipe::Sender::from_owned_fd_unchecked(master)?,
            eof_sent: false,
        })
    }

    fn eof_char(&self) -> u8 {
        // SAFETY: termios is plain old data; tcgetattr fills it (on a master it reads the
        // pair's termios).
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: a valid fd and a writable termios.
        if unsafe { libc::tcgetattr(self.inner.as_raw_fd(), &mut t) } != 0 {
            return DEFAULT_VEOF;
        }
        match t.c_cc[libc::VEOF] {
            0 => DEFAULT_VEOF,
            c => c,
        }
    }
}

impl AsyncWrite for PtyWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.eof_sent {
            let eof = [self.eof_char()];
            // An error (EIO: the process is gone) needs no EOF.
            let _ = ready!(Pin::new(&mut self.inner).poll_write(cx, &eof));
            self.eof_sent = true;
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[test]
    fn window_size_validation() {
        let ws = window_size(120, 40).unwrap();
        assert_eq!((ws.ws_col, ws.ws_row), (120, 40));
        assert_eq!(window_size(0, 0).unwrap().ws_col, 0);
        assert!(window_size(65536, 1).unwrap_err().contains("width"));
        assert!(window_size(1, 70000).unwrap_err().contains("height"));
        assert_eq!(window_size(65535, 65535).unwrap().ws_row, 65535);
    }

    /// Where /dev/ptmx can be opened (not in every sandbox): the bridge's two ends.
    #[tokio::test]
    async fn pty_bridge_and_resize() {
        let Ok(pty) = open() else {
            eprintln!("no /dev/ptmx here; skipped");
            return;
        };
        let size = window_size(100, 30).unwrap();
        set_window_size(pty.master.as_fd(), &size).unwrap();
        let mut got: libc::winsize = window_size(0, 0).unwrap();
        // SAFETY: TIOCGWINSZ with a writable winsize.
        assert_eq!(
            unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut got) },
            0
        );
        assert_eq!((got.ws_col, got.ws_row), (100, 30));

        let mut writer = PtyWriter::new(pty.master.try_clone().unwrap()).unwrap();
        let mut reader = PtyReader::new(pty.master.try_clone().unwrap()).unwrap();
        // Input reaches the slave (canonical mode: a line at a time).
        writer.write_all(b"hello\n").await.unwrap();
        let mut slave = std::fs::File::from(pty.slave.try_clone().unwrap());
        let line = tokio::task::spawn_blocking(move || {
            use std::io::Read as _;
            let mut buf = [0u8; 64];
            let n = slave.read(&mut buf).unwrap();
            (slave, buf[..n].to_vec())
        })
        .await
        .unwrap();
        assert_eq!(line.1, b"hello\n");
        let mut slave = line.0;
        // Shutdown sends ^D: at the start of a line the slave reads EOF.
        writer.shutdown().await.unwrap();
        let eof = tokio::task::spawn_blocking(move || {
            use std::io::Read as _;
            let mut buf = [0u8; 64];
            slave.read(&mut buf).unwrap()
        })
        .await
        .unwrap();
        assert_eq!(eof, 0);

        // Output, then EOF (not EIO) once the last slave fd is closed.
        {
            use std::io::Write as _;
            let mut s = std::fs::File::from(pty.slave);
            s.write_all(b"out").unwrap();
        }
        let mut out = Vec::new();
        reader.read_to_end(&mut out).await.unwrap();
        // The echo of "hello\n" (with onlcr) comes first.
        assert!(out.ends_with(b"out"), "{out:?}");
    }
}
