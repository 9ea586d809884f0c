//! Undoing what a network record names: from a failed setup, the shim's teardown, and after a
//! crash `shim delete` and `spinbox gc`.

use std::path::Path;

use serde_json::Map;

use crate::{cni, invoker, link, netns, nft_client, NetError, NetworkRecord, Settings};

/// Undoes what `record` names, every step even if an earlier one failed: nft rules, the tc
/// redirects and TAPs, CNI DEL, the namespace spinbox created. Returns the errors.
pub async fn release(settings: &Settings, record: &NetworkRecord) -> Vec<String> {
    let mut errors = Vec::new();
    if record.is_empty() {
        return errors;
    }
    if record.nft {
        let _lock = cni::HostLock::acquire(&settings.lock_file).await;
        if let Err(e) = nft_client(settings).remove_container(&record.id).await {
            errors.push(e.to_string());
        }
    }
    if let Some(ns) = record.netns.as_ref().filter(|p| netns::is_netns(p)) {
        if !record.mirrored.is_empty() {
            let pairs = record.mirrored.clone();
            let r = netns::run_in(ns, move || async move {
                let h = link::connect()?;
                let mut errs = Vec::new();
                for (iface, tap) in &pairs {
                    if let Err(e) = link::remove_ingress(&h, iface).await {
                        errs.push(e.to_string());
                    }
                    if let Err(e) = link::delete_link(&h, tap).await {
                        errs.push(e.to_string());
                    }
                }
                Ok(errs)
            })
            .await;
            match r {
                Ok(errs) => errors.extend(errs),
                Err(e) => errors.push(e.to_string()),
            }
        }
    }
    if let Some(c) = &record.cni {
        let del = async {
            let bytes =
                serde_json::to_vec(&c.conflist).map_err(|e| NetError::Other(e.to_string()))?;
            let list = cni::ConfList::parse(&c.conflist_path, &bytes)?;
            let _lock = cni::HostLock::acquire(&settings.lock_file).await?;
            invoker(settings)
                .del(&list, &c.attachment, c.result.as_ref(), &Map::new())
                .await
        };
        if let Err(e) = del.await {
            errors.push(e.to_string());
        }
    }
    if record.netns_created {
        if let Some(ns) = &record.netns {
            if let Err(e) = netns::remove(ns).await {
                errors.push(e.to_string());
            }
        }
    }
    errors
}

/// Releases what the record at `path` names, then removes the record if all went well.
pub async fn release_recorded(settings: &Settings, path: &Path) -> Vec<String> {
    match NetworkRecord::load(path).await {
        Ok(None) => Vec::new(),
        Ok(Some(record)) => {
            let errors = release(settings, &record).await;
            if errors.is_empty() {
                if let Err(e) = tokio::fs::remove_file(path).await {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        return vec![format!("removing {}: {e}", path.display())];
                    }
                }
            }
            errors
        }
        Err(e) => vec![e.to_string()],
    }
}
