//! The boot floor: QEMU booting the same machine, kernel and initrd as a spinbox VM to an
//! init that powers off at once — what `make bench` and `spinbox floor` compare a start with.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use spinbox_config::Config;

use super::base_command_line;
use crate::accel::{resolve_accel, resolve_vsock, HostCaps};
use crate::cmdline;

/// Kernel argument (passed to init as an environment variable: no dot) that makes the agent
/// power the VM off the moment it starts: the boot floor the benchmark compares with.
pub const FLOOR_KERNEL_ARG: &str = "spinbox_floor=1";

/// The QEMU command line of the boot floor: the same machine, kernel and initrd as a spinbox
/// VM (no disks, NICs, vsock or QMP), whose init powers off at once.
pub fn floor_command_line(config: &Config, host: &HostCaps, console_log: &Path) -> Vec<String> {
    let accel = resolve_accel(config.vm.accel, host);
    let vsock_kind = resolve_vsock(config.vm.vsock, host);
    let mut extra = config.vm.kernel_args.clone();
    extra.push(FLOOR_KERNEL_ARG.to_owned());
    let kernel_cmdline = cmdline::guest_kernel_cmdline(accel, config.vm.agent_port, &extra);
    base_command_line(
        config,
        accel,
        vsock_kind,
        false,
        cmdline::Serial::File(console_log.to_path_buf()),
        kernel_cmdline,
    )
    .args()
}

/// Why a boot of the floor failed.
#[derive(Debug, thiserror::Error)]
pub enum FloorError {
    #[error("spawning {qemu}: {source}")]
    Spawn {
        qemu: PathBuf,
        source: std::io::Error,
    },
    #[error("waiting for {qemu}: {source}")]
    Wait {
        qemu: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the floor VM did not power off within {after:?} (timeouts.vm_start); QEMU was killed"
    )]
    TimedOut { after: Duration },
    #[error("the floor VM's QEMU exited with {status}")]
    Failed { status: ExitStatus },
}

/// Boots the floor once and returns its wall time, from spawning QEMU to its exit. QEMU is killed
/// if the guest has not powered off within `timeout`. Blocking (a std child process, polled every
/// millisecond): for the `spinbox` command and the benchmark, never on an async runtime.
pub fn boot_floor(
    config: &Config,
    host: &HostCaps,
    console_log: &Path,
    timeout: Duration,
) -> Result<Duration, FloorError> {
    boot_floor_with(
        config,
        &floor_command_line(config, host, console_log),
        timeout,
    )
}

/// [`boot_floor`] with the given QEMU arguments (the benchmark's variants of the floor's
/// command line).
pub fn boot_floor_with(
    config: &Config,
    args: &[String],
    timeout: Duration,
) -> Result<Duration, FloorError> {
    let qemu = &config.paths.qemu;
    let started = Instant::now();
    let mut child = std::process::Command::new(qemu)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|source| FloorError::Spawn {
            qemu: qemu.clone(),
            source,
        })?;
    loop {
        let waited = child.try_wait().map_err(|source| FloorError::Wait {
            qemu: qemu.clone(),
            source,
        })?;
        if let Some(status) = waited {
            let took = started.elapsed();
            return if status.success() {
                Ok(took)
            } else {
                Err(FloorError::Failed { status })
            };
        }
        if started.elapsed() > timeout {
            // Reaped right after; a kill that fails means it exited in between.
            let _ = child.kill();
            let _ = child.wait();
            return Err(FloorError::TimedOut { after: timeout });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
