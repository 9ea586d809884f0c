//! virtio-fs shares: the host directories that writable bind mounts of a spec name, each
//! exported by a virtiofsd on the host and found in the guest by its tag. The agent mounts a
//! share once per VM under [`SHARES_DIR`]`/<tag>`; the container's bind mount then binds
//! from there, with the spec's own options (`rw`/`ro`, propagation), as runc binds the host
//! path. Writes reach the host directory at once, and the host's changes are seen.

use std::collections::HashSet;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context as _, Result};
use nix::mount::{mount, MsFlags};
use spinbox_agent_api::agent::Share;
use spinbox_agent_api::{valid_share_tag, MAX_SHARES};

use crate::init::{load_module_list, ONDEMAND_MODULES_LIST};
use crate::log::{debug, info};

/// Where shares are mounted in the guest (not visible to containers).
pub const SHARES_DIR: &str = "/run/spinbox/shares";

/// The tags mounted so far in this VM.
static MOUNTED: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// The guest path a share is mounted at.
pub fn guest_path(tag: &str) -> PathBuf {
    Path::new(SHARES_DIR).join(tag)
}

/// (host source, guest path) of each share, for the spec plan's bind sources.
pub fn guest_paths(shares: &[Share]) -> Vec<(String, String)> {
    shares
        .iter()
        .map(|s| (s.source.clone(), guest_path(&s.tag).display().to_string()))
        .collect()
}

/// Refuses a request whose shares the host could not have made: at most [`MAX_SHARES`],
/// tags as the host names them (they become directory names), each tag and source once,
/// absolute sources.
pub fn validate(shares: &[Share]) -> Result<()> {
    if shares.len() > MAX_SHARES {
        bail!("{} shares, at most {MAX_SHARES}", shares.len());
    }
    for (i, s) in shares.iter().enumerate() {
        if !valid_share_tag(&s.tag) {
            bail!("shares[{i}]: bad tag {:?}", s.tag);
        }
        if !s.source.starts_with('/') {
            bail!("shares[{i}]: source {:?} is not an absolute path", s.source);
        }
        if shares[..i]
            .iter()
            .any(|o| o.tag == s.tag || o.source == s.source)
        {
            bail!(
                "shares[{i}]: tag {:?} or source {:?} twice",
                s.tag,
                s.source
            );
        }
    }
    Ok(())
}

/// Mounts every share not mounted yet (loading the virtio-fs modules the first time).
/// Blocking.
pub fn mount_all(shares: &[Share]) -> Result<()> {
    if shares.is_empty() {
        return Ok(());
    }
    let mut mounted = MOUNTED.lock().unwrap_or_else(|p| p.into_inner());
    let mounted = mounted.get_or_insert_with(|| {
        let loaded = load_module_list(ONDEMAND_MODULES_LIST);
        info!("virtio-fs: loaded {} kernel modules", loaded.len());
        HashSet::new()
    });
    for share in shares {
        if mounted.contains(&share.tag) {
            continue;
        }
        let target = guest_path(&share.tag);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&target)
            .with_context(|| format!("creating {}", target.display()))?;
        mount(
            Some(share.tag.as_str()),
            &target,
            Some("virtiofs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            None::<&str>,
        )
        .with_context(|| {
            format!(
                "mounting virtio-fs share {} ({}) at {}",
                share.tag,
                share.source,
                target.display()
            )
        })?;
        debug!("virtio-fs share {} ({}) mounted", share.tag, share.source);
        mounted.insert(share.tag.clone());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(tag: &str, source: &str) -> Share {
        Share {
            tag: tag.into(),
            source: source.into(),
            ..Default::default()
        }
    }

    #[test]
    fn shares_are_validated() {
        assert!(validate(&[share("sbxfs0", "/a"), share("sbxfs1", "/b")]).is_ok());
        for bad in [
            vec![share("sbxfs0/..", "/a")],
            vec![share("fs0", "/a")],
            vec![share("sbxfs0", "a")],
            vec![share("sbxfs0", "/a"), share("sbxfs0", "/b")],
            vec![share("sbxfs0", "/a"), share("sbxfs1", "/a")],
        ] {
            assert!(validate(&bad).is_err(), "{bad:?}");
        }
        let many: Vec<Share> = (0..=MAX_SHARES)
            .map(|i| share(&format!("sbxfs{i}"), &format!("/d{i}")))
            .collect();
        assert!(validate(&many).is_err());
        assert_eq!(
            guest_paths(&[share("sbxfs1", "/host/data")]),
            [(
                "/host/data".to_string(),
                "/run/spinbox/shares/sbxfs1".to_string()
            )]
        );
    }
}
