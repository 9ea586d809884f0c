//! `spinbox`: the operator's command.
//!
//! - `spinbox boot [ID]`: boots a microVM with the configured guest, prints what its agent
//!   reports (version, guest kernel, boot times), shuts it down and prints the shutdown path.
//! - `spinbox floor [RUNS]`: boots the boot floor — QEMU with the same machine, kernel and
//!   initrd, whose init powers off the moment it runs — RUNS times (default 1) and prints each
//!   wall time; what a container start is compared with in `make bench`.
//! - `spinbox config`: prints the configuration in force (after `$SPINBOX_CONFIG` and defaults).
//! - `spinbox gc [--dry-run] [ID...]`: lists VM state and container data left by shims that
//!   are gone, and reclaims it (see `gc.rs`); live VMs are never touched.
//! - `spinbox ps [--json]`: one row per VM on the host (see `ps.rs`).
//! - `spinbox inspect [--json] ID`: a VM's records, config, shape and shutdown record, or the
//!   last shutdown record of one already gone (see `inspect.rs`).
//! - `spinbox stop [--timeout D] [--force] [--json] ID... | --all`: the shutdown ladder of
//!   each VM, in parallel, its events printed as they happen (see `stop.rs`).
//!
//! Logs go to stderr; `RUST_LOG` sets the level (default `info`).

mod gc;
mod inspect;
mod ps;
mod stop;
mod vms;

use anyhow::{bail, Context, Result};
use spinbox_config::Config;
use spinbox_vmm::Vm;

const USAGE: &str = "usage: spinbox boot [ID] | spinbox floor [RUNS] | spinbox config | \
spinbox gc [--dry-run] [ID...] | spinbox ps [--json] | spinbox inspect [--json] ID | \
spinbox stop [--timeout D] [--force] [--json] ID... | --all";

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = Config::load().context("loading the spinbox configuration")?;
    match args.first().map(String::as_str) {
        Some("boot") => {
            let id = args
                .get(1)
                .cloned()
                .unwrap_or_else(|| format!("boot-{}", std::process::id()));
            // The main thread spawns QEMU, so its parent-death signal is tied to this process.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("building the tokio runtime")?;
            rt.block_on(boot(&id, &config))
        }
        Some("gc") => {
            let dry_run = args.iter().any(|a| a == "--dry-run");
            let only: Vec<String> = args[1..]
                .iter()
                .filter(|a| !a.starts_with("--"))
                .cloned()
                .collect();
            if let Some(bad) = args[1..]
                .iter()
                .find(|a| a.starts_with("--") && *a != "--dry-run")
            {
                bail!("spinbox gc: unknown option {bad}\n{USAGE}");
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("building the tokio runtime")?;
            let failures = rt.block_on(gc::run(&config, dry_run, &only))?;
            if failures > 0 {
                bail!("{failures} orphan(s) could not be reclaimed");
            }
            Ok(())
        }
        Some("floor") => {
            let runs: u32 = match args.get(1) {
                Some(n) => n.parse().ok().filter(|n| *n > 0).with_context(|| {
                    format!("spinbox floor: RUNS must be a positive number, got {n:?}")
                })?,
                None => 1,
            };
            floor(&config, runs)
        }
        Some("config") => {
            println!("{}", config.to_json_pretty());
            Ok(())
        }
        Some("ps") => ps::main(&config, &args[1..]),
        Some("inspect") => inspect::main(&config, &args[1..]),
        Some("stop") => {
            let code = runtime()?.block_on(stop::main(&config, &args[1..]))?;
            std::process::exit(code);
        }
        Some("-h") | Some("--help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => bail!("{USAGE}"),
    }
}

async fn boot(id: &str, config: &Config) -> Result<()> {
    let vm = Vm::start(id, config)
        .await
        .with_context(|| format!("starting microVM {id}"))?;
    let boot = vm.boot_info().clone();
    // A second round trip on the established connection, as a liveness check.
    let health = vm.health().await.context("agent health after boot")?;
    println!("microVM {id} is up");
    println!("  accel / vsock:          {} / {}", boot.accel, boot.vsock);
    println!("  QEMU:                   {}", boot.qemu_version);
    println!(
        "  agent version:          spinbox-agent {}",
        boot.agent_version
    );
    println!("  guest kernel (uname -r): {}", boot.kernel_release);
    println!(
        "  guest boot to ready:    {} ms",
        boot.guest_boot_to_ready_ms
    );
    println!(
        "  host prepare (sockets, vhost-device-vsock): {} ms",
        boot.host_prepare_ms
    );
    println!("  QEMU spawn to QMP:      {} ms", boot.host_spawn_to_qmp_ms);
    println!(
        "  QEMU spawn to ready:    {} ms",
        boot.host_spawn_to_ready_ms
    );
    println!("  guest uptime now:       {} ms", health.uptime_ms);
    let report = vm.shutdown().await;
    println!(
        "shutdown: {} in {} ms",
        if report.graceful {
            "graceful"
        } else {
            "forced"
        },
        report.duration_ms
    );
    println!(
        "{}",
        serde_json::to_string_pretty(&report.events).context("encoding shutdown events")?
    );
    let errors = vm.release().await;
    if !errors.is_empty() {
        bail!("cleanup errors: {}", errors.join("; "));
    }
    Ok(())
}

/// Boots the floor VM `runs` times, one after another, and prints each wall time in ms.
fn floor(config: &Config, runs: u32) -> Result<()> {
    let host = spinbox_vmm::accel::HostCaps::probe();
    let dir = tempfile::Builder::new()
        .prefix("spinbox-floor-")
        .tempdir()
        .context("creating a scratch directory for the floor's console log")?;
    let console = dir.path().join("console.log");
    println!(
        "floor: {} booting {} with {}",
        config.paths.qemu.display(),
        config.paths.kernel.display(),
        config.paths.initrd.display()
    );
    for run in 1..=runs {
        let took = spinbox_vmm::boot_floor(config, &host, &console, config.timeouts.vm_start)
            .with_context(|| format!("floor run {run}"))?;
        println!("floor run {run}: {} ms", took.as_millis());
    }
    Ok(())
}
