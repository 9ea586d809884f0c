//! Reaching the agent over vsock, with one transport per host setup.
//!
//! - [`VsockTransport::Kernel`]: the host has `/dev/vhost-vsock`; QEMU gets a `vhost-vsock-pci`
//!   device whose guest CID was claimed on a vhost fd ([`claim_guest_cid`]), and the host dials
//!   `AF_VSOCK` (cid, port).
//! - [`VsockTransport::Hybrid`]: no kernel vhost-vsock; a vhost-device-vsock process backs a
//!   `vhost-user-vsock-pci` device and exposes the guest's vsock on a unix socket. The host
//!   connects there and asks for a port with `CONNECT <port>\n`, answered by `OK <n>\n`.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use ttrpc::r#async::transport::Socket;

/// How the host reaches a guest's vsock ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VsockTransport {
    Kernel { cid: u32 },
    Hybrid { uds_path: PathBuf },
}

impl VsockTransport {
    /// Connects to `port` in the guest, bounded by `limit`.
    pub async fn connect(&self, port: u32, limit: Duration) -> io::Result<Socket> {
        let fut = async {
            match self {
                VsockTransport::Kernel { cid } => {
                    let addr = tokio_vsock::VsockAddr::new(*cid, port);
                    let stream = tokio_vsock::VsockStream::connect(addr).await?;
                    Ok(Socket::new(stream))
                }
                VsockTransport::Hybrid { uds_path } => {
                    let stream = hybrid_connect(uds_path, port).await?;
                    Ok(Socket::new(stream))
                }
            }
        };
        tokio::time::timeout(limit, fut)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "vsock connect timed out"))?
    }
}

/// The hybrid vsock handshake on a vhost-device-vsock (or Firecracker/cloud-hypervisor style)
/// unix socket. Returns the stream positioned after the `OK` line.
pub async fn hybrid_connect(uds_path: &std::path::Path, port: u32) -> io::Result<UnixStream> {
    let mut stream = UnixStream::connect(uds_path).await?;
    // The backend closes (or resets) the connection when nothing listens on the port; that
    // reads as an empty reply.
    let closed = |e: io::Error| match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => Ok(0),
        _ => Err(e),
    };
    let sent = stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map(|_| 1)
        .or_else(closed)?;
    // Read the reply byte by byte: anything after the newline already belongs to the stream.
    // At most MAX_HYBRID_REPLY bytes: a backend that never sends a newline is refused there.
    let mut reply = Vec::with_capacity(16);
    let n = if sent == 0 {
        0
    } else {
        let mut reader = BufReader::with_capacity(1, &mut stream).take(MAX_HYBRID_REPLY as u64);
        reader.read_until(b'\n', &mut reply).await.or_else(closed)?
    };
    parse_hybrid_reply(&reply[..n]).map_err(|msg| {
        io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("hybrid vsock CONNECT {port}: {msg}"),
        )
    })?;
    Ok(stream)
}

/// Longest hybrid-vsock reply read, newline included: `OK 4294967295\n` is 14 bytes.
pub const MAX_HYBRID_REPLY: usize = 64;

/// Checks the backend's answer: `OK <host port>\n`.
pub fn parse_hybrid_reply(reply: &[u8]) -> Result<u32, String> {
    if reply.is_empty() {
        return Err("connection closed before a reply (nothing listening on that port yet)".into());
    }
    let cut = match reply.iter().position(|b| *b == b'\n') {
        Some(i) => i >= MAX_HYBRID_REPLY,
        None => reply.len() >= MAX_HYBRID_REPLY,
    };
    if cut {
        return Err(format!(
            "no newline in the reply's first {MAX_HYBRID_REPLY} bytes ({:?}...)",
            String::from_utf8_lossy(&reply[..32])
        ));
    }
    let text = std::str::from_utf8(reply).map_err(|_| "reply is not text".to_string())?;
    let line = text
        .strip_suffix('\n')
        .ok_or_else(|| format!("reply {text:?} does not end in a newline"))?;
    let rest = line
        .strip_prefix("OK ")
        .ok_or_else(|| format!("unexpected reply {line:?}"))?;
    rest.trim()
        .parse()
        .map_err(|_| format!("unexpected port in reply {line:?}"))
}

