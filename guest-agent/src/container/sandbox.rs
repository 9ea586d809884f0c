//! Pods: what the containers of one sandbox share in the guest besides namespaces.
//!
//! CRI binds one host directory, a tmpfs it made for the sandbox, on /dev/shm in every
//! container of a pod. The host sends no such source to the guest; the agent keeps one tmpfs
//! per pod instead, under [`SANDBOXES_DIR`]`/<pod>/shm`, and binds it wherever the spec binds
//! something unknown on /dev/shm (see [`super::spec::plan`]). The pod is the sandbox container
//! the request names, or the container itself when it names none (CRI's pause container, or a
//! container outside any pod). The tmpfs is made by the first container that needs it and
//! unmounted when the pod's own container is removed; containers still running keep their
//! bind of it.

use std::collections::HashSet;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context as _, Result};
use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::log::debug;

/// Where the pods' shared tmpfs mounts live (not visible to containers).
pub const SANDBOXES_DIR: &str = "/run/spinbox/sandboxes";
/// The pod's /dev/shm: as CRI mounts it on the host (64 MiB, world-writable and sticky).
pub const SHM_DATA: &str = "mode=1777,size=65536k";

/// Pods whose shm tmpfs is mounted in this VM.
static MOUNTED: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// The pod a container belongs to: the sandbox container its request names, else itself.
pub fn pod_of<'a>(container_id: &'a str, sandbox_id: &'a str) -> &'a str {
    if sandbox_id.is_empty() {
        container_id
    } else {
        sandbox_id
    }
}

/// `/run/spinbox/sandboxes/<pod>`.
fn pod_dir(pod: &str) -> PathBuf {
    Path::new(SANDBOXES_DIR).join(pod)
}

/// The guest directory of the pod's /dev/shm tmpfs. `pod` is a container id (checked).
pub fn shm_dir(pod: &str) -> PathBuf {
    pod_dir(pod).join("shm")
}

/// Mounts the pod's shm tmpfs unless it is already. Blocking.
pub fn ensure_shm(pod: &str) -> Result<()> {
    let mut mounted = MOUNTED.lock().unwrap_or_else(|p| p.into_inner());
    let mounted = mounted.get_or_insert_with(HashSet::new);
    if mounted.contains(pod) {
        return Ok(());
    }
    let target = shm_dir(pod);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&target)
        .with_context(|| format!("creating {}", target.display()))?;
    mount(
        Some("shm"),
        &target,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(SHM_DATA),
    )
    .with_context(|| format!("mounting the pod's /dev/shm tmpfs on {}", target.display()))?;
    debug!("pod {pod}: /dev/shm tmpfs mounted on {}", target.display());
    mounted.insert(pod.to_string());
    Ok(())
}

/// Unmounts the pod's shm tmpfs, if any, and removes its directories. Blocking, idempotent.
/// Returns the problems.
pub fn remove(pod: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let mut mounted = MOUNTED.lock().unwrap_or_else(|p| p.into_inner());
    let target = shm_dir(pod);
    if mounted.as_mut().is_some_and(|m| m.remove(pod)) {
        // Busy while a container's setup binds it: detach (the binds keep the tmpfs).
        let unmounted = match umount2(&target, MntFlags::empty()) {
            Err(Errno::EBUSY) => umount2(&target, MntFlags::MNT_DETACH),
            r => r,
        };
        match unmounted {
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
            Err(e) => {
                problems.push(format!("umount {}: {e}", target.display()));
                return problems;
            }
        }
    }
    for d in [target, pod_dir(pod)] {
        match std::fs::remove_dir(&d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => problems.push(format!("rmdir {}: {e}", d.display())),
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_container_belongs_to_the_sandbox_its_request_names() {
        assert_eq!(pod_of("app", "pause"), "pause");
        assert_eq!(pod_of("pause", ""), "pause", "a sandbox is its own pod");
        assert_eq!(
            shm_dir("pause"),
            Path::new("/run/spinbox/sandboxes/pause/shm")
        );
    }

    #[test]
    fn removing_a_pod_without_shm_is_a_no_op() {
        assert!(remove("spinbox-unit-test-no-such-pod").is_empty());
    }
}
