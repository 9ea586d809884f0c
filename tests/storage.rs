//! Host files owner-only; the layer cache collected and bounded — against the suite's real
//! containerd driven by `ctr`, real QEMU guests and the `spinbox gc` binary.
//!
//! The cache tests give the shim a config of their own (`--runtime-config-path`) with its
//! own data directory, so that they see only the layers they made, and build images of
//! their own (busybox plus a marker file: a layer no other image has), which they remove
//! from containerd to make their snapshots go.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use spinbox_tests::ctr::{Ctr, IMAGE, RUNTIME};
use spinbox_tests::VM_TESTS;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Every path under `root` (itself included) that is not owner-only: directories 0700,
/// regular files 0600.
fn not_owner_only(root: &Path) -> Vec<String> {
    let mut bad = Vec::new();
    let mut todo = vec![root.to_owned()];
    while let Some(p) = todo.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue; // removed while walking
        };
        let mode = meta.permissions().mode() & 0o7777;
        if meta.is_dir() {
            if mode != 0o700 {
                bad.push(format!("{} dir {mode:o}", p.display()));
            }
            if let Ok(rd) = std::fs::read_dir(&p) {
                todo.extend(rd.flatten().map(|e| e.path()));
            }
        } else if meta.is_file() {
            if mode != 0o600 {
                bad.push(format!("{} file {mode:o}", p.display()));
            }
        } else if !meta.file_type().is_socket() {
            // Sockets (the VM's, in its 0700 state directory) aside.
            bad.push(format!("{} is neither a file nor a directory", p.display()));
        }
    }
    bad
}

