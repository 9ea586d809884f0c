//! `spinbox stop [--timeout D] [--force] [--json] ID... | --all`: takes VMs down from
//! outside their shims, in parallel, printing each VM's shutdown events as they happen.
//!
//! - A VM whose shim lives is stopped *through* it: the request is written to
//!   `stop-request.json` in the VM's state directory and the shim (its record's owner, pid
//!   and start time checked) gets SIGUSR1. It climbs the VM's shutdown ladder (with
//!   `--force` only its last two steps: QMP quit, SIGKILL) while it stays up, so containerd
//!   sees the tasks exit and deletes them as after any VM death. The events are read from
//!   the VM's `shutdown.json`, which the ladder rewrites at every step, and, once the pod's
//!   cleanup removed the state directory, from the copy kept in `log_dir/shutdown/`.
//! - A VM already stopping or stopped is not asked again: its shutdown is followed, or
//!   reported, as it went (running `stop` twice reports the same outcome).
//! - An orphan (its shim is gone) is stopped directly: QEMU is killed if it still runs, and
//!   what its record names is reclaimed as `spinbox gc` would.
//!
//! `--timeout D` gives each graceful step (agent prepare, ctrl-alt-del, the ACPI power button)
//! D instead of the shim's `timeouts.shutdown_grace`, as `docker stop -t` bounds the wait
//! before the kill; the VM's shutdown is followed for three such steps plus two minutes.
//!
//! Exit status: 0 when every VM stopped gracefully, 1 when some needed force (an escalation
//! past the graceful steps, or an orphan), 2 when some could not be stopped or followed
//! (unknown id, no ShutdownComplete within `--timeout`, an error).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use spinbox_config::Config;
use spinbox_vmm::state::{self, StopRequest};
use spinbox_vmm::{history, ShutdownEvent, ShutdownReport, ShutdownStep};
use tokio::sync::mpsc;

/// How often `shutdown.json` is read while a ladder climbs.
const POLL: Duration = Duration::from_millis(50);
/// How long one VM's shutdown is followed beyond the graceful steps' time: the rest of the
/// ladder (QMP quit, SIGKILL) and the pod's cleanup fit in it many times over.
const FOLLOW_SLACK: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
struct Options {
    /// `--timeout`: each graceful step's grace (else the shim's `timeouts.shutdown_grace`).
    timeout: Option<Duration>,
    force: bool,
    json: bool,
    all: bool,
    ids: Vec<String>,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        timeout: None,
        force: false,
        json: false,
        all: false,
        ids: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--force" => o.force = true,
            "--json" => o.json = true,
            "--all" => o.all = true,
            "--timeout" => {
                let v = it
                    .next()
                    .context("spinbox stop: --timeout needs a duration")?;
                o.timeout = Some(
                    spinbox_config::duration::parse(v)
                        .map_err(|e| anyhow::anyhow!("spinbox stop: --timeout {v:?}: {e}"))?,
                );
            }
            opt if opt.starts_with("--") => bail!("spinbox stop: unknown option {opt}"),
            id => {
                state::validate_id(id)
                    .map_err(|e| anyhow::anyhow!("spinbox stop: VM id {id:?}: {e}"))?;
                o.ids.push(id.to_owned());
            }
        }
    }
    if o.all != o.ids.is_empty() {
        bail!("spinbox stop: name the VMs to stop, or --all (not both)");
    }
    Ok(o)
}

/// How one VM's stop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Graceful,
    Forced,
    Failed(String),
}

/// One printed line: a shutdown event, or a failure.
#[derive(Debug, Clone, PartialEq)]
struct Line(Value);

