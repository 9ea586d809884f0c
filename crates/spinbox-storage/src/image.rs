//! Building filesystem images with the host's tools (argument vectors, never a shell).

use std::path::Path;

use tokio::process::Command;

use crate::private::{create_dir_all_private, create_file_private, tighten, FILE_MODE};
use crate::StorageError;

async fn run(tool: &'static str, cmd: &mut Command, path: &Path) -> Result<(), StorageError> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|source| StorageError::Io {
            what: tool,
            path: path.to_owned(),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(StorageError::Tool {
        tool,
        path: path.to_owned(),
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

/// Runs `f` on the blocking pool.
async fn blocking<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageError::Io {
            what: "file task",
            path: path.to_owned(),
            source: std::io::Error::other(e.to_string()),
        })?
}

/// Creates `out` empty and 0600 for a tool to write into (mkfs.erofs and mkfs.ext4 both open
/// an existing file without changing its mode).
async fn precreate(out: &Path) -> Result<(), StorageError> {
    let o = out.to_owned();
    blocking(out, move || create_file_private(&o).map(drop)).await
}

/// Sets `out` to 0600 again after a tool wrote it.
async fn owner_only(out: &Path) -> Result<(), StorageError> {
    let o = out.to_owned();
    blocking(out, move || tighten(&o, FILE_MODE)).await
}

/// Packs `dir` into an EROFS image at `out`, 0600 (uncompressed: the guest reads it at
/// memory speed and TCG makes decompression expensive). Extended attributes are kept, so
/// overlay whiteouts and opaque markers in a layer survive.
pub async fn build_erofs(dir: &Path, out: &Path) -> Result<(), StorageError> {
    precreate(out).await?;
    run(
        "mkfs.erofs",
        Command::new("mkfs.erofs")
            .arg("--quiet")
            .arg("-x1")
            .arg(out)
            .arg(dir),
        dir,
    )
    .await?;
    owner_only(out).await
}

/// Creates the container's writable layer: a sparse ext4 image of `size_mib` with `upper/`
/// (seeded from `seed` when given) and `work/` at its root, as overlayfs wants them on one
/// filesystem. The image is 0600; the staging directory it is made from (0700) is removed.
pub async fn build_upper_image(
    seed: Option<&Path>,
    out: &Path,
    size_mib: u64,
) -> Result<(), StorageError> {
    let parent = out.parent().unwrap_or(Path::new("/"));
    let staging = parent.join(".upper-staging");
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| StorageError::Io { what, path, source }
    };
    let _ = tokio::fs::remove_dir_all(&staging).await;
    let work = staging.join("work");
    let w = work.clone();
    blocking(&work, move || create_dir_all_private(&w)).await?;
    match seed {
        Some(seed) => {
            // Copy the upperdir as it is (ownership, modes, xattrs, whiteouts).
            run(
                "cp",
                Command::new("cp")
                    .arg("-a")
                    .arg("--")
                    .arg(seed)
                    .arg(staging.join("upper")),
                seed,
            )
            .await?
        }
        None => tokio::fs::create_dir(staging.join("upper"))
            .await
            .map_err(io("creating", &staging))?,
    }
    if let Err(e) = precreate(out).await {
        let _ = tokio::fs::remove_dir_all(&staging).await;
        return Err(e);
    }
    let result = run(
        "mkfs.ext4",
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-O", "^has_journal", "-E"])
            .arg("lazy_itable_init=1,root_owner=0:0")
            .arg("-d")
            .arg(&staging)
            .arg(out)
            .arg(format!("{size_mib}M")),
        out,
    )
    .await;
    let _ = tokio::fs::remove_dir_all(&staging).await;
    let result = match result {
        Ok(()) => owner_only(out).await,
        Err(e) => Err(e),
    };
    if result.is_err() {
        let _ = tokio::fs::remove_file(out).await;
    }
    result
}
