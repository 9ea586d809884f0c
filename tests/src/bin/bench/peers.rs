//! The rows beside gVisor, and a python3 one-liner on a Debian image.
//!
//! gVisor is Debian's runsc (tests/fetch-runsc.sh, `$SPINBOX_BENCH_RUNSC`) run through
//! containerd's runc shim, as `ctr run --runtime io.containerd.runc.v2 --runc-binary W`, where
//! W is a wrapper this module writes that adds `--network=none --platform=systrap` (no network,
//! as runc's loopback-only namespace under `ctr run`). The Debian image is bookworm minbase with
//! python3-minimal (tests/image/build-debian-image.sh, imported by tests/run.sh as
//! `$SPINBOX_BENCH_DEBIAN_IMAGE`). Each row is measured here with spinbox, runc and gVisor
//! alternating round by round, spinbox and runc included again, so that every ratio in these
//! rows is side by side. A row whose runtime or image is missing is left out, saying why.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use spinbox_tests::ctr::{Ctr, IMAGE, RUNTIME};

use super::{floor, ms, remove, rss_pss, vm_processes, Row, Samples, RUNC};

const PYTHON: [&str; 3] = ["python3", "-c", "print(sum(range(1000)))"];
const PLATFORM: &str = "systrap";

/// How `ctr run` starts a container under each runtime compared here.
struct Runtimes {
    /// The runsc wrapper, if there is a runsc.
    gvisor: Option<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum Peer {
    Spinbox,
    Runc,
    Gvisor,
}

impl Peer {
    fn tag(self) -> &'static str {
        match self {
            Peer::Spinbox => "s",
            Peer::Runc => "r",
            Peer::Gvisor => "g",
        }
    }
}

impl Runtimes {
    /// `ctr run` flags for `peer`.
    fn flags(&self, peer: Peer) -> Vec<&str> {
        match peer {
            Peer::Spinbox => vec!["--runtime", RUNTIME],
            Peer::Runc => vec!["--runtime", RUNC],
            Peer::Gvisor => vec![
                "--runtime",
                RUNC,
                "--runc-binary",
                self.gvisor.as_deref().expect("a runsc wrapper"),
            ],
        }
    }

    /// The runtimes there are, in the order they alternate.
    fn peers(&self) -> Vec<Peer> {
        let mut peers = vec![Peer::Spinbox, Peer::Runc];
        if self.gvisor.is_some() {
            peers.push(Peer::Gvisor);
        }
        peers
    }
}

/// Writes the wrapper runc's shim runs as its runc binary: runsc with this bench's flags.
/// Returns `(wrapper, "runsc VERSION")`.
fn runsc_wrapper(runsc: &Path, scratch: &Path) -> (String, String) {
    use std::os::unix::fs::PermissionsExt;
    let out = std::process::Command::new(runsc)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", runsc.display()));
    assert!(out.status.success(), "{} --version failed", runsc.display());
    let version = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .replace(" version", "");
    let wrapper = scratch.join("runsc-bench");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec '{}' --network=none --platform={PLATFORM} \"$@\"\n",
            runsc.display()
        ),
    )
    .expect("writing the runsc wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))
        .expect("chmod the runsc wrapper");
    (wrapper.display().to_string(), version)
}

/// `ctr run --rm` of `cmd` in `image` under `peer`: the wall time and the output. Panics if
/// the run failed.
fn run_rm(
    ctr: &Ctr,
    runtimes: &Runtimes,
    peer: Peer,
    image: &str,
    id: &str,
    cmd: &[&str],
    stdout: Stdio,
) -> (Duration, std::process::Output) {
    super::run_rm_image(ctr, &runtimes.flags(peer), image, id, cmd, stdout)
}

