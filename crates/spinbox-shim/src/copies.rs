//! Copies of the host files and read-only host directories that the spec's bind mounts name.
//!
//! The guest cannot see the host's filesystem. Small files (resolv.conf, hosts, hostname as CRI
//! and nerdctl give them) and small directories bound read-only (Kubernetes' secrets, config
//! maps and service account tokens) travel with CreateContainer, and the agent serves the
//! mounts from its copies: a snapshot taken at create, as in Kata's non-shared-fs mode. A
//! writable directory bind is not copied (writes would never reach the host): it becomes a
//! virtio-fs share ([`shares_for_spec`]), served live by a virtiofsd of its own.

use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::Path;

use spinbox_agent_api::agent::tree_entry::Kind;
use spinbox_agent_api::agent::{FileCopy, Share, TreeEntry};

use spinbox_agent_api::{
    clean_path, share_tag, MAX_FILE_COPIES, MAX_FILE_COPIES_BYTES, MAX_FILE_COPY_BYTES, MAX_SHARES,
    MAX_TREE_ENTRIES,
};

/// The spec's bind mounts as (source, read-only), binds only, in mount order. The source is
/// cleaned as the agent cleans it ([`clean_path`]), so one directory is one source however
/// the spec spells it; `ro` and `rro` are read-only.
fn binds(spec: &serde_json::Value) -> impl Iterator<Item = (String, bool)> + '_ {
    spec["mounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| {
            let options: Vec<&str> = m["options"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|o| o.as_str())
                .collect();
            let is_bind =
                m["type"] == "bind" || options.iter().any(|o| *o == "bind" || *o == "rbind");
            let source = m["source"].as_str()?;
            // CRI binds the pod's shared-memory directory (a tmpfs on the host) to /dev/shm
            // of every container of the pod: the guest gives the pod a tmpfs of its own there
            // instead; nothing of the host's is copied or shared.
            if m["destination"].as_str().map(clean_path).as_deref() == Some("/dev/shm") {
                return None;
            }
            let read_only = options.iter().any(|o| *o == "ro" || *o == "rro");
            (is_bind && source.starts_with('/')).then(|| (clean_path(source), read_only))
        })
}

/// What the spec's bind mounts need: copies ([`for_spec`]) and shares ([`shares_for_spec`]).
/// A shared source is served live, to a read-only bind of it too: no copy of it is sent.
pub async fn plan(spec: &serde_json::Value) -> (Vec<FileCopy>, Vec<Share>) {
    let shares = shares_for_spec(spec).await;
    let files = for_spec(spec, &shares).await;
    (files, shares)
}

