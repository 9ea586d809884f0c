//! Copies of small host files (resolv.conf, hosts, hostname) and small read-only host
//! directories (Kubernetes' secrets, config maps, service account tokens) that the spec's bind
//! mounts name.
//!
//! The host sends their content with CreateContainer (`CreateContainerRequest.files`); the
//! agent writes each to `/run/spinbox/containers/<id>/files/<index>` (a directory's tree
//! below it) and a bind mount whose
//! source is the copy's host path binds the guest copy instead (see [`super::spec::plan`]).
//! The copies live as long as the container: RemoveContainer (or a failed create) deletes them
//! before the container's directory is removed.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use spinbox_agent_api::agent::tree_entry::Kind;
use spinbox_agent_api::agent::{FileCopy, TreeEntry};

use super::rootfs::CONTAINERS_DIR;

/// The limits the shim keeps to (`spinbox_agent_api`): copies per container, bytes per copy
/// (a directory's files together), bytes in all, entries per directory.
pub use spinbox_agent_api::{
    MAX_FILE_COPIES as MAX_FILES, MAX_FILE_COPIES_BYTES as MAX_TOTAL_SIZE,
    MAX_FILE_COPY_BYTES as MAX_FILE_SIZE, MAX_TREE_ENTRIES,
};
/// A copy's mode when the host sent none.
const DEFAULT_MODE: u32 = 0o644;

/// `/run/spinbox/containers/<id>/files`.
pub fn dir(id: &str) -> PathBuf {
    Path::new(CONTAINERS_DIR).join(id).join("files")
}

/// The permission bits a copy is written with.
pub fn mode(copy: &FileCopy) -> u32 {
    match copy.mode & 0o777 {
        0 if copy.directory => 0o755,
        0 => DEFAULT_MODE,
        m => m,
    }
}

/// The bytes a copy carries: a file's content, or its tree's.
fn copy_size(f: &FileCopy) -> usize {
    f.content.len() + f.tree.iter().map(|e| e.content.len()).sum::<usize>()
}

/// Checks the copies: how many, how big, absolute sources, and each directory's tree: relative
/// paths that stay below it, known kinds, nothing below a symlink.
pub fn validate(files: &[FileCopy]) -> Result<()> {
    if files.len() > MAX_FILES {
        bail!(
            "files: {} file copies, at most {MAX_FILES} are allowed",
            files.len()
        );
    }
    let mut total = 0;
    for (i, f) in files.iter().enumerate() {
        if !f.source.starts_with('/') {
            bail!("files[{i}]: source {:?} is not an absolute path", f.source);
        }
        let size = copy_size(f);
        if size > MAX_FILE_SIZE {
            bail!(
                "files[{i}] ({}): {size} bytes, at most {MAX_FILE_SIZE} are allowed",
                f.source
            );
        }
        total += size;
        if !f.directory && !f.tree.is_empty() {
            bail!("files[{i}] ({}): a tree for a file", f.source);
        }
        validate_tree(&f.tree).with_context(|| format!("files[{i}] ({})", f.source))?;
    }
    if total > MAX_TOTAL_SIZE {
        bail!("files: {total} bytes of copies, at most {MAX_TOTAL_SIZE} are allowed");
    }
    Ok(())
}

fn validate_tree(tree: &[TreeEntry]) -> Result<()> {
    if tree.len() > MAX_TREE_ENTRIES {
        bail!(
            "{} entries, at most {MAX_TREE_ENTRIES} are allowed",
            tree.len()
        );
    }
    let mut links: Vec<&str> = Vec::new();
    for (j, e) in tree.iter().enumerate() {
        let p = e.path.as_str();
        if p.is_empty()
            || p.starts_with('/')
            || p.split('/').any(|c| c.is_empty() || c == "." || c == "..")
        {
            bail!("tree[{j}]: path {p:?} does not stay below the directory");
        }
        if links
            .iter()
            .any(|l| p.strip_prefix(l).is_some_and(|rest| rest.starts_with('/')))
        {
            bail!("tree[{j}]: path {p:?} is below a symlink");
        }
        match e.kind.enum_value() {
            Ok(Kind::SYMLINK) => {
                if e.target.is_empty() || e.target.contains('\0') {
                    bail!("tree[{j}] ({p}): bad symlink target {:?}", e.target);
                }
                links.push(p);
            }
            Ok(Kind::FILE) | Ok(Kind::DIRECTORY) => {}
            Err(k) => bail!("tree[{j}] ({p}): unknown kind {k}"),
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
        let write = || -> std::io::Result<()> {
            if !f.directory {
                return write_file(&path, &f.content, mode(f));
            }
            make_dir(&path, mode(f))?;
            for e in &f.tree {
                let p = path.join(&e.path);
                match e.kind.enum_value() {
                    Ok(Kind::DIRECTORY) => make_dir(&p, entry_mode(e))?,
                    Ok(Kind::SYMLINK) => std::os::unix::fs::symlink(&e.target, &p)?,
                    _ => write_file(&p, &e.content, entry_mode(e))?,
                }
            }
            Ok(())
        };
        write().with_context(|| format!("writing the copy of {source} to {}", path.display()))?;
    }
    Ok(())
}

/// A new file (never through an existing name or symlink) with `mode`, whatever the umask.
fn write_file(path: &Path, content: &[u8], mode: u32) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(content)?;
    file.set_permissions(std::fs::Permissions::from_mode(mode))
}

