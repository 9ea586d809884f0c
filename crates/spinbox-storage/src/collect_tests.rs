//! Tests of layer cache collection, on real files, real locks and a real QEMU.

use super::*;
use std::os::unix::fs::PermissionsExt;

fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

const NOW: CollectOptions = CollectOptions {
    dry_run: false,
    wait: Duration::from_secs(5),
};

/// A layer directory with a file of `kib` KiB.
fn layer(root: &Path, name: &str, kib: usize) -> PathBuf {
    let dir = root.join("snapshots").join(name).join("fs");
    std::fs::create_dir_all(&dir).unwrap();
    let data: Vec<u8> = (0..kib * 1024)
        .map(|i| (i * 7 + name.len()) as u8)
        .collect();
    std::fs::write(dir.join("data"), data).unwrap();
    dir
}

fn image(cache: &LayerCache, layer: &Path) -> PathBuf {
    cache
        .dir()
        .join(format!("{}.erofs", LayerCache::key(layer).unwrap()))
}

fn chosen(r: &CollectReport, cache: &LayerCache, layer: &Path) -> Option<(Reason, Action)> {
    let key = image(cache, layer)
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    r.entries
        .iter()
        .find(|e| e.key == key)
        .map(|e| (e.reason, e.action))
}

/// Takes a read lock on byte 100 of `image` through its own open file description, as
/// QEMU's file-posix driver does for an image it has open for reading.
fn qemu_like_lock(image: &Path) -> File {
    let f = File::open(image).unwrap();
    // SAFETY: a plain C struct of integers; all zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_RDLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 100;
    fl.l_len = 1;
    nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_OFD_SETLK(&fl)).unwrap();
    f
}

