//! QEMU microVM control for spinbox.
//!
//! - [`cmdline`]: the QEMU command line, one typed value per option.
//! - [`accel`]: KVM or TCG, kernel vhost-vsock or vhost-user, from what the host offers.
//! - [`qmp`]: an async QMP client.
//! - [`hotplug`]: disks plugged into, and unplugged from, a running VM over QMP.
//! - [`vsock`]: reaching the agent (AF_VSOCK or hybrid vsock over vhost-device-vsock).
//! - [`sockdir`]: socket addresses in a state directory of any length.
//! - [`process`]: spawning children with a parent-death signal; pid + start-time identity.
//! - [`state`]: the per-VM state directory and record, and reclaiming orphans.
//! - [`history`]: the shutdown records kept in the log directory after a VM is gone.
//! - [`vm`]: one VM's start (with rollback), readiness and shutdown ladder.

pub mod accel;
pub mod cmdline;
pub mod history;
pub mod hotplug;
pub mod process;
pub mod qmp;
pub mod sockdir;
pub mod state;
pub mod vm;
pub mod vsock;

pub use vm::{
    boot_floor, boot_floor_with, floor_command_line, BootInfo, DiskAttach, FloorError, NicAttach,
    ShareAttach, ShutdownEvent, ShutdownReport, ShutdownStep, Vm, VmError, VmOptions,
    FLOOR_KERNEL_ARG, MAX_NICS,
};
