//! The layer cache: one EROFS image per committed snapshot directory, shared by every
//! container of every image that has the layer.
//!
//! A committed snapshot never changes, so an image keyed by the directory's identity (path,
//! device, inode, change time) stays valid for as long as the snapshot exists. Beside each
//! image `<key>.erofs` lies its record `<key>.json` (the source directory, its identity,
//! the image's size, when it was built and last used); both are 0600 in a 0700 directory.
//!
//! Locks (all `flock`, all released by the kernel when a process dies):
//! - `layers/.lock`, the cache lock: shared by every fill (look-up, build, lease), exclusive
//!   for collection ([`crate::collect`]). A collection never sees half a fill, and a fill
//!   never finds an image that a collection is removing.
//! - `<key>.lock`, exclusive while a layer is built: two shims starting the same image at
//!   once build it once. Builds go to a temporary 0600 file renamed into place after the
//!   record, so a reader never sees half an image or an image without its record.
//! - A shared lock on the image itself, the *lease*: taken under the cache lock when a
//!   container gets the image, held by the shim until the container's disks are released
//!   ([`Lease`]). It covers the time before QEMU opens the image and does not depend on
//!   QEMU's own image locking (which collection checks as well).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::image::build_erofs;
use crate::private::{create_dir_all_private, write_private, FILE_MODE};
use crate::StorageError;

/// The cache lock's file in the cache directory.
pub(crate) const CACHE_LOCK: &str = ".lock";

#[derive(Debug, Clone)]
pub struct LayerCache {
    dir: PathBuf,
    limit_bytes: u64,
}

/// What the cache records about an entry (`<key>.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryRecord {
    /// The snapshot directory the image was built from (an overlay lowerdir).
    pub source: PathBuf,
    pub dev: u64,
    pub ino: u64,
    pub ctime: i64,
    pub ctime_nsec: i64,
    /// Bytes the image takes on disk.
    pub size: u64,
    /// Milliseconds since the epoch.
    pub built_ms: u64,
    /// When a container last got the image (or a collection found it in use).
    pub last_used_ms: u64,
}

/// A layer image a container uses, with its lease.
#[derive(Debug)]
pub struct LayerImage {
    pub path: PathBuf,
    pub key: String,
    /// Found in the cache (not built now).
    pub hit: bool,
    pub lease: Lease,
}

/// A shared `flock` on a cached image: while any lease on it is held, collection leaves the
/// image alone. Dropping the last clone releases it.
#[derive(Clone)]
pub struct Lease(#[allow(dead_code)] Arc<Flock<File>>);

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lease")
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The key of a layer directory: its path and identity, hashed.
pub(crate) fn key_of(layer: &Path) -> std::io::Result<(String, std::fs::Metadata)> {
    let meta = std::fs::metadata(layer)?;
    let mut h = Sha256::new();
    h.update(layer.as_os_str().as_encoded_bytes());
    h.update(meta.dev().to_le_bytes());
    h.update(meta.ino().to_le_bytes());
    h.update(meta.ctime().to_le_bytes());
    h.update(meta.ctime_nsec().to_le_bytes());
    let digest = h.finalize();
    Ok((
        digest[..16].iter().map(|b| format!("{b:02x}")).collect(),
        meta,
    ))
}

pub(crate) fn record_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("{key}.json"))
}

pub(crate) fn read_record(dir: &Path, key: &str) -> Option<EntryRecord> {
    let data = std::fs::read(record_path(dir, key)).ok()?;
    serde_json::from_slice(&data).ok()
}

/// Writes an entry's record (atomically, 0600; the temporary name is unique to this
/// process and call, so concurrent fills of one key do not collide).
pub(crate) fn write_record(dir: &Path, key: &str, rec: &EntryRecord) -> Result<(), StorageError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{key}.{}.{n}.json.tmp", std::process::id()));
    let data = serde_json::to_vec_pretty(rec).map_err(|e| StorageError::Io {
        what: "encoding layer record",
        path: record_path(dir, key),
        source: std::io::Error::other(e),
    })?;
    write_private(&record_path(dir, key), &tmp, &data)
}

fn blocking_err(path: &Path, e: tokio::task::JoinError) -> StorageError {
    StorageError::Io {
        what: "layer cache task",
        path: path.to_owned(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// Opens (creating, 0600) and locks `path` with `flock`; blocking.
pub(crate) fn lock_file(path: &Path, arg: FlockArg) -> std::io::Result<Flock<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)?;
    Flock::lock(f, arg).map_err(|(_, e)| std::io::Error::from(e))
}

async fn lock(path: PathBuf, arg: FlockArg) -> Result<Flock<File>, StorageError> {
    let p = path.clone();
    tokio::task::spawn_blocking(move || lock_file(&p, arg))
        .await
        .map_err(|e| blocking_err(&path, e))?
        .map_err(|source| StorageError::Io {
            what: "locking layer cache",
            path,
            source,
        })
}

/// A lease on `image`, or `None` when there is no such image. Called under the cache lock.
fn try_lease(image: &Path) -> Result<Option<Lease>, StorageError> {
    let f = match File::open(image) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StorageError::Io {
                what: "opening layer image",
                path: image.to_owned(),
                source,
            })
        }
    };
    // Only a collection locks an image exclusively, and only under the exclusive cache lock
    // that this fill's shared one excludes: this cannot wait.
    let lock = Flock::lock(f, FlockArg::LockSharedNonblock).map_err(|(_, e)| StorageError::Io {
        what: "leasing layer image",
        path: image.to_owned(),
        source: e.into(),
    })?;
    Ok(Some(Lease(Arc::new(lock))))
}