/// The cache's images: key → bytes on disk.
fn cache(data: &Path) -> std::collections::BTreeMap<String, u64> {
    std::fs::read_dir(data.join("layers"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let key = name.strip_suffix(".erofs")?.to_owned();
                    Some((key, e.metadata().ok()?.blocks() * 512))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The one key in `after` that is not in `before`.
fn new_key(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> String {
    let new: Vec<&String> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    assert_eq!(new.len(), 1, "one new layer image: {before:?} → {after:?}");
    new[0].clone()
}

/// The snapshot directory an entry was built from, from its record.
fn source_of(data: &Path, key: &str) -> PathBuf {
    let rec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(data.join(format!("layers/{key}.json"))).expect("the entry's record"),
    )
    .expect("the record is JSON");
    PathBuf::from(rec["source"].as_str().expect("record names its source"))
}

/// Builds and imports `docker.io/library/spinbox-<name>:latest`: busybox and a marker file,
/// one layer of its own. Returns the image's name.
fn import_image(ctr: &Ctr, dir: &Path, name: &str) -> String {
    let root = dir.join(format!("rootfs-{name}"));
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev", "run"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let busybox = spinbox_tests::which("busybox").expect("busybox (busybox-static)");
    std::fs::copy(&busybox, root.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    std::fs::write(root.join("etc/marker"), format!("{name}\n")).unwrap();
    let image = format!("docker.io/library/spinbox-{name}:latest");
    let tar = dir.join(format!("{name}.tar"));
    let oci = concat!(env!("CARGO_MANIFEST_DIR"), "/image/oci.sh");
    let out = Command::new("bash")
        .arg("-c")
        .arg(r#". "$1" && oci_pack "$2" "$3" "$4" "$5""#)
        .args(["oci_pack", oci])
        .arg(&root)
        .arg(r#"{"Env":["PATH=/bin"],"Cmd":["sh"],"WorkingDir":"/"}"#)
        .arg(&image)
        .arg(&tar)
        .output()
        .expect("bash");
    assert!(out.status.success(), "oci_pack: {}", text(&out.stderr));
    let out = ctr.run(&["images", "import", tar.to_str().unwrap()], None);
    assert!(out.status.success(), "import: {}", text(&out.stderr));
    image
}

/// Removes `image` from containerd and waits until its layer's snapshot directory is gone
/// (`--sync` runs containerd's garbage collection before returning; the snapshotter's
/// cleanup is waited for here).
async fn remove_image(ctr: &Ctr, image: &str, snapshot: &Path) {
    let out = ctr.run(&["images", "rm", "--sync", image], None);
    assert!(out.status.success(), "images rm: {}", text(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(30);
    while snapshot.exists() {
        assert!(
            Instant::now() < deadline,
            "containerd did not remove the snapshot {} of {image}",
            snapshot.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A config of the test's own: its state, log and data directories under `dir/name`.
fn variant(
    dir: &Path,
    name: &str,
    change: impl FnOnce(&mut serde_json::Value),
) -> (String, PathBuf) {
    let root = dir.join(name);
    std::fs::create_dir_all(&root).unwrap();
    let r = root.clone();
    let config = spinbox_tests::config_variant_file(dir, name, move |c| {
        for (key, sub) in [
            ("state_dir", "state"),
            ("log_dir", "log"),
            ("data_dir", "data"),
        ] {
            c["paths"][key] = r.join(sub).display().to_string().into();
        }
        change(c);
    });
    (config, root)
}

/// Nothing under a variant's roots but its layer cache, no process mentioning them.
fn assert_variant_clean(root: &Path) {
    for sub in ["state", "data/containers"] {
        if let Ok(entries) = std::fs::read_dir(root.join(sub)) {
            let left: Vec<_> = entries.flatten().map(|e| e.path()).collect();
            assert!(left.is_empty(), "left in {sub}: {left:?}");
        }
    }
    spinbox_tests::assert_log_dir_clean(&root.join("log"), spinbox_tests::suite_records_kept());
    let procs = spinbox_tests::processes_mentioning(&root.display().to_string());
    assert!(procs.is_empty(), "processes left: {procs:?}");
    let bad = not_owner_only(&root.join("data"));
    assert!(bad.is_empty(), "not owner-only: {bad:#?}");
}

fn run_with(ctr: &Ctr, config: &str, detach: bool, image: &str, id: &str, cmd: &[&str]) {
    let mut args = vec!["run"];
    args.push(if detach { "-d" } else { "--rm" });
    args.extend([
        "--runtime",
        RUNTIME,
        "--runtime-config-path",
        config,
        image,
        id,
    ]);
    args.extend_from_slice(cmd);
    let out = ctr.run(&args, None);
    assert!(out.status.success(), "{id}: {}", text(&out.stderr));
}

async fn stop(ctr: &Ctr, id: &str) {
    let out = ctr.run(&["task", "kill", "-s", "SIGKILL", id], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ctr.task_line(id).is_some_and(|l| l.contains("STOPPED")) {
        assert!(Instant::now() < deadline, "{id} not stopped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ctr.run(&["task", "rm", id], None).status.success());
    assert!(ctr.run(&["containers", "rm", id], None).status.success());
}

fn gc(config: &str) -> String {
    spinbox_tests::spinbox_gc(config)
}

#[tokio::test]
async fn data_dir_and_everything_in_it_are_owner_only() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let data = ctr.spinbox_root.join("data");
    // A data directory left world-readable (by hand, or an older version) is tightened.
    if data.exists() {
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let id = "st-modes";
    let out = ctr.run(
        &["run", "-d", "--runtime", RUNTIME, IMAGE, id, "sleep", "300"],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let upper = data.join("containers").join(id).join("upper.ext4");
    assert!(upper.is_file(), "the writable layer's image");
    assert!(!cache(&data).is_empty(), "a cached layer");
    let bad = not_owner_only(&data);
    assert!(bad.is_empty(), "while running, not owner-only: {bad:#?}");
    // The log directory (the console log) and the VM's state directory (records, the
    // helpers' stderr) too.
    let console = ctr
        .spinbox_root
        .join("log")
        .join(format!("{id}.console.log"));
    assert!(console.is_file(), "the console log");
    for dir in [
        ctr.spinbox_root.join("log"),
        ctr.spinbox_root.join("state").join(id),
    ] {
        let bad = not_owner_only(&dir);
        assert!(bad.is_empty(), "while running, not owner-only: {bad:#?}");
    }
    stop(&ctr, id).await;
    let bad = not_owner_only(&data);
    assert!(bad.is_empty(), "after delete, not owner-only: {bad:#?}");
    ctr.assert_clean();
    ctr.assert_no_shim_sockets(&[id]);
}

#[tokio::test]
async fn a_layer_whose_image_was_removed_leaves_the_cache() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (config, root) = variant(dir.path(), "gone", |_| {});
    let data = root.join("data");

    // Collected by the next create.
    let image = import_image(&ctr, dir.path(), "st-gone-create");
    let before = cache(&data);
    run_with(
        &ctr,
        &config,
        false,
        &image,
        "st-gone-1",
        &["/bin/busybox", "true"],
    );
    let key = new_key(&before, &cache(&data));
    let snapshot = source_of(&data, &key);
    assert!(
        snapshot.is_dir(),
        "the record names the snapshot {}",
        snapshot.display()
    );
    remove_image(&ctr, &image, &snapshot).await;
    assert!(
        cache(&data).contains_key(&key),
        "nothing collects before a create"
    );
    let before = cache(&data);
    run_with(&ctr, &config, false, IMAGE, "st-gone-2", &["true"]);
    let after = cache(&data);
    assert!(!after.contains_key(&key), "collected at create: {after:?}");
    assert!(!data.join(format!("layers/{key}.json")).exists());
    let busybox_key = new_key(&before, &after);

    // Collected by `spinbox gc`.
    let image = import_image(&ctr, dir.path(), "st-gone-gc");
    let before = cache(&data);
    run_with(
        &ctr,
        &config,
        false,
        &image,
        "st-gone-3",
        &["/bin/busybox", "true"],
    );
    let key = new_key(&before, &cache(&data));
    let snapshot = source_of(&data, &key);
    remove_image(&ctr, &image, &snapshot).await;
    let said = gc(&config);
    println!("{said}");
    let line = said
        .lines()
        .find(|l| l.starts_with(&key))
        .unwrap_or_else(|| panic!("gc names {key}: {said}"));
    assert!(
        line.contains("source-gone") && line.contains("removed"),
        "{line}"
    );
    let after = cache(&data);
    assert!(!after.contains_key(&key), "collected by gc: {after:?}");
    assert!(
        after.contains_key(&busybox_key),
        "a layer whose image is there stays"
    );

    ctr.assert_clean();
    assert_variant_clean(&root);
}

#[tokio::test]
async fn a_bounded_cache_stays_under_its_bound_and_keeps_running_vms_layers() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    const CAP_MIB: u64 = 5;
    let dir = tempfile::tempdir().unwrap();
    let (config, root) = variant(dir.path(), "cap", |c| {
        c["storage"] = serde_json::json!({ "layer_cache_max_mib": CAP_MIB });
    });
    let data = root.join("data");
    let images: Vec<String> = ["st-cap-a", "st-cap-b", "st-cap-c"]
        .iter()
        .map(|n| import_image(&ctr, dir.path(), n))
        .collect();
    let sleep = ["/bin/busybox", "sleep", "300"];

    // a runs; b runs and exits; both fit (each ~2 MiB: busybox).
    run_with(&ctr, &config, true, &images[0], "st-cap-a", &sleep);
    let key_a = new_key(&Default::default(), &cache(&data));
    let before = cache(&data);
    run_with(
        &ctr,
        &config,
        false,
        &images[1],
        "st-cap-b",
        &["/bin/busybox", "true"],
    );
    let key_b = new_key(&before, &cache(&data));
    let two: u64 = cache(&data).values().sum();
    let one = cache(&data)[&key_b];
    assert!(
        two <= CAP_MIB << 20 && two + one > CAP_MIB << 20,
        "the sizes fit the test: two layers take {two} bytes, one {one}"
    );
    // c's create goes over the bound: the least recently used image no VM has open (b) goes;
    // a's, used earlier but by a running VM, stays.
    let before = cache(&data);
    run_with(&ctr, &config, true, &images[2], "st-cap-c", &sleep);
    let after = cache(&data);
    let key_c = new_key(&before, &after);
    println!("cache after c: {after:?}");
    assert!(after.contains_key(&key_a), "the running VM's layer is kept");
    assert!(after.contains_key(&key_c), "the new VM's layer is kept");
    assert!(!after.contains_key(&key_b), "the unused layer was evicted");
    let total: u64 = after.values().sum();
    assert!(
        total <= CAP_MIB << 20,
        "cache {total} bytes over {CAP_MIB} MiB"
    );

    // A bound the running VMs' layers alone exceed: gc removes nothing they use.
    let tight = spinbox_tests::config_variant_file(dir.path(), "cap-1", |c| {
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
        v["storage"]["layer_cache_max_mib"] = 1.into();
        *c = v;
    });
    let said = gc(&tight);
    println!("{said}");
    assert_eq!(cache(&data), after, "images in use are never evicted");
    assert!(said.contains("over the limit with images in use"), "{said}");

    stop(&ctr, "st-cap-a").await;
    stop(&ctr, "st-cap-c").await;
    // Released: now the tight bound takes them.
    let said = gc(&tight);
    assert!(cache(&data).is_empty(), "{said}");
    for image in &images {
        let _ = ctr.run(&["images", "rm", "--sync", image], None);
    }
    ctr.assert_clean();
    ctr.assert_no_shim_sockets(&["st-cap-a", "st-cap-b", "st-cap-c"]);
    assert_variant_clean(&root);
}