/// A new directory with `mode`, whatever the umask.
fn make_dir(path: &Path, mode: u32) -> std::io::Result<()> {
    std::fs::DirBuilder::new().mode(mode).create(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// A tree entry's permission bits (0 means 0644 for a file, 0755 for a directory).
fn entry_mode(e: &TreeEntry) -> u32 {
    match (e.mode & 0o777, e.kind.enum_value()) {
        (0, Ok(Kind::DIRECTORY)) => 0o755,
        (0, _) => DEFAULT_MODE,
        (m, _) => m,
    }
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

    fn entry(path: &str, kind: Kind, content: &[u8], target: &str) -> TreeEntry {
        TreeEntry {
            path: path.into(),
            kind: kind.into(),
            content: content.to_vec(),
            target: target.into(),
            ..Default::default()
        }
    }

    fn dir_copy(source: &str, tree: Vec<TreeEntry>) -> FileCopy {
        FileCopy {
            source: source.into(),
            directory: true,
            tree,
            ..Default::default()
        }
    }

    #[test]
    fn tree_validation() {
        let ok = dir_copy(
            "/var/lib/kubelet/pods/p/volumes/token",
            vec![
                entry("..2026_11_23", Kind::DIRECTORY, b"", ""),
                entry("..2026_11_23/token", Kind::FILE, b"abc", ""),
                entry("..data", Kind::SYMLINK, b"", "..2026_11_23"),
                entry("token", Kind::SYMLINK, b"", "..data/token"),
            ],
        );
        assert!(validate(std::slice::from_ref(&ok)).is_ok());
        for (bad, needle) in [
            ("../escape", "does not stay below"),
            ("/abs", "does not stay below"),
            ("a/./b", "does not stay below"),
            ("a//b", "does not stay below"),
            ("..data/token2", "below a symlink"),
        ] {
            let mut c = ok.clone();
            c.tree.push(entry(bad, Kind::FILE, b"", ""));
            let e = format!("{:#}", validate(&[c]).unwrap_err());
            assert!(e.contains("files[0]") && e.contains(needle), "{bad}: {e}");
        }
        let mut c = ok.clone();
        c.tree.push(entry("l", Kind::SYMLINK, b"", ""));
        assert!(format!("{:#}", validate(&[c]).unwrap_err()).contains("bad symlink target"));
        let many = dir_copy(
            "/d",
            (0..=MAX_TREE_ENTRIES)
                .map(|i| entry(&format!("f{i}"), Kind::FILE, b"", ""))
                .collect(),
        );
        assert!(format!("{:#}", validate(&[many]).unwrap_err()).contains("257 entries"));
        let half = vec![0u8; MAX_FILE_SIZE];
        let big: Vec<FileCopy> = (0..3)
            .map(|i| dir_copy(&format!("/d{i}"), vec![entry("f", Kind::FILE, &half, "")]))
            .collect();
        assert!(validate(&big[..2]).is_ok());
        let e = validate(&big).unwrap_err().to_string();
        assert!(e.contains("bytes of copies, at most"), "{e}");
        let tree_on_file = FileCopy {
            directory: false,
            ..ok
        };
        assert!(validate(&[tree_on_file]).is_err());
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

        let mut secret = dir_copy(
            "/h/secret",
            vec![
                entry("..v1", Kind::DIRECTORY, b"", ""),
                entry("..v1/key", Kind::FILE, b"s3cret", ""),
                entry("key", Kind::SYMLINK, b"", "..v1/key"),
            ],
        );
        secret.mode = 0o1777;
        secret.tree[1].mode = 0o400;
        write_in(&d, &[copy("/h/hosts", b"h\n", 0), secret]).unwrap();
        let copy_dir = d.join("1");
        assert_eq!(meta(&copy_dir), 0o777, "sticky and other bits dropped");
        assert_eq!(meta(&copy_dir.join("..v1")), 0o755);
        assert_eq!(meta(&copy_dir.join("..v1/key")), 0o400);
        assert_eq!(std::fs::read(copy_dir.join("key")).unwrap(), b"s3cret");
        assert_eq!(
            std::fs::read_link(copy_dir.join("key")).unwrap(),
            Path::new("..v1/key")
        );
        assert!(remove_in(&d).is_empty());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
