//! `spinbox inspect [--json] ID`: a VM's records, config, shape and shutdown record; for an
//! id whose state directory is gone, its newest kept shutdown record
//! (`<paths.log_dir>/shutdown/`, see `spinbox_vmm::history`).
//!
//! `--json`: one object with the fields `vm_id`, `state` (a `spinbox ps` state, or `gone`),
//! `error`, `state_dir`, `record` (vm.json), `network` (network.json), `hotplug`
//! (hotplug.json), `config` (config.json), `shape`, `shutdown` (shutdown.json, or the newest
//! kept record of a VM that is gone) and `shutdown_history` (every kept record of the id,
//! newest first); null where there is none.

use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use spinbox_config::Config;
use spinbox_vmm::{history, state, ShutdownEvent, ShutdownReport};

use crate::ps::human_duration;
use crate::vms::{dash, dash_list, read_json, VmView};

const USAGE: &str = "usage: spinbox inspect [--json] ID";
/// The pod's hot-plugged disks (written by the shim's `sandbox/disks.rs`).
const HOTPLUG_RECORD_FILE: &str = "hotplug.json";

pub fn main(config: &Config, args: &[String]) -> Result<()> {
    let mut json = false;
    let mut ids = Vec::new();
    for arg in args {
        match arg.as_str() {
            "--json" => json = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other if other.starts_with('-') => {
                bail!("spinbox inspect: unknown option {other}\n{USAGE}")
            }
            other => ids.push(other),
        }
    }
    let id = match ids.as_slice() {
        [id] => *id,
        [] => bail!("spinbox inspect: no VM id given\n{USAGE}"),
        more => bail!(
            "spinbox inspect: one VM id at a time, got {}\n{USAGE}",
            more.join(" ")
        ),
    };
    state::validate_id(id).map_err(|r| anyhow::anyhow!("spinbox inspect: VM id {id:?} {r}"))?;
    let report = Report::load(config, id)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report.to_json()).context("encoding the report")?
        );
    } else {
        print!("{}", report.text());
    }
    Ok(())
}

/// What `inspect` found of one id.
struct Report {
    id: String,
    state_dir: PathBuf,
    /// The VM's state directory as read; `None`: it is gone.
    live: Option<Live>,
    /// Kept records, newest first: (path, record).
    history: Vec<(PathBuf, Value)>,
    errors: Vec<String>,
}

struct Live {
    view: VmView,
    hotplug: Option<Value>,
    config: Option<Value>,
}

impl Report {
    fn load(config: &Config, id: &str) -> Result<Report> {
        let state_dir = config.paths.state_dir.join(id);
        let kept_dir = history::dir(&config.paths.log_dir);
        let mut errors = Vec::new();
        let mut kept = history::list(&config.paths.log_dir, id).with_context(|| {
            format!(
                "reading the kept shutdown records in {}",
                kept_dir.display()
            )
        })?;
        kept.reverse();
        let mut records = Vec::new();
        for (_, path) in kept {
            match read_json(&path) {
                Ok(Some(v)) => records.push((path, v)),
                // Pruned between the listing and the read.
                Ok(None) => {}
                Err(e) => errors.push(e),
            }
        }
        let live = if state_dir.is_dir() {
            let view = VmView::load(id, &state_dir);
            errors.extend(view.error.clone());
            let mut read = |name: &str| match read_json(&state_dir.join(name)) {
                Ok(v) => v,
                Err(e) => {
                    errors.push(e);
                    None
                }
            };
            let hotplug = read(HOTPLUG_RECORD_FILE);
            let config = read(state::CONFIG_RECORD_FILE);
            Some(Live {
                view,
                hotplug,
                config,
            })
        } else if records.is_empty() {
            bail!(
                "spinbox inspect: no VM {id}: no state directory {} and no kept shutdown record \
                 {id}.<started_unix_ms>.json in {}",
                state_dir.display(),
                kept_dir.display()
            );
        } else {
            None
        };
        Ok(Report {
            id: id.to_owned(),
            state_dir,
            live,
            history: records,
            errors,
        })
    }