impl LayerCache {
    /// A cache in `dir`, unbounded (see [`LayerCache::with_limit_mib`]).
    pub fn new(dir: impl Into<PathBuf>) -> LayerCache {
        LayerCache {
            dir: dir.into(),
            limit_bytes: 0,
        }
    }

    /// Bounds the cache (`storage.layer_cache_max_mib`; 0: no bound).
    pub fn with_limit_mib(mut self, mib: u64) -> LayerCache {
        self.limit_bytes = mib.saturating_mul(1024 * 1024);
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bounds the cache to `bytes` (tests want a bound finer than MiB).
    pub fn with_limit_bytes(mut self, bytes: u64) -> LayerCache {
        self.limit_bytes = bytes;
        self
    }

    /// The bound in bytes; 0 when unbounded.
    pub fn limit_bytes(&self) -> u64 {
        self.limit_bytes
    }

    /// The cache key of a layer directory.
    pub fn key(layer: &Path) -> Result<String, StorageError> {
        key_of(layer)
            .map(|(k, _)| k)
            .map_err(|source| StorageError::Io {
                what: "reading layer",
                path: layer.to_owned(),
                source,
            })
    }

    /// The image for `layer`, and whether it was already cached (no lease is kept: for
    /// tools and tests; containers use [`LayerCache::lease`]).
    pub async fn get_or_build(&self, layer: &Path) -> Result<(PathBuf, bool), StorageError> {
        let got = self.lease(layer).await?;
        Ok((got.path, got.hit))
    }

    /// The image for `layer`, built now if it is not cached, with a lease that keeps it from
    /// collection while held; records the use.
    pub async fn lease(&self, layer: &Path) -> Result<LayerImage, StorageError> {
        let dir = self.dir.clone();
        let src = layer.to_owned();
        let (key, meta, cache_lock) = tokio::task::spawn_blocking(move || {
            let (key, meta) = key_of(&src).map_err(|source| StorageError::Io {
                what: "reading layer",
                path: src.clone(),
                source,
            })?;
            create_dir_all_private(&dir)?;
            let lock =
                lock_file(&dir.join(CACHE_LOCK), FlockArg::LockShared).map_err(|source| {
                    StorageError::Io {
                        what: "locking layer cache",
                        path: dir.join(CACHE_LOCK),
                        source,
                    }
                })?;
            Ok::<_, StorageError>((key, meta, lock))
        })
        .await
        .map_err(|e| blocking_err(layer, e))??;
        let image = self.dir.join(format!("{key}.erofs"));
        let mut record = EntryRecord {
            source: layer.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
            size: 0,
            built_ms: 0,
            last_used_ms: now_ms(),
        };
        if let Some(lease) = self.found(&key, &image, &record).await? {
            drop(cache_lock);
            return Ok(LayerImage {
                path: image,
                key,
                hit: true,
                lease,
            });
        }
        let key_lock = lock(
            self.dir.join(format!("{key}.lock")),
            FlockArg::LockExclusive,
        )
        .await?;
        // Someone else may have built it while we waited for the lock.
        if let Some(lease) = self.found(&key, &image, &record).await? {
            drop(key_lock);
            drop(cache_lock);
            return Ok(LayerImage {
                path: image,
                key,
                hit: true,
                lease,
            });
        }
        let tmp = self.dir.join(format!(".{key}.{}.tmp", std::process::id()));
        let built = self.build(layer, &key, &tmp, &image, &mut record).await;
        if built.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        drop(key_lock);
        drop(cache_lock);
        let lease = built?;
        tracing::info!(layer = %layer.display(), image = %image.display(), "built layer image");
        Ok(LayerImage {
            path: image,
            key,
            hit: false,
            lease,
        })
    }

    /// The cached image's lease, with its record's last use updated; `None` if not cached.
    async fn found(
        &self,
        key: &str,
        image: &Path,
        fresh: &EntryRecord,
    ) -> Result<Option<Lease>, StorageError> {
        let (dir, key, image, fresh) = (
            self.dir.clone(),
            key.to_owned(),
            image.to_owned(),
            fresh.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let Some(lease) = try_lease(&image)? else {
                return Ok(None);
            };
            let rec = match read_record(&dir, &key) {
                Some(mut r) => {
                    r.last_used_ms = fresh.last_used_ms;
                    r
                }
                None => EntryRecord {
                    size: std::fs::metadata(&image)
                        .map(|m| m.blocks() * 512)
                        .unwrap_or(0),
                    ..fresh
                },
            };
            // The use is for eviction order only: a failure costs the image nothing.
            if let Err(e) = write_record(&dir, &key, &rec) {
                tracing::warn!(error = %e, "could not record the use of a cached layer");
            }
            Ok(Some(lease))
        })
        .await
        .map_err(|e| blocking_err(&self.dir, e))?
    }

