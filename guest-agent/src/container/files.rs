//! Copies of small host files (resolv.conf, hosts, hostname) that the spec's bind mounts name.
//!
//! The host sends their content with CreateContainer (`CreateContainerRequest.files`); the
//! agent writes each to `/run/spinbox/containers/<id>/files/<index>` and a bind mount whose
//! source is the copy's host path binds the guest copy instead (see [`super::spec::plan`]).
//! The copies live as long as the container: RemoveContainer (or a failed create) deletes them
//! before the container's directory is removed.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use spinbox_agent_api::agent::FileCopy;

use super::rootfs::CONTAINERS_DIR;

/// At most this many copies per container, each at most [`MAX_FILE_SIZE`] bytes.
pub const MAX_FILES: usize = 16;
pub const MAX_FILE_SIZE: usize = 1 << 20;
/// A copy's mode when the host sent none.
const DEFAULT_MODE: u32 = 0o644;

/// `/run/spinbox/containers/<id>/files`.
pub fn dir(id: &str) -> PathBuf {
    Path::new(CONTAINERS_DIR).join(id).join("files")
}

/// The permission bits a copy is written with.
pub fn mode(copy: &FileCopy) -> u32 {
    match copy.mode & 0o777 {
        0 => DEFAULT_MODE,
        m => m,
    }
}

/// Checks the copies: how many, how big, absolute sources.
pub fn validate(files: &[FileCopy]) -> Result<()> {
    if files.len() > MAX_FILES {
        bail!(
            "files: {} file copies, at most {MAX_FILES} are allowed",
            files.len()
        );
    }
    for (i, f) in files.iter().enumerate() {
        if !f.source.starts_with('/') {
            bail!("files[{i}]: source {:?} is not an absolute path", f.source);
        }
        if f.content.len() > MAX_FILE_SIZE {
            bail!(
                "files[{i}] ({}): {} bytes, at most {MAX_FILE_SIZE} are allowed",
                f.source,
                f.content.len()
            );
        }
    }
    Ok(())
}

/// (host source, guest path) for each copy, in request order.
pub fn guest_paths(id: &str, files: &[FileCopy]) -> Vec<(String, String)> {
    let d = dir(id);
    files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            (
                f.source.clone(),
                d.join(i.to_string()).display().to_string(),
            )
        })
        .collect()
}

/// Writes the copies under [`dir`] (whose parent, the container's directory, must exist).
/// Blocking. On failure what was written stays for [`remove`].
pub fn write(id: &str, files: &[FileCopy]) -> Result<()> {
    write_in(&dir(id), files)
}

/// [`write`] into directory `d` (created, mode 0700), copy `i` as `d/i`.
fn write_in(d: &Path, files: &[FileCopy]) -> Result<()> {
    if files.is_empty() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(d)
        .with_context(|| format!("mkdir {}", d.display()))?;
    for (i, f) in files.iter().enumerate() {
        let (source, path) = (&f.source, d.join(i.to_string()));
        let mode = mode(f);
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&path)?;
            file.write_all(&f.content)?;
            // The mode asked for, whatever the umask.
            file.set_permissions(std::fs::Permissions::from_mode(mode))
        };
        write().with_context(|| format!("writing the copy of {source} to {}", path.display()))?;
    }
    Ok(())
}

/// Deletes the copies, if any. Blocking, idempotent. Returns the problems.
pub fn remove(id: &str) -> Vec<String> {
    remove_in(&dir(id))
}

fn remove_in(d: &Path) -> Vec<String> {
    match std::fs::remove_dir_all(d) {
        Ok(()) => Vec::new(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => vec![format!("removing {}: {e}", d.display())],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(source: &str, content: &[u8], mode: u32) -> FileCopy {
        FileCopy {
            source: source.into(),
            content: content.to_vec(),
            mode,
            ..Default::default()
        }
    }

    #[test]
    fn validation() {
        assert!(validate(&[copy("/etc/hosts", b"127.0.0.1 localhost\n", 0o644)]).is_ok());
        let e = validate(&[copy("etc/hosts", b"", 0)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("files[0]") && e.contains("absolute"), "{e}");
        let big = vec![0u8; MAX_FILE_SIZE + 1];
        let e = validate(&[copy("/a", b"", 0), copy("/big", &big, 0)])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("files[1] (/big)") && e.contains("at most"),
            "{e}"
        );
        assert!(validate(&[copy("/ok", &big[..MAX_FILE_SIZE], 0)]).is_ok());
        let many: Vec<FileCopy> = (0..=MAX_FILES)
            .map(|i| copy(&format!("/f{i}"), b"", 0))
            .collect();
        let e = validate(&many).unwrap_err().to_string();
        assert!(e.contains("17 file copies"), "{e}");
        assert!(validate(&many[..MAX_FILES]).is_ok());
    }

    #[test]
    fn modes_and_paths() {
        assert_eq!(mode(&copy("/a", b"", 0)), 0o644);
        assert_eq!(mode(&copy("/a", b"", 0o100600)), 0o600);
        assert_eq!(mode(&copy("/a", b"", 0o4755)), 0o755);
        assert_eq!(
            guest_paths(
                "c1",
                &[copy("/h/resolv.conf", b"", 0), copy("/h/hosts", b"", 0)]
            ),
            vec![
                (
                    "/h/resolv.conf".to_string(),
                    "/run/spinbox/containers/c1/files/0".to_string()
                ),
                (
                    "/h/hosts".to_string(),
                    "/run/spinbox/containers/c1/files/1".to_string()
                ),
            ]
        );
    }

    #[test]
    fn write_and_remove() {
        let base = std::env::temp_dir().join(format!("spinbox-files-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let d = base.join("files");
        let files = [
            copy("/h/resolv.conf", b"nameserver 10.0.0.1\n", 0),
            copy("/h/hostname", b"box\n", 0o600),
        ];
        write_in(&d, &files).unwrap();
        let meta = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(meta(&d), 0o700);
        assert_eq!(
            std::fs::read(d.join("0")).unwrap(),
            b"nameserver 10.0.0.1\n"
        );
        assert_eq!(meta(&d.join("0")), 0o644);
        assert_eq!(std::fs::read(d.join("1")).unwrap(), b"box\n");
        assert_eq!(meta(&d.join("1")), 0o600);
        assert!(remove_in(&d).is_empty());
        assert!(!d.exists());
        assert!(remove_in(&d).is_empty(), "idempotent");
        write_in(&d, &[]).unwrap();
        assert!(!d.exists(), "no copies, no directory");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
