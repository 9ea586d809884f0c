//! Collecting the layer cache: entries whose source snapshot is gone, then (with
//! `storage.layer_cache_max_mib`) the least recently used entries until the cache is under
//! its bound — never an image that is in use.
//!
//! A source is *gone* when its directory no longer exists or is not the one the image was
//! built from (its identity, and so its cache key, differs: the path was reused by another
//! snapshot). An entry without a record is gone too (its source cannot be known).
//!
//! An image is *in use* while anyone holds a lock on it:
//! - a shim's lease, a shared `flock` held from the moment a container got the image until
//!   its disks are released (it covers the time before QEMU opens the image);
//! - QEMU's own image locks: QEMU takes OFD byte-range locks (bytes 100 + permission and
//!   200 + permission, `file-posix` `locking=auto`) on every image it has open, checked here
//!   with `F_OFD_GETLK` over the whole file.
//!
//! Locks are kernel state on the image's inode: they need no record that could be stale, see
//! across PID namespaces and users, vanish with their holder, and cost one `open` per entry
//! (a scan of every process's fds would cost one `readlink` per fd on the host and miss
//! processes in other PID namespaces). The check and the removal happen with the image
//! locked exclusively under the exclusive cache lock, so no lease can be taken in between.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use crate::cache::{key_of, lock_file, now_ms, read_record, write_record, EntryRecord};
use crate::cache::{LayerCache, CACHE_LOCK};
use crate::private::{tighten, DIR_MODE, FILE_MODE};
use crate::StorageError;

/// How to collect.
#[derive(Debug, Clone, Copy)]
pub struct CollectOptions {
    /// Only say what would be removed.
    pub dry_run: bool,
    /// How long to wait for the cache lock (fills in progress) before giving up.
    pub wait: Duration,
}

/// Why an entry was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Its source snapshot is gone.
    SourceGone,
    /// It has no record, so no known source.
    NoRecord,
    /// The cache is over its bound and this entry was the least recently used.
    OverLimit,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reason::SourceGone => "source-gone",
            Reason::NoRecord => "no-record",
            Reason::OverLimit => "over-limit",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Removed,
    WouldRemove,
    /// Chosen, but an image in use is never removed: collected later.
    KeptInUse,
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Action::Removed => "removed",
            Action::WouldRemove => "would remove",
            Action::KeptInUse => "kept: in use",
        })
    }
}

/// One entry collection chose.
#[derive(Debug, Clone)]
pub struct Collected {
    pub key: String,
    pub source: Option<PathBuf>,
    pub bytes: u64,
    pub reason: Reason,
    pub action: Action,
}

/// What a collection did.
#[derive(Debug, Clone, Default)]
pub struct CollectReport {
    pub entries: Vec<Collected>,
    /// Bytes of images before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Entries left.
    pub kept: usize,
    /// The cache lock was not free within `wait`: nothing was done.
    pub busy: bool,
    /// Still over the bound: what is left is in use.
    pub over_limit_in_use: bool,
}

struct Entry {
    key: String,
    image: PathBuf,
    record: Option<EntryRecord>,
    /// From the old `<key>.source` file, when there is no record.
    legacy_source: Option<PathBuf>,
    bytes: u64,
    last_used_ms: u64,
    in_use: bool,
}

impl Entry {
    fn source(&self) -> Option<&Path> {
        self.record
            .as_ref()
            .map(|r| r.source.as_path())
            .or(self.legacy_source.as_deref())
    }
}

/// Whether the open image is in use: a lease or QEMU's locks. With `Ok(None)` it is not, and
/// the returned lock (exclusive `flock`) keeps it so while held.
fn lock_unused(f: File) -> std::io::Result<Option<Flock<File>>> {
    let lock = match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(None),
        Err((_, e)) => return Err(e.into()),
    };
    // SAFETY: a plain C struct of integers; all zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0; // to the end, whatever the size
    nix::fcntl::fcntl(lock.as_raw_fd(), nix::fcntl::FcntlArg::F_OFD_GETLK(&mut fl))?;
    if fl.l_type != libc::F_UNLCK as libc::c_short {
        return Ok(None);
    }
    Ok(Some(lock))
}

