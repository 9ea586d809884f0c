//! The layer cache: one EROFS image per committed snapshot directory, shared by every
//! container of every image that has the layer.
//!
//! A committed snapshot never changes, so an image keyed by the directory's identity (path,
//! device, inode, change time) stays valid for as long as the snapshot exists. Builds go to a
//! temporary name and are renamed into place under an exclusive lock per key: two shims
//! starting the same image at once build it once, and a reader never sees half an image.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::image::build_erofs;
use crate::StorageError;

#[derive(Debug, Clone)]
pub struct LayerCache {
    dir: PathBuf,
}

impl LayerCache {
    pub fn new(dir: impl Into<PathBuf>) -> LayerCache {
        LayerCache { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cache key of a layer directory.
    pub fn key(layer: &Path) -> Result<String, StorageError> {
        let meta = std::fs::metadata(layer).map_err(|source| StorageError::Io {
            what: "reading layer",
            path: layer.to_owned(),
            source,
        })?;
        let mut h = Sha256::new();
        h.update(layer.as_os_str().as_encoded_bytes());
        h.update(meta.dev().to_le_bytes());
        h.update(meta.ino().to_le_bytes());
        h.update(meta.ctime().to_le_bytes());
        h.update(meta.ctime_nsec().to_le_bytes());
        let digest = h.finalize();
        Ok(digest[..16].iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The image for `layer`, and whether it was already cached.
    pub async fn get_or_build(&self, layer: &Path) -> Result<(PathBuf, bool), StorageError> {
        let key = LayerCache::key(layer)?;
        let image = self.dir.join(format!("{key}.erofs"));
        if image.is_file() {
            return Ok((image, true));
        }
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(|source| StorageError::Io {
                what: "creating layer cache",
                path: self.dir.clone(),
                source,
            })?;
        let lock_path = self.dir.join(format!("{key}.lock"));
        let lock = lock_exclusive(lock_path.clone()).await?;
        // Someone else may have built it while we waited for the lock.
        if image.is_file() {
            drop(lock);
            return Ok((image, true));
        }
        let tmp = self.dir.join(format!(".{key}.{}.tmp", std::process::id()));
        let built = build_erofs(layer, &tmp).await;
        let result = match built {
            Ok(()) => tokio::fs::rename(&tmp, &image)
                .await
                .map_err(|source| StorageError::Io {
                    what: "publishing layer image",
                    path: image.clone(),
                    source,
                }),
            Err(e) => Err(e),
        };
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        // Record what the image was built from, for operators and garbage collection.
        let _ = tokio::fs::write(
            self.dir.join(format!("{key}.source")),
            layer.as_os_str().as_encoded_bytes(),
        )
        .await;
        drop(lock);
        result.map(|()| {
            tracing::info!(layer = %layer.display(), image = %image.display(), "built layer image");
            (image, false)
        })
    }
}

/// Takes an exclusive `flock` on `path` without blocking the async runtime.
async fn lock_exclusive(path: PathBuf) -> Result<nix::fcntl::Flock<std::fs::File>, StorageError> {
    let p = path.clone();
    let res = tokio::task::spawn_blocking(move || {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| std::io::Error::from(e))
    })
    .await
    .map_err(|e| std::io::Error::other(e.to_string()));
    match res {
        Ok(Ok(lock)) => Ok(lock),
        Ok(Err(source)) | Err(source) => Err(StorageError::Io {
            what: "locking layer cache entry",
            path,
            source,
        }),
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
        assert!(!root.path().join(".upper-staging").exists());
        // A seed that does not exist fails with the tool's reason and leaves no image.
        let e = crate::build_upper_image(Some(&root.path().join("nope")), &img, 64)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("cp"), "{e}");
    }
}
