//! `spinbox ps [--json]`: one row per VM on the host, from its state directory (see
//! `vms.rs` for how each field is found and the state judged; docs/OPERATIONS.md).
//!
//! Text: an aligned table. `--json`: an array of objects with the fields `vm_id`,
//! `namespace`, `containers`, `state`, `qemu_pid`, `shim_pid`, `uptime_s`, `vcpus`,
//! `memory_mib`, `rss_kib`, `addresses` and `error` (null where unknown or not applicable).

use anyhow::{bail, Context, Result};
use spinbox_config::Config;

use crate::vms::{self, dash, dash_list, VmView};

const USAGE: &str = "usage: spinbox ps [--json]";

pub fn main(config: &Config, args: &[String]) -> Result<()> {
    let mut json = false;
    for arg in args {
        match arg.as_str() {
            "--json" => json = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other if other.starts_with('-') => bail!("spinbox ps: unknown option {other}\n{USAGE}"),
            other => bail!("spinbox ps: unexpected argument {other:?}\n{USAGE}"),
        }
    }
    let views = vms::scan(config).with_context(|| {
        format!(
            "listing the VM state directories in {}",
            config.paths.state_dir.display()
        )
    })?;
    if json {
        let rows: Vec<serde_json::Value> = views.iter().map(VmView::ps_json).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).context("encoding the VM list")?
        );
    } else {
        print!("{}", table(&views));
    }
    Ok(())
}

const HEADER: [&str; 11] = [
    "VM ID",
    "NAMESPACE",
    "STATE",
    "QEMU",
    "SHIM",
    "UPTIME",
    "VCPUS",
    "MEMORY",
    "RSS",
    "ADDRESSES",
    "CONTAINERS",
];

/// `3d04h`, `2h05m`, `4m10s`, `12s`.
pub fn human_duration(s: u64) -> String {
    let (d, h, m, sec) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{sec}s"),
        (0, 0, _) => format!("{m}m{sec:02}s"),
        (0, _, _) => format!("{h}h{m:02}m"),
        _ => format!("{d}d{h:02}h"),
    }
}

fn row(v: &VmView) -> Vec<String> {
    let mut containers = dash_list(v.containers(), ",");
    if let Some(e) = &v.error {
        containers = format!("{containers}  ({e})");
    }
    vec![
        v.id.clone(),
        dash(v.namespace()),
        v.state.as_str().to_owned(),
        dash(v.qemu_pid()),
        dash(v.shim_pid()),
        dash(v.uptime_s.map(human_duration)),
        dash(v.shape().map(|s| s.vcpus)),
        dash(v.memory_mib().map(|m| format!("{m}M"))),
        dash(v.rss_kib.map(|k| format!("{:.1}M", k as f64 / 1024.0))),
        dash_list(&v.addresses(), ","),
        containers,
    ]
}

/// The table: columns padded to their widest cell, the last one (containers, then any
/// error) left as it is.
fn table(views: &[VmView]) -> String {
    let mut rows = vec![HEADER.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>()];
    rows.extend(views.iter().map(row));
    let columns = HEADER.len();
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == columns {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(human_duration(0), "0s");
        assert_eq!(human_duration(59), "59s");
        assert_eq!(human_duration(250), "4m10s");
        assert_eq!(human_duration(7_500), "2h05m");
        assert_eq!(human_duration(3 * 86_400 + 4 * 3600 + 59), "3d04h");
    }

    #[test]
    fn the_table_is_aligned_and_lists_errors() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("broken-vm");
        std::fs::create_dir(&dir).unwrap();
        let views = vec![VmView::load("broken-vm", &dir)];
        let text = table(&views);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with("VM ID      "), "{text}");
        let state_at = lines[0].find("STATE").unwrap();
        assert_eq!(&lines[1][state_at..state_at + 7], "unknown", "{text}");
        assert!(lines[1].contains("vm.json"), "{text}");
    }
}
