//! The boot floor and the bench rows that compare two floors: QEMU booting the same machine,
//! kernel and initrd as a spinbox VM to an init that powers off at once.

use std::path::Path;
use std::time::Duration;

use super::{ms, Row, Samples};

/// Two boot floors alternating, `with` as spinbox boots QEMU and `without` one thing of it:
/// (medians and spreads of each).
pub(crate) fn floor_pair(
    config: &spinbox_config::Config,
    with: &[String],
    without: &[String],
    runs: usize,
) -> (Samples, Samples) {
    let boot = |args: &[String]| {
        spinbox_vmm::boot_floor_with(config, args, config.timeouts.vm_start)
            .unwrap_or_else(|e| panic!("floor: {e}"))
    };
    let (mut a, mut b) = (Samples::default(), Samples::default());
    for _ in 0..runs {
        a.push(ms(boot(with)));
        b.push(ms(boot(without)));
    }
    (a, b)
}

pub(crate) fn ratio_row(what: &str, with: &Samples, without: &Samples, bound: f64) -> Row {
    let ratio = with.median() / without.median();
    Row {
        what: what.into(),
        spinbox: with.show("ms"),
        runc: "—".into(),
        other: format!("without {}", without.show("ms")),
        ratio: format!("{ratio:.2}"),
        target: format!(
            "≤ {bound:.2} (none expected): {}",
            if ratio <= bound { "holds" } else { "missed" }
        ),
    }
}

/// What QEMU's confinement costs: the boot floor as spinbox runs QEMU (seccomp sandbox;
/// `-sandbox …`) beside the same command line without it, alternating.
pub(crate) fn confinement_row(config: &spinbox_config::Config, dir: &Path, runs: usize) -> Row {
    eprintln!("bench: QEMU sandbox x{runs}");
    let host = spinbox_vmm::accel::HostCaps::probe();
    let sandboxed =
        spinbox_vmm::floor_command_line(config, &host, &dir.join("floor-sandboxed.console.log"));
    let mut open = sandboxed.clone();
    let at = open
        .iter()
        .position(|a| a == "-sandbox")
        .expect("the floor's command line has -sandbox");
    open.drain(at..at + 2);
    let (with, without) = floor_pair(config, &sandboxed, &open, runs);
    ratio_row(
        "QEMU seccomp sandbox: boot floor with / without `-sandbox`",
        &with,
        &without,
        1.05,
    )
}

/// What the room to grow costs a boot: the floor with `-smp vcpus,maxcpus=vm.max_vcpus` and
/// `-m memory_mib,maxmem=max_memory_mib` with the virtio-mem device (as spinbox boots, so that
/// vCPUs and memory can be hot-plugged) beside the same with no room.
pub(crate) fn room_to_grow_row(config: &spinbox_config::Config, dir: &Path, runs: usize) -> Row {
    eprintln!("bench: room to grow x{runs}");
    let host = spinbox_vmm::accel::HostCaps::probe();
    let console = dir.join("floor-room.console.log");
    let room = spinbox_vmm::floor_command_line(config, &host, &console);
    let mut fixed = config.clone();
    fixed.vm.max_vcpus = fixed.vm.vcpus;
    fixed.vm.max_memory_mib = fixed.vm.memory_mib;
    let no_room = spinbox_vmm::floor_command_line(&fixed, &host, &console);
    let (with, without) = floor_pair(config, &room, &no_room, runs);
    ratio_row(
        &format!(
            "room to grow: boot floor with / without `maxcpus={}`, `maxmem={}M` + virtio-mem",
            config.vm.max_vcpus, config.vm.max_memory_mib
        ),
        &with,
        &without,
        1.05,
    )
}

/// The config with the other guest kernel (`$SPINBOX_BENCH_OTHER_GUEST`: a guest folder with
/// vmlinux, initrd.img and kernel-release), and that kernel's release; `None` without one.
pub(crate) fn other_guest_config(
    config: &spinbox_config::Config,
) -> Option<(String, spinbox_config::Config)> {
    let dir = std::path::PathBuf::from(std::env::var_os("SPINBOX_BENCH_OTHER_GUEST")?);
    let release = std::fs::read_to_string(dir.join("kernel-release")).ok()?;
    let mut other = config.clone();
    other.paths.kernel = dir.join("vmlinux");
    other.paths.initrd = dir.join("initrd.img");
    Some((release.trim().to_owned(), other))
}

/// The boot floor, once: QEMU booting the same kernel and initrd on the same machine to an
/// init that powers off at once.
pub(crate) fn floor(config: &spinbox_config::Config, dir: &Path) -> Duration {
    let console = dir.join("floor.console.log");
    let host = spinbox_vmm::accel::HostCaps::probe();
    spinbox_vmm::boot_floor(config, &host, &console, config.timeouts.vm_start)
        .unwrap_or_else(|e| panic!("floor: {e}"))
}
