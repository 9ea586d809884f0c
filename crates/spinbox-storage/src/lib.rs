//! Rootfs preparation: containerd's mounts → disk images the guest assembles.
//!
//! containerd's overlayfs snapshotter hands a shim an overlay mount (`lowerdir=` the committed
//! layers, topmost first; `upperdir=` the container's writable layer). A VM cannot see host
//! directories without a shared filesystem, so each read-only layer becomes an EROFS image
//! (built once per layer and cached, so the next container of the same image reuses it) and
//! the writable layer an ext4 image private to this container (seeded from the upperdir,
//! discarded on delete). The guest finds each disk by its virtio serial and mounts the overlay.
//! Mounts that already are block devices or image files are passed through.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod cache;
mod collect;
mod image;
mod private;

pub use cache::{EntryRecord, LayerCache, LayerImage, Lease};
pub use collect::{image_in_use, Action, CollectOptions, CollectReport, Collected, Reason};
pub use image::build_upper_image;
pub use private::{prepare_data_dirs, DIR_MODE, FILE_MODE};

/// How long a create waits for the layer cache lock before it leaves collection to the next
/// create (the lock is busy only while another create fills the cache, and that create
/// collects when it is done).
pub const COLLECT_WAIT_AT_CREATE: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("rootfs mount: {0}")]
    Unsupported(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed for {path} ({status}): {stderr}")]
    Tool {
        tool: &'static str,
        path: PathBuf,
        status: String,
        stderr: String,
    },
}

/// A mount as containerd describes it (protobuf types stay in the shim).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// What the rootfs mounts amount to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootfsSource {
    /// Read-only layers (topmost first) and an optional writable upper directory.
    Overlay {
        lowers: Vec<PathBuf>,
        upper: Option<PathBuf>,
    },
    /// One directory (a bind mount): packed into a private image.
    Dir { path: PathBuf, read_only: bool },
    /// A block device or filesystem image file, attached as it is.
    Block {
        path: PathBuf,
        fstype: String,
        read_only: bool,
    },
}

/// Reads containerd's rootfs mounts. Exactly one mount is expected (what the overlayfs,
/// native and devmapper/erofs snapshotters produce).
pub fn parse_rootfs(mounts: &[MountSpec]) -> Result<RootfsSource, StorageError> {
    let m = match mounts {
        [m] => m,
        [] => {
            return Err(StorageError::Unsupported(
                "no rootfs mount given (a bundle with a pre-made rootfs is not supported)".into(),
            ))
        }
        _ => {
            return Err(StorageError::Unsupported(format!(
                "{} rootfs mounts given; spinbox takes exactly one",
                mounts.len()
            )))
        }
    };
    let has = |o: &str| m.options.iter().any(|x| x == o);
    let value = |key: &str| {
        m.options
            .iter()
            .find_map(|o| o.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
    };
    match m.kind.as_str() {
        "overlay" => {
            let lowers: Vec<PathBuf> = value("lowerdir")
                .ok_or_else(|| StorageError::Unsupported("overlay mount without lowerdir".into()))?
                .split(':')
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
                .collect();
            if lowers.is_empty() {
                return Err(StorageError::Unsupported(
                    "overlay lowerdir is empty".into(),
                ));
            }
            let upper = value("upperdir").map(PathBuf::from);
            for p in lowers.iter().chain(upper.iter()) {
                if !p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir)
                {
                    return Err(StorageError::Unsupported(format!(
                        "overlay path {} is not a clean absolute path",
                        p.display()
                    )));
                }
            }
            Ok(RootfsSource::Overlay { lowers, upper })
        }
        "bind" | "rbind" | "none" if Path::new(&m.source).is_dir() => Ok(RootfsSource::Dir {
            path: PathBuf::from(&m.source),
            read_only: has("ro"),
        }),
        "ext4" | "xfs" | "erofs" | "btrfs" => Ok(RootfsSource::Block {
            path: PathBuf::from(&m.source),
            fstype: m.kind.clone(),
            read_only: has("ro"),
        }),
        other => Err(StorageError::Unsupported(format!(
            "mount type {other:?} (source {}) is not supported",
            m.source
        ))),
    }
}

/// One disk for the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub path: PathBuf,
    /// virtio-blk serial (≤ 20 bytes) the guest finds it by.
    pub serial: String,
    pub read_only: bool,
}

