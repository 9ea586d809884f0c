//! `make bench`: spinbox side by side with runc and the boot floor, against the private
//! containerd `tests/run.sh --bench` starts. Every row is measured in this one run with the
//! compared commands alternating, and printed as median (min–max) over `BENCH_RUNS` rounds;
//! ratios, not absolute times, are what carries over between machines. See docs/BENCHMARKS.md.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use spinbox_tests::ctr::{Ctr, IMAGE, RUNTIME};

use floors::{confinement_row, floor, other_guest_config, room_to_grow_row};

mod floors;
mod hotplug;
mod peers;
mod pod;

const RUNC: &str = "io.containerd.runc.v2";

/// Samples of one measurement.
#[derive(Default, Clone)]
struct Samples(Vec<f64>);

impl Samples {
    fn push(&mut self, v: f64) {
        self.0.push(v);
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v
    }

    fn median(&self) -> f64 {
        let v = self.sorted();
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    fn show(&self, unit: &str) -> String {
        let v = self.sorted();
        match (v.first(), v.last()) {
            (Some(lo), Some(hi)) => format!("{:.0} {unit} ({lo:.0}–{hi:.0})", self.median()),
            _ => "-".into(),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn env_num(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `ctr run --rm` to completion; the wall time. Panics (ends the bench) if it fails.
/// `ctr run --rm` of `cmd` in IMAGE: the wall time, and the output (stdout is captured when
/// `stdout` is `Stdio::piped()`). Panics if the run failed.
fn run_rm(
    ctr: &Ctr,
    runtime: &str,
    id: &str,
    cmd: &[&str],
    stdout: Stdio,
) -> (Duration, std::process::Output) {
    run_rm_with(ctr, runtime, &[], id, cmd, stdout)
}

/// [`run_rm`] with extra `ctr run` flags (`--runtime-config-path …`).
fn run_rm_with(
    ctr: &Ctr,
    runtime: &str,
    extra: &[&str],
    id: &str,
    cmd: &[&str],
    stdout: Stdio,
) -> (Duration, std::process::Output) {
    let mut flags = vec!["--runtime", runtime];
    flags.extend_from_slice(extra);
    run_rm_image(ctr, &flags, IMAGE, id, cmd, stdout)
}

/// `ctr run --rm FLAGS… image id cmd…` to completion: the wall time and the output. Panics if
/// the run failed.
fn run_rm_image(
    ctr: &Ctr,
    flags: &[&str],
    image: &str,
    id: &str,
    cmd: &[&str],
    stdout: Stdio,
) -> (Duration, std::process::Output) {
    let mut args = vec!["run", "--rm"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&[image, id]);
    args.extend_from_slice(cmd);
    let started = Instant::now();
    let out = ctr
        .cmd()
        .args(&args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .output()
        .expect("ctr run");
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{} {id}: {}",
        flags.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    (took, out)
}

fn run_detached(ctr: &Ctr, runtime: &str, id: &str, cmd: &[&str]) {
    let mut args = vec!["run", "-d", "--runtime", runtime, IMAGE, id];
    args.extend_from_slice(cmd);
    let out = ctr.run(&args, None);
    assert!(
        out.status.success(),
        "{id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn remove(ctr: &Ctr, id: &str) {
    let _ = ctr.run(&["task", "kill", "-s", "SIGKILL", id], None);
    for _ in 0..150 {
        if ctr.task_line(id).is_none_or(|l| l.contains("STOPPED")) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = ctr.run(&["task", "rm", id], None);
    let _ = ctr.run(&["containers", "rm", id], None);
}

/// "holds" or "missed", for a row's target.
fn holds(ok: bool) -> &'static str {
    if ok {
        "holds"
    } else {
        "missed"
    }
}

/// Seconds between the two `/proc/uptime` readings the ceiling script prints ("A B").
fn guest_interval(out: &str) -> Option<f64> {
    let mut it = out.split_whitespace().map(|w| w.parse::<f64>().ok());
    let (a, b) = (it.next()??, it.next()??);
    (b >= a).then_some(b - a)
}

/// Rss and Pss of a process, in KiB (`/proc/<pid>/smaps_rollup`).
fn rss_pss(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("Rss:"), field("Pss:"))
}

/// The processes serving container (or pod) `id`: its shim, and QEMU and the vsock backend
/// as its state directory records them.
fn vm_processes(ctr: &Ctr, id: &str) -> Vec<(&'static str, u32)> {
    let shim = spinbox_tests::processes_mentioning(&format!("-id {id} "))
        .into_iter()
        .filter(|p| p.contains(&ctr.address) && !p.contains(" delete"))
        .find_map(|p| {
            p.split(':')
                .next()
                .and_then(|pid| pid.trim().parse::<u32>().ok())
        });
    let record: serde_json::Value =
        std::fs::read(ctr.spinbox_root.join("state").join(id).join("vm.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
    let pid_of = |key: &str| record[key]["pid"].as_u64().map(|p| p as u32);
    [
        ("shim", shim),
        ("QEMU", pid_of("qemu")),
        ("vhost-device-vsock", pid_of("vsock_backend")),
    ]
    .into_iter()
    .filter_map(|(name, pid)| pid.map(|pid| (name, pid)))
    .collect()
}

/// The shim's `create timeline` lines in containerd's log, by container id: step → ms; a
/// `first output` line adds `first_output` (ms from the create's start to the first byte).
fn timelines(log: &Path) -> HashMap<String, Vec<(String, u64)>> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut out: HashMap<String, Vec<(String, u64)>> = HashMap::new();
    for line in text.lines() {
        let first_output = line.contains("first output");
        if !first_output && !line.contains("create timeline") {
            continue;
        }
        let mut id = None;
        let mut steps = Vec::new();
        for word in line.split(|c: char| c.is_whitespace() || c == '"') {
            // `steps=` prefixes the first step: `steps=bundle_ms=0 state_ms=1 …`.
            let word = word.strip_prefix("steps=").unwrap_or(word);
            let Some((k, v)) = word.split_once('=') else {
                continue;
            };
            if k == "id" {
                id = Some(v.to_owned());
            } else if first_output {
                if let ("since_create_ms", Ok(n)) = (k, v.parse::<u64>()) {
                    steps.push(("first_output".to_owned(), n));
                }
            } else if let (Some(step), Ok(n)) = (k.strip_suffix("_ms"), v.parse::<u64>()) {
                steps.push((step.to_owned(), n));
            }
        }
        if let Some(id) = id {
            out.entry(id).or_default().extend(steps);
        }
    }
    out
}

struct Row {
    what: String,
    spinbox: String,
    runc: String,
    other: String,
    ratio: String,
    target: String,
}

fn print_table(rows: &[Row], runs: usize, config: &spinbox_config::Config) {
    println!();
    println!(
        "spinbox benchmark — {} rounds, accel {:?}, {} vCPU / {} MiB guest",
        runs, config.vm.accel, config.vm.vcpus, config.vm.memory_mib
    );
    println!();
    println!("| measurement | spinbox | runc | other | ratio | target |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.what, r.spinbox, r.runc, r.other, r.ratio, r.target
        );
    }
}

fn main() {
    let Some(ctr) = Ctr::from_env() else {
        eprintln!("bench: run through `make bench` (tests/run.sh --bench)");
        std::process::exit(2);
    };
    let config_path = std::env::var_os("SPINBOX_E2E_CONFIG").expect("SPINBOX_E2E_CONFIG");
    let config = spinbox_config::Config::from_file(Path::new(&config_path)).expect("config");
    let runs = env_num("BENCH_RUNS", 5) as usize;
    let stdout_mib = env_num("BENCH_STDOUT_MIB", 256);
    let parallel = env_num("BENCH_PARALLEL", 8) as usize;
    let scratch = tempfile::tempdir().expect("scratch dir");
    let mut rows = Vec::new();
    // BENCH_ONLY=peers: only the rows beside gVisor and the python3 row (peers.rs).
    match std::env::var("BENCH_ONLY").unwrap_or_default().as_str() {
        "" => {}
        "peers" => {
            rows.extend(peers::rows(&ctr, &config, runs, scratch.path()));
            print_table(&rows, runs, &config);
            return;
        }
        other => {
            eprintln!("bench: BENCH_ONLY={other}: unknown (peers, or unset for every row)");
            std::process::exit(2);
        }
    }

    // Warm-up: the image's layer images, page cache, both runtimes' binaries.
    let _ = run_rm(&ctr, RUNTIME, "bench-warm-s", &["true"], Stdio::null());
    let _ = run_rm(&ctr, RUNC, "bench-warm-r", &["true"], Stdio::null());
    floor(&config, scratch.path());

    // Cold start, alternating.
    eprintln!("bench: cold start x{runs}");
    let (mut s_cold, mut r_cold, mut f_cold) =
        (Samples::default(), Samples::default(), Samples::default());
    // The other guest kernel's floor beside it (tests/run.sh: build/guest-debian or
    // build/guest-minimal, when `make guest-other` built it).
    let other_guest = other_guest_config(&config);
    let mut o_floor = Samples::default();
    for i in 0..runs {
        s_cold.push(ms(run_rm(
            &ctr,
            RUNTIME,
            &format!("bench-cold-s{i}"),
            &["true"],
            Stdio::null(),
        )
        .0));
        r_cold.push(ms(run_rm(
            &ctr,
            RUNC,
            &format!("bench-cold-r{i}"),
            &["true"],
            Stdio::null(),
        )
        .0));
        f_cold.push(ms(floor(&config, scratch.path())));
        if let Some((_, other)) = &other_guest {
            o_floor.push(ms(floor(other, scratch.path())));
        }
    }
    let floor_ratio = s_cold.median() / f_cold.median();
    let other_floor = match &other_guest {
        Some((release, _)) => format!("; floor, {release} {}", o_floor.show("ms")),
        None => String::new(),
    };
    rows.push(Row {
        what: "cold start `ctr run --rm … true`".into(),
        spinbox: s_cold.show("ms"),
        runc: r_cold.show("ms"),
        other: format!("floor {}{other_floor}", f_cold.show("ms")),
        ratio: format!(
            "/floor {:.2}, /runc {:.1}",
            floor_ratio,
            s_cold.median() / r_cold.median()
        ),
        target: format!(
            "≤ 1000 ms: {}; /floor ≤ 1.25: {}",
            holds(s_cold.median() <= 1000.0),
            holds(floor_ratio <= 1.25)
        ),
    });

    // Exec latency on a running container.
    eprintln!("bench: exec x{runs}");
    run_detached(&ctr, RUNTIME, "bench-exec-s", &["sleep", "600"]);
    run_detached(&ctr, RUNC, "bench-exec-r", &["sleep", "600"]);
    let (mut s_exec, mut r_exec) = (Samples::default(), Samples::default());
    for i in 0..runs {
        for (id, samples) in [("bench-exec-s", &mut s_exec), ("bench-exec-r", &mut r_exec)] {
            let started = Instant::now();
            let out = ctr.run(
                &["task", "exec", "--exec-id", &format!("x{i}"), id, "true"],
                None,
            );
            assert!(
                out.status.success(),
                "exec: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            samples.push(ms(started.elapsed()));
        }
    }
    remove(&ctr, "bench-exec-s");
    remove(&ctr, "bench-exec-r");
    rows.push(Row {
        what: "exec latency `ctr task exec … true`".into(),
        spinbox: s_exec.show("ms"),
        runc: r_exec.show("ms"),
        other: String::new(),
        ratio: format!("/runc {:.1}", s_exec.median() / r_exec.median()),
        target: String::new(),
    });

    // stdout throughput: MiB through stdout into a file. Off each wall time comes the median
    // wall of the same command writing nothing (`count=0`), run alternately with the same
    // runtime and route: boot, teardown and the empty `dd` cancel out. The producer is `dd`
    // with 64 KiB writes: busybox `head -c` copies in small pieces and is itself the
    // bottleneck under TCG.
    let stdout_runs = runs.min(3);
    eprintln!("bench: stdout {stdout_mib} MiB x{stdout_runs}");
    let producer = format!(
        "dd if=/dev/zero bs=65536 count={} 2>/dev/null",
        stdout_mib * 16
    );
    // The same bytes through a pipe inside the guest, timed there: what the guest CPU can
    // move at all, so the best any transport out of the VM could reach.
    let ceiling_script = format!(
        "a=$(cut -d' ' -f1 /proc/uptime); {producer} | cat >/dev/null; \
         b=$(cut -d' ' -f1 /proc/uptime); echo \"$a $b\""
    );
    // spinbox with `vm.output_ports: false`: the container's stdout on vsock, as execs'.
    let vsock_config_path =
        spinbox_tests::config_variant_file(scratch.path(), "vsock-route", |c| {
            c["vm"]["output_ports"] = false.into();
        });
    let vsock_route = ["--runtime-config-path", vsock_config_path.as_str()];
    let (mut s_tp, mut r_tp, mut v_tp, mut ceiling) = (
        Samples::default(),
        Samples::default(),
        Samples::default(),
        Samples::default(),
    );
    let empty = "dd if=/dev/zero bs=65536 count=0 2>/dev/null";
    // Per variant: the wall times with bytes, and without.
    let mut walls: [(Vec<f64>, Samples); 3] = Default::default();
    for i in 0..stdout_runs {
        for (v, (runtime, extra, tag)) in [
            (RUNTIME, &[][..], "s"),
            (RUNC, &[][..], "r"),
            (RUNTIME, &vsock_route[..], "v"),
        ]
        .into_iter()
        .enumerate()
        {
            let (took, _) = run_rm_with(
                &ctr,
                runtime,
                extra,
                &format!("bench-out0-{tag}{i}"),
                &["sh", "-c", empty],
                Stdio::null(),
            );
            walls[v].1.push(ms(took));
            let path = scratch.path().join(format!("out-{tag}{i}"));
            let file = std::fs::File::create(&path).expect("output file");
            let (took, _) = run_rm_with(
                &ctr,
                runtime,
                extra,
                &format!("bench-out-{tag}{i}"),
                &["sh", "-c", &producer],
                Stdio::from(file),
            );
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            assert_eq!(size, stdout_mib * 1024 * 1024, "{runtime}: output size");
            walls[v].0.push(ms(took));
            let _ = std::fs::remove_file(&path);
        }
        let (_, out) = run_rm(
            &ctr,
            RUNTIME,
            &format!("bench-ceiling{i}"),
            &["sh", "-c", &ceiling_script],
            Stdio::piped(),
        );
        let secs = guest_interval(&String::from_utf8_lossy(&out.stdout))
            .unwrap_or_else(|| panic!("ceiling: unexpected output {:?}", out.stdout));
        ceiling.push(stdout_mib as f64 / secs.max(0.001));
    }
    for ((with_bytes, empty), samples) in walls.iter().zip([&mut s_tp, &mut r_tp, &mut v_tp]) {
        for wall in with_bytes {
            let secs = (wall - empty.median()).max(1.0) / 1000.0;
            samples.push(stdout_mib as f64 / secs);
        }
    }
    let tp_ratio = s_tp.median() / r_tp.median();
    rows.push(Row {
        what: format!("stdout {stdout_mib} MiB to a file (`dd bs=64k`)"),
        spinbox: s_tp.show("MiB/s"),
        runc: r_tp.show("MiB/s"),
        other: format!(
            "vsock route {}; in-guest pipe {}",
            v_tp.show("MiB/s"),
            ceiling.show("MiB/s")
        ),
        ratio: format!(
            "/runc {:.2}, /vsock route {:.1}, /in-guest pipe {:.2}",
            tp_ratio,
            s_tp.median() / v_tp.median(),
            s_tp.median() / ceiling.median()
        ),
        target: format!(
            "≥ 0.50 of runc: {}",
            if tp_ratio >= 0.5 { "holds" } else { "missed" }
        ),
    });

    // Host memory of one idle container.
    eprintln!("bench: idle memory");
    let id = "bench-mem";
    run_detached(&ctr, RUNTIME, id, &["sleep", "600"]);
    std::thread::sleep(Duration::from_secs(3));
    let mut mem = Vec::new();
    for (name, pid) in vm_processes(&ctr, id) {
        let (rss, pss) = rss_pss(pid);
        mem.push((name, rss, pss));
    }
    remove(&ctr, id);
    let total_rss: u64 = mem.iter().map(|m| m.1).sum();
    let total_pss: u64 = mem.iter().map(|m| m.2).sum();
    let shim_rss = mem.iter().find(|m| m.0 == "shim").map(|m| m.1).unwrap_or(0);
    rows.push(Row {
        what: format!(
            "host memory, idle container ({} MiB guest)",
            config.vm.memory_mib
        ),
        spinbox: format!("RSS {} MiB, PSS {} MiB", total_rss / 1024, total_pss / 1024),
        runc: String::new(),
        other: mem
            .iter()
            .map(|(n, rss, pss)| format!("{n} {}/{} MiB", rss / 1024, pss / 1024))
            .collect::<Vec<_>>()
            .join("; "),
        ratio: String::new(),
        target: format!(
            "shim RSS ≤ 15 MiB: {} ({:.1} MiB)",
            if shim_rss <= 15 * 1024 {
                "holds"
            } else {
                "missed"
            },
            shim_rss as f64 / 1024.0
        ),
    });

    // N in parallel.
    eprintln!("bench: {parallel} in parallel");
    let started = Instant::now();
    let handles: Vec<_> = (0..parallel)
        .map(|i| {
            let args: Vec<String> = [
                "--address",
                &ctr.address,
                "run",
                "--rm",
                "--runtime",
                RUNTIME,
                IMAGE,
                &format!("bench-par{i}"),
                "true",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            std::thread::spawn(move || {
                Command::new("ctr")
                    .args(&args)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .output()
                    .map(|o| {
                        if !o.status.success() {
                            eprintln!(
                                "bench: parallel start failed: {}",
                                String::from_utf8_lossy(&o.stderr)
                            );
                        }
                        o.status.success()
                    })
                    .unwrap_or(false)
            })
        })
        .collect();
    let results: Vec<bool> = handles
        .into_iter()
        .map(|h| h.join().unwrap_or(false))
        .collect();
    assert!(results.iter().all(|ok| *ok), "a parallel start failed");
    let wall = ms(started.elapsed());
    let serial = parallel as f64 * s_cold.median();
    rows.push(Row {
        what: format!("{parallel} cold starts in parallel"),
        spinbox: format!("{wall:.0} ms"),
        runc: String::new(),
        other: format!("{parallel} × one: {serial:.0} ms"),
        ratio: format!("{:.2}", wall / serial),
        target: format!(
            "< {parallel} × one: {}",
            if wall < serial { "holds" } else { "missed" }
        ),
    });

    // First start of a new image (layer images built) vs cached layer images.
    let cache_runs = runs.min(3);
    eprintln!("bench: layer cache x{cache_runs}");
    let layers = ctr.spinbox_root.join("data").join("layers");
    let (mut first, mut cached) = (Samples::default(), Samples::default());
    for i in 0..cache_runs {
        let _ = std::fs::remove_dir_all(&layers);
        first.push(ms(run_rm(
            &ctr,
            RUNTIME,
            &format!("bench-new{i}"),
            &["true"],
            Stdio::null(),
        )
        .0));
        cached.push(ms(run_rm(
            &ctr,
            RUNTIME,
            &format!("bench-cached{i}"),
            &["true"],
            Stdio::null(),
        )
        .0));
    }
    rows.push(Row {
        what: "start, new image vs cached layers".into(),
        spinbox: format!("new {}", first.show("ms")),
        runc: String::new(),
        other: format!("cached {}", cached.show("ms")),
        ratio: format!("{:.2}", first.median() / cached.median()),
        target: String::new(),
    });

    // Pods, through containerd's CRI plugin.
    rows.push(confinement_row(&config, scratch.path(), runs));
    rows.push(room_to_grow_row(&config, scratch.path(), runs));
    rows.extend(hotplug::rows(&ctr, runs.min(5)));
    rows.extend(pod::rows(&ctr, &config, runs.min(3), scratch.path()));
    rows.extend(peers::rows(&ctr, &config, runs, scratch.path()));

    print_table(&rows, runs, &config);

    // Where the median cold start's time went.
    let log = ctr.containerd_dir.join("containerd.log");
    let all = timelines(&log);
    let mut cold: Vec<(&String, &Vec<(String, u64)>)> = all
        .iter()
        .filter(|(id, _)| id.starts_with("bench-cold-s"))
        .collect();
    cold.sort_by_key(|(_, steps)| {
        steps
            .iter()
            .find(|(s, _)| s == "total")
            .map(|s| s.1)
            .unwrap_or(0)
    });
    if let Some((id, steps)) = cold.get(cold.len() / 2) {
        println!();
        println!("create timeline of the median cold start ({id}), ms:");
        println!();
        println!("| step | ms |");
        println!("|---|---|");
        for (step, ms) in steps.iter() {
            println!("| {step} | {ms} |");
        }
        println!(
            "\n(create = the shim's Create; the rest of the cold start is ctr, containerd, shim start, \
             Start, the process, Delete and the VM's shutdown; floor median {:.0} ms)",
            f_cold.median()
        );
        // `true` prints nothing: the stdout runs show when a container's first byte arrives.
        let mut first = Samples::default();
        for (id, steps) in &all {
            if id.starts_with("bench-out-s") {
                if let Some((_, n)) = steps.iter().find(|(s, _)| s == "first_output") {
                    first.push(*n as f64);
                }
            }
        }
        if !first.is_empty() {
            println!(
                "first output (stdout runs), from the start of Create to the first byte at the shim: {}",
                first.show("ms")
            );
        }
    } else {
        println!("\n(no `create timeline` lines found in {})", log.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_timeline_lines_parse() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("containerd.log");
        std::fs::write(
            &log,
            "time=\"x\" level=info msg=\"create timeline id=bench-cold-s0 steps=bundle_ms=0 \
             state_ms=1 mounts_ms=16 network_ms=140 vm_ms=1733 container_ms=238 stdio_ms=1 \
             qemu_spawn_to_ready_ms=1723 guest_boot_to_ready_ms=1461 total_ms=2131\"\n\
             time=\"y\" level=info msg=\"rootfs prepared id=t1\"\n\
             time=\"z\" level=info msg=\"first output\" id=bench-cold-s0 stream=stdout \
             since_create_ms=2140\n",
        )
        .unwrap();
        let t = timelines(&log);
        let steps = &t["bench-cold-s0"];
        assert_eq!(steps[0], ("bundle".to_string(), 0));
        assert!(steps.contains(&("vm".to_string(), 1733)));
        assert!(steps.contains(&("total".to_string(), 2131)));
        assert_eq!(steps.last(), Some(&("first_output".to_string(), 2140)));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn guest_interval_parses_two_uptimes() {
        assert_eq!(guest_interval("12.50 13.75\n"), Some(1.25));
        assert_eq!(guest_interval("13.75 12.50"), None);
        assert_eq!(guest_interval("12.50"), None);
        assert_eq!(guest_interval("x y"), None);
    }

    #[test]
    fn samples_median_and_spread() {
        let mut s = Samples::default();
        for v in [5.0, 1.0, 3.0, 2.0] {
            s.push(v);
        }
        assert_eq!(s.median(), 2.5);
        assert_eq!(s.show("ms"), "2 ms (1–5)");
    }
}
