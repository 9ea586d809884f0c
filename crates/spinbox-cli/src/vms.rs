//! The VMs on this host as their state directories (`<paths.state_dir>/<id>/`) record them:
//! what `spinbox ps` lists and `spinbox inspect` shows. Only reads: nothing here signals a
//! process or changes a file.
//!
//! A VM's state is judged from its records and which of its recorded processes run (pid and
//! start time both matching, see [`ProcessRecord::is_alive`]):
//!
//! | state | when |
//! |---|---|
//! | `orphaned` | the owner (the shim that created the VM) is gone: `spinbox gc` reclaims it |
//! | `stopped` | `shutdown.json` says complete, or QEMU is gone while the owner lives |
//! | `stopping` | `shutdown.json` exists and is not complete: the ladder is climbing |
//! | `running` | the owner and QEMU run, no shutdown began |
//! | `starting` | the owner runs and has not spawned QEMU yet (or has forgotten it) |
//! | `unknown` | a record could not be read (the error says why) |

use std::path::Path;

use anyhow::Result;
use serde_json::{json, Value};
use spinbox_config::Config;
use spinbox_vmm::process::ProcessRecord;
use spinbox_vmm::state::{self, VmRecord, VmShape};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    Starting,
    Running,
    Stopping,
    Stopped,
    Orphaned,
    Unknown,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Orphaned => "orphaned",
            VmState::Unknown => "unknown",
        }
    }
}

/// Judges a VM's state. `qemu`: whether the recorded QEMU runs, `None` when the record names
/// none; `shutdown_complete`: what `shutdown.json` says, `None` without one.
pub fn judge(owner_alive: bool, qemu: Option<bool>, shutdown_complete: Option<bool>) -> VmState {
    if !owner_alive {
        return VmState::Orphaned;
    }
    match (shutdown_complete, qemu) {
        (Some(true), _) | (_, Some(false)) => VmState::Stopped,
        (Some(false), _) => VmState::Stopping,
        (None, Some(true)) => VmState::Running,
        (None, None) => VmState::Starting,
    }
}

/// One VM as its state directory shows it.
#[derive(Debug, Clone)]
pub struct VmView {
    pub id: String,
    pub state: VmState,
    /// Why a record could not be read (the state is `unknown` when it was `vm.json` or
    /// `shutdown.json`).
    pub error: Option<String>,
    pub record: Option<VmRecord>,
    /// `vm.json` as written (fields this version does not know included).
    pub record_json: Option<Value>,
    pub network: Option<Value>,
    pub shutdown: Option<Value>,
    /// Seconds since QEMU started, while it runs.
    pub uptime_s: Option<u64>,
    /// Resident memory of QEMU and its helpers (those still running as recorded), KiB.
    pub rss_kib: Option<u64>,
}

/// Reads `path` as JSON: `Ok(None)` when it does not exist.
pub fn read_json(path: &Path) -> Result<Option<Value>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("reading {}: {e}", path.display())),
    }
}

impl VmView {
    /// Reads the state directory `dir` of VM `id` and judges it; never fails: what cannot be
    /// read is the view's `error`.
    pub fn load(id: &str, dir: &Path) -> VmView {
        let mut view = VmView {
            id: id.to_owned(),
            state: VmState::Unknown,
            error: None,
            record: None,
            record_json: None,
            network: None,
            shutdown: None,
            uptime_s: None,
            rss_kib: None,
        };
        let mut errors = Vec::new();
        let record = match read_json(&dir.join(state::RECORD_FILE)) {
            Ok(Some(v)) => {
                let typed = serde_json::from_value::<VmRecord>(v.clone())
                    .map_err(|e| format!("{}: {e}", dir.join(state::RECORD_FILE).display()));
                view.record_json = Some(v);
                typed
            }
            Ok(None) => Err(format!(
                "no {} in {} (a VM being created, or a directory not spinbox's)",
                state::RECORD_FILE,
                dir.display()
            )),
            Err(e) => Err(e),
        };
        let shutdown = read_json(&dir.join(state::SHUTDOWN_RECORD_FILE));
        match read_json(&dir.join(spinbox_net::RECORD_FILE)) {
            Ok(n) => view.network = n,
            Err(e) => errors.push(e),
        }
        match (record, shutdown) {
            (Ok(record), Ok(shutdown)) => {
                let qemu = record.qemu.map(|q| q.is_alive());
                let complete = shutdown
                    .as_ref()
                    .map(|s| s.get("complete").and_then(Value::as_bool).unwrap_or(false));
                view.state = judge(record.owner_alive(), qemu, complete);
                if qemu == Some(true) {
                    view.uptime_s = record.qemu.and_then(|q| uptime_of(&q));
                }
                view.rss_kib = rss_kib(&record.processes());
                view.shutdown = shutdown;
                view.record = Some(record);
            }
            (record, shutdown) => {
                if let Err(e) = &record {
                    errors.insert(0, e.clone());
                }
                match shutdown {
                    Ok(s) => view.shutdown = s,
                    Err(e) => errors.push(e),
                }
                view.record = record.ok();
            }
        }
        if !errors.is_empty() {
            view.error = Some(errors.join("; "));
        }
        view
    }

