//! Disks hot-plugged for containers that join a running pod: one root port each, shared
//! layers attached once (found by serial) and unplugged when their last user goes, recorded
//! in `hotplug.json` before each plug.

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;
use spinbox_storage::Disk;
use spinbox_vmm::DiskAttach;

use super::Sandbox;
use crate::container::ContainerError;

/// The hot-plugged disks' record, in the sandbox's state directory.
const HOTPLUG_RECORD: &str = "hotplug.json";

/// One hot-plugged disk: which root port it sits on and which containers use it.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Plugged {
    serial: String,
    node: String,
    port: u32,
    path: std::path::PathBuf,
    users: BTreeSet<String>,
}

#[derive(Debug, Default)]
pub(super) struct Slots {
    /// Free root ports, lowest first taken last (a stack).
    pub(super) free: Vec<u32>,
    /// By serial.
    pub(super) plugged: HashMap<String, Plugged>,
    /// Serials the VM booted with (the owner's disks): never plugged or unplugged.
    pub(super) at_boot: BTreeSet<String>,
}

impl Sandbox {
    /// Attaches `disks` for container `user`: a disk the VM already has (by serial) gains a
    /// user; a new one is recorded, then plugged onto a free root port. On failure the
    /// disks this call plugged are unplugged again.
    pub async fn attach(&self, user: &str, disks: &[Disk]) -> Result<(), ContainerError> {
        let mut slots = self.slots.lock().await;
        let mut plugged_now: Vec<String> = Vec::new();
        let mut result = Ok(());
        for disk in disks {
            if slots.at_boot.contains(&disk.serial) {
                continue;
            }
            if let Some(p) = slots.plugged.get_mut(&disk.serial) {
                p.users.insert(user.to_owned());
                continue;
            }
            let Some(port) = slots.free.pop() else {
                result = Err(ContainerError::Pod {
                    sandbox: self.id.clone(),
                    reason: format!(
                        "no free hotplug slot for disk {} of container {user} (vm.hotplug_slots = {} in use)",
                        disk.serial, self.config.vm.hotplug_slots
                    ),
                });
                break;
            };
            let entry = Plugged {
                serial: disk.serial.clone(),
                node: format!("hd{port}"),
                port,
                path: disk.path.clone(),
                users: BTreeSet::from([user.to_owned()]),
            };
            slots.plugged.insert(disk.serial.clone(), entry.clone());
            if let Err(e) = self.write_record(&slots).await {
                slots.plugged.remove(&disk.serial);
                slots.free.push(port);
                result = Err(e);
                break;
            }
            let attach = DiskAttach {
                path: disk.path.clone(),
                serial: disk.serial.clone(),
                read_only: disk.read_only,
            };
            let plugged = match self.vm.lock().await.as_ref() {
                Some(vm) => spinbox_vmm::hotplug::plug_disk(
                    vm.qmp(),
                    &spinbox_vmm::hotplug::port_id(port),
                    &entry.node,
                    &attach,
                )
                .await
                .map_err(ContainerError::from),
                None => Err(self.gone()),
            };
            match plugged {
                Ok(()) => {
                    tracing::info!(sandbox = %self.id, container = user, serial = %disk.serial, port, "disk hot-plugged");
                    plugged_now.push(disk.serial.clone());
                }
                Err(e) => {
                    slots.plugged.remove(&disk.serial);
                    slots.free.push(port);
                    let _ = self.write_record(&slots).await;
                    result = Err(e);
                    break;
                }
            }
        }
        drop(slots);
        if result.is_err() {
            let errors = self.detach(user).await;
            if !errors.is_empty() {
                tracing::warn!(sandbox = %self.id, container = user, errors = ?errors, "undoing a failed attach");
            }
        }
        result
    }

    /// Detaches container `user` from its disks; a disk nobody uses any more is unplugged
    /// (not while the VM is going down: QEMU takes its devices along).
    pub async fn detach(&self, user: &str) -> Vec<String> {
        let mut slots = self.slots.lock().await;
        let unused: Vec<String> = slots
            .plugged
            .values_mut()
            .filter_map(|p| {
                let was_user = p.users.remove(user);
                (was_user && p.users.is_empty()).then(|| p.serial.clone())
            })
            .collect();
        let mut errors = Vec::new();
        if unused.is_empty() {
            return errors;
        }
        let live = self.vm_alive() && !self.is_tearing_down();
        for serial in unused {
            let Some(p) = slots.plugged.get(&serial).cloned() else {
                continue;
            };
            if live {
                let unplugged = match self.vm.lock().await.as_ref() {
                    Some(vm) => {
                        spinbox_vmm::hotplug::unplug_disk(
                            vm.qmp(),
                            &p.node,
                            self.config.timeouts.device_detection,
                        )
                        .await
                    }
                    None => Ok(()),
                };
                if let Err(e) = unplugged {
                    // The device stays where it is; its port is not reused.
                    errors.push(e.to_string());
                    continue;
                }
                tracing::info!(sandbox = %self.id, container = user, serial = %serial, port = p.port, "disk unplugged");
            }
            slots.plugged.remove(&serial);
            slots.free.push(p.port);
        }
        if let Err(e) = self.write_record(&slots).await {
            errors.push(e.to_string());
        }
        errors
    }

    async fn write_record(&self, slots: &Slots) -> Result<(), ContainerError> {
        let mut disks: Vec<Plugged> = slots.plugged.values().cloned().collect();
        disks.sort_by_key(|p| p.port);
        let dir = self.state.path().to_owned();
        tokio::task::spawn_blocking(move || {
            spinbox_vmm::state::write_json(&dir, HOTPLUG_RECORD, &disks)
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(|source| ContainerError::State {
            path: self.state.path().join(HOTPLUG_RECORD),
            source,
        })
    }
}
