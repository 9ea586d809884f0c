//! The container gets exactly its spec: devices, capabilities, paths (compared with runc).
//!
//! Device rules (`linux.resources.devices` plus runc's always-allowed list) bind the init and
//! every exec; a spec without capabilities runs with none; a symlink in the image that points
//! out of the root (`/`, `../../..`) resolves inside it. Each test ends with the leak check.

use std::path::{Path, PathBuf};

use spinbox_tests::ctr::{Ctr, Detached, IMAGE, RUNTIME};
use spinbox_tests::VM_TESTS;

const RUNC: &str = "io.containerd.runc.v2";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Device probes in a default container: nodes outside the spec's list may be made (runc
/// allows mknod of any node) but not opened; the standard nodes work. Errors go to stdout.
const DEVICE_PROBE: &str = "exec 2>&1; \
    mknod /x b 254 0 && echo 'mknod b 254:0'; head -c 1 /x >/dev/null; \
    mknod /y c 4 64 && echo 'mknod c 4:64'; echo hi > /y; \
    mknod /k c 1 11 && echo 'mknod c 1:11'; echo hi > /k; \
    mknod /n c 1 3 && echo hi > /n && echo 'c 1:3 works'; \
    echo hi > /dev/null && cat /dev/null && echo '/dev/null works'; \
    head -c 4 /dev/zero | wc -c";

const DEVICE_EXPECTED: &str = "mknod b 254:0\n\
    head: /x: Operation not permitted\n\
    mknod c 4:64\n\
    sh: can't create /y: Operation not permitted\n\
    mknod c 1:11\n\
    sh: can't create /k: Operation not permitted\n\
    c 1:3 works\n\
    /dev/null works\n\
    4\n";

/// The guest's raw disk (the first virtio-blk one), made and read: refused.
const RAW_DISK_PROBE: &str = "exec 2>&1; d=$(ls /sys/block | grep '^vd' | head -n 1); \
    [ -n \"$d\" ] || { echo 'no disk'; exit 1; }; \
    mknod /disk b $(tr ':' ' ' < /sys/block/$d/dev) && head -c 512 /disk | wc -c";

#[tokio::test]
async fn default_container_device_rules_match_runc() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let probe = ["sh", "-c", DEVICE_PROBE];
    let out = ctr.run_container(RUNTIME, "dev-default", &[], &probe, None);
    let runc = ctr.run_container(RUNC, "dev-default-runc", &[], &probe, None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), DEVICE_EXPECTED);
    assert_eq!(
        text(&out.stdout),
        text(&runc.stdout),
        "the same as under runc"
    );

    let disk = ["sh", "-c", RAW_DISK_PROBE];
    let out = ctr.run_container(RUNTIME, "dev-disk", &[], &disk, None);
    let seen = text(&out.stdout);
    assert!(
        seen.starts_with("head: /disk: Operation not permitted\n"),
        "{seen}"
    );
    ctr.assert_clean();
}

#[tokio::test]
async fn exec_processes_are_bound_by_the_same_device_rules() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let probe = ["sh", "-c", DEVICE_PROBE];
    let seen = {
        let c = Detached::run(&ctr, RUNTIME, "dev-exec", &[], &["sleep", "300"]).await;
        let out = c.exec("probe", &probe, None);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let disk = c.exec("disk", &["sh", "-c", RAW_DISK_PROBE], None);
        let disk = text(&disk.stdout);
        assert!(
            disk.starts_with("head: /disk: Operation not permitted\n"),
            "{disk}"
        );
        text(&out.stdout)
    };
    let runc = {
        let c = Detached::run(&ctr, RUNC, "dev-exec-runc", &[], &["sleep", "300"]).await;
        text(&c.exec("probe", &probe, None).stdout)
    };
    assert_eq!(seen, DEVICE_EXPECTED);
    assert_eq!(seen, runc, "the same as under runc");
    ctr.assert_clean();
}

/// The image mounted on the host for a full spec (`ctr run --config`), unmounted on drop.
struct HostRoot<'a> {
    ctr: &'a Ctr,
    dir: tempfile::TempDir,
    rootfs: String,
}