/// The rows; `scratch` holds the runsc wrapper and the stdout files.
pub fn rows(ctr: &Ctr, config: &spinbox_config::Config, runs: usize, scratch: &Path) -> Vec<Row> {
    let runsc = std::env::var_os("SPINBOX_BENCH_RUNSC").map(PathBuf::from);
    let (gvisor, gvisor_name) = match &runsc {
        Some(runsc) => {
            let (wrapper, version) = runsc_wrapper(runsc, scratch);
            (Some(wrapper), format!("gVisor ({version}, {PLATFORM})"))
        }
        None => {
            eprintln!("bench: no runsc ($SPINBOX_BENCH_RUNSC unset): the gVisor rows are left out");
            (None, String::new())
        }
    };
    let debian = std::env::var("SPINBOX_BENCH_DEBIAN_IMAGE").ok();
    if debian.is_none() {
        eprintln!("bench: no Debian image ($SPINBOX_BENCH_DEBIAN_IMAGE unset): the python3 row is left out");
    }
    let runtimes = Runtimes { gvisor };
    if runtimes.gvisor.is_none() && debian.is_none() {
        return Vec::new();
    }
    let peers = runtimes.peers();

    // Warm-up: each runtime's first start, the Debian image's layer in spinbox's cache.
    for &peer in &peers {
        let id = format!("bench-peers-warm-{}", peer.tag());
        run_rm(ctr, &runtimes, peer, IMAGE, &id, &["true"], Stdio::null());
        if let Some(image) = &debian {
            run_rm(
                ctr,
                &runtimes,
                peer,
                image,
                &format!("{id}-py"),
                &PYTHON,
                Stdio::null(),
            );
        }
    }

    let mut rows = cold_rows(
        ctr,
        config,
        &runtimes,
        debian.as_deref(),
        &gvisor_name,
        runs,
        scratch,
    );
    if runtimes.gvisor.is_some() {
        rows.push(stdout_row(ctr, &runtimes, runs.min(3), scratch));
        rows.push(memory_row(ctr, &runtimes));
    }
    rows
}

/// Cold starts alternating, round by round: busybox `true` under each runtime and the boot
/// floor (the row beside gVisor), then the python3 one-liner on the Debian image under each.
fn cold_rows(
    ctr: &Ctr,
    config: &spinbox_config::Config,
    runtimes: &Runtimes,
    debian: Option<&str>,
    gvisor_name: &str,
    runs: usize,
    scratch: &Path,
) -> Vec<Row> {
    let peers = runtimes.peers();
    eprintln!("bench: cold start beside gVisor, python3 on Debian x{runs}");
    let mut cold: [Samples; 3] = Default::default();
    let mut python: [Samples; 3] = Default::default();
    let mut floors = Samples::default();
    for i in 0..runs {
        for &peer in &peers {
            let id = format!("bench-peers-cold-{}{i}", peer.tag());
            let (took, _) = run_rm(ctr, runtimes, peer, IMAGE, &id, &["true"], Stdio::null());
            cold[peer as usize].push(ms(took));
        }
        if runtimes.gvisor.is_some() {
            floors.push(ms(floor(config, scratch)));
        }
        if let Some(image) = debian {
            for &peer in &peers {
                let id = format!("bench-peers-py-{}{i}", peer.tag());
                let (took, out) = run_rm(ctr, runtimes, peer, image, &id, &PYTHON, Stdio::piped());
                let printed = String::from_utf8_lossy(&out.stdout);
                assert_eq!(
                    printed.trim(),
                    "499500",
                    "{id}: python3 printed {printed:?}"
                );
                python[peer as usize].push(ms(took));
            }
        }
    }
    let [s, r, g] = &cold;
    let mut rows = Vec::new();
    if runtimes.gvisor.is_some() {
        rows.push(Row {
            what: format!("cold start `ctr run --rm … true`, beside {gvisor_name}"),
            spinbox: s.show("ms"),
            runc: r.show("ms"),
            other: format!("gVisor {}; floor {}", g.show("ms"), floors.show("ms")),
            ratio: format!(
                "/gVisor {:.1}, /runc {:.1}, /floor {:.2}; gVisor /runc {:.1}",
                s.median() / g.median(),
                s.median() / r.median(),
                s.median() / floors.median(),
                g.median() / r.median()
            ),
            target: String::new(),
        });
    }
    if debian.is_some() {
        let [sp, rp, gp] = &python;
        let ratio = sp.median() / s.median();
        let gvisor = if runtimes.gvisor.is_some() {
            format!("gVisor {}; ", gp.show("ms"))
        } else {
            String::new()
        };
        rows.push(Row {
            what: "python3 one-liner `python3 -c 'print(sum(range(1000)))'`, Debian bookworm image, cold `ctr run --rm`".into(),
            spinbox: sp.show("ms"),
            runc: rp.show("ms"),
            other: format!("{gvisor}spinbox busybox `true` {}", s.show("ms")),
            ratio: format!(
                "/busybox true {ratio:.2}, /runc {:.1}{}",
                sp.median() / rp.median(),
                if runtimes.gvisor.is_some() {
                    format!(", /gVisor {:.1}", sp.median() / gp.median())
                } else {
                    String::new()
                }
            ),
            target: format!(
                "≤ 2 × busybox `true`: {}",
                if ratio <= 2.0 { "holds" } else { "missed" }
            ),
        });
    }
    rows
}