    /// Builds the image into `tmp` (0600), writes its record, renames it into place and
    /// leases it.
    async fn build(
        &self,
        layer: &Path,
        key: &str,
        tmp: &Path,
        image: &Path,
        record: &mut EntryRecord,
    ) -> Result<Lease, StorageError> {
        build_erofs(layer, tmp).await?;
        let (dir, key, tmp, image) = (
            self.dir.clone(),
            key.to_owned(),
            tmp.to_owned(),
            image.to_owned(),
        );
        let mut rec = record.clone();
        tokio::task::spawn_blocking(move || {
            let io = |what, path: &Path| {
                let path = path.to_owned();
                move |source| StorageError::Io { what, path, source }
            };
            // Whatever mode the tool left, the image is owner-only before it has its name.
            crate::private::tighten(&tmp, FILE_MODE)?;
            let meta = std::fs::metadata(&tmp).map_err(io("reading", &tmp))?;
            rec.size = meta.blocks() * 512;
            rec.built_ms = now_ms();
            write_record(&dir, &key, &rec)?;
            std::fs::rename(&tmp, &image).map_err(io("publishing layer image", &image))?;
            try_lease(&image)?.ok_or_else(|| StorageError::Io {
                what: "leasing layer image",
                path: image.clone(),
                source: std::io::ErrorKind::NotFound.into(),
            })
        })
        .await
        .map_err(|e| blocking_err(&self.dir, e))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn have(tool: &str) -> bool {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
    }

    #[tokio::test]
    async fn builds_once_then_reuses() {
        if !have("mkfs.erofs") {
            eprintln!("skipped: mkfs.erofs not installed (make deps)");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let layer = root.path().join("layer");
        std::fs::create_dir_all(layer.join("bin")).unwrap();
        std::fs::write(layer.join("bin/hello"), b"hi").unwrap();
        let cache = LayerCache::new(root.path().join("cache"));
        let (a, hit_a) = cache.get_or_build(&layer).await.unwrap();
        let ino = std::fs::metadata(&a).unwrap().ino();
        let (b, hit_b) = cache.get_or_build(&layer).await.unwrap();
        assert!(!hit_a && hit_b);
        assert_eq!(a, b);
        assert_eq!(std::fs::metadata(&b).unwrap().ino(), ino, "not rebuilt");
        // The image really is EROFS: magic 0xE0F5E1E2 at offset 1024.
        let data = std::fs::read(&a).unwrap();
        assert_eq!(&data[1024..1028], &0xE0F5E1E2u32.to_le_bytes());
        // A different layer gets a different image.
        let other = root.path().join("other");
        std::fs::create_dir(&other).unwrap();
        let (c, _) = cache.get_or_build(&other).await.unwrap();
        assert_ne!(a, c);
        // Owner-only: the directory, the images, their records and the lock files.
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(cache.dir()), 0o700);
        let mut files = 0;
        for e in std::fs::read_dir(cache.dir()).unwrap().flatten() {
            assert_eq!(mode(&e.path()), 0o600, "{}", e.path().display());
            files += 1;
        }
        // Two images, two records, two build locks, the cache lock; no temporary left.
        assert_eq!(files, 7);
        let key = LayerCache::key(&layer).unwrap();
        let rec = read_record(cache.dir(), &key).unwrap();
        assert_eq!(rec.source, layer);
        assert_eq!(rec.size, std::fs::metadata(&a).unwrap().blocks() * 512);
        assert!(rec.last_used_ms >= rec.built_ms);
    }

    #[tokio::test]
    async fn upper_image_is_ext4_with_upper_and_work() {
        if !have("mkfs.ext4") {
            eprintln!("skipped: mkfs.ext4 not installed (make deps)");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let seed = root.path().join("seed");
        std::fs::create_dir(&seed).unwrap();
        std::fs::write(seed.join("f"), b"x").unwrap();
        let img = root.path().join("u.ext4");
        crate::build_upper_image(Some(&seed), &img, 64)
            .await
            .unwrap();
        let data = std::fs::read(&img).unwrap();
        // ext4 superblock magic 0xEF53 at 1024 + 56.
        assert_eq!(&data[1080..1082], &[0x53, 0xEF]);
        assert_eq!(std::fs::metadata(&img).unwrap().mode() & 0o7777, 0o600);
        assert!(!root.path().join(".upper-staging").exists());
        // A seed that does not exist fails with the tool's reason and leaves no image.
        let e = crate::build_upper_image(Some(&root.path().join("nope")), &img, 64)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("cp"), "{e}");
    }
}
