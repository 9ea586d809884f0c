//! spinbox-agent: PID 1 of a spinbox guest, and the ttrpc agent the host talks to over vsock.
//!
//! Boot: mount pseudo filesystems, read the kernel command line, load the initrd's kernel
//! modules, watch the ACPI power button, then serve ttrpc on a vsock port (and container stdio
//! streams on a second one). Run as `spinbox-agent __container-init` (or `__container-exec`)
//! it is instead a container's init (or exec process; see `container::child`). Every way out
//! (ctrl-alt-del, SIGTERM/SIGPWR, the power button, an error, a panic) powers the VM off.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod cmdline;
mod container;
mod cpus;
mod init;
mod input;
mod log;
mod network;
mod reaper;
mod resources;
mod service;
mod shutdown;

use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::log::{debug, error, info, warning};
use crate::service::{millis, AgentService, BootInfo};
use crate::shutdown::{is_pid1, power_off};

/// Attempts to bind the vsock port before giving up, and the pause between them.
const BIND_ATTEMPTS: u32 = 5;
const BIND_RETRY: Duration = Duration::from_millis(100);

fn main() {
    // Re-executed as a container's init or exec process (see container::launch): that
    // process lives in the container's namespaces and must do none of the guest init's work.
    let mode = std::env::args_os().nth(1);
    if mode.as_deref() == Some(std::ffi::OsStr::new(container::launch::CONTAINER_INIT_ARG)) {
        container::child::main();
    }
    if mode.as_deref() == Some(std::ffi::OsStr::new(container::launch::CONTAINER_EXEC_ARG)) {
        container::child::exec_main();
    }
    shutdown::power_off_if_floor();
    shutdown::install_panic_hook();
    let reason = match run() {
        Ok(reason) => reason,
        Err(e) => {
            error!("{e:#}");
            "fatal error".to_string()
        }
    };
    power_off(&reason);
}

/// Boots and serves; returns why the VM should power off.
fn run() -> Result<String> {
    let pid1 = is_pid1();
    if pid1 {
        init::leave_initramfs();
        init::mount_pseudo_filesystems();
    } else {
        warning!("not PID 1: skipping mounts, modules and power handling");
    }
    let settings = match std::fs::read_to_string("/proc/cmdline") {
        Ok(text) => cmdline::parse(&text),
        Err(e) => {
            warning!("reading /proc/cmdline: {e}; using defaults");
            cmdline::Settings::default()
        }
    };
    log::set_level(settings.log_level);
    debug!(
        "spinbox-agent {} started; agent port {}",
        env!("CARGO_PKG_VERSION"),
        settings.agent_port
    );
    for problem in &settings.problems {
        warning!("{problem}");
    }
    if let (true, Some(name)) = (pid1, &settings.hostname) {
        // Containers without a spec hostname inherit it in their new UTS namespace.
        if let Err(e) = nix::unistd::sethostname(name) {
            warning!("sethostname {name:?}: {e}");
        }
    }
    let modules_loaded = if pid1 {
        init::load_modules()
    } else {
        Vec::new()
    };
    if settings.ignore_poweroff {
        warning!("test hook: ignoring ctrl-alt-del and the power button");
    } else if pid1 {
        input::watch_power_button();
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    runtime.block_on(serve(
        settings.agent_port,
        settings.stdio_port,
        modules_loaded,
        pid1,
        settings.ignore_poweroff,
    ))
}

async fn serve(
    port: u32,
    stdio_port: u32,
    modules_loaded: Vec<String>,
    pid1: bool,
    ignore_poweroff: bool,
) -> Result<String> {
    let mut sigchld = signal(SignalKind::child()).context("SIGCHLD handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigpwr = signal(SignalKind::from_raw(libc::SIGPWR)).context("SIGPWR handler")?;
    if pid1 {
        // Now that SIGINT has a handler: ctrl-alt-del sends SIGINT to PID 1 instead of
        // rebooting on the spot.
        if let Err(e) = nix::sys::reboot::set_cad_enabled(false) {
            warning!("disabling ctrl-alt-del reboot: {e}");
        }
    }

    let addr = format!("vsock://{}:{port}", libc::VMADDR_CID_ANY);
    let server = bind(&addr, port).await?;
    match init::vsock_local_cid() {
        Ok(Some(cid)) => debug!("vsock CID {cid}"),
        Ok(None) => warning!("no virtio-vsock device: the host cannot reach port {port}"),
        Err(e) => warning!("{e:#}"),
    }
    let boot = BootInfo {
        kernel_release: service::kernel_release(),
        boot_to_ready_ms: millis(log::boottime()),
        modules_loaded,
    };
    let ready_ms = boot.boot_to_ready_ms;
    let containers = container::Manager::new();
    // Without the stdio port containers can still run (with stdio to /dev/null); say why.
    if let Err(e) = container::stdio::listen(stdio_port, containers.clone()) {
        warning!("{e:#}");
    }
    let mut server = server.register_service(AgentService::services(boot, containers));
    server.start().await.context("starting the ttrpc server")?;
    log::always(format_args!(
        "{} port={port}",
        spinbox_agent_api::READY_MARKER
    ));
    info!(
        "spinbox-agent {} ready on vsock port {port} (boot-to-ready {ready_ms} ms)",
        env!("CARGO_PKG_VERSION")
    );

    loop {
        tokio::select! {
            got = sigchld.recv() => {
                if got.is_none() {
                    anyhow::bail!("SIGCHLD stream ended");
                }
                reaper::reap_all();
            }
            _ = sigint.recv() => {
                if ignore_poweroff {
                    warning!("test hook: ignoring ctrl-alt-del");
                    continue;
                }
                return Ok("ctrl-alt-del (SIGINT)".to_string());
            }
            _ = sigterm.recv() => return Ok("SIGTERM".to_string()),
            _ = sigpwr.recv() => return Ok("SIGPWR".to_string()),
        }
    }
}

/// Binds the ttrpc server to the vsock address, retrying briefly (the transport may still be
/// registering).
async fn bind(addr: &str, port: u32) -> Result<ttrpc::r#async::Server> {
    let mut attempt = 1;
    loop {
        match ttrpc::r#async::Server::new().bind(addr) {
            Ok(server) => return Ok(server),
            Err(e) if attempt < BIND_ATTEMPTS => {
                debug!("binding {addr} (attempt {attempt}): {e}");
                attempt += 1;
                tokio::time::sleep(BIND_RETRY).await;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "cannot listen on vsock port {port} after {BIND_ATTEMPTS} attempts \
                         (is a virtio-vsock device present and vmw_vsock_virtio_transport loaded?)"
                    )
                })
            }
        }
    }
}
