//! `spinbox gc` against real processes and directories: orphans (owner gone) are reclaimed,
//! a live VM's state and a record-less directory being created are left alone, and a
//! recorded pid whose start time differs is never signalled.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, SystemTime};

use spinbox_vmm::process::ProcessRecord;
use spinbox_vmm::state::{self, VmRecord};

fn sleeper() -> Child {
    Command::new("sleep")
        .arg("120")
        .spawn()
        .expect("spawn sleep")
}

fn gc(config: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_spinbox"))
        .arg("gc")
        .args(args)
        .env("SPINBOX_CONFIG", config)
        .output()
        .expect("run spinbox gc");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn line<'a>(output: &'a str, id: &str) -> &'a str {
    output
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .unwrap_or_else(|| panic!("no line for {id} in:\n{output}"))
}

fn make_old(path: &Path) {
    let old = SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::open(path)
        .and_then(|f| f.set_modified(old))
        .expect("set mtime");
}

#[test]
fn gc_reclaims_orphans_and_leaves_live_vms_alone() {
    let root = tempfile::tempdir().unwrap();
    let state_root = root.path().join("state");
    let data_root = root.path().join("data");
    let config = root.path().join("config.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"paths": {{"state_dir": "{}", "data_dir": "{}", "log_dir": "{}"}}}}"#,
            state_root.display(),
            data_root.display(),
            root.path().join("log").display()
        ),
    )
    .unwrap();

    // An orphan: its owner has exited; its "QEMU" still runs; it names a file and a dir.
    let mut dead = Command::new("true").spawn().unwrap();
    let dead_owner = ProcessRecord::of(dead.id()).unwrap();
    dead.wait().unwrap();
    let mut orphan_qemu = sleeper();
    let mut orphan_virtiofsd = sleeper();
    // A bystander whose pid the orphan's record names with another start time.
    let mut bystander = sleeper();
    let console = root.path().join("orphan.console.log");
    std::fs::write(&console, "boot").unwrap();
    let orphan_data = data_root.join("containers/vm-orphan");
    std::fs::create_dir_all(&orphan_data).unwrap();
    std::fs::write(orphan_data.join("upper.ext4"), "x").unwrap();
    let orphan_dir = state_root.join("vm-orphan");
    std::fs::create_dir_all(&orphan_dir).unwrap();
    state::write_record(
        &orphan_dir,
        &VmRecord {
            id: "vm-orphan".into(),
            owner: Some(dead_owner),
            qemu: Some(ProcessRecord::of(orphan_qemu.id()).unwrap()),
            vsock_backend: Some(ProcessRecord {
                pid: bystander.id(),
                start_time: ProcessRecord::of(bystander.id()).unwrap().start_time + 7,
            }),
            fs_backends: vec![ProcessRecord::of(orphan_virtiofsd.id()).unwrap()],
            files: vec![console.clone()],
            dirs: vec![orphan_data.clone()],
            ..Default::default()
        },
    )
    .unwrap();

    // A live VM: its owner (this test) runs.
    let mut live_qemu = sleeper();
    let live_dir = state_root.join("vm-live");
    std::fs::create_dir_all(&live_dir).unwrap();
    state::write_record(
        &live_dir,
        &VmRecord {
            id: "vm-live".into(),
            owner: Some(ProcessRecord::of(std::process::id()).unwrap()),
            qemu: Some(ProcessRecord::of(live_qemu.id()).unwrap()),
            ..Default::default()
        },
    )
    .unwrap();

    // A directory being created right now (no record yet), and old orphaned data.
    std::fs::create_dir_all(state_root.join("vm-young")).unwrap();
    let stale_data = data_root.join("containers/data-orphan");
    std::fs::create_dir_all(&stale_data).unwrap();
    make_old(&stale_data);

    let (ok, out) = gc(&config, &["--dry-run"]);
    println!("{out}");
    assert!(ok, "{out}");
    assert!(line(&out, "vm-orphan").contains("orphan"), "{out}");
    assert!(line(&out, "vm-orphan").contains("would reclaim"), "{out}");
    assert!(line(&out, "vm-live").contains("live:"), "{out}");
    assert!(line(&out, "vm-young").contains("unknown"), "{out}");
    assert!(line(&out, "data-orphan").contains("would reclaim"), "{out}");
    assert!(orphan_dir.exists() && orphan_data.exists() && console.exists());
    assert!(
        orphan_qemu.try_wait().unwrap().is_none(),
        "dry run killed nothing"
    );

    let (ok, out) = gc(&config, &[]);
    println!("{out}");
    assert!(ok, "{out}");
    assert!(line(&out, "vm-orphan").contains("reclaimed"), "{out}");
    assert!(line(&out, "data-orphan").contains("reclaimed"), "{out}");
    let status = orphan_qemu.wait().unwrap();
    assert!(!status.success(), "the orphan's QEMU was killed");
    let status = orphan_virtiofsd.wait().unwrap();
    assert!(!status.success(), "the orphan's virtiofsd was killed");
    assert!(!orphan_dir.exists() && !orphan_data.exists() && !console.exists());
    assert!(!stale_data.exists());
    // Left alone: the live VM, its process, the young directory, the recycled pid.
    assert!(live_dir.join(state::RECORD_FILE).exists());
    assert!(live_qemu.try_wait().unwrap().is_none());
    assert!(state_root.join("vm-young").exists());
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "a recycled pid was killed"
    );

    // Limited to named ids.
    let (ok, out) = gc(&config, &["vm-live"]);
    assert!(ok && !out.contains("vm-young"), "{out}");
    let (ok, out) = gc(&config, &["--force"]);
    assert!(!ok && out.contains("--force"), "{out}");

    for mut c in [live_qemu, bystander] {
        c.kill().unwrap();
        c.wait().unwrap();
    }
}

fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// The layer cache: an image whose source snapshot is gone is removed, one that a container
/// holds is kept (and removed by a later run once released), one whose source is there
/// stays; with `storage.layer_cache_max_mib` the least recently used go first.
#[tokio::test]
async fn gc_collects_the_layer_cache() {
    if !have("mkfs.erofs") {
        eprintln!("skipped: mkfs.erofs not installed (make deps)");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let write_config = |max_mib: u64| {
        let config = root.path().join(format!("config-{max_mib}.json"));
        std::fs::write(
            &config,
            format!(
                r#"{{"paths": {{"state_dir": "{}", "data_dir": "{}", "log_dir": "{}"}},
                    "storage": {{"layer_cache_max_mib": {max_mib}}}}}"#,
                root.path().join("state").display(),
                data.display(),
                root.path().join("log").display()
            ),
        )
        .unwrap();
        config
    };
    // Snapshot directories as containerd's overlayfs snapshotter lays them out.
    let snapshot = |n: u32, mib: usize| {
        let fs = root.path().join(format!("snapshots/{n}/fs"));
        std::fs::create_dir_all(&fs).unwrap();
        let bytes: Vec<u8> = (0..mib << 20).map(|i| (i % 251) as u8 ^ n as u8).collect();
        std::fs::write(fs.join("blob"), bytes).unwrap();
        fs
    };
    let cache = spinbox_storage::LayerCache::new(data.join("layers"));
    let (kept, gone, held) = (snapshot(1, 1), snapshot(2, 1), snapshot(3, 1));
    let key = |p: &Path| spinbox_storage::LayerCache::key(p).unwrap();
    let (key_kept, key_gone, key_held) = (key(&kept), key(&gone), key(&held));
    cache.get_or_build(&kept).await.unwrap();
    cache.get_or_build(&gone).await.unwrap();
    let lease = cache.lease(&held).await.unwrap();
    std::fs::remove_dir_all(gone.parent().unwrap()).unwrap();
    std::fs::remove_dir_all(held.parent().unwrap()).unwrap();
    let image = |k: &str| data.join(format!("layers/{k}.erofs"));

    let unbounded = write_config(0);
    let (ok, out) = gc(&unbounded, &["--dry-run"]);
    println!("{out}");
    assert!(ok, "{out}");
    assert!(line(&out, &key_gone).contains("would remove"), "{out}");
    assert!(line(&out, &key_held).contains("kept: in use"), "{out}");
    assert!(!out.contains(&key_kept), "{out}");
    assert!(image(&key_gone).exists());

    let (ok, out) = gc(&unbounded, &[]);
    println!("{out}");
    assert!(ok, "{out}");
    assert!(line(&out, &key_gone).contains("source-gone"), "{out}");
    assert!(line(&out, &key_gone).contains("removed"), "{out}");
    assert!(!image(&key_gone).exists());
    assert!(image(&key_held).exists() && image(&key_kept).exists());

    // Released: the next run takes it.
    drop(lease);
    let (ok, out) = gc(&unbounded, &[]);
    assert!(ok, "{out}");
    assert!(line(&out, &key_held).contains("removed"), "{out}");
    assert!(!image(&key_held).exists());

    // Bounded to 2 MiB: three 1 MiB layers (a little over 1 MiB each as images) do not fit
    // twice; the least recently used one goes first.
    let (b, c) = (snapshot(4, 1), snapshot(5, 1));
    cache.get_or_build(&b).await.unwrap();
    cache.get_or_build(&c).await.unwrap();
    cache.get_or_build(&kept).await.unwrap(); // used last
    let (ok, out) = gc(&write_config(2), &[]);
    println!("{out}");
    assert!(ok, "{out}");
    assert!(line(&out, &key(&b)).contains("over-limit"), "{out}");
    assert!(!image(&key(&b)).exists());
    assert!(image(&key(&kept)).exists());
    let total: u64 = std::fs::read_dir(data.join("layers"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "erofs"))
        .map(|e| {
            use std::os::unix::fs::MetadataExt;
            e.metadata().unwrap().blocks() * 512
        })
        .sum();
    assert!(total <= 2 << 20, "cache holds {total} bytes");
}