/// stdout throughput as main.rs measures it (MiB into a file; off each wall time the median
/// wall of the same command with `count=0` under the same runtime), the three runtimes
/// alternating.
fn stdout_row(ctr: &Ctr, runtimes: &Runtimes, runs: usize, scratch: &Path) -> Row {
    let mib = super::env_num("BENCH_STDOUT_MIB", 256);
    eprintln!("bench: stdout {mib} MiB beside gVisor x{runs}");
    let producer = format!("dd if=/dev/zero bs=65536 count={} 2>/dev/null", mib * 16);
    let empty = "dd if=/dev/zero bs=65536 count=0 2>/dev/null";
    // Per runtime: the wall times with bytes, and without.
    let mut walls: [(Vec<f64>, Samples); 3] = Default::default();
    for i in 0..runs {
        for peer in runtimes.peers() {
            let tag = peer.tag();
            // `sh -c script` under this peer: the wall time.
            let sh = |id: &str, script: &str, out: Stdio| {
                ms(run_rm(ctr, runtimes, peer, IMAGE, id, &["sh", "-c", script], out).0)
            };
            walls[peer as usize].1.push(sh(
                &format!("bench-peers-out0-{tag}{i}"),
                empty,
                Stdio::null(),
            ));
            let path = scratch.join(format!("peers-out-{tag}{i}"));
            let file = std::fs::File::create(&path).expect("output file");
            let id = format!("bench-peers-out-{tag}{i}");
            let took = sh(&id, &producer, Stdio::from(file));
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            assert_eq!(size, mib * 1024 * 1024, "{id}: output size");
            walls[peer as usize].0.push(took);
            let _ = std::fs::remove_file(&path);
        }
    }
    let [s, r, g] = walls.map(|(with_bytes, empty)| {
        let mut rate = Samples::default();
        for wall in with_bytes {
            let secs = (wall - empty.median()).max(1.0) / 1000.0;
            rate.push(mib as f64 / secs);
        }
        rate
    });
    Row {
        what: format!("stdout {mib} MiB to a file (`dd bs=64k`), beside gVisor"),
        spinbox: s.show("MiB/s"),
        runc: r.show("MiB/s"),
        other: format!("gVisor {}", g.show("MiB/s")),
        ratio: format!(
            "/gVisor {:.2}, /runc {:.2}; gVisor /runc {:.2}",
            s.median() / g.median(),
            s.median() / r.median(),
            g.median() / r.median()
        ),
        target: String::new(),
    }
}

/// The runc shim serving container `id` (containerd-shim-runc-v2 … -id ID -address …).
fn runc_shim(ctr: &Ctr, id: &str) -> Option<u32> {
    spinbox_tests::processes_mentioning(&format!("-id {id} "))
        .into_iter()
        .filter(|p| p.contains(&ctr.address) && p.contains("shim-runc") && !p.contains(" delete"))
        .find_map(|p| p.split(':').next()?.trim().parse().ok())
}

/// `pid` and all its descendants, by the parent pids in `/proc/<pid>/stat`.
fn process_tree(pid: u32) -> Vec<u32> {
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            children.entry(ppid).or_default().push(p);
        }
    }
    let mut tree = vec![pid];
    let mut at = 0;
    while at < tree.len() {
        tree.extend(children.get(&tree[at]).into_iter().flatten());
        at += 1;
    }
    tree
}

/// A process's name for the memory breakdown: argv[0]'s file name (runsc's processes name
/// themselves runsc-sandbox, runsc-gofer; its systrap stubs keep no command line).
fn process_name(pid: u32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    let name = String::from_utf8_lossy(argv0);
    match name.rsplit('/').next() {
        Some(n) if !n.is_empty() => n.to_owned(),
        _ => "stub".to_owned(),
    }
}

