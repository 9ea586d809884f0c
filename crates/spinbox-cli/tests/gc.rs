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