/// `VHOST_VSOCK_SET_GUEST_CID` = `_IOW(VHOST_VIRTIO (0xAF), 0x60, __u64)`.
const VHOST_VSOCK_SET_GUEST_CID: libc::c_ulong = 0x4008_AF60;
/// `VHOST_SET_OWNER` = `_IO(0xAF, 0x01)`; the CID ioctl needs an owner.
const VHOST_SET_OWNER: libc::c_ulong = 0x0000_AF01;

/// First CID handed out; 0-2 are reserved (hypervisor, local, host).
pub const MIN_GUEST_CID: u32 = 3;

/// Opens `/dev/vhost-vsock` and claims a guest CID on it, trying `first`, `first+1`, ...
/// The kernel refuses a CID another vhost fd holds (`EADDRINUSE`), so concurrent VMs — in
/// this process or any other — cannot collide. QEMU gets the fd as `vhostfd`.
pub fn claim_guest_cid(first: u32, attempts: u32) -> io::Result<(u32, OwnedFd)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/vhost-vsock")?;
    let fd: OwnedFd = file.into();
    // SAFETY: plain ioctls on an fd we own; no pointers beyond a local u64.
    if unsafe { libc::ioctl(fd.as_raw_fd(), VHOST_SET_OWNER as _) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut cid = first.max(MIN_GUEST_CID);
    for _ in 0..attempts {
        let value: u64 = cid.into();
        // SAFETY: the ioctl reads one u64 from the pointer, which outlives the call.
        let rc = unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                VHOST_VSOCK_SET_GUEST_CID as _,
                &value as *const u64,
            )
        };
        if rc == 0 {
            return Ok((cid, fd));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EADDRINUSE) {
            return Err(err);
        }
        cid = cid
            .checked_add(1)
            .filter(|c| *c < u32::MAX - 1)
            .unwrap_or(MIN_GUEST_CID);
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("no free guest CID after {attempts} attempts from {first}"),
    ))
}

/// A starting CID spread by process and time, so concurrent shims rarely probe the same one.
pub fn cid_hint() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    MIN_GUEST_CID + (std::process::id().wrapping_mul(2654435761) ^ nanos) % 0x00FF_FFFF
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hybrid_replies() {
        assert_eq!(parse_hybrid_reply(b"OK 1073741824\n"), Ok(1073741824));
        assert!(parse_hybrid_reply(b"").unwrap_err().contains("closed"));
        assert!(parse_hybrid_reply(b"OK 12")
            .unwrap_err()
            .contains("newline"));
        assert!(parse_hybrid_reply(b"ERR\n")
            .unwrap_err()
            .contains("unexpected"));
        assert!(parse_hybrid_reply(b"OK x\n").unwrap_err().contains("port"));
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // _IOW(0xAF, 0x60, __u64): dir=1 (write) << 30 | size 8 << 16 | type 0xAF << 8 | nr 0x60
        assert_eq!(
            VHOST_VSOCK_SET_GUEST_CID,
            (1 << 30) | (8 << 16) | (0xAF << 8) | 0x60
        );
        assert_eq!(VHOST_SET_OWNER, (0xAF << 8) | 0x01);
    }

    #[test]
    fn cid_hint_is_never_reserved() {
        for _ in 0..100 {
            assert!(cid_hint() >= MIN_GUEST_CID);
        }
    }

    /// The handshake against a unix-socket peer that speaks it: bytes the peer sends right
    /// after `OK` must stay in the stream.
    #[tokio::test]
    async fn hybrid_handshake_keeps_following_bytes() {
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let peer = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 13];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"CONNECT 1024\n");
            s.write_all(b"OK 99\npayload").await.unwrap();
            // Second connection: refused the way vhost-device-vsock does (closed).
            let (s2, _) = listener.accept().await.unwrap();
            drop(s2);
        });
        let mut s = hybrid_connect(&path, 1024).await.unwrap();
        let mut rest = [0u8; 7];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"payload");
        let e = hybrid_connect(&path, 1024).await.unwrap_err();
        assert!(e.to_string().contains("nothing listening"), "{e}");
        peer.await.unwrap();
    }

    #[test]
    fn kernel_cid_claim_where_the_device_exists() {
        if !std::path::Path::new("/dev/vhost-vsock").exists() {
            eprintln!("skipped: /dev/vhost-vsock is absent on this host (no vhost_vsock module)");
            return;
        }
        let (a, _fa) = claim_guest_cid(1000, 64).unwrap();
        let (b, _fb) = claim_guest_cid(a, 64).unwrap();
        assert_ne!(a, b, "a CID held by one fd is not handed out again");
    }
}

#[cfg(test)]
mod proptests;