/// RSS and PSS (KiB) of a runc shim and everything below it, by process name
/// (name → (count, RSS, PSS)); empty when no shim was found.
fn tree_memory(ctr: &Ctr, id: &str) -> BTreeMap<String, (usize, u64, u64)> {
    let mut by_name: BTreeMap<String, (usize, u64, u64)> = BTreeMap::new();
    for pid in runc_shim(ctr, id).map(process_tree).unwrap_or_default() {
        let (rss, pss) = rss_pss(pid);
        let e = by_name.entry(process_name(pid)).or_default();
        *e = (e.0 + 1, e.1 + rss, e.2 + pss);
    }
    by_name
}

fn totals(parts: &BTreeMap<String, (usize, u64, u64)>) -> (u64, u64) {
    parts.values().fold((0, 0), |(r, p), v| (r + v.1, p + v.2))
}

/// Host memory of one idle `sleep` container under each runtime, one at a time: spinbox's
/// shim, QEMU and vhost-device-vsock; runc's shim and the container's process; runc's shim
/// and runsc's processes (sandbox, gofer, systrap stubs) for gVisor.
fn memory_row(ctr: &Ctr, runtimes: &Runtimes) -> Row {
    eprintln!("bench: idle memory beside gVisor");
    let mut measured: Vec<BTreeMap<String, (usize, u64, u64)>> = Vec::new();
    for peer in runtimes.peers() {
        let id = format!("bench-peers-mem-{}", peer.tag());
        let mut args = vec!["run", "-d"];
        args.extend(runtimes.flags(peer));
        args.extend_from_slice(&[IMAGE, &id, "sleep", "600"]);
        let out = ctr.run(&args, None);
        assert!(
            out.status.success(),
            "{id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_secs(3));
        let parts = if peer == Peer::Spinbox {
            vm_processes(ctr, &id)
                .into_iter()
                .map(|(name, pid)| {
                    let (rss, pss) = rss_pss(pid);
                    (name.to_owned(), (1, rss, pss))
                })
                .collect()
        } else {
            tree_memory(ctr, &id)
        };
        remove(ctr, &id);
        assert!(!parts.is_empty(), "{id}: no processes found to measure");
        measured.push(parts);
    }
    let mib = |kib: u64| kib / 1024;
    let show = |parts: &BTreeMap<String, (usize, u64, u64)>| {
        let (rss, pss) = totals(parts);
        format!("RSS {} MiB, PSS {} MiB", mib(rss), mib(pss))
    };
    let breakdown = parts_list(&measured[2]);
    let pss = |i: usize| totals(&measured[i]).1 as f64;
    Row {
        what: "host memory, idle `sleep` container, beside gVisor".into(),
        spinbox: show(&measured[0]),
        runc: show(&measured[1]),
        other: format!("gVisor {} ({breakdown})", show(&measured[2])),
        ratio: format!(
            "PSS /gVisor {:.1}, /runc {:.1}",
            pss(0) / pss(2).max(1.0),
            pss(0) / pss(1).max(1.0)
        ),
        target: String::new(),
    }
}

/// `name RSS/PSS MiB` per process name, `n× name` where there are several.
fn parts_list(parts: &BTreeMap<String, (usize, u64, u64)>) -> String {
    parts
        .iter()
        .map(|(name, (n, rss, pss))| {
            let count = if *n > 1 {
                format!("{n}× ")
            } else {
                String::new()
            };
            let (rss, pss) = (*rss as f64 / 1024.0, *pss as f64 / 1024.0);
            format!("{count}{name} {rss:.1}/{pss:.1} MiB")
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_tree_holds_a_child_of_ours() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let tree = process_tree(std::process::id());
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(tree[0], std::process::id());
        assert!(tree.contains(&child.id()), "{tree:?}");
    }

    #[test]
    fn parts_list_counts_processes_of_one_name() {
        let mut parts = BTreeMap::new();
        parts.insert("runsc-sandbox".to_owned(), (1, 40 * 1024, 20 * 1024));
        parts.insert("stub".to_owned(), (2, 2048, 1024));
        assert_eq!(
            parts_list(&parts),
            "runsc-sandbox 40.0/20.0 MiB; 2× stub 2.0/1.0 MiB"
        );
        assert_eq!(totals(&parts), (40 * 1024 + 2048, 21 * 1024));
    }
}