impl<'a> HostRoot<'a> {
    fn mount(ctr: &'a Ctr) -> HostRoot<'a> {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir(&rootfs).unwrap();
        let rootfs = rootfs.to_str().expect("a UTF-8 temp dir").to_owned();
        let out = ctr.run(&["images", "mount", "--rw", IMAGE, &rootfs], None);
        assert!(out.status.success(), "{}", text(&out.stderr));
        HostRoot { ctr, dir, rootfs }
    }

    fn rootfs(&self) -> PathBuf {
        PathBuf::from(&self.rootfs)
    }

    /// `ctr oci spec` (containerd's default: deny every device, the default capabilities)
    /// with this root and `args`, changed by `edit`, written next to the root.
    fn spec(&self, name: &str, args: &[&str], edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let spec = self.ctr.run(&["oci", "spec"], None);
        assert!(spec.status.success());
        let mut spec: serde_json::Value =
            serde_json::from_slice(&spec.stdout).expect("ctr oci spec is JSON");
        spec["process"]["args"] = serde_json::json!(args);
        spec["process"]["terminal"] = serde_json::json!(false);
        spec["process"]["env"] = serde_json::json!(["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]);
        spec["root"] = serde_json::json!({"path": self.rootfs, "readonly": false});
        edit(&mut spec);
        let path = self.dir.path().join(name);
        std::fs::write(&path, serde_json::to_vec(&spec).unwrap()).unwrap();
        path.display().to_string()
    }
}

impl Drop for HostRoot<'_> {
    fn drop(&mut self) {
        let out = self
            .ctr
            .run(&["images", "unmount", "--rm", &self.rootfs], None);
        if !out.status.success() && !std::thread::panicking() {
            panic!("images unmount: {}", text(&out.stderr));
        }
    }
}

/// No `process.capabilities`: every set empty, as runc gives. A node the spec lists and
/// allows for writing only can be written and not read.
#[tokio::test]
async fn a_spec_without_capabilities_runs_with_none_like_runc() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let root = HostRoot::mount(&ctr);
    let probe = "exec 2>&1; grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb)' /proc/self/status; \
                 echo '<7>spinbox devices test' > /dev/kmsg && echo 'kmsg written'; \
                 head -c 1 /dev/kmsg; mknod /z c 1 5 || echo 'no mknod'";
    let spec = root.spec("nocaps.json", &["sh", "-c", probe], |s| {
        s["process"]
            .as_object_mut()
            .unwrap()
            .remove("capabilities");
        s["linux"]["devices"] = serde_json::json!([
            {"path": "/dev/kmsg", "type": "c", "major": 1, "minor": 11, "fileMode": 0o666,
             "uid": 0, "gid": 0}
        ]);
        s["linux"]["resources"]["devices"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"allow": true, "type": "c", "major": 1, "minor": 11, "access": "w"}));
    });
    let out = ctr.run_container(RUNTIME, "dev-nocaps", &["--config", &spec], &[], None);
    let runc = ctr.run_container(RUNC, "dev-nocaps-runc", &["--config", &spec], &[], None);
    drop(root);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let zero = "0000000000000000";
    let expected = format!(
        "CapInh:\t{zero}\nCapPrm:\t{zero}\nCapEff:\t{zero}\nCapBnd:\t{zero}\nCapAmb:\t{zero}\n\
         kmsg written\nhead: /dev/kmsg: Operation not permitted\n\
         mknod: /z: Operation not permitted\nno mknod\n"
    );
    assert_eq!(text(&out.stdout), expected);
    assert_eq!(
        text(&out.stdout),
        text(&runc.stdout),
        "the same as under runc ({})",
        text(&runc.stderr)
    );
    ctr.assert_clean();
}

/// Symlinks in the image that point out of the root (`../../..`, `/`, a host path) are
/// followed inside it when the runtime makes a bind's mount point, and nothing is made on the
/// host's side.
#[tokio::test]
async fn symlinks_out_of_the_root_resolve_inside_it_like_runc() {
    let Some(ctr) = Ctr::from_env() else { return };
    let _serial = VM_TESTS.lock().await;
    let root = HostRoot::mount(&ctr);
    let rootfs = root.rootfs();
    let host_dir = tempfile::tempdir().unwrap();
    let outside = host_dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let probe_file = host_dir.path().join("probe");
    std::fs::write(&probe_file, b"probe\n").unwrap();
    std::os::unix::fs::symlink("../../../../../../..", rootfs.join("up")).unwrap();
    std::os::unix::fs::symlink("/", rootfs.join("slash")).unwrap();
    std::os::unix::fs::symlink(&outside, rootfs.join("host")).unwrap();
    let bind = |dst: &str| {
        serde_json::json!({"destination": dst, "type": "bind",
            "source": probe_file.display().to_string(), "options": ["rbind", "ro"]})
    };
    let probe = "exec 2>&1; cat /spinbox-up-probe /spinbox-slash-probe; \
                 cat \"$OUTSIDE/probe\"; ls /up/ | grep -c spinbox-";
    let spec = root.spec("links.json", &["sh", "-c", probe], |s| {
        let mounts = s["mounts"].as_array_mut().unwrap();
        mounts.push(bind("/up/spinbox-up-probe"));
        mounts.push(bind("/slash/spinbox-slash-probe"));
        mounts.push(bind("/host/probe"));
        s["process"]["env"] = serde_json::json!([
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            format!("OUTSIDE={}", outside.display())
        ]);
    });
    let out = ctr.run_container(RUNTIME, "dev-links", &["--config", &spec], &[], None);
    let runc = ctr.run_container(RUNC, "dev-links-runc", &["--config", &spec], &[], None);
    // Nothing was made through the links on the host.
    let made_outside: Vec<_> = std::fs::read_dir(&outside).unwrap().flatten().collect();
    let made_host: Vec<&str> = ["/spinbox-up-probe", "/spinbox-slash-probe"]
        .into_iter()
        .filter(|p| Path::new(p).exists())
        .collect();
    drop(root);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "probe\nprobe\nprobe\n2\n");
    assert_eq!(
        text(&out.stdout),
        text(&runc.stdout),
        "the same as under runc"
    );
    assert!(
        made_outside.is_empty(),
        "made outside the root: {made_outside:?}"
    );
    assert!(made_host.is_empty(), "made on the host: {made_host:?}");
    ctr.assert_clean();
}