    pub fn namespace(&self) -> Option<&str> {
        self.record.as_ref()?.namespace.as_deref()
    }

    pub fn containers(&self) -> &[String] {
        self.record
            .as_ref()
            .map_or(&[], |r| r.containers.as_slice())
    }

    /// QEMU's pid, while it runs as recorded.
    pub fn qemu_pid(&self) -> Option<u32> {
        let q = self.record.as_ref()?.qemu?;
        q.is_alive().then_some(q.pid)
    }

    /// The owner's (shim's) pid, while it runs as recorded.
    pub fn shim_pid(&self) -> Option<u32> {
        let o = self.record.as_ref()?.owner?;
        o.is_alive().then_some(o.pid)
    }

    pub fn shape(&self) -> Option<VmShape> {
        self.record.as_ref()?.shape
    }

    /// The VM's memory now: boot memory plus what is hot-plugged.
    pub fn memory_mib(&self) -> Option<u32> {
        self.shape()
            .map(|s| s.memory_base_mib.saturating_add(s.memory_plugged_mib))
    }

    pub fn addresses(&self) -> Vec<String> {
        self.network.as_ref().map(addresses).unwrap_or_default()
    }

    /// The `spinbox ps --json` object (field names are stable).
    pub fn ps_json(&self) -> Value {
        json!({
            "vm_id": self.id,
            "namespace": self.namespace(),
            "containers": self.containers(),
            "state": self.state.as_str(),
            "qemu_pid": self.qemu_pid(),
            "shim_pid": self.shim_pid(),
            "uptime_s": self.uptime_s,
            "vcpus": self.shape().map(|s| s.vcpus),
            "memory_mib": self.memory_mib(),
            "rss_kib": self.rss_kib,
            "addresses": self.addresses(),
            "error": self.error,
        })
    }
}

/// Every VM state directory under `paths.state_dir`, by id.
pub fn scan(config: &Config) -> Result<Vec<VmView>> {
    Ok(crate::gc::entries(&config.paths.state_dir)?
        .into_iter()
        .map(|(id, path)| VmView::load(&id, &path))
        .collect())
}

/// The addresses a `network.json` names: those of the mirrored interfaces, or (records
/// written before they were kept) those of the CNI result.
pub fn addresses(network: &Value) -> Vec<String> {
    let strings = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let recorded = strings(network.get("addresses"));
    if !recorded.is_empty() {
        return recorded;
    }
    network
        .pointer("/cni/result/ips")
        .and_then(Value::as_array)
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| ip.get("address")?.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Seconds since boot, from `/proc/uptime` ("12345.67 54321.00").
pub fn parse_uptime(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok()
}

/// `VmRSS` of a `/proc/<pid>/status`, in KiB.
pub fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Seconds a process has run: the host's uptime less its start (clock ticks after boot).
pub fn uptime_from(start_ticks: u64, ticks_per_s: u64, host_uptime_s: f64) -> Option<u64> {
    if ticks_per_s == 0 {
        return None;
    }
    let started = start_ticks as f64 / ticks_per_s as f64;
    let up = host_uptime_s - started;
    (up >= 0.0).then_some(up as u64)
}

fn ticks_per_second() -> u64 {
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).unwrap_or(0)
}

fn uptime_of(process: &ProcessRecord) -> Option<u64> {
    let host = std::fs::read_to_string("/proc/uptime").ok()?;
    uptime_from(process.start_time, ticks_per_second(), parse_uptime(&host)?)
}

/// The summed `VmRSS` of those of `processes` that still run as recorded: the status is
/// read first and counted only if the pid still has the recorded start time afterwards, so a
/// recycled pid's memory is never added.
fn rss_kib(processes: &[ProcessRecord]) -> Option<u64> {
    let mut total = None;
    for p in processes {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", p.pid)) else {
            continue;
        };
        if let Some(kib) = parse_vm_rss_kib(&status) {
            if p.is_alive() {
                total = Some(total.unwrap_or(0) + kib);
            }
        }
    }
    total
}