    fn state(&self) -> &'static str {
        self.live.as_ref().map_or("gone", |l| l.view.state.as_str())
    }

    /// The shutdown record to show: the state directory's, or the newest kept one.
    fn shutdown(&self) -> Option<&Value> {
        match &self.live {
            Some(l) => l.view.shutdown.as_ref(),
            None => self.history.first().map(|(_, v)| v),
        }
    }

    fn shape_json(&self) -> Value {
        let Some(shape) = self.live.as_ref().and_then(|l| l.view.shape()) else {
            return Value::Null;
        };
        let mut v = serde_json::to_value(shape).unwrap_or(Value::Null);
        if let Value::Object(m) = &mut v {
            let memory = shape
                .memory_base_mib
                .saturating_add(shape.memory_plugged_mib);
            m.insert("memory_mib".into(), memory.into());
        }
        v
    }

    fn to_json(&self) -> Value {
        let live = self.live.as_ref();
        json!({
            "vm_id": self.id,
            "state": self.state(),
            "error": (!self.errors.is_empty()).then(|| self.errors.join("; ")),
            "state_dir": live.map(|_| self.state_dir.display().to_string()),
            "record": live.and_then(|l| l.view.record_json.clone()),
            "network": live.and_then(|l| l.view.network.clone()),
            "hotplug": live.and_then(|l| l.hotplug.clone()),
            "config": live.and_then(|l| l.config.clone()),
            "shape": self.shape_json(),
            "shutdown": self.shutdown(),
            "shutdown_history": self.history.iter().map(|(_, v)| v).collect::<Vec<_>>(),
        })
    }

    fn text(&self) -> String {
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        match &self.live {
            Some(l) => {
                let v = &l.view;
                line(format!("VM {}: {}", self.id, v.state.as_str()));
                line(format!("  state directory: {}", self.state_dir.display()));
                line(format!(
                    "  namespace:       {}",
                    v.namespace().unwrap_or("-")
                ));
                line(format!(
                    "  containers:      {}",
                    dash_list(v.containers(), ", ")
                ));
                line(format!("  shim pid:        {}", dash(v.shim_pid())));
                let mut qemu = dash(v.qemu_pid());
                if let Some(up) = v.uptime_s {
                    qemu.push_str(&format!(", up {}", human_duration(up)));
                }
                if let Some(kib) = v.rss_kib {
                    qemu.push_str(&format!(
                        ", RSS {:.1} MiB with its helpers",
                        kib as f64 / 1024.0
                    ));
                }
                line(format!("  QEMU pid:        {qemu}"));
                line(format!(
                    "  shape:           {}",
                    v.shape().map_or("-".into(), |s| format!(
                        "{} vCPUs (at most {}), {} MiB ({} boot + {} plugged, at most {})",
                        s.vcpus,
                        s.max_vcpus,
                        s.memory_base_mib.saturating_add(s.memory_plugged_mib),
                        s.memory_base_mib,
                        s.memory_plugged_mib,
                        s.memory_max_mib
                    ))
                ));
                line(format!(
                    "  addresses:       {}",
                    dash_list(&v.addresses(), ", ")
                ));
            }
            None => {
                line(format!(
                    "VM {} is gone: no state directory {}",
                    self.id,
                    self.state_dir.display()
                ));
                if let Some((path, _)) = self.history.first() {
                    line(format!(
                        "  its newest kept shutdown record: {}",
                        path.display()
                    ));
                }
            }
        }
        for e in &self.errors {
            line(format!("  error: {e}"));
        }
        line(String::new());
        match self.shutdown() {
            Some(s) => line(format!("shutdown: {}", shutdown_text(s))),
            None => line("shutdown: none began".into()),
        }
        if !self.history.is_empty() {
            line(String::new());
            line(format!(
                "kept shutdown records (newest first): {}",
                self.history.len()
            ));
            for (path, v) in &self.history {
                line(format!("  {}  {}", path.display(), summary(v)));
            }
        }
        if let Some(l) = &self.live {
            let sections = [
                (state::RECORD_FILE, l.view.record_json.as_ref()),
                (spinbox_net::RECORD_FILE, l.view.network.as_ref()),
                (HOTPLUG_RECORD_FILE, l.hotplug.as_ref()),
                (state::CONFIG_RECORD_FILE, l.config.as_ref()),
            ];
            for (name, value) in sections {
                if let Some(v) = value {
                    line(String::new());
                    line(format!("--- {name} ---"));
                    line(serde_json::to_string_pretty(v).unwrap_or_default());
                }
            }
        }
        out
    }
}

fn ago(unix_ms: u64) -> String {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let past_s = u64::try_from(now.saturating_sub(u128::from(unix_ms)) / 1000).unwrap_or(0);
    format!("{} ago (unix ms {unix_ms})", human_duration(past_s))
}

/// One line: how a shutdown went.
fn summary(v: &Value) -> String {
    match serde_json::from_value::<ShutdownReport>(v.clone()) {
        Ok(r) => format!(
            "{}, {} in {} ms, began {}",
            if r.complete { "complete" } else { "incomplete" },
            if r.graceful { "graceful" } else { "forced" },
            r.duration_ms,
            ago(r.started_unix_ms)
        ),
        Err(e) => format!("unreadable: {e}"),
    }
}

