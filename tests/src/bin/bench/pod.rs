//! The pod rows, through containerd's CRI plugin (what kubelet drives): a pod's start
//! (RunPodSandbox until its first container runs), a second container's start in a running
//! pod (no boot), and the host memory of a pod of three containers against three
//! single-container VMs. spinbox's `spinbox` handler beside the `runc` handler, alternated.

use std::path::Path;
use std::time::{Duration, Instant};

use spinbox_tests::cri::{self, Cri, CriEnv};
use spinbox_tests::ctr::{Ctr, RUNTIME};

use super::{ms, remove, rss_pss, run_detached, vm_processes, Row, Samples};

const HANDLERS: [&str; 2] = ["spinbox", "runc"];

/// The pod rows; none when the suite's containerd has no CRI plugin.
pub fn rows(ctr: &Ctr, config: &spinbox_config::Config, runs: usize, scratch: &Path) -> Vec<Row> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let mut rows = vec![rt.block_on(root_ports(config, runs, scratch))];
    if let Some(env) = CriEnv::from_env() {
        rows.extend(rt.block_on(measure(ctr, &env, runs, scratch)));
    }
    rows
}

/// What the root ports a pod's VM reserves for hotplug cost its boot: QEMU spawn to agent
/// ready with `vm.hotplug_slots` ports and with none, alternated.
async fn root_ports(config: &spinbox_config::Config, runs: usize, scratch: &Path) -> Row {
    let slots = config.vm.hotplug_slots;
    eprintln!("bench: boot with {slots} hotplug root ports vs none x{runs}");
    let mut config = config.clone();
    config.paths.state_dir = scratch.join("ports-state");
    config.paths.log_dir = scratch.join("ports-log");
    let host = spinbox_vmm::accel::HostCaps::probe();
    let mut with: Samples = Default::default();
    let mut without: Samples = Default::default();
    for round in 0..runs {
        for (ports, samples) in [(slots, &mut with), (0, &mut without)] {
            let options = spinbox_vmm::VmOptions {
                hotplug_ports: ports,
                ..Default::default()
            };
            let id = format!("bench-ports{round}-{ports}");
            let vm = spinbox_vmm::Vm::start_with(&id, &config, &options, &host)
                .await
                .unwrap_or_else(|e| panic!("{id}: {e}"));
            samples.push(vm.boot_info().host_spawn_to_ready_ms as f64);
            vm.shutdown().await;
            let errors = vm.release().await;
            assert!(errors.is_empty(), "{id}: {errors:?}");
        }
    }
    Row {
        what: format!("VM boot (QEMU spawn → agent ready), {slots} hotplug root ports vs none"),
        spinbox: with.show("ms"),
        runc: String::new(),
        other: format!("none {}", without.show("ms")),
        ratio: format!("{:.2}", with.median() / without.median()),
        target: String::new(),
    }
}

/// Samples by handler, in `HANDLERS` order.
type ByHandler = [Samples; 2];

async fn measure(ctr: &Ctr, env: &CriEnv, runs: usize, scratch: &Path) -> Vec<Row> {
    let mut cri = Cri::connect(&env.address).await.expect("CRI connection");
    let mut pod_start: ByHandler = Default::default();
    let mut second: ByHandler = Default::default();
    eprintln!("bench: pod start and a second container x{runs}");
    for round in 0..runs {
        for (h, handler) in HANDLERS.iter().enumerate() {
            let name = format!("bench-pod{round}-{handler}");
            let logs = scratch.join(&name);
            std::fs::create_dir_all(&logs).expect("a pod log directory");
            let started = Instant::now();
            let pod = cri
                .run_pod(cri::pod_config(&name, &name, &logs, false), handler)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            cri.run_container(
                &pod,
                cri::container_config("first", "exec sleep 600", false, None),
            )
            .await
            .unwrap_or_else(|e| panic!("{name}: first container: {e}"));
            pod_start[h].push(ms(started.elapsed()));
            let started = Instant::now();
            cri.run_container(
                &pod,
                cri::container_config("second", "exec sleep 600", false, None),
            )
            .await
            .unwrap_or_else(|e| panic!("{name}: second container: {e}"));
            second[h].push(ms(started.elapsed()));
            pod.stop_and_remove(&mut cri)
                .await
                .unwrap_or_else(|e| panic!("{name}: removing: {e}"));
        }
    }
    let mut rows = vec![
        Row {
            what: "pod start (RunPodSandbox + first container running, CRI)".into(),
            spinbox: pod_start[0].show("ms"),
            runc: pod_start[1].show("ms"),
            other: String::new(),
            ratio: format!("/runc {:.1}", pod_start[0].median() / pod_start[1].median()),
            target: String::new(),
        },
        Row {
            what: "second container in a running pod (Create + Start, CRI)".into(),
            spinbox: second[0].show("ms"),
            runc: second[1].show("ms"),
            other: String::new(),
            ratio: format!("/runc {:.1}", second[0].median() / second[1].median()),
            target: format!(
                "≤ 300 ms: {}",
                if second[0].median() <= 300.0 {
                    "holds"
                } else {
                    "missed"
                }
            ),
        },
    ];

    eprintln!("bench: host memory, a pod of 3 vs 3 VMs");
    let name = "bench-pod-mem";
    let logs = scratch.join(name);
    std::fs::create_dir_all(&logs).expect("a pod log directory");
    let pod = cri
        .run_pod(cri::pod_config(name, name, &logs, false), "spinbox")
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    for i in 0..3 {
        let c = format!("c{i}");
        cri.run_container(
            &pod,
            cri::container_config(&c, "exec sleep 600", false, None),
        )
        .await
        .unwrap_or_else(|e| panic!("{name}: {c}: {e}"));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pod_pss = vm_pss(ctr, &pod.id);
    pod.stop_and_remove(&mut cri)
        .await
        .unwrap_or_else(|e| panic!("{name}: removing: {e}"));
    let ids: Vec<String> = (0..3).map(|i| format!("bench-vm{i}")).collect();
    for id in &ids {
        run_detached(ctr, RUNTIME, id, &["sleep", "600"]);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let vms_pss: u64 = ids.iter().map(|id| vm_pss(ctr, id)).sum();
    for id in &ids {
        remove(ctr, id);
    }
    rows.push(Row {
        what: "host memory (PSS: shim + QEMU + vsock backend), 3 idle containers".into(),
        spinbox: format!("one pod {} MiB", pod_pss / 1024),
        runc: String::new(),
        other: format!("3 VMs {} MiB", vms_pss / 1024),
        ratio: format!("{:.2}", pod_pss as f64 / vms_pss.max(1) as f64),
        target: String::new(),
    });
    rows
}

/// PSS (KiB) of the shim holding `id` and the VM processes its state directory records.
fn vm_pss(ctr: &Ctr, id: &str) -> u64 {
    vm_processes(ctr, id)
        .into_iter()
        .map(|(_, pid)| rss_pss(pid).1)
        .sum()
}
