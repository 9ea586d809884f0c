//! Disks hot-plugged into a running VM over QMP.
//!
//! A pod's VM boots with free PCIe root ports (`vm.hotplug_slots`, named [`port_id`]); a
//! container that joins the pod later gets each of its disks behind one of them:
//! `blockdev-add` (the image as a raw node) then `device_add` (a `virtio-blk-pci` with the
//! serial the guest finds it by). Unplugging is `device_del`, which the guest acknowledges
//! through ACPI; QEMU reports it with `DEVICE_DELETED`, and only then is the block node
//! released with `blockdev-del`. Every step is bounded: by QMP's own `timeouts.qmp_command`,
//! and the guest's acknowledgement by the caller's `wait`.

use std::time::Duration;

use serde_json::json;

use crate::qmp::{Qmp, QmpError};
use crate::vm::DiskAttach;

/// The id of hotplug root port `i` (0-based).
pub fn port_id(i: u32) -> String {
    format!("hp{i}")
}

#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    #[error("hot-plugging disk {node} ({path}): {step}: {source}")]
    Plug {
        node: String,
        path: String,
        step: &'static str,
        #[source]
        source: QmpError,
    },
    #[error("unplugging disk {node}: {step}: {source}")]
    Unplug {
        node: String,
        step: &'static str,
        #[source]
        source: QmpError,
    },
    #[error("unplugging disk {node}: the guest did not release it within {after:?}")]
    UnplugTimeout { node: String, after: Duration },
}

/// Plugs `disk` into root port `port` as block node and device `node` (also the QMP id).
/// On failure nothing stays attached.
pub async fn plug_disk(
    qmp: &Qmp,
    port: &str,
    node: &str,
    disk: &DiskAttach,
) -> Result<(), HotplugError> {
    let path = disk.path.to_string_lossy().into_owned();
    let plug_err = |step, source| HotplugError::Plug {
        node: node.to_owned(),
        path: path.clone(),
        step,
        source,
    };
    qmp.execute(
        "blockdev-add",
        Some(json!({
            "node-name": node,
            "driver": "raw",
            "read-only": disk.read_only,
            "file": {
                "driver": "file",
                "filename": path,
                "aio": "threads",
                "read-only": disk.read_only,
            },
        })),
    )
    .await
    .map_err(|e| plug_err("blockdev-add", e))?;
    let added = qmp
        .execute(
            "device_add",
            Some(json!({
                "driver": "virtio-blk-pci",
                "id": node,
                "drive": node,
                "serial": disk.serial,
                "bus": port,
            })),
        )
        .await;
    if let Err(e) = added {
        if let Err(undo) = qmp
            .execute("blockdev-del", Some(json!({ "node-name": node })))
            .await
        {
            tracing::warn!(node, error = %undo, "releasing the block node of a failed device_add");
        }
        return Err(plug_err("device_add", e));
    }
    Ok(())
}

/// Unplugs device `node` and releases its block node, waiting at most `wait` for the guest
/// to let the device go.
pub async fn unplug_disk(qmp: &Qmp, node: &str, wait: Duration) -> Result<(), HotplugError> {
    let unplug_err = |step, source| HotplugError::Unplug {
        node: node.to_owned(),
        step,
        source,
    };
    // Subscribed before the command, so the event cannot slip past.
    let mut events = qmp.subscribe();
    match qmp.execute("device_del", Some(json!({ "id": node }))).await {
        Ok(_) => {}
        // Already gone (an earlier, interrupted unplug): only the node is left.
        Err(QmpError::Command { desc, .. }) if desc.contains("not found") => {}
        Err(e) => return Err(unplug_err("device_del", e)),
    }
    let deleted = tokio::time::timeout(wait, async {
        loop {
            match events.recv().await {
                Ok(ev) if ev.name == "DEVICE_DELETED" && ev.data["device"] == node => return true,
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return false,
            }
        }
    })
    .await;
    match deleted {
        Ok(true) => {}
        Ok(false) => {
            return Err(unplug_err(
                "waiting for DEVICE_DELETED",
                QmpError::Disconnected {
                    command: "device_del".into(),
                },
            ))
        }
        Err(_) => {
            return Err(HotplugError::UnplugTimeout {
                node: node.to_owned(),
                after: wait,
            })
        }
    }
    qmp.execute("blockdev-del", Some(json!({ "node-name": node })))
        .await
        .map_err(|e| unplug_err("blockdev-del", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ids_are_short_and_distinct() {
        assert_eq!(port_id(0), "hp0");
        assert_ne!(port_id(1), port_id(11));
    }
}
