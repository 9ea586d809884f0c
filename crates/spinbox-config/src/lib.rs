//! spinbox configuration.
//!
//! One JSON file, `/etc/spinbox/config.json` unless `$SPINBOX_CONFIG` names another. Every key is
//! optional (the defaults below apply), unknown keys are errors, and every error names the key
//! that was wrong (`timeouts.vm_start: "10q": unknown unit ...`).
//!
//! Where each key is read:
//! - `paths.*`, `vm.*`: `spinbox-vmm` (QEMU command line, vsock transport, state and log files).
//! - `timeouts.vm_start`, `timeouts.task_client_retry`: the agent readiness wait in `spinbox-vmm`.
//! - `timeouts.device_detection`: waiting for the vhost-user vsock backend's socket.
//! - `timeouts.qmp_command`: every QMP command's reply wait.
//! - `timeouts.shutdown_grace`: each graceful step of the VM shutdown ladder.
//! - `timeouts.io_wait`, `timeouts.event_reconnect`: the shim's stdio drain and event retries.
//! - `network.*`, `timeouts.cni_plugin`, `timeouts.nft`: `spinbox-net`, through the shim's
//!   network phase (setup on create, release on delete, `shim delete` and `spinbox gc`).

pub mod autoscale;
pub mod duration;

pub use autoscale::Autoscale;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Environment variable naming an alternative config file.
pub const CONFIG_ENV: &str = "SPINBOX_CONFIG";
/// Where the installed config lives.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/spinbox/config.json";
/// Largest config file read (the shipped one is ~2 KiB); a bigger one is refused unread.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Longest any `timeouts.*` value may be: past a day a bound is no bound, and deadlines
/// computed from it (`now + timeout`) stay far from overflowing.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// A config error: which file, which key, what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {origin}: {key}: {message}")]
    Invalid {
        origin: String,
        key: String,
        message: String,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub paths: Paths,
    pub vm: VmDefaults,
    pub timeouts: Timeouts,
    pub network: Network,
    pub storage: Storage,
}

/// The host-side image store under `paths.data_dir`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Storage {
    /// Upper bound on the EROFS layer cache (`data_dir/layers`): past it, the least recently
    /// used layers that no running VM has open are evicted. `0`: no bound (entries are still
    /// collected once their source snapshot is gone).
    pub layer_cache_max_mib: u64,
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            layer_cache_max_mib: 4096,
        }
    }
}

/// How a container gets its network (see docs/NETWORKING.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Mirror the spec's network namespace if it has interfaces, else run the CNI conflist if
    /// it exists, else no network (loopback only).
    Auto,
    /// Always run the CNI conflist (in the spec's namespace, or one spinbox creates).
    Cni,
    /// Always mirror the spec's namespace; a spec without one with interfaces is an error.
    Netns,
    /// Loopback only.
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Network {
    pub mode: NetworkMode,
    /// The CNI conflist spinbox runs for containers without a network of their own.
    pub cni_conflist: PathBuf,
    /// Where CNI plugin binaries are looked up, in order (also CNI_PATH).
    pub cni_bin_dirs: Vec<PathBuf>,
    /// The interface name CNI creates in the container's namespace.
    pub cni_ifname: String,
    /// ADD attempts before a create fails (a DEL runs between attempts).
    pub cni_attempts: u32,
    /// Where spinbox creates network namespaces (as `ip netns` does).
    pub netns_dir: PathBuf,
    /// The host-wide lock around CNI calls and nft changes.
    pub lock_file: PathBuf,
    /// The nft binary (nftables' JSON interface, `nft -j`).
    pub nft: PathBuf,
    /// Containers spinbox networks through CNI do not reach each other over the bridge (they
    /// still reach the gateway and, through it, the rest).
    pub isolate: bool,
    /// Host ports below 1024 may be published (the publish annotation); false refuses them.
    pub publish_privileged_ports: bool,
}