/// The virtio-fs shares for the spec's writable directory binds, each source once, in mount
/// order, tagged `sbxfs0`, `sbxfs1`, ... Past [`MAX_SHARES`] they are logged and left out
/// (the agent then skips those mounts and warns).
pub async fn shares_for_spec(spec: &serde_json::Value) -> Vec<Share> {
    let wanted: Vec<String> = binds(spec)
        .filter(|(_, read_only)| !read_only)
        .map(|(source, _)| source)
        .collect();
    let dirs = tokio::task::spawn_blocking(move || {
        wanted
            .into_iter()
            .filter(|s| std::fs::metadata(s).is_ok_and(|m| m.is_dir()))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    let mut out: Vec<Share> = Vec::new();
    for source in dirs {
        if out.iter().any(|s| s.source == source) {
            continue;
        }
        if out.len() == MAX_SHARES {
            tracing::warn!(
                source,
                "more than {MAX_SHARES} writable directory binds; the rest are not shared"
            );
            break;
        }
        out.push(Share {
            tag: share_tag(out.len()),
            source,
            ..Default::default()
        });
    }
    out
}

/// The copies for the spec's bind mounts, each source once, in mount order, none of a
/// `shared` source (it is served live). What cannot be copied is logged and left out (the
/// agent then skips the mount and warns).
pub async fn for_spec(spec: &serde_json::Value, shared: &[Share]) -> Vec<FileCopy> {
    let mut out: Vec<FileCopy> = Vec::new();
    let mut total = 0;
    for (source, read_only) in binds(spec) {
        if out.iter().any(|f| f.source == source) || shared.iter().any(|s| s.source == source) {
            continue;
        }
        let owned = source.clone();
        let copied = tokio::task::spawn_blocking(move || copy(Path::new(&owned), read_only))
            .await
            .unwrap_or_else(|e| Err(format!("copy task: {e}")));
        match copied {
            Ok(None) => {}
            Ok(Some(_)) if out.len() == MAX_FILE_COPIES => {
                tracing::warn!(
                    source = %source,
                    "more than {MAX_FILE_COPIES} bind mounts to copy; the rest are not copied"
                );
                break;
            }
            Ok(Some(c)) => {
                let size = size(&c);
                if total + size > MAX_FILE_COPIES_BYTES {
                    tracing::warn!(
                        source = %source,
                        "bind mount source not copied: the copies would exceed {MAX_FILE_COPIES_BYTES} bytes"
                    );
                    continue;
                }
                total += size;
                out.push(c);
            }
            Err(e) => tracing::warn!(source = %source, "bind mount source not copied: {e}"),
        }
    }
    out
}

fn size(c: &FileCopy) -> usize {
    c.content.len() + c.tree.iter().map(|e| e.content.len()).sum::<usize>()
}

/// A copy of the file, or of the directory bound `read_only`, at `source` (symlinks below a
/// directory are kept as links, never followed); None for anything else, or a source that is
/// not there (the agent skips the mount and says so). Blocking.
fn copy(source: &Path, read_only: bool) -> Result<Option<FileCopy>, String> {
    let Ok(meta) = std::fs::metadata(source) else {
        return Ok(None);
    };
    if !(meta.is_file() || meta.is_dir() && read_only) {
        return Ok(None);
    }
    let mode = meta.permissions().mode() & 0o777;
    let source_str = source.display().to_string();
    if meta.is_file() {
        if meta.len() > MAX_FILE_COPY_BYTES as u64 {
            return Err(format!(
                "{} bytes, at most {MAX_FILE_COPY_BYTES}",
                meta.len()
            ));
        }
        let content = std::fs::read(source).map_err(|e| e.to_string())?;
        return Ok(Some(FileCopy {
            source: source_str,
            content,
            mode,
            ..Default::default()
        }));
    }
    let mut tree = Vec::new();
    let mut bytes = 0;
    walk(source, "", &mut tree, &mut bytes)?;
    Ok(Some(FileCopy {
        source: source_str,
        mode,
        directory: true,
        tree,
        ..Default::default()
    }))
}

/// Appends what is below `dir` to `tree`, parents before children, names sorted.
fn walk(
    dir: &Path,
    prefix: &str,
    tree: &mut Vec<TreeEntry>,
    bytes: &mut u64,
) -> Result<(), String> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    names.sort();
    for name in names {
        let Some(name) = name.to_str() else {
            return Err(format!("{}: a name that is not UTF-8", dir.display()));
        };
        let path = dir.join(name);
        let rel = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}/{name}")
        };
        if tree.len() == MAX_TREE_ENTRIES {
            return Err(format!("more than {MAX_TREE_ENTRIES} entries"));
        }
        let meta =
            std::fs::symlink_metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let kind = meta.file_type();
        let mut entry = TreeEntry {
            path: rel.clone(),
            mode: meta.permissions().mode() & 0o777,
            ..Default::default()
        };
        if kind.is_symlink() {
            let target =
                std::fs::read_link(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            entry.kind = Kind::SYMLINK.into();
            entry.target = target
                .to_str()
                .ok_or_else(|| format!("{}: a link target that is not UTF-8", path.display()))?
                .to_string();
            tree.push(entry);
        } else if kind.is_dir() {
            entry.kind = Kind::DIRECTORY.into();
            tree.push(entry);
            walk(&path, &rel, tree, bytes)?;
        } else if kind.is_file() {
            *bytes += meta.len();
            if *bytes > MAX_FILE_COPY_BYTES as u64 {
                return Err(format!("more than {MAX_FILE_COPY_BYTES} bytes"));
            }
            entry.kind = Kind::FILE.into();
            entry.content = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            tree.push(entry);
        } else {
            let what = if kind.is_fifo() {
                "a fifo"
            } else if kind.is_socket() {
                "a socket"
            } else {
                "a device node"
            };
            return Err(format!("{} is {what}", path.display()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(mounts: serde_json::Value) -> serde_json::Value {
        serde_json::json!({ "mounts": mounts })
    }

    #[tokio::test]
    async fn read_only_directories_and_files_are_copied_writable_directories_not() {
        let d = tempfile::tempdir().unwrap();
        let secret = d.path().join("secret");
        std::fs::create_dir_all(secret.join("..v1/sub")).unwrap();
        std::fs::write(secret.join("..v1/key"), b"s3cret").unwrap();
        std::fs::write(secret.join("..v1/sub/n"), b"1").unwrap();
        std::os::unix::fs::symlink("..v1/key", secret.join("key")).unwrap();
        let file = d.path().join("hosts");
        std::fs::write(&file, b"127.0.0.1 localhost\n").unwrap();
        let (secret_s, file_s) = (secret.to_str().unwrap(), file.to_str().unwrap());
        let copies = for_spec(&spec(serde_json::json!([
            {"destination": "/s", "type": "bind", "source": secret_s, "options": ["rbind", "ro"]},
            {"destination": "/w", "type": "bind", "source": secret_s, "options": ["rbind", "rw"]},
            {"destination": "/etc/hosts", "type": "bind", "source": file_s, "options": ["rbind", "rw"]},
            {"destination": "/rw", "type": "bind", "source": d.path().to_str().unwrap(), "options": ["rbind"]},
            {"destination": "/proc", "type": "proc", "source": "proc"}
        ])), &[])
        .await;
        assert_eq!(copies.len(), 2, "{copies:?}");
        let dir = &copies[0];
        assert!(dir.directory && dir.source == secret_s && dir.content.is_empty());
        let entries: Vec<(&str, Kind, &[u8], &str)> = dir
            .tree
            .iter()
            .map(|e| {
                (
                    e.path.as_str(),
                    e.kind.enum_value().unwrap(),
                    e.content.as_slice(),
                    e.target.as_str(),
                )
            })
            .collect();
        assert_eq!(
            entries,
            vec![
                ("..v1", Kind::DIRECTORY, &b""[..], ""),
                ("..v1/key", Kind::FILE, &b"s3cret"[..], ""),
                ("..v1/sub", Kind::DIRECTORY, &b""[..], ""),
                ("..v1/sub/n", Kind::FILE, &b"1"[..], ""),
                ("key", Kind::SYMLINK, &b""[..], "..v1/key"),
            ]
        );
        assert!(!copies[1].directory);
        assert_eq!(copies[1].content, b"127.0.0.1 localhost\n");
    }

    /// CRI's pod shared-memory directory, bound to /dev/shm, is neither shared nor copied:
    /// the guest gives the pod a tmpfs there.
    #[tokio::test]
    async fn the_pods_shm_directory_is_left_to_the_guest() {
        let d = tempfile::tempdir().unwrap();
        let shm = d.path().join("shm");
        std::fs::create_dir_all(&shm).unwrap();
        let (files, shares) = plan(&spec(serde_json::json!([
            {"destination": "/dev/shm", "type": "bind", "source": shm.to_str().unwrap(), "options": ["rbind", "rw"]},
            {"destination": "/dev//shm/", "type": "bind", "source": shm.to_str().unwrap(), "options": ["rbind", "ro"]},
        ])))
        .await;
        assert!(
            files.is_empty() && shares.is_empty(),
            "{files:?} {shares:?}"
        );
        // The same directory bound elsewhere is shared as usual.
        let (_, shares) = plan(&spec(serde_json::json!([
            {"destination": "/data", "type": "bind", "source": shm.to_str().unwrap(), "options": ["rbind", "rw"]},
        ])))
        .await;
        assert_eq!(shares.len(), 1);
    }

    /// A writable directory is shared however the spec spells it, and a read-only bind of
    /// the same directory is served from the share, not from a snapshot; `rro` is read-only
    /// (copied, never shared); a writable file is copied.
    #[tokio::test]
    async fn writable_directories_are_shared_once_read_only_ones_copied() {
        let d = tempfile::tempdir().unwrap();
        let (vol, conf) = (d.path().join("vol"), d.path().join("conf"));
        std::fs::create_dir_all(&vol).unwrap();
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(conf.join("a"), b"x").unwrap();
        let file = d.path().join("hosts");
        std::fs::write(&file, b"h").unwrap();
        let vol_s = vol.to_str().unwrap();
        let (files, shares) = plan(&spec(serde_json::json!([
            {"destination": "/ro", "type": "bind", "source": vol_s, "options": ["rbind", "ro"]},
            {"destination": "/rw", "type": "bind", "source": format!("{vol_s}/"), "options": ["rbind", "rw"]},
            {"destination": "/rw2", "type": "bind", "source": format!("{vol_s}/."), "options": ["rbind"]},
            {"destination": "/conf", "type": "bind", "source": conf.to_str().unwrap(), "options": ["rbind", "rro"]},
            {"destination": "/etc/hosts", "type": "bind", "source": file.to_str().unwrap(), "options": ["rbind", "rw"]}
        ])))
        .await;
        let shared: Vec<(&str, &str)> = shares
            .iter()
            .map(|s| (s.tag.as_str(), s.source.as_str()))
            .collect();
        assert_eq!(shared, [("sbxfs0", vol_s)]);
        let copied: Vec<&str> = files.iter().map(|f| f.source.as_str()).collect();
        assert_eq!(copied, [conf.to_str().unwrap(), file.to_str().unwrap()]);
    }

    #[test]
    fn what_cannot_be_copied_is_named() {
        let d = tempfile::tempdir().unwrap();
        nix::unistd::mkfifo(&d.path().join("pipe"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = copy(d.path(), true).unwrap_err();
        assert!(e.ends_with("pipe is a fifo"), "{e}");

        let many = tempfile::tempdir().unwrap();
        for i in 0..=MAX_TREE_ENTRIES {
            std::fs::write(many.path().join(format!("f{i}")), b"").unwrap();
        }
        let e = copy(many.path(), true).unwrap_err();
        assert!(e.contains("more than 256 entries"), "{e}");

        let big = tempfile::tempdir().unwrap();
        std::fs::write(big.path().join("a"), vec![0u8; 700 << 10]).unwrap();
        std::fs::write(big.path().join("b"), vec![0u8; 700 << 10]).unwrap();
        let e = copy(big.path(), true).unwrap_err();
        assert!(e.contains("more than 1048576 bytes"), "{e}");
    }
}
