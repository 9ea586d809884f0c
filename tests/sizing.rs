//! VMs sized by their workload: a container's CPU and memory limits size its VM (a pod's
//! through CRI in tests/pod.rs), the config's defaults apply without limits, and a limit
//! beyond `vm.max_vcpus` / `vm.max_memory_mib` is refused naming it, leaving nothing. Each
//! test ends with the shared leak check.

use containerd_shim_protos::api::UpdateTaskRequest;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::MessageField;
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

/// A LinuxResources Update, as CRI's UpdateContainerResources sends it through the shim's
/// task API.
fn update_request(id: &str, resources: serde_json::Value) -> UpdateTaskRequest {
    let mut any = Any::new();
    any.type_url = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into();
    any.value = serde_json::to_vec(&resources).unwrap();
    let mut req = UpdateTaskRequest::new();
    req.id = id.into();
    req.resources = MessageField::some(any);
    req
}

/// The VM's shape as its record (vm.json) has it.
fn recorded_shape(ctr: &Ctr, id: &str) -> serde_json::Value {
    let path = ctr.spinbox_root.join("state").join(id).join("vm.json");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("vm.json")).expect("JSON");
    record["shape"].clone()
}

fn mem_total_kib(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("MemTotal in {meminfo:?}"))
}

/// Update through the shim's task API: memory 256 MiB -> 1.5 GiB grows the guest's MemTotal
/// (virtio-mem) and the container's memory.max follows; a CPU quota of 2 hot-plugs a vCPU and
/// cpu.max follows; shrinking both gives the memory back (MemTotal falls) and takes the vCPU
/// offline without touching the container; beyond vm.max_vcpus is refused naming it. Then the
/// shim is killed with SIGKILL: containerd's cleanup leaves nothing, and `spinbox gc` finds
/// nothing either.
#[tokio::test]
async fn an_update_grows_and_shrinks_the_running_vm_and_a_killed_shim_leaves_nothing() {
    use containerd_shim_protos::shim_async::{Client, TaskClient};
    use spinbox_tests::ctr::Detached;

    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let id = "sz-update";
    let mib256 = 256u64 << 20;
    let gib15 = 1536u64 << 20;
    // ctr's default spec has no cgroup mount (CRI's does): the container's own cgroup is
    // mounted where it looks, as a CRI container has it.
    let c = Detached::run(
        &ctr,
        RUNTIME,
        id,
        &[
            "--memory-limit",
            &mib256.to_string(),
            "--mount",
            "type=cgroup,src=cgroup,dst=/sys/fs/cgroup,options=ro:nosuid:nodev:noexec",
        ],
        &["sleep", "300"],
    )
    .await;
    let probe = |exec: &str, script: &str| {
        let out = c.exec(exec, &["sh", "-c", script], None);
        assert!(out.status.success(), "{exec}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let cgroup = "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max";
    let boot_kib = mem_total_kib(&probe("m0", "cat /proc/meminfo"));
    assert_eq!(probe("c0", "nproc"), "1\n", "one vCPU at boot");
    assert_eq!(
        probe("g0", cgroup),
        format!("{mib256}\nmax 100000\n"),
        "the container's cgroup at create"
    );
    assert_eq!(recorded_shape(&ctr, id)["memory_plugged_mib"], 0);

    let socket = ctr.shim_socket("default", id);
    let client = Client::connect(&format!("unix://{}", socket.display()))
        .await
        .expect("shim socket");
    let task = TaskClient::new(client);
    let ctx = || ttrpc::context::with_timeout(60_000_000_000);

    // Grow: memory to 1.5 GiB, then the CPU quota to 2.
    let started = std::time::Instant::now();
    task.update(
        ctx(),
        &update_request(id, serde_json::json!({"memory": {"limit": gib15}})),
    )
    .await
    .expect("an update to 1.5 GiB");
    println!("Update to 1.5 GiB: {} ms", started.elapsed().as_millis());
    let grown_kib = mem_total_kib(&probe("m1", "cat /proc/meminfo"));
    println!("MemTotal {boot_kib} KiB -> {grown_kib} KiB");
    assert!(
        grown_kib >= gib15 >> 10,
        "MemTotal {grown_kib} KiB after growing to 1.5 GiB"
    );
    let shape = recorded_shape(&ctr, id);
    assert!(
        shape["memory_plugged_mib"].as_u64().unwrap() >= 1024,
        "vm.json records the plugged memory: {shape}"
    );
    let started = std::time::Instant::now();
    task.update(
        ctx(),
        &update_request(
            id,
            serde_json::json!({"cpu": {"quota": 200000, "period": 100000}}),
        ),
    )
    .await
    .expect("an update to 2 CPUs");
    println!("Update to 2 CPUs: {} ms", started.elapsed().as_millis());
    assert_eq!(probe("c1", "nproc"), "2\n", "two vCPUs after the update");
    // The memory limit stays as the last Update set it; the quota is the new one.
    assert_eq!(probe("g1", cgroup), format!("{gib15}\n200000 100000\n"));
    assert_eq!(recorded_shape(&ctr, id)["vcpus"], 2);

    // Shrink both: the memory goes back, the vCPU goes offline, the container lives on.
    task.update(
        ctx(),
        &update_request(
            id,
            serde_json::json!({"memory": {"limit": mib256}, "cpu": {"quota": 100000, "period": 100000}}),
        ),
    )
    .await
    .expect("an update back down");
    let shrunk_kib = mem_total_kib(&probe("m2", "cat /proc/meminfo"));
    println!("MemTotal after shrinking: {shrunk_kib} KiB");
    assert!(
        shrunk_kib + (512 << 10) < grown_kib,
        "MemTotal fell: {grown_kib} -> {shrunk_kib} KiB"
    );
    assert_eq!(probe("c2", "nproc"), "1\n", "one vCPU online again");
    assert_eq!(probe("g2", cgroup), format!("{mib256}\n100000 100000\n"));
    assert!(c.ctr.task_line(id).is_some_and(|l| l.contains("RUNNING")));

    let err = task
        .update(
            ctx(),
            &update_request(
                id,
                serde_json::json!({"cpu": {"quota": 1600000, "period": 100000}}),
            ),
        )
        .await
        .expect_err("16 CPUs, beyond vm.max_vcpus");
    assert!(err.to_string().contains("vm.max_vcpus"), "{err}");

    // A hot-plugged VM whose shim dies: containerd's `shim delete` reclaims it by record.
    let shims = spinbox_tests::processes_mentioning(&format!("-id {id} -address {}", ctr.address));
    let pid: i32 = shims
        .first()
        .and_then(|s| s.split(':').next()?.parse().ok())
        .expect("the shim");
    task.update(
        ctx(),
        &update_request(id, serde_json::json!({"memory": {"limit": gib15}})),
    )
    .await
    .expect("growing again before the kill");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 the shim");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while ctr.task_line(id).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the task outlived its shim"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    ctr.wait_no_shim(id).await;
    drop(c);
    let _ = ctr.run(&["containers", "rm", id], None);
    ctr.assert_clean();
    let config = std::env::var("SPINBOX_E2E_CONFIG").expect("SPINBOX_E2E_CONFIG");
    spinbox_tests::spinbox_gc(&config);
    ctr.assert_clean();
}

/// With `vm.autoscale` on and a 1..2 vCPU range: a CPU-burning container gets a second vCPU
/// within the configured window, and once the burn stops the VM goes back to one. The
/// teardown's log shows the `hotplug` phase stopping the controllers before the VM goes down.
#[tokio::test]
async fn autoscale_adds_a_vcpu_to_a_busy_guest_and_takes_it_back_when_idle() {
    use spinbox_tests::ctr::Detached;

    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let config = spinbox_tests::config_variant_file(dir.path(), "autoscale", |c| {
        c["vm"]["max_vcpus"] = 2.into();
        c["vm"]["autoscale"] = serde_json::json!({
            "enabled": true,
            "interval": "500ms",
            "sustain": 2,
            "min_interval": "1s",
        });
    });
    let id = "sz-autoscale";
    // Burns one CPU until /tmp/stop exists.
    let burn = "while [ ! -e /tmp/stop ]; do :; done; exec sleep 300";
    let window = std::time::Duration::from_secs(30);
    {
        let c = Detached::run(
            &ctr,
            RUNTIME,
            id,
            &["--runtime-config-path", &config],
            &["sh", "-c", burn],
        )
        .await;
        let nproc = |exec: &str| {
            let out = c.exec(exec, &["nproc"], None);
            assert!(out.status.success(), "{}", text(&out.stderr));
            text(&out.stdout).trim().parse::<u32>().expect("nproc")
        };
        let wait_for = |want: u32, what: &str| {
            let started = std::time::Instant::now();
            let mut n = 0;
            loop {
                n += 1;
                if nproc(&format!("{what}{n}")) == want {
                    return started.elapsed();
                }
                assert!(
                    started.elapsed() < window,
                    "{what}: not {want} vCPUs within {window:?}"
                );
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
        };
        let up = wait_for(2, "up");
        println!("busy: a second vCPU after {} ms", up.as_millis());
        let out = c.exec("stop", &["touch", "/tmp/stop"], None);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let down = wait_for(1, "down");
        println!("idle: back to one vCPU after {} ms", down.as_millis());
    }
    ctr.assert_clean();
    let log = std::fs::read_to_string(ctr.containerd_dir.join("containerd.log")).unwrap();
    let sandbox = format!("sandbox={id}");
    let at = |what: &str| {
        log.lines()
            .position(|l| l.contains(&sandbox) && l.contains(what))
            .unwrap_or_else(|| panic!("no {what:?} line for {id}"))
    };
    let resized = log
        .lines()
        .filter(|l| l.contains(&sandbox) && l.contains("VM resized") && l.contains("autoscale"))
        .count();
    assert!(resized >= 2, "{resized} autoscale resize lines");
    let vm = format!("vm_id=\"{id}\"");
    let down = log
        .lines()
        .position(|l| l.contains(&vm) && l.contains("event=\"shutdown_complete\""))
        .expect("shutdown_complete");
    assert!(
        at("resize controllers stopped") < down,
        "the hotplug phase stops the controllers before the VM goes down"
    );
}
