//! `spinbox gc`: finds VMs whose shim is gone and reclaims what their records name.
//!
//! A state directory (`<paths.state_dir>/<id>`) is *live* while the process its record names
//! as owner runs (pid and start time both match) and is never touched then. It is an
//! *orphan* once the owner is gone: its processes (verified by start time), files, data
//! directories and the state directory itself are reclaimed. A container data directory
//! (`<paths.data_dir>/containers/<id>`) with no state directory is an orphan too (the state
//! record is created before it and removed after it).
//!
//! Then (unless ids are named) the layer cache (`<paths.data_dir>/layers`) is collected:
//! images whose source snapshot is gone, then the least recently used ones past
//! `storage.layer_cache_max_mib` — never one that a VM has open or a shim holds (see
//! `spinbox_storage`'s `collect.rs`). An image in use is listed as kept and collected by a
//! later run. VMs are reclaimed first, so that the images of orphans are free by then.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use spinbox_config::Config;
use spinbox_vmm::state;

/// How long `gc` waits for the layer cache lock (a create filling the cache) before it
/// leaves the cache for a later run.
const CACHE_WAIT: Duration = Duration::from_secs(60);

/// A directory without a record younger than this may be a create between its mkdir and
/// its first record write: left alone.
const RECORDLESS_GRACE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Live {
        owner: u32,
    },
    Orphan,
    /// No readable record, and too young to call.
    Unknown,
}

#[derive(Debug, Clone)]
pub struct Found {
    pub id: String,
    pub kind: &'static str,
    pub path: PathBuf,
    pub verdict: Verdict,
    pub processes: Vec<u32>,
}

fn age(path: &Path) -> Duration {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .unwrap_or_default()
}

pub(crate) fn entries(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let read = match std::fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for entry in read {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // Only names a runtime could have made; anything else is not ours to judge.
        if state::validate_id(&name).is_ok() && entry.path().is_dir() {
            out.push((name, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// What the state and data directories hold, judged.
pub fn scan(config: &Config, only: &[String]) -> Result<Vec<Found>> {
    let wanted = |id: &str| only.is_empty() || only.iter().any(|o| o == id);
    let mut found = Vec::new();
    let state_root = &config.paths.state_dir;
    for (id, path) in entries(state_root)? {
        if !wanted(&id) {
            continue;
        }
        let (verdict, processes) = match state::read_record(&path) {
            Ok(rec) => {
                let procs = rec
                    .processes()
                    .into_iter()
                    .filter(|p| p.is_alive())
                    .map(|p| p.pid)
                    .collect();
                match rec.owner {
                    Some(o) if o.is_alive() => (Verdict::Live { owner: o.pid }, procs),
                    _ => (Verdict::Orphan, procs),
                }
            }
            Err(_) if age(&path) < RECORDLESS_GRACE => (Verdict::Unknown, Vec::new()),
            Err(_) => (Verdict::Orphan, Vec::new()),
        };
        found.push(Found {
            id,
            kind: "vm",
            path,
            verdict,
            processes,
        });
    }
    let data_root = config.paths.data_dir.join("containers");
    for (id, path) in entries(&data_root)? {
        if !wanted(&id) || state_root.join(&id).exists() {
            continue;
        }
        let verdict = if age(&path) < RECORDLESS_GRACE {
            Verdict::Unknown
        } else {
            Verdict::Orphan
        };
        found.push(Found {
            id,
            kind: "data",
            path,
            verdict,
            processes: Vec::new(),
        });
    }
    Ok(found)
}

/// Lists (and unless `dry_run`, reclaims) orphans; prints one line per directory found.
/// Returns how many orphans could not be reclaimed.
pub async fn run(config: &Config, dry_run: bool, only: &[String]) -> Result<usize> {
    let found = scan(config, only)?;
    let net = spinbox_net::Settings::from_config(config);
    let mut failures = 0;
    println!(
        "{:<24} {:<5} {:<12} {:<14} ACTION",
        "ID", "KIND", "STATUS", "PROCESSES"
    );
    for f in &found {
        let status = match &f.verdict {
            Verdict::Live { owner } => format!("live:{owner}"),
            Verdict::Orphan => "orphan".to_owned(),
            Verdict::Unknown => "unknown".to_owned(),
        };
        let procs = if f.processes.is_empty() {
            "-".to_owned()
        } else {
            f.processes
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let action = match (&f.verdict, dry_run) {
            (Verdict::Orphan, true) => "would reclaim".to_owned(),
            (Verdict::Orphan, false) => match reclaim(f, &net).await {
                Ok(()) => "reclaimed".to_owned(),
                Err(e) => {
                    failures += 1;
                    format!("FAILED: {e:#}")
                }
            },
            _ => "left alone".to_owned(),
        };
        println!(
            "{:<24} {:<5} {:<12} {:<14} {action}",
            f.id, f.kind, status, procs
        );
    }
    if only.is_empty() {
        failures += collect_layers(config, dry_run).await;
    }
    Ok(failures)
}

/// Collects the layer cache; prints a line per image chosen and a summary. Returns 1 when
/// the collection failed.
async fn collect_layers(config: &Config, dry_run: bool) -> usize {
    let cache = spinbox_storage::LayerCache::new(config.paths.data_dir.join("layers"))
        .with_limit_mib(config.storage.layer_cache_max_mib);
    let opts = spinbox_storage::CollectOptions {
        dry_run,
        wait: CACHE_WAIT,
    };
    let report = match cache.collect(opts).await {
        Ok(r) => r,
        Err(e) => {
            println!("layer cache {}: FAILED: {e}", cache.dir().display());
            return 1;
        }
    };
    if report.busy {
        println!(
            "layer cache {}: busy (a create is filling it), not collected",
            cache.dir().display()
        );
        return 0;
    }
    for e in &report.entries {
        println!(
            "{:<24} {:<5} {:<12} {:<14} {} ({} KiB, source {})",
            e.key,
            "layer",
            e.reason.to_string(),
            "-",
            e.action,
            e.bytes / 1024,
            e.source
                .as_deref()
                .map_or("unknown".into(), |p| p.display().to_string())
        );
    }
    let limit = match cache.limit_bytes() {
        0 => "unbounded".to_owned(),
        b => format!("limit {} MiB", b / (1024 * 1024)),
    };
    println!(
        "layer cache {}: {} image(s), {} KiB ({limit}){}",
        cache.dir().display(),
        report.kept,
        report.bytes_after / 1024,
        if report.over_limit_in_use {
            "; over the limit with images in use"
        } else {
            ""
        }
    );
    0
}

pub(crate) async fn reclaim(f: &Found, net: &spinbox_net::Settings) -> Result<()> {
    match f.kind {
        "vm" => {
            state::reclaim_contents(&f.path)
                .await
                .with_context(|| format!("reclaiming {}", f.path.display()))?;
            // The VM is gone; then its network (TAPs, redirects, nft rules, CNI, netns).
            let errors =
                spinbox_net::release_recorded(net, &f.path.join(spinbox_net::RECORD_FILE)).await;
            if !errors.is_empty() {
                anyhow::bail!("network of {}: {}", f.id, errors.join("; "));
            }
            match std::fs::remove_dir_all(&f.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", f.path.display())),
            }
        }
        _ => std::fs::remove_dir_all(&f.path)
            .with_context(|| format!("removing {}", f.path.display()))?,
    }
    Ok(())
}