/// How the guest assembles the rootfs from the disks (mirrors the agent API's `Rootfs`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRootfs {
    /// EROFS lower layers, topmost first.
    pub lower_serials: Vec<String>,
    /// ext4 disk holding `upper/` and `work/`; empty for a read-only rootfs.
    pub upper_serial: String,
    /// A single disk that is the whole rootfs (block passthrough).
    pub block_serial: String,
    pub block_fstype: String,
    pub read_only: bool,
}

/// The prepared rootfs: disks to attach and how to mount them; `owned` are the files created
/// for this container alone (removed on delete); cached layers are not among them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedRootfs {
    pub disks: Vec<Disk>,
    pub guest: GuestRootfs,
    pub owned: Vec<PathBuf>,
    /// How many layer images were found in the cache / built now.
    pub cache_hits: usize,
    pub cache_misses: usize,
    /// The leases on the cached layer images this container uses: while this value (or a
    /// clone) lives, collection leaves them alone. Not part of the value's identity.
    #[serde(skip)]
    pub leases: Leases,
}

/// Leases held by a [`PreparedRootfs`]; equal to any other (they are not data).
#[derive(Debug, Clone, Default)]
pub struct Leases(pub Vec<Lease>);

impl PartialEq for Leases {
    fn eq(&self, _: &Leases) -> bool {
        true
    }
}

impl Eq for Leases {}

/// Options for [`prepare`].
#[derive(Debug, Clone)]
pub struct PrepareOptions<'a> {
    pub cache: &'a LayerCache,
    /// Directory private to the container for its own images.
    pub work_dir: &'a Path,
    pub upper_size_mib: u64,
    /// The spec asks for a read-only root.
    pub read_only: bool,
    /// Names this container's own disks within its VM ([`disk_tag`]).
    pub disk_tag: &'a str,
}

/// A layer's disk serial: named by its cached image (the cache key), so the same layer used
/// by two containers of a pod is one disk, attached once.
fn serial_layer(image: &Path) -> String {
    let key = image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let short: String = key.chars().take(SERIAL_MAX - 2).collect();
    format!("l-{short}")
}

/// Virtio's limit on a disk serial.
pub const SERIAL_MAX: usize = 20;

/// The serial of a container's own disk of `kind` (`u` upper, `d` directory image, `r` block
/// root): `kind-tag`, the tag naming the container within its VM.
fn serial_own(kind: char, tag: &str) -> String {
    let short: String = tag.chars().take(SERIAL_MAX - 2).collect();
    format!("{kind}-{short}")
}

