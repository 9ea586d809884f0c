//! The hotplug rows: how long an Update through the shim's task API (as CRI's
//! UpdateContainerResources sends it) takes from the request until the guest has what it
//! asked — the shim answers once the guest has the new vCPUs online, or the virtio-mem
//! device reports the memory plugged — and back again.

use std::time::Instant;

use containerd_shim_protos::api::UpdateTaskRequest;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::shim_async::{Client, TaskClient};
use spinbox_tests::ctr::{Ctr, IMAGE, RUNTIME};

use super::{ms, remove, Row, Samples};

fn request(id: &str, resources: serde_json::Value) -> UpdateTaskRequest {
    let mut any = Any::new();
    any.type_url = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into();
    any.value = serde_json::to_vec(&resources).expect("JSON");
    let mut req = UpdateTaskRequest::new();
    req.id = id.into();
    req.resources = MessageField::some(any);
    req
}

/// CPU 1 -> 2 -> 1 and memory 256 MiB -> 1.5 GiB -> 256 MiB, `runs` times, in one container.
pub fn rows(ctr: &Ctr, runs: usize) -> Vec<Row> {
    eprintln!("bench: CPU and memory hotplug x{runs}");
    let id = "bench-hotplug";
    let small = 256u64 << 20;
    let large = 1536u64 << 20;
    let out = ctr.run(
        &[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            "--memory-limit",
            &small.to_string(),
            IMAGE,
            id,
            "sleep",
            "600",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let socket = ctr.shim_socket("default", id);
    let samples = rt.block_on(async {
        let client = Client::connect(&format!("unix://{}", socket.display()))
            .await
            .expect("the shim's socket");
        let task = TaskClient::new(client);
        let ctx = || ttrpc::context::with_timeout(60_000_000_000);
        let steps = [
            serde_json::json!({"cpu": {"quota": 200000, "period": 100000}}),
            serde_json::json!({"cpu": {"quota": 100000, "period": 100000}}),
            serde_json::json!({"memory": {"limit": large}}),
            serde_json::json!({"memory": {"limit": small}}),
        ];
        let mut samples: [Samples; 4] = Default::default();
        for _ in 0..runs {
            for (i, step) in steps.iter().enumerate() {
                let started = Instant::now();
                task.update(ctx(), &request(id, step.clone()))
                    .await
                    .unwrap_or_else(|e| panic!("Update {step}: {e}"));
                samples[i].push(ms(started.elapsed()));
            }
        }
        samples
    });
    remove(ctr, id);
    let [cpu_up, cpu_down, mem_up, mem_down] = samples;
    vec![
        Row {
            what: "CPU hotplug: Update 1 → 2 vCPUs, request → online in the guest".into(),
            spinbox: cpu_up.show("ms"),
            runc: String::new(),
            other: format!("2 → 1 (offline): {}", cpu_down.show("ms")),
            ratio: String::new(),
            target: String::new(),
        },
        Row {
            what: "memory hotplug: Update 256 MiB → 1.5 GiB, request → plugged in the guest".into(),
            spinbox: mem_up.show("ms"),
            runc: String::new(),
            other: format!("back to 256 MiB (unplugged): {}", mem_down.show("ms")),
            ratio: String::new(),
            target: String::new(),
        },
    ]
}