pub async fn main(config: &Config, args: &[String]) -> Result<i32> {
    let o = parse(args)?;
    let ids = if o.all {
        running_ids(config).await?
    } else {
        o.ids.clone()
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<Line>();
    let mut tasks = tokio::task::JoinSet::new();
    for id in ids {
        let (config, o, tx) = (config.clone(), o.clone(), tx.clone());
        tasks.spawn(async move {
            let outcome = stop_one(&config, &id, &o, &tx)
                .await
                .unwrap_or_else(|e| Outcome::Failed(format!("{e:#}")));
            if let Outcome::Failed(why) = &outcome {
                let _ = tx.send(Line(json!({
                    "vm_id": id, "event": "StopFailed", "reason": why, "at": now_rfc3339(),
                })));
            }
            outcome
        });
    }
    drop(tx);
    let json = o.json;
    let printer = tokio::spawn(async move {
        while let Some(line) = rx.recv().await {
            println!("{}", render(&line.0, json));
        }
    });
    let mut code = 0;
    while let Some(done) = tasks.join_next().await {
        code = code.max(match done {
            Ok(Outcome::Graceful) => 0,
            Ok(Outcome::Forced) => 1,
            Ok(Outcome::Failed(_)) | Err(_) => 2,
        });
    }
    let _ = printer.await;
    Ok(code)
}

/// Every VM with a state directory holding a record.
async fn running_ids(config: &Config) -> Result<Vec<String>> {
    let dir = config.paths.state_dir.clone();
    tokio::task::spawn_blocking(move || {
        Ok(crate::gc::entries(&dir)?
            .into_iter()
            .filter(|(_, path)| path.join(state::RECORD_FILE).is_file())
            .map(|(id, _)| id)
            .collect())
    })
    .await
    .context("listing the VMs")?
}

async fn stop_one(
    config: &Config,
    id: &str,
    o: &Options,
    tx: &mpsc::UnboundedSender<Line>,
) -> Result<Outcome> {
    let dir = config.paths.state_dir.join(id);
    let mut follow = Follow::new(id, tx);
    if !tokio::fs::try_exists(&dir).await.unwrap_or(false) {
        // Gone already: how it went, if that was kept.
        return match kept_record(config, id, 0).await? {
            Some(report) => Ok(follow.report(&report)),
            None => bail!(
                "no VM {id}: no state directory in {} and no shutdown record in {}",
                config.paths.state_dir.display(),
                shutdown_dir(config).display()
            ),
        };
    }
    let shutdown_path = dir.join(state::SHUTDOWN_RECORD_FILE);
    let asked_at = unix_ms(SystemTime::now());
    if !tokio::fs::try_exists(&shutdown_path).await.unwrap_or(false) {
        let record = {
            let at = dir.clone();
            tokio::task::spawn_blocking(move || state::read_record(&at))
                .await
                .context("reading the VM's record")?
                .with_context(|| format!("reading the record in {}", dir.display()))?
        };
        match record.owner.filter(|o| o.is_alive()) {
            Some(owner) => ask_shim(&dir, owner.pid, o).await?,
            None => return stop_orphan(config, id, &record, &mut follow).await,
        }
    }
    // Three graceful steps at their grace, then the rest.
    let grace = o.timeout.unwrap_or(config.timeouts.shutdown_grace);
    let bound = grace * 3 + FOLLOW_SLACK;
    let deadline = Instant::now() + bound;
    loop {
        if let Some(report) = read_json(&shutdown_path).await {
            follow.report(&report);
            if let Some(outcome) = follow.done() {
                return Ok(outcome);
            }
        } else if !tokio::fs::try_exists(&dir).await.unwrap_or(false) {
            // The pod's cleanup removed the state directory: the kept copy says the rest.
            let since = asked_at.saturating_sub(60_000);
            return match kept_record(config, id, since).await? {
                Some(report) => Ok(follow.report(&report)),
                None => bail!(
                    "the VM's state directory went without a shutdown record kept in {}",
                    shutdown_dir(config).display()
                ),
            };
        }
        if Instant::now() >= deadline {
            bail!(
                "no ShutdownComplete within {}",
                spinbox_config::duration::format(bound)
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Writes the stop request and signals the shim.
async fn ask_shim(dir: &Path, shim: u32, o: &Options) -> Result<()> {
    let request = StopRequest {
        force: o.force,
        why: format!("spinbox stop{}", if o.force { " --force" } else { "" }),
        grace_ms: o
            .timeout
            .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
    };
    let dir_owned = dir.to_owned();
    tokio::task::spawn_blocking(move || {
        state::write_json(&dir_owned, state::STOP_REQUEST_FILE, &request)
    })
    .await
    .context("writing the stop request")?
    .with_context(|| format!("writing the stop request in {}", dir.display()))?;
    let pid = i32::try_from(shim).context("the shim's pid")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .with_context(|| format!("signalling the VM's shim (pid {shim})"))?;
    Ok(())
}

/// A VM whose shim is gone: nothing can ask the guest, so QEMU is killed if it still runs,
/// and the rest reclaimed by the record. The outcome is kept like any shutdown's.
async fn stop_orphan(
    config: &Config,
    id: &str,
    record: &state::VmRecord,
    follow: &mut Follow<'_>,
) -> Result<Outcome> {
    let started = Instant::now();
    let mut report = ShutdownReport {
        vm_id: id.to_owned(),
        started_unix_ms: unix_ms(SystemTime::now()),
        events: vec![ShutdownEvent::ShutdownInitiated {
            at_ms: 0,
            graceful: false,
        }],
        complete: false,
        graceful: false,
        duration_ms: 0,
    };
    let mut last = ShutdownStep::AlreadyExited;
    if let Some(qemu) = record.qemu.filter(|q| q.is_alive()) {
        last = ShutdownStep::Sigkill;
        report.events.push(ShutdownEvent::ShutdownEscalation {
            at_ms: 0,
            step: ShutdownStep::Sigkill,
            reason: "its shim is gone: there is no agent connection to shut the guest down through"
                .into(),
            waited_ms: 0,
        });
        let pid = i32::try_from(qemu.pid).context("QEMU's pid")?;
        // Gone already is fine: the reclaim below verifies by start time.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let found = crate::gc::scan(config, &[id.to_owned()])?;
    let net = spinbox_net::Settings::from_config(config);
    for f in found
        .iter()
        .filter(|f| f.verdict == crate::gc::Verdict::Orphan)
    {
        crate::gc::reclaim(f, &net).await?;
    }
    let took = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    report.events.push(ShutdownEvent::ShutdownComplete {
        at_ms: took,
        graceful: false,
        last_step: last,
        duration_ms: took,
    });
    (report.complete, report.duration_ms) = (true, took);
    let kept = usize::try_from(config.vm.shutdown_records_kept).unwrap_or(usize::MAX);
    history::keep_async(&config.paths.log_dir, &report, kept)
        .await
        .map_err(anyhow::Error::msg)?;
    let value = serde_json::to_value(&report).context("encoding the shutdown record")?;
    Ok(follow.report(&value))
}

/// Prints a VM's events once each, in order, as its `shutdown.json` grows.
struct Follow<'a> {
    id: &'a str,
    tx: &'a mpsc::UnboundedSender<Line>,
    printed: usize,
    outcome: Option<Outcome>,
}

impl<'a> Follow<'a> {
    fn new(id: &'a str, tx: &'a mpsc::UnboundedSender<Line>) -> Follow<'a> {
        Follow {
            id,
            tx,
            printed: 0,
            outcome: None,
        }
    }

    /// Prints the events of `report` not printed yet; returns the outcome once complete (a
    /// record without one is a failure).
    fn report(&mut self, report: &Value) -> Outcome {
        let started = report["started_unix_ms"].as_u64().unwrap_or(0);
        let events = report["events"].as_array().cloned().unwrap_or_default();
        for ev in events.iter().skip(self.printed) {
            let _ = self.tx.send(Line(line(self.id, started, ev)));
        }
        self.printed = self.printed.max(events.len());
        if report["complete"].as_bool() == Some(true) {
            let outcome = if report["graceful"].as_bool() == Some(true) {
                Outcome::Graceful
            } else {
                Outcome::Forced
            };
            self.outcome = Some(outcome.clone());
            outcome
        } else {
            Outcome::Failed("the shutdown record is not complete".into())
        }
    }

    fn done(&self) -> Option<Outcome> {
        self.outcome.clone()
    }
}

/// One shutdown event as printed: stable field names, `at` in RFC 3339 (UTC).
fn line(id: &str, started_unix_ms: u64, ev: &Value) -> Value {
    let name = match ev["event"].as_str() {
        Some("shutdown_initiated") => "ShutdownInitiated",
        Some("shutdown_escalation") => "ShutdownEscalation",
        Some("shutdown_complete") => "ShutdownComplete",
        _ => "ShutdownUnknown",
    };
    let at = started_unix_ms.saturating_add(ev["at_ms"].as_u64().unwrap_or(0));
    let mut out = json!({
        "vm_id": id,
        "event": name,
        "at": rfc3339(at),
    });
    for key in [
        "step",
        "reason",
        "waited_ms",
        "graceful",
        "last_step",
        "duration_ms",
    ] {
        if !ev[key].is_null() {
            out[key] = ev[key].clone();
        }
    }
    out
}

fn render(line: &Value, json: bool) -> String {
    if json {
        return line.to_string();
    }
    let mut text = format!(
        "{}  {}  {}",
        line["at"].as_str().unwrap_or("-"),
        line["vm_id"].as_str().unwrap_or("-"),
        line["event"].as_str().unwrap_or("-")
    );
    for key in [
        "graceful",
        "step",
        "waited_ms",
        "last_step",
        "duration_ms",
        "reason",
    ] {
        match &line[key] {
            Value::Null => {}
            Value::String(s) => text.push_str(&format!(" {key}={s:?}")),
            v => text.push_str(&format!(" {key}={v}")),
        }
    }
    text
}

fn shutdown_dir(config: &Config) -> PathBuf {
    history::dir(&config.paths.log_dir)
}

/// The newest kept shutdown record of `id` that started at or after `since_unix_ms`.
async fn kept_record(config: &Config, id: &str, since_unix_ms: u64) -> Result<Option<Value>> {
    let (log_dir, owned) = (config.paths.log_dir.clone(), id.to_owned());
    let records = tokio::task::spawn_blocking(move || history::list(&log_dir, &owned))
        .await
        .context("listing kept shutdown records")?
        .with_context(|| format!("reading {}", shutdown_dir(config).display()))?;
    match records
        .into_iter()
        .rev()
        .find(|(ms, _)| *ms >= since_unix_ms)
    {
        Some((_, path)) => Ok(read_json(&path).await),
        None => Ok(None),
    }
}

async fn read_json(path: &Path) -> Option<Value> {
    let bytes = tokio::fs::read(path).await.ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn now_rfc3339() -> String {
    rfc3339(unix_ms(SystemTime::now()))
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn rfc3339(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_796_644_800_000), "2026-12-07T12:00:00.000Z");
    }

    #[test]
    fn options_name_what_is_wrong() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let o = parse(&args(&["--timeout", "5s", "--force", "--json", "a", "b"])).unwrap();
        assert_eq!(
            (o.timeout, o.force, o.json, o.ids.len()),
            (Some(Duration::from_secs(5)), true, true, 2)
        );
        assert!(parse(&args(&["--all"])).unwrap().all);
        for (bad, says) in [
            (vec!["--nope", "a"], "--nope"),
            (vec!["--timeout"], "--timeout"),
            (vec!["--timeout", "soon", "a"], "soon"),
            (vec!["../etc"], "../etc"),
            (vec![], "--all"),
            (vec!["--all", "a"], "--all"),
        ] {
            let e = parse(&args(&bad)).unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn events_print_once_in_order_with_stable_fields() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut f = Follow::new("vm1", &tx);
        let mut report = json!({
            "vm_id": "vm1", "started_unix_ms": 1_000, "complete": false, "graceful": true,
            "events": [{"event": "shutdown_initiated", "at_ms": 0, "graceful": true}],
        });
        assert!(matches!(f.report(&report), Outcome::Failed(_)));
        report["events"].as_array_mut().unwrap().extend([
            json!({"event": "shutdown_escalation", "at_ms": 3000, "step": "acpi-powerdown",
                   "reason": "no power-off", "waited_ms": 3000}),
            json!({"event": "shutdown_complete", "at_ms": 3500, "graceful": false,
                   "last_step": "acpi-powerdown", "duration_ms": 3500}),
        ]);
        report["complete"] = json!(true);
        report["graceful"] = json!(false);
        assert_eq!(f.report(&report), Outcome::Forced);
        assert_eq!(f.done(), Some(Outcome::Forced));
        drop(tx);
        let mut lines = Vec::new();
        while let Ok(Line(l)) = rx.try_recv() {
            lines.push(l);
        }
        let names: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "ShutdownInitiated",
                "ShutdownEscalation",
                "ShutdownComplete"
            ]
        );
        assert_eq!(lines[1]["step"], "acpi-powerdown");
        assert_eq!(lines[1]["waited_ms"], 3000);
        assert_eq!(lines[1]["at"], "1970-01-01T00:00:04.000Z");
        assert_eq!(lines[2]["graceful"], false);
        let text = render(&lines[1], false);
        assert!(
            text.contains("vm1  ShutdownEscalation") && text.contains("step=\"acpi-powerdown\""),
            "{text}"
        );
    }
}