/// A tag for `prepare` naming a container within its VM: hex of a hash of its id (ids are up
/// to 76 bytes; a serial takes 20).
pub fn disk_tag(container_id: &str) -> String {
    let digest = Sha256::digest(container_id.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Builds (or finds in the cache) the images for `source`.
pub async fn prepare(
    source: &RootfsSource,
    opts: &PrepareOptions<'_>,
) -> Result<PreparedRootfs, StorageError> {
    let mut out = PreparedRootfs::default();
    match source {
        RootfsSource::Overlay { lowers, upper } => {
            for layer in lowers {
                let got = opts.cache.lease(layer).await?;
                if got.hit {
                    out.cache_hits += 1;
                } else {
                    out.cache_misses += 1;
                }
                out.leases.0.push(got.lease);
                let image = got.path;
                let serial = serial_layer(&image);
                out.guest.lower_serials.push(serial.clone());
                out.disks.push(Disk {
                    path: image,
                    serial,
                    read_only: true,
                });
            }
            // This container's layers are leased: collect what is gone or over the bound.
            collect_at_create(opts.cache).await;
            // A read-only root keeps its writable layer, as the snapshot does under runc: the
            // guest creates the spec's mount targets there, then makes the root read-only.
            if let Some(upper) = upper {
                let img = opts.work_dir.join("upper.ext4");
                out.owned.push(img.clone());
                build_upper_image(Some(upper), &img, opts.upper_size_mib).await?;
                let serial = serial_own('u', opts.disk_tag);
                out.guest.upper_serial = serial.clone();
                out.disks.push(Disk {
                    path: img,
                    serial,
                    read_only: false,
                });
            }
        }
        RootfsSource::Dir { path, read_only } => {
            let img = opts.work_dir.join("rootfs.erofs");
            out.owned.push(img.clone());
            image::build_erofs(path, &img).await?;
            let serial = serial_own('d', opts.disk_tag);
            out.guest.lower_serials.push(serial.clone());
            out.disks.push(Disk {
                path: img,
                serial,
                read_only: true,
            });
            if !read_only {
                let up = opts.work_dir.join("upper.ext4");
                out.owned.push(up.clone());
                build_upper_image(None, &up, opts.upper_size_mib).await?;
                let serial = serial_own('u', opts.disk_tag);
                out.guest.upper_serial = serial.clone();
                out.disks.push(Disk {
                    path: up,
                    serial,
                    read_only: false,
                });
            }
        }
        RootfsSource::Block {
            path,
            fstype,
            read_only,
        } => {
            let serial = serial_own('r', opts.disk_tag);
            out.guest.block_serial = serial.clone();
            out.disks.push(Disk {
                path: path.clone(),
                serial,
                read_only: *read_only || opts.read_only,
            });
            out.guest.block_fstype = fstype.clone();
        }
    }
    out.guest.read_only = opts.read_only;
    Ok(out)
}

/// The collection a create runs after it got its layers: failures and a busy lock are
/// logged, never fatal (the next create or `spinbox gc` collects).
async fn collect_at_create(cache: &LayerCache) {
    let opts = CollectOptions {
        dry_run: false,
        wait: COLLECT_WAIT_AT_CREATE,
    };
    match cache.collect(opts).await {
        Ok(r) if r.busy => {
            tracing::info!(cache = %cache.dir().display(), "layer cache busy: not collected now")
        }
        Ok(r) => {
            for e in &r.entries {
                tracing::info!(
                    key = %e.key,
                    source = %e.source.as_deref().unwrap_or(Path::new("-")).display(),
                    bytes = e.bytes,
                    reason = %e.reason,
                    action = %e.action,
                    "layer cache collection"
                );
            }
            if r.over_limit_in_use {
                tracing::warn!(
                    bytes = r.bytes_after,
                    limit = cache.limit_bytes(),
                    "layer cache over storage.layer_cache_max_mib: what is left is in use"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "layer cache collection failed"),
    }
}

/// Removes what [`prepare`] created for the container (not the shared cache). Idempotent.
pub fn release(prepared_owned: &[PathBuf]) -> Vec<String> {
    let mut errors = Vec::new();
    for p in prepared_owned {
        match std::fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("removing {}: {e}", p.display())),
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(kind: &str, source: &str, options: &[&str]) -> MountSpec {
        MountSpec {
            kind: kind.into(),
            source: source.into(),
            options: options.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn overlay_from_containerd() {
        let mounts = [m(
            "overlay",
            "overlay",
            &[
                "index=off",
                "workdir=/s/3/work",
                "upperdir=/s/3/fs",
                "lowerdir=/s/2/fs:/s/1/fs",
            ],
        )];
        assert_eq!(
            parse_rootfs(&mounts).unwrap(),
            RootfsSource::Overlay {
                lowers: vec!["/s/2/fs".into(), "/s/1/fs".into()],
                upper: Some("/s/3/fs".into())
            }
        );
    }

    #[test]
    fn read_only_overlay_and_bind() {
        let ro = [m("overlay", "overlay", &["lowerdir=/s/2/fs:/s/1/fs"])];
        assert!(matches!(
            parse_rootfs(&ro).unwrap(),
            RootfsSource::Overlay { upper: None, .. }
        ));
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().to_str().unwrap();
        assert_eq!(
            parse_rootfs(&[m("bind", src, &["ro", "rbind"])]).unwrap(),
            RootfsSource::Dir {
                path: dir.path().into(),
                read_only: true
            }
        );
        assert!(matches!(
            parse_rootfs(&[m("ext4", "/dev/vdz", &[])]).unwrap(),
            RootfsSource::Block { .. }
        ));
    }

    #[test]
    fn refuses_what_it_cannot_attach() {
        assert!(parse_rootfs(&[])
            .unwrap_err()
            .to_string()
            .contains("no rootfs"));
        let two = [
            m("overlay", "o", &["lowerdir=/a"]),
            m("overlay", "o", &["lowerdir=/b"]),
        ];
        assert!(parse_rootfs(&two)
            .unwrap_err()
            .to_string()
            .contains("exactly one"));
        let e = parse_rootfs(&[m("nfs", "srv:/x", &[])])
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"nfs\""), "{e}");
        let e = parse_rootfs(&[m("overlay", "o", &["lowerdir=/a/../../etc"])])
            .unwrap_err()
            .to_string();
        assert!(e.contains("clean absolute"), "{e}");
        let e = parse_rootfs(&[m("overlay", "o", &["upperdir=/u"])])
            .unwrap_err()
            .to_string();
        assert!(e.contains("lowerdir"), "{e}");
    }
}