#[tokio::test]
async fn entries_whose_source_is_gone_are_collected_unless_in_use() {
    if !have("mkfs.erofs") {
        eprintln!("skipped: mkfs.erofs not installed (make deps)");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let cache = LayerCache::new(root.path().join("layers"));
    let (a, b, c, d) = (
        layer(root.path(), "1", 4),
        layer(root.path(), "2", 4),
        layer(root.path(), "3", 4),
        layer(root.path(), "4", 4),
    );
    for l in [&a, &b, &d] {
        cache.get_or_build(l).await.unwrap();
    }
    let leased = cache.lease(&c).await.unwrap();
    let image_d = image(&cache, &d);
    let qemu = qemu_like_lock(&image_d);
    let image_a = image(&cache, &a);
    // a, c and d lose their snapshots; b keeps its own.
    for l in [&a, &c, &d] {
        std::fs::remove_dir_all(l.parent().unwrap()).unwrap();
    }
    let dry = cache
        .collect(CollectOptions {
            dry_run: true,
            ..NOW
        })
        .await
        .unwrap();
    assert_eq!(chosen(&dry, &cache, &b), None, "b's source is there");
    assert_eq!(dry.entries.len(), 3, "{dry:?}");
    assert!(image_a.exists(), "a dry run removes nothing");
    let r = cache.collect(NOW).await.unwrap();
    // a was removed with its record; the leased c and the QEMU-locked d were kept.
    assert!(!r.busy);
    assert!(!image_a.exists());
    assert_eq!(r.kept, 3, "{r:?}");
    assert_eq!(r.entries.len(), 3, "{r:?}");
    assert!(r
        .entries
        .iter()
        .any(|e| e.reason == Reason::SourceGone && e.action == Action::Removed));
    assert_eq!(
        r.entries
            .iter()
            .filter(|e| e.action == Action::KeptInUse)
            .count(),
        2,
        "{r:?}"
    );
    let left: Vec<String> = std::fs::read_dir(cache.dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        left.iter().filter(|n| n.ends_with(".erofs")).count(),
        3,
        "{left:?}"
    );
    assert_eq!(
        left.iter().filter(|n| n.ends_with(".json")).count(),
        3,
        "a's record went with it: {left:?}"
    );
    assert!(cache.dir().join(format!("{}.erofs", leased.key)).exists());

    // Released: collected by the next collection. (Another test's fork may hold a copy
    // of the released descriptions until its exec closes them: wait that out.)
    let image_c = leased.path.clone();
    drop(leased);
    drop(qemu);
    let deadline = Instant::now() + Duration::from_secs(5);
    while image_in_use(&image_c).unwrap() || image_in_use(&image_d).unwrap() {
        assert!(Instant::now() < deadline, "locks not released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = cache.collect(NOW).await.unwrap();
    assert_eq!(r.kept, 1, "{r:?}");
    assert_eq!(
        r.entries
            .iter()
            .filter(|e| e.action == Action::Removed && e.reason == Reason::SourceGone)
            .count(),
        2,
        "{r:?}"
    );
    assert!(image(&cache, &b).exists());
}

#[tokio::test]
async fn the_bound_evicts_least_recently_used_entries_that_are_not_in_use() {
    if !have("mkfs.erofs") {
        eprintln!("skipped: mkfs.erofs not installed (make deps)");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("layers");
    let ls: Vec<PathBuf> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| layer(root.path(), n, 256))
        .collect();
    let cache = LayerCache::new(&dir);
    for l in &ls {
        cache.get_or_build(l).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // a used again: the order of last use is b, c, d, a; d is in use.
    cache.get_or_build(&ls[0]).await.unwrap();
    let d = cache.lease(&ls[3]).await.unwrap();
    let size = |l: &PathBuf| std::fs::metadata(image(&cache, l)).unwrap().blocks() * 512;
    let limit = size(&ls[0]) + size(&ls[3]) + 1;
    let bounded = LayerCache::new(&dir).with_limit_bytes(limit);

    let dry = bounded
        .collect(CollectOptions {
            dry_run: true,
            ..NOW
        })
        .await
        .unwrap();
    let order: Vec<(Reason, Action)> = dry.entries.iter().map(|e| (e.reason, e.action)).collect();
    assert_eq!(
        order,
        vec![(Reason::OverLimit, Action::WouldRemove); 2],
        "{dry:?}"
    );
    assert!(
        ls.iter().all(|l| image(&cache, l).exists()),
        "a dry run removes nothing"
    );

    let r = bounded.collect(NOW).await.unwrap();
    assert_eq!(
        chosen(&r, &cache, &ls[1]),
        Some((Reason::OverLimit, Action::Removed))
    );
    assert_eq!(
        chosen(&r, &cache, &ls[2]),
        Some((Reason::OverLimit, Action::Removed))
    );
    assert!(image(&cache, &ls[0]).exists() && image(&cache, &ls[3]).exists());
    assert!(r.bytes_after <= limit && !r.over_limit_in_use, "{r:?}");

    // A bound smaller than the image in use: everything else goes, the image in use stays.
    let tiny = LayerCache::new(&dir).with_limit_bytes(1);
    let r = tiny.collect(NOW).await.unwrap();
    assert_eq!(
        chosen(&r, &cache, &ls[0]),
        Some((Reason::OverLimit, Action::Removed))
    );
    assert!(image(&cache, &ls[3]).exists());
    assert!(r.over_limit_in_use && r.kept == 1, "{r:?}");
    // Its record says it was used now (it is in use).
    let rec = read_record(&dir, &d.key).unwrap();
    assert!(rec.last_used_ms >= now_ms() - 5_000);
    let image_d = d.path.clone();
    drop(d);
    let deadline = Instant::now() + Duration::from_secs(5);
    while image_in_use(&image_d).unwrap() {
        assert!(Instant::now() < deadline, "lease not released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = tiny.collect(NOW).await.unwrap();
    assert_eq!(r.kept, 0, "{r:?}");
    // Unbounded (0): nothing is evicted for size.
    cache.get_or_build(&ls[1]).await.unwrap();
    let r = LayerCache::new(&dir).collect(NOW).await.unwrap();
    assert!(r.entries.is_empty() && r.kept == 1, "{r:?}");
}

#[tokio::test]
async fn old_entries_get_records_and_modes_and_leftovers_go() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("layers");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let src = layer(root.path(), "1", 1);
    let key = LayerCache::key(&src).unwrap();
    // An entry of an older version: 0644, its source in `<key>.source`.
    let old = dir.join(format!("{key}.erofs"));
    std::fs::write(&old, vec![0u8; 8192]).unwrap();
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(
        dir.join(format!("{key}.source")),
        src.as_os_str().as_encoded_bytes(),
    )
    .unwrap();
    std::fs::write(dir.join(format!("{key}.lock")), "").unwrap();
    // An image with no record at all, a build that died, the lock of a gone entry.
    std::fs::write(dir.join("0123456789abcdef0123456789abcdef.erofs"), "x").unwrap();
    std::fs::write(dir.join(".feedfeed.123.tmp"), "half").unwrap();
    std::fs::write(dir.join("deadbeef.lock"), "").unwrap();
    std::fs::write(dir.join("unrelated.txt"), "not ours").unwrap();

    let cache = LayerCache::new(&dir);
    let r = cache.collect(NOW).await.unwrap();
    assert_eq!(r.entries.len(), 1, "{r:?}");
    assert_eq!(r.entries[0].reason, Reason::NoRecord);
    let mut left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    let mut want = vec![
        ".lock".to_owned(),
        format!("{key}.erofs"),
        format!("{key}.json"),
        format!("{key}.lock"),
        "unrelated.txt".to_owned(),
    ];
    want.sort();
    assert_eq!(left, want);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&old), 0o600);
    assert_eq!(mode(&dir.join(format!("{key}.json"))), 0o600);
    assert_eq!(read_record(&dir, &key).unwrap().source, src);
}

#[tokio::test]
async fn a_busy_cache_is_not_collected_and_an_absent_one_is_empty() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("layers");
    let cache = LayerCache::new(&dir);
    assert!(cache.collect(NOW).await.unwrap().kept == 0);
    std::fs::create_dir(&dir).unwrap();
    // A fill holds the cache lock shared.
    let fill = lock_file(&dir.join(CACHE_LOCK), FlockArg::LockShared).unwrap();
    let r = cache
        .collect(CollectOptions {
            dry_run: false,
            wait: Duration::from_millis(100),
        })
        .await
        .unwrap();
    assert!(r.busy);
    drop(fill);
    assert!(!cache.collect(NOW).await.unwrap().busy);
}

/// A real QEMU with the image attached as a read-only virtio-blk disk (as spinbox attaches
/// layers): collection keeps it while QEMU runs, and removes it once QEMU is gone.
#[tokio::test]
async fn an_image_qemu_has_open_is_never_removed() {
    let qemu = "qemu-system-x86_64";
    if !have("mkfs.erofs") || !have(qemu) {
        eprintln!("skipped: mkfs.erofs or {qemu} not installed (make deps)");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let cache = LayerCache::new(root.path().join("layers"));
    let l = layer(root.path(), "1", 4);
    let (img, _) = cache.get_or_build(&l).await.unwrap();
    std::fs::remove_dir_all(l.parent().unwrap()).unwrap();
    let mut child = std::process::Command::new(qemu)
        .args(["-machine", "q35,accel=tcg", "-S", "-nodefaults", "-display", "none"])
        .args(["-m", "64", "-monitor", "none", "-serial", "none"])
        .arg("-blockdev")
        .arg(format!(
            "node-name=l0,driver=raw,read-only=on,file.driver=file,file.filename={},file.aio=threads,file.read-only=on",
            img.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=l0,serial=l-test"])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("spawn qemu");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !image_in_use(&img).unwrap() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("qemu exited: {status}");
        }
        assert!(Instant::now() < deadline, "QEMU never locked the image");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = cache.collect(NOW).await.unwrap();
    assert_eq!(r.entries.len(), 1);
    assert_eq!(r.entries[0].action, Action::KeptInUse);
    assert!(img.exists());
    child.kill().unwrap();
    child.wait().unwrap();
    let r = cache.collect(NOW).await.unwrap();
    assert_eq!(r.entries[0].action, Action::Removed);
    assert!(!img.exists());
}