/// Whether `image` is in use (an image that is gone is not).
pub fn image_in_use(image: &Path) -> std::io::Result<bool> {
    match File::open(image) {
        Ok(f) => Ok(lock_unused(f)?.is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StorageError {
    let path = path.to_owned();
    move |source| StorageError::Io { what, path, source }
}

fn remove_if_there(path: &Path) -> Result<(), StorageError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("removing", path)(e)),
    }
}

/// Removes the entry unless it is in use; `Ok(false)` when it is.
fn remove_entry(dir: &Path, e: &Entry) -> Result<bool, StorageError> {
    let f = match File::open(&e.image) {
        Ok(f) => Some(f),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) => return Err(io("opening layer image", &e.image)(err)),
    };
    let _held = match f {
        Some(f) => match lock_unused(f).map_err(io("checking locks of", &e.image))? {
            Some(l) => Some(l),
            None => return Ok(false),
        },
        None => None,
    };
    remove_if_there(&e.image)?;
    for ext in ["json", "source", "lock"] {
        remove_if_there(&dir.join(format!("{}.{ext}", e.key)))?;
    }
    Ok(true)
}

/// Whether the entry's source snapshot is gone.
fn source_gone(e: &Entry) -> Option<Reason> {
    let Some(source) = e.source() else {
        return Some(Reason::NoRecord);
    };
    match key_of(source) {
        Ok((k, _)) if k == e.key => None,
        Ok(_) => Some(Reason::SourceGone),
        Err(err) if matches!(err.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => {
            Some(Reason::SourceGone)
        }
        // Cannot tell (permissions, I/O): keep it.
        Err(_) => None,
    }
}

/// Takes the exclusive cache lock, trying until `wait` has passed.
fn lock_cache(dir: &Path, wait: Duration) -> Result<Option<Flock<File>>, StorageError> {
    let path = dir.join(CACHE_LOCK);
    let until = Instant::now() + wait;
    loop {
        match lock_file(&path, FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(Some(l)),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {}
            Err(e) => return Err(io("locking layer cache", &path)(e)),
        }
        if Instant::now() >= until {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn scan(dir: &Path) -> Result<(Vec<Entry>, Vec<PathBuf>), StorageError> {
    let mut images = BTreeMap::new();
    let mut other = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io("reading", dir))? {
        let entry = entry.map_err(io("reading", dir))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(key) = name.strip_suffix(".erofs") {
            if !key.starts_with('.') {
                images.insert(key.to_owned(), path);
                continue;
            }
        }
        other.push(path);
    }
    let mut entries = Vec::new();
    for (key, image) in images {
        let meta = match std::fs::metadata(&image) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io("reading", &image)(e)),
        };
        let record = read_record(dir, &key);
        let legacy_source = match record {
            Some(_) => None,
            None => std::fs::read(dir.join(format!("{key}.source")))
                .ok()
                .map(|b| PathBuf::from(String::from_utf8_lossy(&b).into_owned())),
        };
        let in_use = image_in_use(&image).map_err(io("checking locks of", &image))?;
        let mtime_ms = u64::try_from(meta.mtime()).unwrap_or(0) * 1000;
        entries.push(Entry {
            last_used_ms: record.as_ref().map_or(mtime_ms, |r| r.last_used_ms),
            bytes: meta.blocks() * 512,
            key,
            image,
            record,
            legacy_source,
            in_use,
        });
    }
    Ok((entries, other))
}

/// Housekeeping of a collection that is not a dry run, under the exclusive cache lock: no
/// fill is in progress, so temporary files are leftovers of builds that died and build
/// locks of entries that are gone are unused; kept entries get their record (migrated from
/// the old `.source` file, or the last use of an image in use) and owner-only modes.
fn tidy(dir: &Path, kept: &[Entry], other: &[PathBuf]) -> Result<(), StorageError> {
    tighten(dir, DIR_MODE)?;
    for path in other {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let key = name
            .strip_suffix(".lock")
            .or_else(|| name.strip_suffix(".json"))
            .or_else(|| name.strip_suffix(".source"));
        let stale_tmp = name.starts_with('.') && name.ends_with(".tmp");
        let orphan = key.is_some_and(|k| !k.is_empty() && !kept.iter().any(|e| e.key == k));
        if stale_tmp || orphan {
            remove_if_there(path)?;
        }
    }
    for e in kept {
        tighten(&e.image, FILE_MODE)?;
        let record = match (&e.record, e.source()) {
            (Some(_), _) if !e.in_use => {
                tighten(&dir.join(format!("{}.json", e.key)), FILE_MODE)?;
                continue;
            }
            (Some(r), _) => EntryRecord {
                last_used_ms: now_ms(),
                ..r.clone()
            },
            (None, Some(source)) => {
                // A source that cannot be read now is judged again next time.
                let Ok(meta) = std::fs::metadata(source) else {
                    continue;
                };
                EntryRecord {
                    source: source.to_owned(),
                    dev: meta.dev(),
                    ino: meta.ino(),
                    ctime: meta.ctime(),
                    ctime_nsec: meta.ctime_nsec(),
                    size: e.bytes,
                    built_ms: e.last_used_ms,
                    last_used_ms: if e.in_use { now_ms() } else { e.last_used_ms },
                }
            }
            // Without a source an entry is kept only while in use: nothing to record.
            (None, None) => continue,
        };
        write_record(dir, &e.key, &record)?;
        remove_if_there(&dir.join(format!("{}.source", e.key)))?;
    }
    Ok(())
}

impl LayerCache {
    /// Collects the cache (blocking: call it on a blocking thread, or use
    /// [`LayerCache::collect`]).
    pub fn collect_blocking(&self, opts: CollectOptions) -> Result<CollectReport, StorageError> {
        let dir = self.dir();
        let mut report = CollectReport::default();
        if !dir.is_dir() {
            return Ok(report);
        }
        let Some(_lock) = lock_cache(dir, opts.wait)? else {
            report.busy = true;
            return Ok(report);
        };
        let (entries, other) = scan(dir)?;
        report.bytes_before = entries.iter().map(|e| e.bytes).sum();
        let mut kept = Vec::new();
        let mut remove = |e: &Entry, reason: Reason| -> Result<bool, StorageError> {
            let action = if e.in_use {
                Action::KeptInUse
            } else if opts.dry_run {
                Action::WouldRemove
            } else if remove_entry(dir, e)? {
                Action::Removed
            } else {
                Action::KeptInUse
            };
            report.entries.push(Collected {
                key: e.key.clone(),
                source: e.source().map(Path::to_owned),
                bytes: e.bytes,
                reason,
                action,
            });
            Ok(action != Action::KeptInUse)
        };
        for e in entries {
            match source_gone(&e) {
                Some(reason) if remove(&e, reason)? => {}
                _ => kept.push(e),
            }
        }
        let limit = self.limit_bytes();
        let mut total: u64 = kept.iter().map(|e| e.bytes).sum();
        if limit > 0 && total > limit {
            let mut order: Vec<usize> = (0..kept.len()).filter(|&i| !kept[i].in_use).collect();
            order.sort_by(|&a, &b| {
                (kept[a].last_used_ms, &kept[a].key).cmp(&(kept[b].last_used_ms, &kept[b].key))
            });
            let mut gone = Vec::new();
            for i in order {
                if total <= limit {
                    break;
                }
                if remove(&kept[i], Reason::OverLimit)? {
                    total -= kept[i].bytes;
                    gone.push(i);
                }
            }
            let mut i = 0;
            kept.retain(|_| {
                i += 1;
                !gone.contains(&(i - 1))
            });
            report.over_limit_in_use = total > limit;
        }
        report.bytes_after = total;
        report.kept = kept.len();
        if !opts.dry_run {
            tidy(dir, &kept, &other)?;
        }
        Ok(report)
    }

    /// Collects the cache on a blocking thread.
    pub async fn collect(&self, opts: CollectOptions) -> Result<CollectReport, StorageError> {
        let cache = self.clone();
        tokio::task::spawn_blocking(move || cache.collect_blocking(opts))
            .await
            .map_err(|e| StorageError::Io {
                what: "collecting layer cache",
                path: self.dir().to_owned(),
                source: std::io::Error::other(e.to_string()),
            })?
    }
}

#[cfg(test)]
#[path = "collect_tests.rs"]
mod tests;
