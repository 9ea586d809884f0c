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
    #[error("hot-plugging vCPUs: {step}: {source}")]
    Vcpu {
        step: &'static str,
        #[source]
        source: QmpError,
    },
    #[error("hot-plugging vCPUs: {0}")]
    VcpuSlots(String),
    #[error("resizing memory: {step}: {source}")]
    Memory {
        step: &'static str,
        #[source]
        source: QmpError,
    },
    #[error("resizing memory: {0}")]
    MemoryBounds(String),
    #[error("recording the VM's new shape in vm.json: {0}")]
    Record(#[source] std::io::Error),
}

/// `query-hotpluggable-cpus`: every vCPU slot, plugged (with a `qom-path`) or free.
async fn cpu_slots(qmp: &Qmp) -> Result<Vec<serde_json::Value>, HotplugError> {
    let slots = qmp
        .execute("query-hotpluggable-cpus", None)
        .await
        .map_err(|source| HotplugError::Vcpu {
            step: "query-hotpluggable-cpus",
            source,
        })?;
    Ok(slots.as_array().cloned().unwrap_or_default())
}

fn present_vcpus(slots: &[serde_json::Value]) -> u32 {
    let present = slots.iter().filter(|c| c.get("qom-path").is_some()).count();
    u32::try_from(present).unwrap_or(u32::MAX)
}

/// How many vCPUs QEMU has plugged.
pub async fn plugged_vcpus(qmp: &Qmp) -> Result<u32, HotplugError> {
    Ok(present_vcpus(&cpu_slots(qmp).await?))
}

/// Plugs vCPUs until the VM has `target` (bounded by the `maxcpus` it booted with): each free
/// slot `query-hotpluggable-cpus` lists gets a `device_add` of the CPU type it names, with its
/// socket/core/thread ids as given. Returns how many vCPUs the VM had before and has after
/// (equal when it already had `target`). The guest registers them offline: the agent brings
/// them online (OnlineCpus).
pub async fn plug_vcpus(qmp: &Qmp, target: u32) -> Result<(u32, u32), HotplugError> {
    let slots = cpu_slots(qmp).await?;
    let before = present_vcpus(&slots);
    let mut have = before;
    if have >= target {
        return Ok((before, have));
    }
    // Free slots, lowest socket/core first (QEMU lists them highest first).
    let mut free: Vec<&serde_json::Value> = slots
        .iter()
        .filter(|c| c.get("qom-path").is_none())
        .collect();
    free.reverse();
    for slot in free {
        if have >= target {
            break;
        }
        let (Some(driver), Some(props)) = (slot["type"].as_str(), slot["props"].as_object()) else {
            return Err(HotplugError::VcpuSlots(format!(
                "an unexpected slot from query-hotpluggable-cpus: {slot}"
            )));
        };
        let mut args = props.clone();
        args.insert("driver".into(), json!(driver));
        args.insert("id".into(), json!(format!("vcpu{have}")));
        qmp.execute("device_add", Some(serde_json::Value::Object(args)))
            .await
            .map_err(|source| HotplugError::Vcpu {
                step: "device_add",
                source,
            })?;
        have += 1;
    }
    if have < target {
        return Err(HotplugError::VcpuSlots(format!(
            "{target} wanted, the VM has room for {have} (its maxcpus)"
        )));
    }
    Ok((before, have))
}

/// The virtio-mem device's QOM path.
fn virtio_mem_path() -> String {
    format!("/machine/peripheral/{}", crate::cmdline::VIRTIO_MEM_ID)
}

/// The hot-plugged memory the guest has now (MiB): the virtio-mem device's plugged size.
pub async fn plugged_memory_mib(qmp: &Qmp) -> Result<u32, HotplugError> {
    let size = qmp
        .execute(
            "qom-get",
            Some(json!({ "path": virtio_mem_path(), "property": "size" })),
        )
        .await
        .map_err(|source| HotplugError::Memory {
            step: "qom-get size",
            source,
        })?;
    let bytes = size.as_u64().ok_or_else(|| {
        HotplugError::MemoryBounds(format!("qom-get size answered {size}, not a byte count"))
    })?;
    Ok(u32::try_from(bytes >> 20).unwrap_or(u32::MAX))
}

/// Asks the guest to have `target_mib` of hot-plugged memory (rounded up to the device block;
/// at most `region_mib`, the device's size) and waits at most `wait` for it to plug or unplug
/// the difference. Returns the plugged size before and after, in MiB. A guest that cannot
/// give all of it back within `wait` (memory in use) keeps what it still has: the request
/// is set to that, so the guest stops trying and the host knows the VM's true size.
pub async fn resize_memory(
    qmp: &Qmp,
    target_mib: u32,
    region_mib: u32,
    wait: Duration,
) -> Result<(u32, u32), HotplugError> {
    let block = crate::cmdline::VIRTIO_MEM_BLOCK_MIB;
    let target = target_mib.div_ceil(block) * block;
    if target > region_mib {
        return Err(HotplugError::MemoryBounds(format!(
            "{target} MiB wanted, the VM has room for {region_mib} MiB of hot-pluggable memory"
        )));
    }
    let before = plugged_memory_mib(qmp).await?;
    if before == target {
        return Ok((before, before));
    }
    let request = |mib: u32| {
        json!({
            "path": virtio_mem_path(),
            "property": "requested-size",
            "value": u64::from(mib) << 20,
        })
    };
    qmp.execute("qom-set", Some(request(target)))
        .await
        .map_err(|source| HotplugError::Memory {
            step: "qom-set requested-size",
            source,
        })?;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let now = plugged_memory_mib(qmp).await?;
        if now == target {
            return Ok((before, now));
        }
        if tokio::time::Instant::now() >= deadline {
            if target < before {
                // The rest is in use: what the guest gave back is all it gives.
                qmp.execute("qom-set", Some(request(now)))
                    .await
                    .map_err(|source| HotplugError::Memory {
                        step: "qom-set requested-size (to what the guest kept)",
                        source,
                    })?;
                return Ok((before, now));
            }
            return Err(HotplugError::MemoryBounds(format!(
                "the guest plugged {now} of {target} MiB within {wait:?} (is virtio_mem in its kernel?)"
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
