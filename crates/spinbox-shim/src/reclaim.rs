//! The one crash-reclaim path: what `shim delete` runs after a shim died (containerd calls it
//! once per container of the dead shim). A pod's record lives in its sandbox's state
//! directory and names every member's data directory, so reclaiming it from any container of
//! the pod reclaims the whole pod; later calls find nothing left and succeed.

use std::path::PathBuf;

use spinbox_config::Config;

use crate::container::work_dir;

/// Reclaims what a dead shim left: the VM and everything its record names (processes verified
/// by start time, files, the data directories of the pod's containers), then the state
/// directory. `dir` is the state directory the shim recorded in the bundle (a member's names
/// its sandbox's), or `<paths.state_dir>/<id>`. Idempotent.
/// What [`reclaim`] found: the errors of what it could not release, or the pid of the live
/// shim that still owns the pod (then nothing was touched).
#[derive(Debug, Default)]
pub struct Reclaimed {
    pub errors: Vec<String>,
    pub live_owner: Option<u32>,
}

pub async fn reclaim(config: &Config, id: &str, dir: Option<PathBuf>) -> Reclaimed {
    let mut errors = Vec::new();
    if spinbox_vmm::state::validate_id(id).is_err() {
        return Reclaimed {
            errors: vec![format!("refusing to reclaim invalid id {id:?}")],
            live_owner: None,
        };
    }
    let dir = dir.unwrap_or_else(|| config.paths.state_dir.join(id));
    if let Some(owner) = live_owner(&dir).await {
        // containerd runs `shim delete` for a pod's member whose task it deleted too (when it
        // lets go of the member's connection): the pod's shim lives and keeps its VM.
        tracing::info!(id, owner, dir = %dir.display(), "the pod's shim is alive: nothing to reclaim");
        return Reclaimed {
            errors: Vec::new(),
            live_owner: Some(owner),
        };
    }
    match spinbox_vmm::state::reclaim_contents(&dir).await {
        Ok(killed) if !killed.is_empty() => {
            tracing::warn!(id, killed = ?killed, "reclaimed processes of a dead shim")
        }
        Ok(_) => {}
        Err(e) => errors.push(format!("reclaiming {}: {e}", dir.display())),
    }
    // The VM is gone: then its network, then the record itself (kept if anything failed).
    let settings = spinbox_net::Settings::from_config(config);
    errors.extend(
        spinbox_net::release_recorded(&settings, &dir.join(spinbox_net::RECORD_FILE)).await,
    );
    if errors.is_empty() {
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("removing {}: {e}", dir.display())),
        }
    }
    // A record older than its data directory's entry (or none at all): the default place.
    let work = work_dir(config, id);
    match tokio::fs::remove_dir_all(&work).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => errors.push(format!("removing {}: {e}", work.display())),
    }
    Reclaimed {
        errors,
        live_owner: None,
    }
}

/// The pid of the live shim that owns the record in `dir`, if any (pid and start time match).
async fn live_owner(dir: &std::path::Path) -> Option<u32> {
    let dir = dir.to_owned();
    let record = tokio::task::spawn_blocking(move || spinbox_vmm::state::read_record(&dir))
        .await
        .ok()?
        .ok()?;
    record.owner.filter(|o| o.is_alive()).map(|o| o.pid)
}