/// A value for a table, `-` when there is none.
pub(crate) fn dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// A list for a table joined by `sep`, `-` when empty.
pub(crate) fn dash_list(items: &[String], sep: &str) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(sep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_are_judged_from_owner_qemu_and_shutdown_record() {
        use VmState::*;
        // Owner gone: orphaned whatever else holds.
        for qemu in [None, Some(true), Some(false)] {
            for done in [None, Some(true), Some(false)] {
                assert_eq!(judge(false, qemu, done), Orphaned, "{qemu:?} {done:?}");
            }
        }
        assert_eq!(judge(true, Some(true), None), Running);
        assert_eq!(judge(true, Some(true), Some(false)), Stopping);
        assert_eq!(judge(true, Some(true), Some(true)), Stopped);
        assert_eq!(
            judge(true, None, Some(true)),
            Stopped,
            "released, record kept"
        );
        assert_eq!(judge(true, Some(false), None), Stopped, "QEMU died");
        assert_eq!(judge(true, Some(false), Some(false)), Stopped);
        assert_eq!(judge(true, None, Some(false)), Stopping);
        assert_eq!(judge(true, None, None), Starting);
    }

    #[test]
    fn proc_files_parse() {
        assert_eq!(parse_uptime("12345.67 54321.00\n"), Some(12345.67));
        assert_eq!(parse_uptime(""), None);
        assert_eq!(parse_uptime("x y"), None);
        let status =
            "Name:\tqemu-system-x86\nVmPeak:\t 2000 kB\nVmRSS:\t  301234 kB\nThreads:\t5\n";
        assert_eq!(parse_vm_rss_kib(status), Some(301_234));
        // Kernel threads have no VmRSS line.
        assert_eq!(parse_vm_rss_kib("Name:\tkthreadd\nState:\tS\n"), None);
        assert_eq!(uptime_from(1_000, 100, 70.5), Some(60));
        assert_eq!(uptime_from(1_000, 100, 5.0), None, "clock went backwards");
        assert_eq!(uptime_from(1_000, 0, 70.5), None);
        assert!(ticks_per_second() > 0);
    }

    #[test]
    fn addresses_from_the_record_or_the_cni_result() {
        let kept = json!({"addresses": ["10.87.0.5/16", "fd00::5/64"]});
        assert_eq!(addresses(&kept), vec!["10.87.0.5/16", "fd00::5/64"]);
        let old = json!({"cni": {"result": {"ips": [{"address": "10.87.250.7/24"}]}}});
        assert_eq!(addresses(&old), vec!["10.87.250.7/24"]);
        assert!(addresses(&json!({"id": "x"})).is_empty());
    }

    #[test]
    fn unreadable_and_partial_directories_are_unknown_not_fatal() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("vm");
        std::fs::create_dir(&dir).unwrap();
        let v = VmView::load("vm", &dir);
        assert_eq!(v.state, VmState::Unknown);
        assert!(v.error.as_deref().unwrap().contains("vm.json"), "{v:?}");
        std::fs::write(dir.join(state::RECORD_FILE), "{not json").unwrap();
        let v = VmView::load("vm", &dir);
        assert_eq!(v.state, VmState::Unknown);
        assert_eq!(v.ps_json()["state"], "unknown");
        // A record whose owner is this process, QEMU not spawned yet: starting.
        let rec = VmRecord {
            id: "vm".into(),
            owner: ProcessRecord::of(std::process::id()).ok(),
            namespace: Some("default".into()),
            containers: vec!["vm".into()],
            ..Default::default()
        };
        state::write_record(&dir, &rec).unwrap();
        let v = VmView::load("vm", &dir);
        assert_eq!(v.state, VmState::Starting, "{v:?}");
        let row = v.ps_json();
        assert_eq!(row["namespace"], "default");
        assert_eq!(row["containers"], json!(["vm"]));
        assert_eq!(row["shim_pid"], json!(std::process::id()));
        // A QEMU stand-in that runs (this process): running, with uptime and RSS.
        let rec = VmRecord {
            qemu: ProcessRecord::of(std::process::id()).ok(),
            shape: Some(VmShape {
                vcpus: 2,
                max_vcpus: 8,
                memory_base_mib: 512,
                memory_plugged_mib: 256,
                memory_max_mib: 8192,
            }),
            ..rec
        };
        state::write_record(&dir, &rec).unwrap();
        let row = VmView::load("vm", &dir).ps_json();
        assert_eq!(row["state"], "running", "{row}");
        assert_eq!(row["memory_mib"], 768);
        assert_eq!(row["vcpus"], 2);
        assert!(row["rss_kib"].as_u64().unwrap() > 0, "{row}");
        assert!(row["uptime_s"].is_u64(), "{row}");
        // An unreadable shutdown record makes the state unknown, with the error.
        std::fs::write(dir.join(state::SHUTDOWN_RECORD_FILE), "[").unwrap();
        let v = VmView::load("vm", &dir);
        assert_eq!(v.state, VmState::Unknown);
        assert!(v.error.unwrap().contains("shutdown.json"));
        std::fs::write(
            dir.join(state::SHUTDOWN_RECORD_FILE),
            r#"{"complete": false}"#,
        )
        .unwrap();
        assert_eq!(VmView::load("vm", &dir).state, VmState::Stopping);
    }
}