/// The summary, then one line per event.
fn shutdown_text(v: &Value) -> String {
    let Ok(r) = serde_json::from_value::<ShutdownReport>(v.clone()) else {
        return serde_json::to_string_pretty(v).unwrap_or_default();
    };
    let mut out = summary(v);
    for e in &r.events {
        let text = match e {
            ShutdownEvent::ShutdownInitiated { at_ms, graceful } => format!(
                "+{at_ms:>6} ms  initiated ({})",
                if *graceful { "graceful" } else { "forced" }
            ),
            ShutdownEvent::ShutdownEscalation {
                at_ms,
                step,
                reason,
                waited_ms,
            } => format!(
                "+{at_ms:>6} ms  escalated past {} after {waited_ms} ms: {reason}",
                step.as_str()
            ),
            ShutdownEvent::ShutdownComplete {
                at_ms,
                graceful,
                last_step,
                ..
            } => format!(
                "+{at_ms:>6} ms  complete ({}) at {}",
                if *graceful { "graceful" } else { "forced" },
                last_step.as_str()
            ),
        };
        out.push_str("\n  ");
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(root: &Path) -> Config {
        let mut c = Config::default();
        c.paths.state_dir = root.join("state");
        c.paths.log_dir = root.join("log");
        c
    }

    fn report(id: &str, started: u64) -> ShutdownReport {
        serde_json::from_value(json!({
            "vm_id": id, "started_unix_ms": started, "complete": true, "graceful": true,
            "duration_ms": 40,
            "events": [
                {"event": "shutdown_initiated", "at_ms": 0, "graceful": true},
                {"event": "shutdown_complete", "at_ms": 40, "graceful": true,
                 "last_step": "ctrl-alt-del", "duration_ms": 40}
            ]
        }))
        .unwrap()
    }

    #[test]
    fn a_gone_vm_shows_its_newest_kept_record_and_an_unknown_id_names_both_places() {
        let root = tempfile::tempdir().unwrap();
        let c = config(root.path());
        let e = Report::load(&c, "never").err().unwrap().to_string();
        let (state_dir, kept_dir) = (
            c.paths.state_dir.join("never"),
            history::dir(&c.paths.log_dir),
        );
        assert!(e.contains("never"), "{e}");
        assert!(e.contains(&state_dir.display().to_string()), "{e}");
        assert!(e.contains(&kept_dir.display().to_string()), "{e}");

        history::keep(&c.paths.log_dir, &report("gone", 100), 5).unwrap();
        history::keep(&c.paths.log_dir, &report("gone", 200), 5).unwrap();
        let r = Report::load(&c, "gone").unwrap();
        let j = r.to_json();
        assert_eq!(j["state"], "gone");
        assert_eq!(j["shutdown"]["started_unix_ms"], 200);
        assert_eq!(j["shutdown_history"].as_array().unwrap().len(), 2);
        assert_eq!(j["record"], Value::Null);
        let text = r.text();
        assert!(text.contains("is gone"), "{text}");
        assert!(
            text.contains("complete (graceful) at ctrl-alt-del"),
            "{text}"
        );
    }

    #[test]
    fn a_state_directory_is_shown_with_its_records() {
        let root = tempfile::tempdir().unwrap();
        let c = config(root.path());
        let dir = c.paths.state_dir.join("vm1");
        std::fs::create_dir_all(&dir).unwrap();
        let rec = state::VmRecord {
            id: "vm1".into(),
            owner: spinbox_vmm::process::ProcessRecord::of(std::process::id()).ok(),
            shape: Some(state::VmShape {
                vcpus: 1,
                max_vcpus: 8,
                memory_base_mib: 512,
                memory_plugged_mib: 128,
                memory_max_mib: 8192,
            }),
            ..Default::default()
        };
        state::write_record(&dir, &rec).unwrap();
        state::write_json(&dir, state::CONFIG_RECORD_FILE, &c).unwrap();
        let j = Report::load(&c, "vm1").unwrap().to_json();
        assert_eq!(j["state"], "starting");
        assert_eq!(j["shape"]["memory_mib"], 640);
        assert_eq!(j["record"]["id"], "vm1");
        assert_eq!(j["config"]["vm"]["memory_mib"], 512);
        assert_eq!(j["hotplug"], Value::Null);
        assert_eq!(j["shutdown"], Value::Null);
        assert_eq!(j["error"], Value::Null);
    }
}