impl Default for Network {
    fn default() -> Self {
        Network {
            mode: NetworkMode::Auto,
            cni_conflist: "/etc/spinbox/cni/spinbox.conflist".into(),
            cni_bin_dirs: vec!["/opt/cni/bin".into(), "/usr/lib/cni".into()],
            cni_ifname: "eth0".into(),
            cni_attempts: 3,
            netns_dir: "/run/netns".into(),
            lock_file: "/run/spinbox/network.lock".into(),
            nft: "/usr/sbin/nft".into(),
            isolate: false,
            publish_privileged_ports: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Paths {
    /// The QEMU system emulator binary.
    pub qemu: PathBuf,
    /// Guest kernel: the uncompressed `vmlinux` (skips the decompressor, faster under TCG) or
    /// a bzImage.
    pub kernel: PathBuf,
    /// Guest initrd whose `/init` is spinbox-agent.
    pub initrd: PathBuf,
    /// Per-VM runtime state: sockets, the state record. Created owner-only.
    pub state_dir: PathBuf,
    /// Per-VM console logs while the VM runs.
    pub log_dir: PathBuf,
    /// The vhost-user vsock backend, used where the host has no `/dev/vhost-vsock`.
    pub vhost_device_vsock: PathBuf,
    /// Persistent data: the layer image cache (`layers/`) and each container's writable
    /// layer image (`containers/<id>/`).
    pub data_dir: PathBuf,
    /// Firmware for QEMU's `-bios`; `null` means QEMU's default (SeaBIOS). qboot boots a
    /// kernel directly in a fraction of SeaBIOS's time.
    pub firmware: Option<PathBuf>,
    /// The virtio-fs daemon that serves a container's writable host directory binds to its
    /// VM (QEMU's C virtiofsd; needed only by containers that have such binds).
    pub virtiofsd: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when `/dev/kvm` opens and the CPU has vmx or svm, else TCG.
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VsockMode {
    /// Kernel vhost-vsock when `/dev/vhost-vsock` exists, else vhost-user.
    Auto,
    /// Kernel `vhost-vsock-pci`, AF_VSOCK on the host.
    Vhost,
    /// `vhost-user-vsock-pci` backed by a vhost-device-vsock process, hybrid vsock on the host.
    VhostUser,
}

/// Most shutdown records `vm.shutdown_records_kept` may keep per VM id.
pub const MAX_SHUTDOWN_RECORDS_KEPT: u32 = 1000;

/// Most hotplug root ports a VM reserves: the root bus's free slots after the boot devices.
pub const MAX_HOTPLUG_SLOTS: u32 = 24;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmDefaults {
    pub vcpus: u32,
    pub memory_mib: u32,
    pub accel: Accel,
    pub vsock: VsockMode,
    /// The vsock port the agent serves on.
    pub agent_port: u32,
    /// Extra guest kernel command-line arguments, appended last.
    pub kernel_args: Vec<String>,
    /// Size of each container's writable layer image (sparse: only written blocks use disk).
    pub rootfs_upper_mib: u64,
    /// Give each VM virtio serial ports for its container's stdout and stderr (the init's,
    /// without a terminal); false: those streams travel on vsock like every other.
    pub output_ports: bool,
    /// PCIe root ports a pod's VM reserves at boot for the disks of containers that join it
    /// later (one disk per port: a container takes its upper layer plus each image layer not
    /// yet attached). Only a Kubernetes sandbox's VM gets them; a pod of one needs none.
    pub hotplug_slots: u32,
    /// Memory a pod's VM gets on top of what CRI says its containers may use (the sandbox's
    /// `io.kubernetes.cri.sandbox-memory`): the guest kernel, the agent, page cache.
    pub pod_memory_overhead_mib: u32,
    /// The most vCPUs a VM is sized to: a workload asking more (its CPU quota, or a pod's) is
    /// refused naming the limit.
    pub max_vcpus: u32,
    /// The most memory (MiB) a VM is sized to, its workload's limit and
    /// `pod_memory_overhead_mib` together; a workload asking more is refused.
    pub max_memory_mib: u32,
    /// Bound on the guest serial console log on the host: `<id>.console.log` plus its one
    /// rotated predecessor `<id>.console.log.1` together stay below it (each half of it).
    pub console_log_max_kib: u64,
    /// How many of each VM id's last shutdown records (`<log_dir>/shutdown/<id>.<ms>.json`)
    /// are kept after the VM is gone, for `spinbox inspect` (0: none; at most 1000).
    pub shutdown_records_kept: u32,
    /// Resizing a running VM by its use (the resize controllers, docs/LIFECYCLE.md).
    pub autoscale: Autoscale,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// From QEMU spawn until the agent answers its health RPC.
    #[serde(with = "duration")]
    pub vm_start: Duration,
    /// Waiting for a device or its backend to appear (the vhost-user vsock socket).
    #[serde(with = "duration")]
    pub device_detection: Duration,
    /// How long each graceful shutdown step may take before the next escalation.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// Pause before the shim retries publishing an event containerd did not take.
    #[serde(with = "duration")]
    pub event_reconnect: Duration,
    /// Pause between attempts to reach the agent (task client) while it is not up yet.
    #[serde(with = "duration")]
    pub task_client_retry: Duration,
    /// How long stdio may keep draining after the process exited.
    #[serde(with = "duration")]
    pub io_wait: Duration,
    /// Reply wait for every QMP command.
    #[serde(with = "duration")]
    pub qmp_command: Duration,
    /// Bound on one CNI plugin execution (ADD or DEL).
    #[serde(with = "duration")]
    pub cni_plugin: Duration,
    /// Bound on one `nft` execution.
    #[serde(with = "duration")]
    pub nft: Duration,
    /// How long a SIGKILL may go unconfirmed by the guest (the process's exit not reported)
    /// before the shim takes the VM down through the shutdown ladder and reports exit 137.
    #[serde(with = "duration")]
    pub kill: Duration,
    /// Bound on every agent call that has no narrower one (create, start, exec, remove).
    #[serde(with = "duration")]
    pub agent_call: Duration,
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            kernel: "/usr/share/spinbox/vmlinux".into(),
            initrd: "/usr/share/spinbox/initrd.img".into(),
            state_dir: "/run/spinbox".into(),
            log_dir: "/var/log/spinbox".into(),
            vhost_device_vsock: "/usr/local/bin/vhost-device-vsock".into(),
            data_dir: "/var/lib/spinbox".into(),
            firmware: Some("/usr/share/qemu/qboot.rom".into()),
            virtiofsd: "/usr/lib/qemu/virtiofsd".into(),
        }
    }
}

impl Default for VmDefaults {
    fn default() -> Self {
        VmDefaults {
            vcpus: 1,
            memory_mib: 512,
            accel: Accel::Auto,
            vsock: VsockMode::Auto,
            agent_port: 1024,
            kernel_args: Vec::new(),
            rootfs_upper_mib: 2048,
            output_ports: true,
            hotplug_slots: 16,
            pod_memory_overhead_mib: 128,
            max_vcpus: 8,
            max_memory_mib: 8192,
            console_log_max_kib: 1024,
            shutdown_records_kept: 5,
            autoscale: Autoscale::default(),
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            vm_start: Duration::from_secs(20),
            device_detection: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(3),
            event_reconnect: Duration::from_secs(2),
            task_client_retry: Duration::from_millis(5),
            io_wait: Duration::from_secs(5),
            qmp_command: Duration::from_secs(3),
            cni_plugin: Duration::from_secs(10),
            nft: Duration::from_secs(5),
            kill: Duration::from_secs(5),
            agent_call: Duration::from_secs(30),
        }
    }
}

impl Config {
    /// Loads `$SPINBOX_CONFIG` if set (it must exist), else `/etc/spinbox/config.json` if it
    /// exists, else the built-in defaults.
    pub fn load() -> Result<Config, ConfigError> {
        match std::env::var_os(CONFIG_ENV) {
            Some(path) if !path.is_empty() => Config::from_file(Path::new(&path)),
            _ => {
                let path = Path::new(DEFAULT_CONFIG_PATH);
                if path.exists() {
                    Config::from_file(path)
                } else {
                    Ok(Config::default())
                }
            }
        }
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        use std::io::Read;
        let read_err = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text))
            .map_err(read_err)?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(read_err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("larger than {MAX_CONFIG_BYTES} bytes"),
            )));
        }
        Config::from_json(&text, &path.display().to_string())
    }

    /// Parses and validates; `origin` names the source in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            ConfigError::Invalid {
                origin: origin.to_owned(),
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                message: strip_position(&inner.to_string()),
            }
        })?;
        config
            .validate()
            .map_err(|(key, message)| ConfigError::Invalid {
                origin: origin.to_owned(),
                key: key.to_owned(),
                message,
            })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        let vm = &self.vm;
        if vm.vcpus == 0 || vm.vcpus > 255 {
            return Err(("vm.vcpus", format!("{} is out of range 1..=255", vm.vcpus)));
        }
        if vm.memory_mib < 64 {
            return Err((
                "vm.memory_mib",
                format!("{} MiB is below the 64 MiB a guest needs", vm.memory_mib),
            ));
        }
        if vm.agent_port == 0 || vm.agent_port == u32::MAX {
            return Err((
                "vm.agent_port",
                format!("{} is not a usable vsock port", vm.agent_port),
            ));
        }
        if vm.rootfs_upper_mib < 16 {
            return Err((
                "vm.rootfs_upper_mib",
                format!("{} MiB is below the 16 MiB minimum", vm.rootfs_upper_mib),
            ));
        }
        if vm.hotplug_slots > MAX_HOTPLUG_SLOTS {
            return Err((
                "vm.hotplug_slots",
                format!(
                    "{} is above the {MAX_HOTPLUG_SLOTS} PCIe root ports a q35 root bus has room for",
                    vm.hotplug_slots
                ),
            ));
        }
        if vm.max_vcpus < vm.vcpus || vm.max_vcpus > 255 {
            return Err((
                "vm.max_vcpus",
                format!(
                    "{} is out of range vm.vcpus ({})..=255",
                    vm.max_vcpus, vm.vcpus
                ),
            ));
        }
        if vm.max_memory_mib < vm.memory_mib {
            return Err((
                "vm.max_memory_mib",
                format!(
                    "{} MiB is below vm.memory_mib ({} MiB)",
                    vm.max_memory_mib, vm.memory_mib
                ),
            ));
        }
        if vm.console_log_max_kib < 16 {
            return Err((
                "vm.console_log_max_kib",
                format!("{} KiB is below the 16 KiB minimum", vm.console_log_max_kib),
            ));
        }
        if vm.shutdown_records_kept > MAX_SHUTDOWN_RECORDS_KEPT {
            return Err((
                "vm.shutdown_records_kept",
                format!(
                    "{} is above the {MAX_SHUTDOWN_RECORDS_KEPT} records kept per VM id at most",
                    vm.shutdown_records_kept
                ),
            ));
        }
        vm.autoscale.validate()?;
        let net = &self.network;
        if net.cni_ifname.is_empty()
            || net.cni_ifname.len() > 15
            || !net
                .cni_ifname
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err((
                "network.cni_ifname",
                format!(
                    "{:?} is not an interface name (1-15 of [A-Za-z0-9_-])",
                    net.cni_ifname
                ),
            ));
        }
        if net.cni_attempts == 0 || net.cni_attempts > 10 {
            return Err((
                "network.cni_attempts",
                format!("{} is out of range 1..=10", net.cni_attempts),
            ));
        }
        if net.cni_bin_dirs.is_empty() {
            return Err((
                "network.cni_bin_dirs",
                "must name at least one directory".into(),
            ));
        }
        for arg in &vm.kernel_args {
            if arg.is_empty() || arg.chars().any(char::is_whitespace) {
                return Err((
                    "vm.kernel_args",
                    format!("{arg:?}: each entry must be one non-empty word without spaces"),
                ));
            }
        }
        let t = &self.timeouts;
        for (key, value) in [
            ("timeouts.vm_start", t.vm_start),
            ("timeouts.device_detection", t.device_detection),
            ("timeouts.shutdown_grace", t.shutdown_grace),
            ("timeouts.event_reconnect", t.event_reconnect),
            ("timeouts.task_client_retry", t.task_client_retry),
            ("timeouts.io_wait", t.io_wait),
            ("timeouts.qmp_command", t.qmp_command),
            ("timeouts.cni_plugin", t.cni_plugin),
            ("timeouts.nft", t.nft),
            ("timeouts.kill", t.kill),
            ("timeouts.agent_call", t.agent_call),
        ] {
            if value.is_zero() {
                return Err((key, "must be greater than zero".into()));
            }
            if value > MAX_TIMEOUT {
                return Err((
                    key,
                    format!("{} is above the 24h maximum", duration::format(value)),
                ));
            }
        }
        let p = &self.paths;
        for (key, value) in [
            ("paths.qemu", &p.qemu),
            ("paths.kernel", &p.kernel),
            ("paths.initrd", &p.initrd),
            ("paths.state_dir", &p.state_dir),
            ("paths.log_dir", &p.log_dir),
            ("paths.vhost_device_vsock", &p.vhost_device_vsock),
            ("paths.data_dir", &p.data_dir),
        ] {
            if !value.is_absolute() {
                return Err((key, format!("{} is not an absolute path", value.display())));
            }
        }
        if let Some(fw) = &p.firmware {
            if !fw.is_absolute() {
                return Err((
                    "paths.firmware",
                    format!("{} is not an absolute path", fw.display()),
                ));
            }
        }
        Ok(())
    }

    /// The config as pretty JSON, in the shape `from_json` reads.
    pub fn to_json_pretty(&self) -> String {
        // Serializing plain structs of strings, numbers and paths cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// serde_json appends " at line L column C"; the key path says more, keep the message short.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        Config::from_json(json, "test.json")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn empty_object_gives_defaults() {
        assert_eq!(Config::from_json("{}", "t").unwrap(), Config::default());
    }

    #[test]
    fn shipped_config_parses_and_matches_defaults() {
        let text = include_str!("../../../config/config.json");
        let config = Config::from_json(text, "config/config.json").unwrap();
        assert_eq!(
            config,
            Config::default(),
            "config/config.json drifted from the defaults"
        );
    }

    #[test]
    fn partial_config_overrides_only_named_keys() {
        let c = Config::from_json(
            r#"{"vm": {"vcpus": 2, "accel": "tcg"}, "timeouts": {"vm_start": "3s"}}"#,
            "t",
        )
        .unwrap();
        assert_eq!(c.vm.vcpus, 2);
        assert_eq!(c.vm.accel, Accel::Tcg);
        assert_eq!(c.vm.memory_mib, VmDefaults::default().memory_mib);
        assert_eq!(c.timeouts.vm_start, Duration::from_secs(3));
        assert_eq!(c.timeouts.qmp_command, Timeouts::default().qmp_command);
    }

    #[test]
    fn unknown_key_names_its_path() {
        let e = err(r#"{"timeouts": {"vm_strat": "3s"}}"#);
        assert!(e.contains("timeouts.vm_strat"), "{e}");
        assert!(e.contains("unknown field"), "{e}");
        let e = err(r#"{"netwrok": {}}"#);
        assert!(e.contains("netwrok"), "{e}");
    }

    #[test]
    fn bad_duration_names_key_and_reason() {
        let e = err(r#"{"timeouts": {"shutdown_grace": "5 parsecs"}}"#);
        assert!(e.contains("timeouts.shutdown_grace"), "{e}");
        assert!(e.contains("unknown unit"), "{e}");
        let e = err(r#"{"timeouts": {"qmp_command": 5}}"#);
        assert!(e.contains("timeouts.qmp_command"), "{e}");
    }

    #[test]
    fn bad_enum_and_ranges_name_key() {
        let e = err(r#"{"vm": {"accel": "hvf"}}"#);
        assert!(e.contains("vm.accel"), "{e}");
        let e = err(r#"{"vm": {"vsock": "tcp"}}"#);
        assert!(e.contains("vm.vsock"), "{e}");
        let e = err(r#"{"vm": {"vcpus": 0}}"#);
        assert!(e.contains("vm.vcpus"), "{e}");
        let e = err(r#"{"vm": {"memory_mib": 16}}"#);
        assert!(e.contains("vm.memory_mib"), "{e}");
        let e = err(r#"{"vm": {"shutdown_records_kept": 1001}}"#);
        assert!(e.contains("vm.shutdown_records_kept"), "{e}");
        let c = Config::from_json(r#"{"vm": {"shutdown_records_kept": 0}}"#, "t").unwrap();
        assert_eq!(c.vm.shutdown_records_kept, 0);
        let e = err(r#"{"timeouts": {"io_wait": "0s"}}"#);
        assert!(
            e.contains("timeouts.io_wait") && e.contains("greater than zero"),
            "{e}"
        );
        let e = err(r#"{"paths": {"kernel": "vmlinuz"}}"#);
        assert!(e.contains("paths.kernel") && e.contains("absolute"), "{e}");
        let e = err(r#"{"vm": {"kernel_args": ["a b"]}}"#);
        assert!(e.contains("vm.kernel_args"), "{e}");
    }

    #[test]
    fn syntax_error_says_where() {
        let e = err(r#"{"vm": {"vcpus": }"#);
        assert!(e.contains("test.json"), "{e}");
    }

    #[test]
    fn env_var_selects_file_and_missing_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        std::fs::write(&path, r#"{"vm": {"memory_mib": 256}}"#).unwrap();
        let c = Config::from_file(&path).unwrap();
        assert_eq!(c.vm.memory_mib, 256);
        let missing = dir.path().join("nope.json");
        let e = Config::from_file(&missing).unwrap_err().to_string();
        assert!(e.contains("nope.json"), "{e}");
    }

    #[test]
    fn round_trips_through_json() {
        let mut c = Config::default();
        c.timeouts.shutdown_grace = Duration::from_millis(1500);
        c.vm.vsock = VsockMode::VhostUser;
        let back = Config::from_json(&c.to_json_pretty(), "t").unwrap();
        assert_eq!(back, c);
    }
}
