//! VMs sized by their workload: a container's CPU and memory limits size its VM (a pod's
//! through CRI in tests/pod.rs), the config's defaults apply without limits, and a limit
//! beyond `vm.max_vcpus` / `vm.max_memory_mib` is refused naming it, leaving nothing. Each
//! test ends with the shared leak check.

use spinbox_tests::ctr::{Ctr, RUNTIME};
use spinbox_tests::VM_TESTS;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// What the guest shows the container: (CPUs, MemTotal in KiB).
fn guest_shape(ctr: &Ctr, id: &str, limits: &[&str]) -> (u32, u64) {
    let probe = ["sh", "-c", "nproc; grep MemTotal /proc/meminfo"];
    let out = ctr.run_container(RUNTIME, id, limits, &probe, None);
    let seen = text(&out.stdout);
    assert!(out.status.success(), "{id}: {seen} {}", text(&out.stderr));
    let mut lines = seen.lines();
    let cpus = lines
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("{id}: nproc in {seen:?}"));
    let mem_kib = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("{id}: MemTotal in {seen:?}"));
    (cpus, mem_kib)
}

#[tokio::test]
async fn a_vm_is_sized_by_its_containers_limits_and_refused_above_the_maxima() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    // `--cpus 2` is a CFS quota of 200000 µs per 100000 µs.
    let (cpus, mem_kib) = guest_shape(
        &ctr,
        "sz-limits",
        &["--cpus", "2", "--memory-limit", "1073741824"],
    );
    println!("--cpus 2 --memory-limit 1 GiB: {cpus} CPUs, MemTotal {mem_kib} KiB");
    assert_eq!(cpus, 2, "the guest's CPUs");
    assert!(mem_kib >= 1 << 20, "MemTotal {mem_kib} KiB < 1 GiB");
    // No limits: the config's defaults (1 vCPU, 512 MiB).
    let (cpus, mem_kib) = guest_shape(&ctr, "sz-default", &[]);
    println!("no limits: {cpus} CPUs, MemTotal {mem_kib} KiB");
    assert_eq!(cpus, 1);
    assert!(mem_kib <= 512 << 10, "MemTotal {mem_kib} KiB > 512 MiB");
    // More than the maxima (8 vCPUs, 8 GiB by default): refused, naming the field and key.
    let huge = (64u64 << 30).to_string();
    for (id, limits, names) in [
        (
            "sz-memory",
            vec!["--memory-limit", huge.as_str()],
            ["linux.resources.memory.limit", "vm.max_memory_mib"],
        ),
        (
            "sz-cpus",
            vec!["--cpus", "16"],
            ["linux.resources.cpu", "vm.max_vcpus"],
        ),
    ] {
        let out = ctr.run_container(RUNTIME, id, &limits, &["true"], None);
        let said = text(&out.stderr);
        assert!(!out.status.success(), "{id} ran");
        for name in names {
            assert!(
                said.contains(name),
                "{id}: the refusal names {name}: {said}"
            );
        }
        // ctr run --rm does not remove a container whose task failed to be created.
        let _ = ctr.run(&["task", "rm", "-f", id], None);
        let _ = ctr.run(&["containers", "rm", id], None);
    }
    ctr.assert_clean();
    ctr.assert_no_shim_sockets(&["sz-limits", "sz-default", "sz-memory", "sz-cpus"]);
}

/// Update through the shim's task API (as CRI's UpdateContainerResources reaches it): a CPU
/// quota asking more vCPUs than the VM has hot-plugs them into the running VM, the guest
/// brings them online; more than `vm.max_vcpus` is refused naming it.
#[tokio::test]
async fn an_update_of_the_cpu_quota_hot_plugs_vcpus_into_the_running_vm() {
    use containerd_shim_protos::api::UpdateTaskRequest;
    use containerd_shim_protos::protobuf::well_known_types::any::Any;
    use containerd_shim_protos::protobuf::MessageField;
    use containerd_shim_protos::shim_async::{Client, TaskClient};
    use spinbox_tests::ctr::Detached;

    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let id = "sz-update";
    {
        let c = Detached::run(&ctr, RUNTIME, id, &[], &["sleep", "300"]).await;
        let probe = |exec: &str, script: &str| {
            let out = c.exec(exec, &["sh", "-c", script], None);
            assert!(out.status.success(), "{}", text(&out.stderr));
            text(&out.stdout)
        };
        assert_eq!(probe("before", "nproc"), "1\n", "one vCPU at boot");
        let socket = ctr.shim_socket("default", id);
        let client = Client::connect(&format!("unix://{}", socket.display()))
            .await
            .expect("shim socket");
        let task = TaskClient::new(client);
        let update = |quota: u64| {
            let mut any = Any::new();
            any.type_url =
                "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into();
            any.value = serde_json::to_vec(&serde_json::json!({
                "cpu": {"quota": quota, "period": 100000}
            }))
            .unwrap();
            let mut req = UpdateTaskRequest::new();
            req.id = id.into();
            req.resources = MessageField::some(any);
            req
        };
        let ctx = || ttrpc::context::with_timeout(30_000_000_000);
        let started = std::time::Instant::now();
        task.update(ctx(), &update(200_000))
            .await
            .expect("an update to 2 CPUs");
        println!(
            "Update to 2 CPUs (hot-plug + online + cgroup): {} ms",
            started.elapsed().as_millis()
        );
        let after = probe("after", "nproc");
        assert_eq!(after, "2\n", "two vCPUs after the update");
        let err = task
            .update(ctx(), &update(1_600_000))
            .await
            .expect_err("16 CPUs, beyond vm.max_vcpus");
        assert!(err.to_string().contains("vm.max_vcpus"), "{err}");
    }
    ctr.assert_clean();
}
