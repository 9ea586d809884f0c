//! Owner-only host files: every directory spinbox makes under `paths.data_dir` is 0700 and
//! every file 0600, as containerd keeps its snapshots. Layer images hold whole image layers
//! and `upper.ext4` a container's writable layer: no other local user may read them.
//!
//! Files that a tool writes (mkfs.erofs, mkfs.ext4) are created here first, empty and 0600,
//! and the tool writes into them (both open an existing file without changing its mode); the
//! mode is set again before the file gets its final name, so nothing is ever visible with a
//! wider mode, whatever the tool did or the umask was.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::StorageError;

/// Mode of every directory spinbox creates under `data_dir`.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file spinbox creates under `data_dir`.
pub const FILE_MODE: u32 = 0o600;

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StorageError {
    let path = path.to_owned();
    move |source| StorageError::Io { what, path, source }
}

/// `create_dir_all` with 0700 on every level it creates (levels that exist are left as
/// they are: they may not be ours).
pub fn create_dir_all_private(path: &Path) -> Result<(), StorageError> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
        .map_err(io("creating directory", path))?;
    // The umask may have taken bits away, never added any; the leaf is ours in any case.
    tighten(path, DIR_MODE)
}

/// Sets `path`'s mode to `mode` when it has bits for group or others (an existing
/// `data_dir` made 0755 by an older version or by hand). The owner's own bits are kept as
/// asked.
pub fn tighten(path: &Path, mode: u32) -> Result<(), StorageError> {
    let meta = std::fs::metadata(path).map_err(io("reading mode of", path))?;
    if meta.permissions().mode() & 0o7777 != mode {
        std::fs::set_permissions(path, Permissions::from_mode(mode))
            .map_err(io("setting mode of", path))?;
    }
    Ok(())
}

/// Creates `path` as an empty 0600 file (replacing a file of that name), for a tool to
/// write into.
pub fn create_file_private(path: &Path) -> Result<std::fs::File, StorageError> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io("replacing", path)(e)),
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(io("creating", path))
}

/// Writes `data` to `path` through a 0600 temporary file renamed into place.
pub fn write_private(path: &Path, tmp: &Path, data: &[u8]) -> Result<(), StorageError> {
    use std::io::Write;
    let result = create_file_private(tmp)
        .and_then(|mut f| f.write_all(data).map_err(io("writing", tmp)))
        .and_then(|()| std::fs::rename(tmp, path).map_err(io("renaming into place", path)));
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

/// The directories of `data_dir` a container create needs: `data_dir` itself, `layers/` and
/// `containers/` (created 0700, or tightened to 0700 when they exist wider), then the
/// container's own `work_dir` below it (0700 on every level created).
pub async fn prepare_data_dirs(data_dir: &Path, work_dir: &Path) -> Result<(), StorageError> {
    let data_dir = data_dir.to_owned();
    let work_dir: PathBuf = work_dir.to_owned();
    tokio::task::spawn_blocking(move || {
        create_dir_all_private(&data_dir)?;
        for sub in ["layers", "containers"] {
            let p = data_dir.join(sub);
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => tighten(&p, DIR_MODE)?,
                // Not a directory: the layer cache reports it when it gets there.
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io("reading", &p)(e)),
            }
        }
        create_dir_all_private(&work_dir)
    })
    .await
    .map_err(|e| StorageError::Io {
        what: "preparing data directories",
        path: PathBuf::new(),
        source: std::io::Error::other(e.to_string()),
    })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[tokio::test]
    async fn data_dirs_are_created_and_tightened_to_owner_only() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("a/b/data");
        let work = data.join("containers/sb/members/c1");
        prepare_data_dirs(&data, &work).await.unwrap();
        // Every level created is 0700, those above data_dir included.
        for p in ["a", "a/b"] {
            assert_eq!(mode(&root.path().join(p)), 0o700, "{p}");
        }
        // An existing data_dir and layers directory from an older version, world-readable.
        std::fs::create_dir_all(data.join("layers")).unwrap();
        std::fs::set_permissions(&data, Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(data.join("layers"), Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(data.join("containers"), Permissions::from_mode(0o711)).unwrap();
        prepare_data_dirs(&data, &work).await.unwrap();
        for p in [
            data.clone(),
            data.join("layers"),
            data.join("containers"),
            data.join("containers/sb"),
            data.join("containers/sb/members"),
            work.clone(),
        ] {
            assert_eq!(mode(&p), 0o700, "{}", p.display());
        }
        // A file named like a directory is reported by whoever needs the directory.
        let data2 = root.path().join("d2");
        std::fs::create_dir(&data2).unwrap();
        std::fs::write(data2.join("layers"), "x").unwrap();
        prepare_data_dirs(&data2, &data2.join("containers/x"))
            .await
            .unwrap();
    }

    #[test]
    fn private_files_are_0600_even_with_a_permissive_umask() {
        let root = tempfile::tempdir().unwrap();
        let f = root.path().join("f");
        std::fs::write(&f, "old").unwrap();
        std::fs::set_permissions(&f, Permissions::from_mode(0o666)).unwrap();
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        let created = create_file_private(&f);
        nix::sys::stat::umask(old);
        created.unwrap();
        assert_eq!(mode(&f), 0o600);
        assert_eq!(std::fs::metadata(&f).unwrap().len(), 0, "replaced");
        let j = root.path().join("j.json");
        write_private(&j, &root.path().join(".j.tmp"), b"{}").unwrap();
        assert_eq!(mode(&j), 0o600);
        assert!(!root.path().join(".j.tmp").exists());
    }
}
