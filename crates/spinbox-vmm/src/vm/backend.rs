//! The VM's helper processes: vhost-device-vsock (hybrid vsock) and one virtiofsd per
//! writable directory share. Spawned with their sockets in the state directory, stopped
//! with SIGTERM, then SIGKILL.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use spinbox_config::Config;
use tokio::sync::watch;

use super::{kill_and_wait, tail, watch_exit, VmError, HYBRID_GUEST_CID};
use crate::process::{self, ProcessRecord};
use crate::sockdir::SocketDir;

pub(super) struct Backend {
    pub(super) what: &'static str,
    pub(super) record: ProcessRecord,
    pub(super) exit: watch::Receiver<Option<ExitStatus>>,
    pub(super) stderr_log: PathBuf,
}

/// The state directory's files of share `index`: virtiofsd's socket and its stderr.
pub(super) fn share_file_names(index: usize) -> [String; 2] {
    [
        format!("fs{index}.sock"),
        format!("virtiofsd{index}.stderr"),
    ]
}

/// Stops a helper process: SIGTERM, SIGKILL after 2 s. Returns an error line if it lives on.
pub(super) async fn stop_backend(b: &mut Backend) -> Option<String> {
    let _ = b.record.signal(nix::sys::signal::Signal::SIGTERM);
    if tokio::time::timeout(Duration::from_secs(2), b.exit.wait_for(|s| s.is_some()))
        .await
        .is_err()
    {
        kill_and_wait(&b.record, &mut b.exit).await;
    }
    if b.exit.borrow().is_none() {
        return Some(format!("{} pid {} did not exit", b.what, b.record.pid));
    }
    None
}

pub(super) async fn start_vsock_backend(
    config: &Config,
    sockets: &SocketDir,
) -> Result<Backend, (VmError, Option<Backend>)> {
    let cid = HYBRID_GUEST_CID.to_string();
    let backend_sock = sockets.for_child("vhost-vsock.sock");
    let vsock_uds = sockets.for_child("vsock.sock");
    let args: Vec<&std::ffi::OsStr> = vec![
        "--guest-cid".as_ref(),
        cid.as_ref(),
        "--socket".as_ref(),
        backend_sock.as_os_str(),
        "--uds-path".as_ref(),
        vsock_uds.as_os_str(),
    ];
    start_backend(
        "vhost-device-vsock",
        &config.paths.vhost_device_vsock,
        &args,
        sockets.full("vhost-device-vsock.stderr"),
        sockets,
        &sockets.full("vhost-vsock.sock"),
        config.timeouts.device_detection,
    )
    .await
}

/// virtiofsd serving `source` on `socket`. Its own sandbox (mount, pid and net namespaces,
/// pivot_root into `source`) keeps the guest's requests inside the shared directory.
pub(super) async fn start_virtiofsd(
    config: &Config,
    source: &Path,
    sockets: &SocketDir,
    socket_name: &str,
    stderr_log: PathBuf,
) -> Result<Backend, (VmError, Option<Backend>)> {
    let mut socket_arg = std::ffi::OsString::from("--socket-path=");
    socket_arg.push(sockets.for_child(socket_name));
    let mut source_arg = std::ffi::OsString::from("source=");
    source_arg.push(fuse_opt_escape(source.as_os_str()));
    let args: Vec<&std::ffi::OsStr> = vec![
        socket_arg.as_ref(),
        "-o".as_ref(),
        source_arg.as_ref(),
        "-o".as_ref(),
        "cache=auto".as_ref(),
        "-o".as_ref(),
        "sandbox=namespace".as_ref(),
        // No device nodes or file capabilities in the host directory, whatever the guest
        // kernel asks for.
        "-o".as_ref(),
        "modcaps=-mknod:-setfcap".as_ref(),
        "-o".as_ref(),
        "log_level=warn".as_ref(),
    ];
    start_backend(
        "virtiofsd",
        &config.paths.virtiofsd,
        &args,
        stderr_log,
        sockets,
        &sockets.full(socket_name),
        config.timeouts.device_detection,
    )
    .await
}

/// `value` escaped for a libfuse `-o` option value (virtiofsd's): `\` and `,` get a
/// backslash, so a path cannot end the option or start another.
fn fuse_opt_escape(value: &std::ffi::OsStr) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStringExt as _;
    let mut out = Vec::with_capacity(value.len());
    for &b in value.as_encoded_bytes() {
        if b == b'\\' || b == b',' {
            out.push(b'\\');
        }
        out.push(b);
    }
    std::ffi::OsString::from_vec(out)
}

/// Spawns a vhost-user backend and waits (at most `limit`) for its socket: that is when
/// QEMU can connect.
pub(super) async fn start_backend(
    what: &'static str,
    program: &Path,
    args: &[&std::ffi::OsStr],
    stderr_log: PathBuf,
    sockets: &SocketDir,
    socket: &Path,
    limit: Duration,
) -> Result<Backend, (VmError, Option<Backend>)> {
    let stderr_file = crate::state::create_private_file(&stderr_log)
        .await
        .map_err(|source| {
            (
                VmError::StateDir {
                    path: stderr_log.clone(),
                    source,
                },
                None,
            )
        })?;
    let child = process::command(program, args, Vec::new())
        .current_dir(sockets.dir())
        .stdout(std::process::Stdio::null())
        .stderr(stderr_file)
        .env("RUST_LOG", "warn")
        .spawn()
        .map_err(|source| {
            (
                VmError::Spawn {
                    what,
                    program: program.to_owned(),
                    source,
                },
                None,
            )
        })?;
    let pid = child.id().unwrap_or(0);
    let record = ProcessRecord::of(pid).unwrap_or(ProcessRecord { pid, start_time: 0 });
    let exit = watch_exit(child);
    let mut backend = Backend {
        what,
        record,
        exit,
        stderr_log,
    };
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if tokio::fs::try_exists(socket).await.unwrap_or(false) {
            return Ok(backend);
        }
        if backend.exit.borrow().is_some() {
            let status = backend
                .exit
                .borrow()
                .map(|s| s.to_string())
                .unwrap_or_default();
            let stderr = tail(&backend.stderr_log, 10).await;
            return Err((
                VmError::BackendExited {
                    what,
                    status,
                    stderr,
                },
                Some(backend),
            ));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err((
                VmError::BackendTimeout {
                    what,
                    path: socket.to_owned(),
                    after: limit,
                },
                Some(backend),
            ));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            _ = backend.exit.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuse_option_values_are_escaped() {
        assert_eq!(
            fuse_opt_escape(std::ffi::OsStr::new("/srv/a,b\\c")),
            std::ffi::OsString::from("/srv/a\\,b\\\\c")
        );
        assert_eq!(
            fuse_opt_escape(std::ffi::OsStr::new("/plain/dir")),
            std::ffi::OsString::from("/plain/dir")
        );
    }
}
