//! The guest's serial console on the host: QEMU writes it into a socket pair, and a task
//! here copies it into `<log_dir>/<id>.console.log` (0600) with a bound. When the file
//! reaches half of `vm.console_log_max_kib` it becomes `<id>.console.log.1` (the previous
//! `.1` goes) and a new file starts: the two together never pass the cap, whatever the
//! guest writes. The copy also watches for the agent's ready line. Reading it back (error
//! messages) takes only the file's tail.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::watch;

/// Read size of the copy (and so the most one write adds before a rotation check).
const CHUNK: usize = 8192;
/// The most of the console an error message reads back.
const TAIL_BYTES: u64 = 16 * 1024;

/// The rotated predecessor of console log `path`.
pub fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// The running copy: `ready` turns true once the agent's ready line went by.
pub(super) struct ConsoleSink {
    pub(super) ready: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ConsoleSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn open_log(path: &Path) -> std::io::Result<tokio::fs::File> {
    tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .await
}

/// Starts copying `console` (our end of QEMU's serial socket pair) into `path`, the file and
/// its rotated predecessor together at most `max_bytes`; `marker` sets `ready`.
pub(super) fn spawn(
    console: std::os::unix::net::UnixStream,
    path: PathBuf,
    max_bytes: u64,
    marker: &'static [u8],
) -> std::io::Result<ConsoleSink> {
    console.set_nonblocking(true)?;
    let mut console = tokio::net::UnixStream::from_std(console)?;
    let (ready_tx, ready) = watch::channel(false);
    let half = (max_bytes / 2).max(CHUNK as u64);
    let task = tokio::spawn(async move {
        let mut file = match open_log(&path).await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "console log: cannot open; console dropped");
                return;
            }
        };
        let mut written: u64 = 0;
        let mut buf = vec![0u8; CHUNK];
        let mut seen = MarkerScan::new(marker);
        loop {
            let n = match console.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let data = &buf[..n];
            if !*ready_tx.borrow() && seen.feed(data) {
                let _ = ready_tx.send(true);
            }
            if written + n as u64 > half {
                let _ = file.flush().await;
                if let Err(e) = tokio::fs::rename(&path, rotated(&path)).await {
                    tracing::warn!(path = %path.display(), error = %e, "console log: rotation failed");
                }
                file = match open_log(&path).await {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "console log: cannot reopen; console dropped");
                        break;
                    }
                };
                written = 0;
            }
            if file.write_all(data).await.is_err() {
                break;
            }
            written += n as u64;
        }
        let _ = file.flush().await;
        // Whatever QEMU still writes goes nowhere once the copy stops: drain without keeping.
        while let Ok(n) = console.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    });
    Ok(ConsoleSink { ready, task })
}

/// Finds `marker` in a stream fed in chunks (it may straddle two).
struct MarkerScan {
    marker: &'static [u8],
    carry: Vec<u8>,
}

impl MarkerScan {
    fn new(marker: &'static [u8]) -> MarkerScan {
        MarkerScan {
            marker,
            carry: Vec::new(),
        }
    }

    fn feed(&mut self, data: &[u8]) -> bool {
        if self.marker.is_empty() {
            return true;
        }
        let mut window = std::mem::take(&mut self.carry);
        window.extend_from_slice(data);
        if window.windows(self.marker.len()).any(|w| w == self.marker) {
            return true;
        }
        let keep = (self.marker.len() - 1).min(window.len());
        self.carry = window[window.len() - keep..].to_vec();
        false
    }
}

/// The last `lines` lines of the console log, read from at most its last 16 KiB.
pub(super) async fn tail(path: &Path, lines: usize) -> String {
    let read = async {
        let mut f = tokio::fs::File::open(path).await?;
        let len = f.metadata().await?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))
            .await?;
        let mut data = Vec::with_capacity(TAIL_BYTES as usize);
        f.take(TAIL_BYTES).read_to_end(&mut data).await?;
        Ok::<_, std::io::Error>(data)
    };
    match read.await {
        Ok(data) => {
            let text = String::from_utf8_lossy(&data);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(_) => String::new(),
    }
}

/// The console's last lines for an error message (empty when there are none).
pub(super) async fn suffix(path: &Path) -> String {
    let t = tail(path, 15).await;
    if t.trim().is_empty() {
        String::new()
    } else {
        format!(
            "\n--- guest console (last lines of {}) ---\n{t}",
            path.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_marker_is_found_across_chunks_and_not_without_it() {
        let mut m = MarkerScan::new(b"agent-ready");
        assert!(!m.feed(b"[ 1.0] booting\nspinbox-agent-re"));
        assert!(m.feed(b"ady on port 1024\n"));
        let mut m = MarkerScan::new(b"agent-ready");
        assert!(!m.feed(b"agent-rea"));
        assert!(!m.feed(b"d"));
        assert!(m.feed(b"y, at last"));
        let mut m = MarkerScan::new(b"agent-ready");
        assert!(!m.feed(b"agent-read agent-rEady agent_ready"));
    }

    #[tokio::test]
    async fn the_log_and_its_predecessor_stay_under_the_cap_whatever_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.console.log");
        let (ours, mut qemu) = std::os::unix::net::UnixStream::pair().unwrap();
        let cap = 64 * 1024;
        let sink = spawn(ours, path.clone(), cap, b"READY").unwrap();
        let writer = std::thread::spawn(move || {
            let line = [b'x'; 1000];
            for i in 0..2000 {
                qemu.write_all(&line).unwrap();
                if i == 1500 {
                    qemu.write_all(b"\nREADY\n").unwrap();
                }
            }
            qemu.write_all(b"\nthe end\n").unwrap();
        });
        tokio::task::spawn_blocking(move || writer.join().unwrap())
            .await
            .unwrap();
        let mut ready = sink.ready.clone();
        tokio::time::timeout(std::time::Duration::from_secs(5), ready.wait_for(|r| *r))
            .await
            .expect("ready seen")
            .unwrap();
        // The copy catches up with the end of what was written.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !tail(&path, 1).await.contains("the end") {
            assert!(std::time::Instant::now() < deadline, "the copy stalled");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let total = size(&path) + size(&rotated(&path));
        assert!(total <= cap, "{total} bytes on disk for a cap of {cap}");
        assert!(size(&rotated(&path)) > 0, "no rotation after 2 MB");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(suffix(&path).await.contains("the end"));
        drop(sink);
    }
}
