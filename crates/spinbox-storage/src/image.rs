//! Building filesystem images with the host's tools (argument vectors, never a shell).

use std::path::Path;

use tokio::process::Command;

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

/// Packs `dir` into an EROFS image at `out` (uncompressed: the guest reads it at memory speed
/// and TCG makes decompression expensive). Extended attributes are kept, so overlay whiteouts
/// and opaque markers in a layer survive.
pub async fn build_erofs(dir: &Path, out: &Path) -> Result<(), StorageError> {
    run(
        "mkfs.erofs",
        Command::new("mkfs.erofs")
            .arg("--quiet")
            .arg("-x1")
            .arg(out)
            .arg(dir),
        dir,
    )
    .await
}

/// Creates the container's writable layer: a sparse ext4 image of `size_mib` with `upper/`
/// (seeded from `seed` when given) and `work/` at its root, as overlayfs wants them on one
/// filesystem.
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
    tokio::fs::create_dir_all(staging.join("work"))
        .await
        .map_err(io("creating", &staging))?;
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
    if result.is_err() {
        let _ = tokio::fs::remove_file(out).await;
    }
    result
}
