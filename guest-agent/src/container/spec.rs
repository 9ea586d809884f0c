//! The part of the OCI runtime spec (config.json) the agent honours, and its translation into
//! the plain [`InitConfig`] the container-init process executes plus what the agent itself
//! needs (namespaces, cgroup limits).
//!
//! Everything that can be checked without touching the system is checked here, so a bad spec
//! fails `CreateContainer` with a message naming the field instead of failing half-way through
//! the container's setup.

use std::collections::BTreeMap;

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use super::caps;
use super::cgroup;

// ---------------------------------------------------------------------------------------------
// The OCI spec subset (runtime-spec 1.x field names).

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Spec {
    pub process: Option<Process>,
    pub root: Option<Root>,
    pub hostname: Option<String>,
    pub domainname: Option<String>,
    pub mounts: Vec<Mount>,
    pub linux: Option<Linux>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Process {
    pub terminal: bool,
    pub user: User,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub capabilities: Option<Capabilities>,
    pub rlimits: Vec<Rlimit>,
    pub no_new_privileges: bool,
    pub oom_score_adj: Option<i32>,
    pub apparmor_profile: Option<String>,
    pub selinux_label: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub umask: Option<u32>,
    pub additional_gids: Vec<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Capabilities {
    pub bounding: Vec<String>,
    pub effective: Vec<String>,
    pub inheritable: Vec<String>,
    pub permitted: Vec<String>,
    pub ambient: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Rlimit {
    #[serde(rename = "type")]
    pub kind: String,
    pub hard: u64,
    pub soft: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Root {
    pub path: String,
    pub readonly: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Mount {
    pub destination: String,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub source: Option<String>,
    pub options: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Linux {
    pub namespaces: Vec<Namespace>,
    pub uid_mappings: Vec<serde_json::Value>,
    pub resources: Option<Resources>,
    pub masked_paths: Vec<String>,
    pub readonly_paths: Vec<String>,
    pub sysctl: BTreeMap<String, String>,
    pub devices: Vec<Device>,
    pub seccomp: Option<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Namespace {
    #[serde(rename = "type")]
    pub kind: String,
    pub path: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Resources {
    pub memory: Option<Memory>,
    pub cpu: Option<Cpu>,
    pub pids: Option<Pids>,
    pub unified: BTreeMap<String, String>,
    /// Enforced by a device program on the container's cgroup ([`super::devices`]).
    pub devices: Vec<super::devices::DeviceCgroup>,
    /// Not applied: reported ([`cgroup::unapplied`]).
    #[serde(rename = "blockIO")]
    pub block_io: Option<serde_json::Value>,
    #[serde(rename = "hugepageLimits")]
    pub hugepage_limits: Option<serde_json::Value>,
    pub network: Option<serde_json::Value>,
    pub rdma: Option<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Memory {
    pub limit: Option<i64>,
    pub reservation: Option<i64>,
    pub swap: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Cpu {
    pub shares: Option<u64>,
    pub quota: Option<i64>,
    pub period: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Pids {
    pub limit: i64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Device {
    #[serde(rename = "type")]
    pub kind: String,
    pub path: String,
    pub major: i64,
    pub minor: i64,
    pub file_mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

// ---------------------------------------------------------------------------------------------
// What container-init executes (sent to it as JSON on an inherited fd).

/// One mount inside the container's root, with its options already decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountPlan {
    /// Absolute path inside the container.
    pub destination: String,
    pub source: String,
    /// Filesystem type for mount(2); empty for a bind mount.
    pub fstype: String,
    /// MS_* flags (MS_BIND and MS_REC included for binds).
    pub flags: u64,
    /// MS_PRIVATE / MS_SLAVE / ... (| MS_REC), applied after the mount; 0 for none.
    pub propagation: u64,
    /// Filesystem-specific options (`mode=755,size=65536k`).
    pub data: String,
}

impl MountPlan {
    pub fn is_bind(&self) -> bool {
        self.flags & libc::MS_BIND != 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicePlan {
    pub path: String,
    /// S_IFCHR, S_IFBLK or S_IFIFO.
    pub kind: u32,
    pub major: u64,
    pub minor: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RlimitPlan {
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

/// Capability numbers per set. A spec without `capabilities` gets empty sets; `None` in
/// [`ProcessConfig::capabilities`] (never from a spec) leaves the sets alone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapsPlan {
    pub bounding: Vec<u8>,
    pub effective: Vec<u8>,
    pub permitted: Vec<u8>,
    pub inheritable: Vec<u8>,
    pub ambient: Vec<u8>,
}

/// The process to run: what container-init and container-exec do once the namespaces are
/// set up (the OCI `process` object, checked and decoded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessConfig {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub umask: u32,
    pub rlimits: Vec<RlimitPlan>,
    pub no_new_privileges: bool,
    pub capabilities: Option<CapsPlan>,
    pub oom_score_adj: Option<i32>,
    /// fds 0-2 are a pseudo-terminal's slave: become a session leader with it as the
    /// controlling terminal. From `process.terminal`; the agent overrides it with the request's
    /// `terminal`, which decides how stdio is wired.
    #[serde(default)]
    pub terminal: bool,
    /// The container's compiled `linux.seccomp` (exec processes get the init's).
    #[serde(default)]
    pub seccomp: Option<super::seccomp::Filter>,
}

/// Everything container-init needs, in the order it uses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitConfig {
    pub container_id: String,
    /// The assembled root filesystem, as a path in the agent's mount namespace.
    pub rootfs: String,
    /// Make the root read-only once everything is mounted in it (root.readonly, or the host's
    /// `Rootfs.read_only`).
    pub readonly_root: bool,
    pub new_cgroup_ns: bool,
    pub new_net_ns: bool,
    pub hostname: Option<String>,
    pub domainname: Option<String>,
    pub mounts: Vec<MountPlan>,
    /// Whether a /dev was mounted from the spec: then the standard device nodes and links
    /// are created in it.
    pub populate_dev: bool,
    pub devices: Vec<DevicePlan>,
    pub masked_paths: Vec<String>,
    pub readonly_paths: Vec<String>,
    pub sysctl: Vec<(String, String)>,
    pub process: ProcessConfig,
}

/// Everything container-exec needs: it joins the namespaces of the container's init (handed
/// over as a pidfd) and runs `process` there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecConfig {
    pub container_id: String,
    pub exec_id: String,
    pub process: ProcessConfig,
}

/// What the agent does with a spec: the init config plus the agent-side parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerPlan {
    pub init: InitConfig,
    /// CLONE_NEW* flags: the namespaces container-init is born in, new ones. The mount
    /// namespace is always among them.
    pub new_namespaces: libc::c_int,
    /// CLONE_NEW* flags: the namespaces of the sandbox container's init that the container
    /// joins instead (pid, ipc and uts that linux.namespaces names by path while the request
    /// names a sandbox).
    pub sandbox_namespaces: libc::c_int,
    /// The /dev/shm bind is served from the pod's shared tmpfs ([`PlanContext::pod_shm`]),
    /// which the agent mounts before the container's setup.
    pub uses_pod_shm: bool,
    /// cgroup v2 files to write in the container's cgroup, in order.
    pub cgroup_limits: Vec<(String, String)>,
    /// `linux.resources.devices` and runc's always-allowed devices, for the device program
    /// attached to the container's cgroup.
    pub device_rules: Vec<super::devices::Rule>,
    /// Things that were ignored, for the log.
    pub warnings: Vec<String>,
}

/// Parses the bundle's config.json.
pub fn parse_spec(json: &[u8]) -> Result<Spec> {
    serde_json::from_slice(json).context("parsing the OCI spec (config.json)")
}

/// What the agent brings to a plan besides the spec.
pub struct PlanContext<'a> {
    /// Where the agent mounted the root.
    pub rootfs: &'a str,
    /// The host asked for a read-only root.
    pub rootfs_ro: bool,
    /// Share the guest's network namespace whatever linux.namespaces says
    /// (`CreateContainerRequest.share_vm_network`).
    pub share_vm_network: bool,
    /// Bind sources served from guest copies: (host source, guest path), first match wins
    /// (see [`super::files`]).
    pub file_copies: &'a [(String, String)],
    /// Whether a bind mount's source exists in the guest (host-only sources are skipped with
    /// a warning).
    pub source_exists: &'a dyn Fn(&str) -> bool,
    /// The request names the pod's sandbox container (`CreateContainerRequest.sandbox_id`):
    /// pid, ipc and uts namespaces given by path are that container's.
    pub in_sandbox: bool,
    /// The guest directory of the pod's shared /dev/shm tmpfs: a bind mount on /dev/shm whose
    /// source is neither a copy nor a share (CRI's per-sandbox shm directory on the host)
    /// binds it instead.
    pub pod_shm: &'a str,
}

/// Where CRI binds the pod's shared memory directory.
const DEV_SHM: &str = "/dev/shm";

/// Flags every /dev/shm gets, as CRI mounts the sandbox's shm on the host.
const SHM_FLAGS: u64 = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

/// The CLONE_NEW* flag of a namespace type that may be shared with the pod's sandbox.
fn sandbox_namespace_flag(kind: &str) -> Option<libc::c_int> {
    match kind {
        "pid" => Some(libc::CLONE_NEWPID),
        "ipc" => Some(libc::CLONE_NEWIPC),
        "uts" => Some(libc::CLONE_NEWUTS),
        _ => None,
    }
}

/// The guest copy serving a bind mount's host `source`, if the host sent one.
pub fn copy_for<'a>(copies: &'a [(String, String)], source: &str) -> Option<&'a str> {
    let source = clean_path(source);
    copies
        .iter()
        .find(|(host, _)| clean_path(host) == source)
        .map(|(_, guest)| guest.as_str())
}

/// Translates a spec into a plan.
pub fn plan(container_id: &str, spec: &Spec, ctx: &PlanContext<'_>) -> Result<ContainerPlan> {
    let mut warnings = Vec::new();
    let process = spec
        .process
        .as_ref()
        .context("the spec has no \"process\"")?;
    let mut process = process_plan(process, &mut warnings)?;
    let empty_linux = Linux::default();
    let linux = spec.linux.as_ref().unwrap_or(&empty_linux);
    warnings.extend(unenforced_confinement(spec));
    process.seccomp = match &linux.seccomp {
        Some(profile) if !profile.is_null() => Some(super::seccomp::compile_json(profile)?),
        _ => None,
    };
    if !linux.uid_mappings.is_empty() {
        bail!("user namespaces (linux.uidMappings) are not supported yet");
    }

    // The guest is cgroup v2: a container always gets a cgroup namespace of its own, so it sees
    // its own cgroup at /sys/fs/cgroup, as containerd's specs give it on a cgroup v2 host (and
    // as a cgroup v1 host's runc shows the container its own limits).
    let new_cgroup_ns = true;
    let mut new_net_ns = false;
    // New unless shared with the sandbox: the container is PID 1 of its own pid namespace,
    // with its own mounts, hostname and IPC.
    let mut new_namespaces =
        libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    let mut sandbox_namespaces = 0;
    for ns in &linux.namespaces {
        let joins = ns.path.as_deref().is_some_and(|p| !p.is_empty());
        if let Some(flag) = sandbox_namespace_flag(&ns.kind).filter(|_| joins && ctx.in_sandbox) {
            // CRI names the sandbox (pause) container's namespace by its host path.
            new_namespaces &= !flag;
            sandbox_namespaces |= flag;
            continue;
        }
        match ns.kind.as_str() {
            // The mount namespace is always new; the others are without a sandbox.
            "pid" | "mount" | "uts" | "ipc" => {
                if joins {
                    warnings.push(format!(
                        "linux.namespaces: {} namespace path {:?} ignored (the container gets a new one)",
                        ns.kind,
                        ns.path.as_deref().unwrap_or("")
                    ));
                }
            }
            "network" => {
                if ctx.share_vm_network {
                    // The guest's namespace mirrors the container's host one (ConfigureNetwork).
                } else if joins {
                    // A host network namespace means nothing inside the VM: share the guest's.
                    warnings.push(format!(
                        "linux.namespaces: network namespace path {:?} is the host's; the container shares the guest's network",
                        ns.path.as_deref().unwrap_or("")
                    ));
                } else {
                    new_net_ns = true;
                }
            }
            "cgroup" => {
                if joins {
                    warnings.push(format!(
                        "linux.namespaces: cgroup namespace path {:?} is the host's; the container gets its own",
                        ns.path.as_deref().unwrap_or("")
                    ));
                }
            }
            "user" => bail!("user namespaces are not supported yet"),
            "time" => warnings.push("linux.namespaces: time namespace ignored".to_string()),
            other => bail!("linux.namespaces: unknown namespace type {other:?}"),
        }
    }

    if new_net_ns {
        new_namespaces |= libc::CLONE_NEWNET;
    }

    let mut mounts = Vec::new();
    let mut populate_dev = false;
    let mut uses_pod_shm = false;
    for (i, m) in spec.mounts.iter().enumerate() {
        if !m.destination.starts_with('/') {
            bail!(
                "mounts[{i}]: destination {:?} is not an absolute path",
                m.destination
            );
        }
        if m.destination.split('/').any(|c| c == "..") {
            bail!(
                "mounts[{i}]: destination {:?} contains \"..\"",
                m.destination
            );
        }
        let mut plan = mount_plan(m).with_context(|| format!("mounts[{i}] ({})", m.destination))?;
        if plan.is_bind() {
            if let Some(copy) = copy_for(ctx.file_copies, &plan.source) {
                plan.source = copy.to_string();
            } else if plan.destination == DEV_SHM {
                // The host's per-sandbox shm directory means nothing in the guest: the pod's
                // tmpfs, shared by every container of the sandbox, stands in for it.
                plan.source = ctx.pod_shm.to_string();
                plan.flags |= SHM_FLAGS;
                uses_pod_shm = true;
            } else if !(ctx.source_exists)(&plan.source) {
                warnings.push(format!(
                    "mount {}: bind source {:?} is not in the guest (files and read-only directories are copied in, writable directories shared; not this one); skipped",
                    m.destination, plan.source
                ));
                continue;
            }
        }
        if clean_path(&m.destination) == "/dev" && !plan.is_bind() {
            populate_dev = true;
        }
        mounts.push(plan);
    }

    let mut devices = Vec::new();
    for d in &linux.devices {
        let plan = device_plan(d)?;
        // A /dev the agent populates gets /dev/ptmx -> pts/ptmx, the container's own devpts
        // instance, which replaces a ptmx node from the spec (as runc does). `--privileged`
        // lists the host's /dev/ptmx among its devices.
        if populate_dev && plan.path == "/dev/ptmx" {
            continue;
        }
        devices.push(plan);
    }

    for key in linux.sysctl.keys() {
        if key.is_empty() || key.split(['.', '/']).any(|c| c.is_empty() || c == "..") {
            bail!("linux.sysctl: bad key {key:?}");
        }
    }

    let cgroup_limits = match &linux.resources {
        Some(r) => {
            warnings.extend(cgroup::unapplied(r));
            cgroup::limits(r).context("linux.resources")?
        }
        None => Vec::new(),
    };
    let device_rules = super::devices::rules(
        linux
            .resources
            .as_ref()
            .map(|r| r.devices.as_slice())
            .unwrap_or_default(),
    )?;

    let init = InitConfig {
        container_id: container_id.to_string(),
        rootfs: ctx.rootfs.to_string(),
        readonly_root: ctx.rootfs_ro || spec.root.as_ref().is_some_and(|r| r.readonly),
        new_cgroup_ns,
        new_net_ns,
        hostname: spec.hostname.clone().filter(|h| !h.is_empty()),
        domainname: spec.domainname.clone().filter(|h| !h.is_empty()),
        mounts,
        populate_dev,
        devices,
        masked_paths: linux.masked_paths.clone(),
        readonly_paths: linux.readonly_paths.clone(),
        sysctl: linux
            .sysctl
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        process,
    };
    Ok(ContainerPlan {
        init,
        new_namespaces,
        sandbox_namespaces,
        uses_pod_shm,
        cgroup_limits,
        device_rules,
        warnings,
    })
}

/// Parses an OCI `process` object (ExecProcessRequest.process) and decodes it; warnings (unknown
/// capabilities) go to `warnings`.
pub fn parse_process(json: &[u8], warnings: &mut Vec<String>) -> Result<ProcessConfig> {
    let process: Process =
        serde_json::from_slice(json).context("parsing the OCI process (JSON)")?;
    process_plan(&process, warnings)
}

/// Checks and decodes a spec's `process`: the part of the init config that concerns the
/// process, shared by the init and exec processes.
pub fn process_plan(process: &Process, warnings: &mut Vec<String>) -> Result<ProcessConfig> {
    if process.args.is_empty() {
        bail!("process.args is empty: nothing to run");
    }
    let cwd = if process.cwd.is_empty() {
        "/".to_string()
    } else {
        process.cwd.clone()
    };
    if !cwd.starts_with('/') {
        bail!("process.cwd {cwd:?} is not an absolute path");
    }
    let mut rlimits = Vec::new();
    for r in &process.rlimits {
        let resource =
            rlimit_resource(&r.kind).with_context(|| format!("process.rlimits: {:?}", r.kind))?;
        if r.soft > r.hard {
            bail!(
                "process.rlimits: {} soft limit {} exceeds hard limit {}",
                r.kind,
                r.soft,
                r.hard
            );
        }
        rlimits.push(RlimitPlan {
            resource,
            soft: r.soft,
            hard: r.hard,
        });
    }

    // No `capabilities` (or a set left out): empty sets, as runc gives.
    let no_caps = Capabilities::default();
    let c = process.capabilities.as_ref().unwrap_or(&no_caps);
    let capabilities = {
        let mut set = |names: &[String], which: &str| {
            let mut out = Vec::new();
            for name in names {
                match caps::from_name(name) {
                    Some(n) => out.push(n),
                    None => warnings.push(format!(
                        "process.capabilities.{which}: unknown capability {name:?} ignored"
                    )),
                }
            }
            out
        };
        CapsPlan {
            bounding: set(&c.bounding, "bounding"),
            effective: set(&c.effective, "effective"),
            permitted: set(&c.permitted, "permitted"),
            inheritable: set(&c.inheritable, "inheritable"),
            ambient: set(&c.ambient, "ambient"),
        }
    };

    Ok(ProcessConfig {
        args: process.args.clone(),
        env: process.env.clone(),
        cwd,
        uid: process.user.uid,
        gid: process.user.gid,
        additional_gids: process.user.additional_gids.clone(),
        umask: process.user.umask.unwrap_or(0o022),
        rlimits,
        no_new_privileges: process.no_new_privileges,
        capabilities: Some(capabilities),
        oom_score_adj: process.oom_score_adj,
        terminal: process.terminal,
        // The container's, set by `plan` (and for an exec from its container).
        seccomp: None,
    })
}

/// `/a//b/` -> `/a/b`.
pub use spinbox_agent_api::clean_path;

/// How one mount option acts on the flags.
enum Opt {
    Set(u64),
    Clear(u64),
    Propagation(u64),
    Ignore,
}

fn mount_option(name: &str) -> Option<Opt> {
    use libc::*;
    Some(match name {
        "defaults" => Opt::Set(0),
        "ro" => Opt::Set(MS_RDONLY),
        "rw" => Opt::Clear(MS_RDONLY),
        "nosuid" => Opt::Set(MS_NOSUID),
        "suid" => Opt::Clear(MS_NOSUID),
        "nodev" => Opt::Set(MS_NODEV),
        "dev" => Opt::Clear(MS_NODEV),
        "noexec" => Opt::Set(MS_NOEXEC),
        "exec" => Opt::Clear(MS_NOEXEC),
        "sync" => Opt::Set(MS_SYNCHRONOUS),
        "async" => Opt::Clear(MS_SYNCHRONOUS),
        "dirsync" => Opt::Set(MS_DIRSYNC),
        "remount" => Opt::Set(MS_REMOUNT),
        "mand" => Opt::Set(MS_MANDLOCK),
        "nomand" => Opt::Clear(MS_MANDLOCK),
        "atime" => Opt::Clear(MS_NOATIME),
        "noatime" => Opt::Set(MS_NOATIME),
        "diratime" => Opt::Clear(MS_NODIRATIME),
        "nodiratime" => Opt::Set(MS_NODIRATIME),
        "relatime" => Opt::Set(MS_RELATIME),
        "norelatime" => Opt::Clear(MS_RELATIME),
        "strictatime" => Opt::Set(MS_STRICTATIME),
        "nostrictatime" => Opt::Clear(MS_STRICTATIME),
        "nosymfollow" => Opt::Set(MS_NOSYMFOLLOW),
        "bind" => Opt::Set(MS_BIND),
        "rbind" => Opt::Set(MS_BIND | MS_REC),
        "private" => Opt::Propagation(MS_PRIVATE),
        "rprivate" => Opt::Propagation(MS_PRIVATE | MS_REC),
        "shared" => Opt::Propagation(MS_SHARED),
        "rshared" => Opt::Propagation(MS_SHARED | MS_REC),
        "slave" => Opt::Propagation(MS_SLAVE),
        "rslave" => Opt::Propagation(MS_SLAVE | MS_REC),
        "unbindable" => Opt::Propagation(MS_UNBINDABLE),
        "runbindable" => Opt::Propagation(MS_UNBINDABLE | MS_REC),
        // runc extensions that need no action here.
        // Recursive read-only: the bind itself read-only (nothing is mounted below a copy or
        // a share in the guest).
        "rro" => Opt::Set(MS_RDONLY),
        "tmpcopyup" | "rrw" => Opt::Ignore,
        _ => return None,
    })
}

/// Decodes one spec mount: flags, propagation and data from its options.
pub fn mount_plan(m: &Mount) -> Result<MountPlan> {
    let kind = m.kind.clone().unwrap_or_default();
    let mut flags = 0u64;
    let mut propagation = 0u64;
    let mut data = Vec::new();
    for o in &m.options {
        match mount_option(o) {
            Some(Opt::Set(f)) => flags |= f,
            Some(Opt::Clear(f)) => flags &= !f,
            Some(Opt::Propagation(p)) => propagation = p,
            Some(Opt::Ignore) => {}
            None if o.starts_with("idmap") || o.starts_with("ridmap") => {
                bail!("idmapped mounts are not supported")
            }
            None => data.push(o.as_str()),
        }
    }
    if kind == "bind" || kind == "rbind" {
        flags |= libc::MS_BIND;
        if kind == "rbind" {
            flags |= libc::MS_REC;
        }
    }
    let source = m.source.clone().unwrap_or_default();
    let fstype = if flags & libc::MS_BIND != 0 {
        if source.is_empty() {
            bail!("bind mount without a source");
        }
        String::new()
    } else if kind.is_empty() {
        bail!("mount without a type");
    } else if kind == "cgroup" {
        // The guest has the unified hierarchy only.
        "cgroup2".to_string()
    } else {
        kind
    };
    let source = if source.is_empty() {
        fstype.clone()
    } else {
        source
    };
    Ok(MountPlan {
        destination: clean_path(&m.destination),
        source,
        fstype,
        flags,
        propagation,
        data: data.join(","),
    })
}

/// What a spec asks for that the guest does not enforce: AppArmor or SELinux labels (the
/// guest kernel runs neither).
fn unenforced_confinement(spec: &Spec) -> Vec<String> {
    let mut out = Vec::new();
    let process = spec.process.as_ref();
    if let Some(p) = process.and_then(|p| p.apparmor_profile.as_deref()) {
        if !p.is_empty() {
            out.push(format!(
                "process.apparmorProfile {p:?} ignored: the guest has no AppArmor"
            ));
        }
    }
    if let Some(l) = process.and_then(|p| p.selinux_label.as_deref()) {
        if !l.is_empty() {
            out.push(format!(
                "process.selinuxLabel {l:?} ignored: the guest has no SELinux"
            ));
        }
    }
    out
}

fn device_plan(d: &Device) -> Result<DevicePlan> {
    let kind = match d.kind.as_str() {
        "c" | "u" => libc::S_IFCHR,
        "b" => libc::S_IFBLK,
        "p" => libc::S_IFIFO,
        other => bail!("linux.devices: {}: unknown type {other:?}", d.path),
    };
    if !d.path.starts_with("/dev/") || d.path.split('/').any(|c| c == "..") {
        bail!("linux.devices: {:?} is not a path under /dev", d.path);
    }
    let num = |v: i64, what: &str| {
        u64::try_from(v).with_context(|| format!("linux.devices: {}: bad {what} {v}", d.path))
    };
    Ok(DevicePlan {
        path: clean_path(&d.path),
        kind,
        major: num(d.major, "major")?,
        minor: num(d.minor, "minor")?,
        mode: d.file_mode.unwrap_or(0o666) & 0o7777,
        uid: d.uid.unwrap_or(0),
        gid: d.gid.unwrap_or(0),
    })
}

/// `RLIMIT_NOFILE` -> its resource number.
pub fn rlimit_resource(name: &str) -> Result<u32> {
    let r = match name {
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        _ => bail!("unknown rlimit type"),
    };
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"{
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 65534, "gid": 65534, "additionalGids": [1234]},
            "args": ["sh", "-c", "id"],
            "env": ["PATH=/usr/bin:/bin", "FOO=bar"],
            "cwd": "/tmp",
            "capabilities": {
                "bounding": ["CAP_CHOWN", "CAP_KILL", "CAP_NOPE"],
                "effective": ["CAP_KILL"],
                "permitted": ["CAP_CHOWN", "CAP_KILL"]
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 512}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "box",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["ro", "nosuid"]},
            {"destination": "/etc/resolv.conf", "type": "bind",
             "source": "/var/lib/containerd/x/resolv.conf", "options": ["rbind", "ro"]},
            {"destination": "/data", "type": "none", "source": "/guest/data",
             "options": ["bind", "rprivate"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "network", "path": "/var/run/netns/x"},
                           {"type": "cgroup"}],
            "resources": {"memory": {"limit": 104857600}, "pids": {"limit": 64},
                          "cpu": {"quota": 50000, "period": 100000, "shares": 1024}},
            "maskedPaths": ["/proc/kcore"],
            "readonlyPaths": ["/proc/sys"],
            "devices": [{"type": "c", "path": "/dev/fuse", "major": 10, "minor": 229, "fileMode": 438}]
        }
    }"#;

    fn exists(p: &str) -> bool {
        p == "/guest/data"
    }

    fn ctx(rootfs: &str, rootfs_ro: bool) -> PlanContext<'_> {
        PlanContext {
            rootfs,
            rootfs_ro,
            share_vm_network: false,
            file_copies: &[],
            source_exists: &exists,
            in_sandbox: false,
            pod_shm: "/run/spinbox/sandboxes/pod/shm",
        }
    }

    #[test]
    fn full_spec_to_plan() {
        let spec = parse_spec(SPEC.as_bytes()).unwrap();
        let plan = plan("c1", &spec, &ctx("/run/c1/rootfs", false)).unwrap();
        let i = &plan.init;
        assert_eq!(i.process.args, vec!["sh", "-c", "id"]);
        assert_eq!(i.process.cwd, "/tmp");
        assert_eq!(
            (
                i.process.uid,
                i.process.gid,
                i.process.additional_gids.clone()
            ),
            (65534, 65534, vec![1234])
        );
        assert_eq!(i.process.umask, 0o022);
        assert!(i.readonly_root, "root.readonly");
        assert!(i.process.no_new_privileges);
        assert_eq!(i.hostname.as_deref(), Some("box"));
        assert!(i.new_cgroup_ns);
        assert!(!i.new_net_ns, "a host netns path shares the guest's");
        assert!(i.populate_dev);
        assert_eq!(
            i.process.rlimits,
            vec![RlimitPlan {
                resource: libc::RLIMIT_NOFILE,
                soft: 512,
                hard: 1024
            }]
        );
        let caps = i.process.capabilities.as_ref().unwrap();
        assert_eq!(caps.bounding, vec![0, 5]);
        assert_eq!(caps.effective, vec![5]);
        assert!(caps.ambient.is_empty());
        assert!(plan.warnings.iter().any(|w| w.contains("CAP_NOPE")));
        assert!(plan.warnings.iter().any(|w| w.contains("resolv.conf")));
        // resolv.conf skipped; the guest-local bind kept.
        let dests: Vec<&str> = i.mounts.iter().map(|m| m.destination.as_str()).collect();
        assert_eq!(
            dests,
            vec![
                "/proc",
                "/dev",
                "/dev/pts",
                "/sys",
                "/sys/fs/cgroup",
                "/data"
            ]
        );
        let dev = &i.mounts[1];
        assert_eq!(dev.fstype, "tmpfs");
        assert_eq!(dev.flags, libc::MS_NOSUID | libc::MS_STRICTATIME);
        assert_eq!(dev.data, "mode=755,size=65536k");
        assert_eq!(
            i.mounts[2].data,
            "newinstance,ptmxmode=0666,mode=0620,gid=5"
        );
        assert_eq!(i.mounts[4].fstype, "cgroup2");
        let data = &i.mounts[5];
        assert!(data.is_bind());
        assert_eq!(data.fstype, "");
        assert_eq!(data.propagation, libc::MS_PRIVATE | libc::MS_REC);
        assert_eq!(i.devices[0].kind, libc::S_IFCHR);
        assert_eq!(
            (i.devices[0].major, i.devices[0].minor, i.devices[0].mode),
            (10, 229, 0o666)
        );
        assert_eq!(
            plan.cgroup_limits,
            vec![
                ("memory.max".to_string(), "104857600".to_string()),
                ("cpu.max".to_string(), "50000 100000".to_string()),
                ("cpu.weight".to_string(), "39".to_string()),
                ("pids.max".to_string(), "64".to_string()),
            ]
        );
        // The init config survives the trip to container-init.
        let json = serde_json::to_vec(i).unwrap();
        assert_eq!(&serde_json::from_slice::<InitConfig>(&json).unwrap(), i);
    }

    #[test]
    fn minimal_spec_defaults() {
        let spec = parse_spec(br#"{"process": {"args": ["true"]}}"#).unwrap();
        let plan = plan("c", &spec, &ctx("/r", true)).unwrap();
        assert_eq!(plan.init.process.cwd, "/");
        assert_eq!((plan.init.process.uid, plan.init.process.gid), (0, 0));
        assert!(
            plan.init.readonly_root,
            "the host asked for a read-only root"
        );
        // No capabilities: empty sets (runc's CapEff 0), not the agent's.
        assert_eq!(plan.init.process.capabilities, Some(CapsPlan::default()));
        assert!(!plan.init.populate_dev);
        assert!(plan.cgroup_limits.is_empty());
        // No devices: default deny plus runc's always-allowed nodes.
        assert_eq!(plan.device_rules, super::super::devices::RUNC_ALLOWED);
    }

    #[test]
    fn rejections_name_the_field() {
        let bad = |json: &str| {
            let spec = parse_spec(json.as_bytes()).unwrap();
            format!("{:#}", plan("c", &spec, &ctx("/r", false)).unwrap_err())
        };
        assert!(bad(r#"{}"#).contains("process"));
        assert!(bad(r#"{"process": {"args": []}}"#).contains("args"));
        assert!(bad(r#"{"process": {"args": ["x"], "cwd": "rel"}}"#).contains("cwd"));
        assert!(
            bad(r#"{"process": {"args": ["x"], "rlimits": [{"type": "RLIMIT_BOGUS"}]}}"#)
                .contains("RLIMIT_BOGUS")
        );
        assert!(bad(
            r#"{"process": {"args": ["x"]}, "linux": {"namespaces": [{"type": "user"}]}}"#
        )
        .contains("user namespaces"));
        assert!(bad(r#"{"process": {"args": ["x"]}, "mounts": [{"destination": "/a/../b", "type": "tmpfs"}]}"#)
            .contains(".."));
        assert!(
            bad(r#"{"process": {"args": ["x"]}, "mounts": [{"destination": "/a"}]}"#)
                .contains("type")
        );
        assert!(parse_spec(b"not json").is_err());
    }

    #[test]
    fn seccomp_is_compiled_and_lsm_labels_are_warned_about() {
        let spec = parse_spec(SPEC.as_bytes()).unwrap();
        let p = plan("c1", &spec, &ctx("/run/c1/rootfs", false)).unwrap();
        assert!(p.init.process.seccomp.is_none());
        assert!(!p
            .warnings
            .iter()
            .any(|w| w.contains("apparmor") || w.contains("selinux")));
        let confined = SPEC
            .replace(
                r#""noNewPrivileges": true"#,
                r#""noNewPrivileges": true, "apparmorProfile": "cri-containerd.apparmor.d",
                   "selinuxLabel": "system_u:system_r:container_t:s0""#,
            )
            .replace(
                r#""maskedPaths""#,
                r#""seccomp": {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": []}, "maskedPaths""#,
            );
        let spec = parse_spec(confined.as_bytes()).unwrap();
        let p = plan("c1", &spec, &ctx("/run/c1/rootfs", false)).unwrap();
        let filter = p.init.process.seccomp.as_ref().expect("a compiled filter");
        assert!(filter.program.len() > 6, "{filter:?}");
        assert!(!p.warnings.iter().any(|w| w.contains("seccomp")));
        let bad = confined.replace("SCMP_ACT_ERRNO", "SCMP_ACT_NOPE");
        let e = plan(
            "c1",
            &parse_spec(bad.as_bytes()).unwrap(),
            &ctx("/r", false),
        )
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("linux.seccomp.defaultAction"),
            "{e:#}"
        );
        for needle in [
            "process.apparmorProfile \"cri-containerd.apparmor.d\" ignored",
            "process.selinuxLabel \"system_u:system_r:container_t:s0\" ignored",
        ] {
            assert!(
                p.warnings.iter().any(|w| w.starts_with(needle)),
                "{needle}: {:?}",
                p.warnings
            );
        }
    }

    #[test]
    fn a_ptmx_device_yields_to_the_devpts_symlink_only_on_a_populated_dev() {
        let with_ptmx = SPEC.replace(
            r#""devices": [{"type": "c", "path": "/dev/fuse""#,
            r#""devices": [{"type": "c", "path": "/dev/ptmx", "major": 5, "minor": 2},
                           {"type": "c", "path": "/dev/fuse""#,
        );
        let spec = parse_spec(with_ptmx.as_bytes()).unwrap();
        let p = plan("c1", &spec, &ctx("/run/c1/rootfs", false)).unwrap();
        assert!(p.init.populate_dev);
        let paths: Vec<&str> = p.init.devices.iter().map(|d| d.path.as_str()).collect();
        assert_eq!(paths, vec!["/dev/fuse"], "the symlink to pts/ptmx wins");

        // /dev bound from elsewhere is not populated: the node is made as the spec says.
        let bound_dev = with_ptmx.replace(
            r#"{"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},"#,
            r#"{"destination": "/dev", "type": "bind", "source": "/guest/data", "options": ["rbind"]},"#,
        );
        assert_ne!(bound_dev, with_ptmx);
        let spec = parse_spec(bound_dev.as_bytes()).unwrap();
        let p = plan("c1", &spec, &ctx("/run/c1/rootfs", false)).unwrap();
        assert!(!p.init.populate_dev);
        let paths: Vec<&str> = p.init.devices.iter().map(|d| d.path.as_str()).collect();
        assert_eq!(paths, vec!["/dev/ptmx", "/dev/fuse"]);
    }

    #[test]
    fn network_namespace() {
        let net = |namespaces: &str, share: bool| {
            let json = format!(
                r#"{{"process": {{"args": ["x"]}}, "linux": {{"namespaces": {namespaces}}}}}"#
            );
            let spec = parse_spec(json.as_bytes()).unwrap();
            let c = PlanContext {
                share_vm_network: share,
                ..ctx("/r", false)
            };
            let p = plan("c", &spec, &c).unwrap();
            (p.init.new_net_ns, p.warnings)
        };
        let new = r#"[{"type": "network"}]"#;
        let host = r#"[{"type": "network", "path": "/var/run/netns/cni-1"}]"#;
        assert!(
            net(new, false).0,
            "today: a network entry without path is a new netns"
        );
        let (new_ns, warnings) = net(host, false);
        assert!(!new_ns);
        assert!(warnings.iter().any(|w| w.contains("cni-1")));
        for ns in [new, host, "[]"] {
            let (new_ns, warnings) = net(ns, true);
            assert!(!new_ns, "{ns}: share_vm_network keeps the guest's netns");
            assert!(warnings.is_empty(), "{ns}: {warnings:?}");
        }
    }

    /// A CRI app container's namespaces: the pod's pid (shareProcessNamespace), ipc and uts by
    /// the pause container's paths, the network by the pod's netns.
    const POD_NAMESPACES: &str = r#"[{"type": "pid", "path": "/proc/42/ns/pid"},
        {"type": "ipc", "path": "/proc/42/ns/ipc"}, {"type": "uts", "path": "/proc/42/ns/uts"},
        {"type": "mount"}, {"type": "network", "path": "/var/run/netns/cni-1"}]"#;

    fn with_namespaces(namespaces: &str, in_sandbox: bool) -> ContainerPlan {
        let json =
            format!(r#"{{"process": {{"args": ["x"]}}, "linux": {{"namespaces": {namespaces}}}}}"#);
        let spec = parse_spec(json.as_bytes()).unwrap();
        let c = PlanContext {
            in_sandbox,
            share_vm_network: true,
            ..ctx("/r", false)
        };
        plan("c", &spec, &c).unwrap()
    }

    #[test]
    fn namespaces_named_by_path_are_the_sandboxs() {
        use libc::{CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWUTS};
        // A pod's container: pid, ipc and uts joined, no warning; the mount namespace new.
        let p = with_namespaces(POD_NAMESPACES, true);
        assert_eq!(
            p.sandbox_namespaces,
            CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
        );
        assert_eq!(p.new_namespaces, CLONE_NEWNS);
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);

        // Without a sandbox: new namespaces, and a warning for each path.
        let p = with_namespaces(POD_NAMESPACES, false);
        assert_eq!(p.sandbox_namespaces, 0);
        assert_eq!(
            p.new_namespaces,
            CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
        );
        for kind in ["pid", "ipc", "uts"] {
            let needle = format!("{kind} namespace path \"/proc/42/ns/{kind}\" ignored");
            assert!(
                p.warnings.iter().any(|w| w.contains(&needle)),
                "{needle}: {:?}",
                p.warnings
            );
        }

        // Entries without a path get new namespaces, in a pod too (a pod without
        // shareProcessNamespace); a mount path is never joined.
        let p = with_namespaces(
            r#"[{"type": "pid"}, {"type": "ipc", "path": "/proc/42/ns/ipc"},
                {"type": "uts", "path": ""}, {"type": "mount", "path": "/proc/42/ns/mnt"},
                {"type": "network"}]"#,
            true,
        );
        assert_eq!(p.sandbox_namespaces, CLONE_NEWIPC);
        assert_eq!(p.new_namespaces, CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWUTS);
        assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
        assert!(p.warnings[0].contains("mount namespace path"));

        // A new network namespace is among the new ones.
        let json =
            r#"{"process": {"args": ["x"]}, "linux": {"namespaces": [{"type": "network"}]}}"#;
        let spec = parse_spec(json.as_bytes()).unwrap();
        let p = plan("c", &spec, &ctx("/r", false)).unwrap();
        assert!(p.init.new_net_ns);
        assert_eq!(p.new_namespaces & CLONE_NEWNET, CLONE_NEWNET);
    }

    #[test]
    fn dev_shm_binds_become_the_pod_tmpfs() {
        let shm_bind = |options: &str| {
            format!(
                r#"{{"process": {{"args": ["x"]}}, "mounts": [
                    {{"destination": "/dev", "type": "tmpfs", "source": "tmpfs"}},
                    {{"destination": "/dev/shm/", "type": "bind", "options": {options},
                      "source": "/run/containerd/io.containerd.grpc.v1.cri/sandboxes/p1/shm"}}]}}"#
            )
        };
        let shm_of = |p: &ContainerPlan| {
            p.init
                .mounts
                .iter()
                .find(|m| m.destination == "/dev/shm")
                .cloned()
                .expect("a /dev/shm mount")
        };
        let base =
            libc::MS_BIND | libc::MS_REC | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

        // CRI's pause container: read-only.
        let spec =
            parse_spec(shm_bind(r#"["rbind", "ro", "nosuid", "nodev", "noexec"]"#).as_bytes())
                .unwrap();
        let p = plan("c", &spec, &ctx("/r", false)).unwrap();
        assert!(p.uses_pod_shm);
        assert!(p.warnings.is_empty(), "no warning: {:?}", p.warnings);
        let shm = shm_of(&p);
        assert_eq!(shm.source, "/run/spinbox/sandboxes/pod/shm");
        assert_eq!(shm.flags, base | libc::MS_RDONLY);
        // An app container: writable, and nosuid/nodev/noexec whatever the spec says.
        let spec = parse_spec(shm_bind(r#"["rbind", "rprivate", "rw"]"#).as_bytes()).unwrap();
        let p = plan("c", &spec, &ctx("/r", false)).unwrap();
        let shm = shm_of(&p);
        assert!(p.uses_pod_shm);
        assert_eq!(shm.flags, base);
        assert_eq!(shm.propagation, libc::MS_PRIVATE | libc::MS_REC);

        // A source the host sent (a copy or a share) is served as such.
        let copies = vec![(
            "/run/containerd/io.containerd.grpc.v1.cri/sandboxes/p1/shm".to_string(),
            "/run/spinbox/shares/sbxfs0".to_string(),
        )];
        let c = PlanContext {
            file_copies: &copies,
            ..ctx("/r", false)
        };
        let p = plan("c", &spec, &c).unwrap();
        assert!(!p.uses_pod_shm);
        assert_eq!(shm_of(&p).source, "/run/spinbox/shares/sbxfs0");
        assert_eq!(shm_of(&p).flags, libc::MS_BIND | libc::MS_REC);

        // A tmpfs on /dev/shm (containerd's default spec) stays one, as does a bind elsewhere.
        let spec = parse_spec(
            br#"{"process": {"args": ["x"]}, "mounts": [
                {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["mode=1777"]},
                {"destination": "/dev/shm2", "type": "bind", "source": "/nowhere"}]}"#,
        )
        .unwrap();
        let p = plan("c", &spec, &ctx("/r", false)).unwrap();
        assert!(!p.uses_pod_shm);
        let shm = shm_of(&p);
        assert_eq!((shm.fstype.as_str(), shm.source.as_str()), ("tmpfs", "shm"));
        assert_eq!(p.init.mounts.len(), 1);
        assert!(p.warnings[0].contains("/nowhere"), "{:?}", p.warnings);
    }

    #[test]
    fn recursive_read_only_binds_are_read_only() {
        let m: Mount = serde_json::from_str(
            r#"{"destination": "/conf", "type": "bind", "source": "/c", "options": ["rbind", "rro"]}"#,
        )
        .unwrap();
        let p = mount_plan(&m).unwrap();
        assert!(p.is_bind());
        assert_eq!(p.flags & libc::MS_RDONLY, libc::MS_RDONLY);
    }

    #[test]
    fn bind_sources_from_file_copies() {
        let spec = parse_spec(SPEC.as_bytes()).unwrap();
        let copies = vec![
            (
                "/var/lib/containerd/x/resolv.conf".to_string(),
                "/run/spinbox/containers/c1/files/0".to_string(),
            ),
            (
                "/proc".to_string(),
                "/run/spinbox/containers/c1/files/1".to_string(),
            ),
        ];
        let c = PlanContext {
            file_copies: &copies,
            ..ctx("/run/c1/rootfs", false)
        };
        let p = plan("c1", &spec, &c).unwrap();
        assert!(
            !p.warnings.iter().any(|w| w.contains("resolv.conf")),
            "{:?}",
            p.warnings
        );
        let resolv = p
            .init
            .mounts
            .iter()
            .find(|m| m.destination == "/etc/resolv.conf")
            .expect("the resolv.conf bind is kept");
        assert_eq!(resolv.source, "/run/spinbox/containers/c1/files/0");
        assert!(resolv.is_bind());
        assert_eq!(resolv.flags & libc::MS_RDONLY, libc::MS_RDONLY);
        // Only binds are redirected: the proc mount's source "proc" is not a bind source.
        let proc_mount = &p.init.mounts[0];
        assert_eq!(
            (proc_mount.source.as_str(), proc_mount.fstype.as_str()),
            ("proc", "proc")
        );
        // A guest-local bind without a copy is untouched.
        let data = p
            .init
            .mounts
            .iter()
            .find(|m| m.destination == "/data")
            .unwrap();
        assert_eq!(data.source, "/guest/data");

        // Bind by option (no type), and a source spelled differently.
        let spec = parse_spec(
            br#"{"process": {"args": ["x"]}, "mounts": [
                {"destination": "/etc/hosts", "source": "/var/lib/x//hosts", "options": ["bind", "ro"]},
                {"destination": "/etc/hostname", "type": "bind", "source": "/var/lib/x/hostname"}]}"#,
        )
        .unwrap();
        let copies = vec![
            ("/var/lib/x/hosts".to_string(), "/g/0".to_string()),
            ("/var/lib/x/hostname".to_string(), "/g/1".to_string()),
            ("/var/lib/x/hostname".to_string(), "/g/2".to_string()),
        ];
        let c = PlanContext {
            file_copies: &copies,
            ..ctx("/r", false)
        };
        let p = plan("c", &spec, &c).unwrap();
        let sources: Vec<&str> = p.init.mounts.iter().map(|m| m.source.as_str()).collect();
        assert_eq!(sources, vec!["/g/0", "/g/1"], "first match wins");
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        assert_eq!(copy_for(&copies, "/var/lib/x/nope"), None);
    }

    #[test]
    fn exec_process_parsing() {
        let mut warnings = Vec::new();
        let p = parse_process(
            br#"{"terminal": true, "user": {"uid": 1000, "gid": 100, "umask": 63,
                 "additionalGids": [10, 20]},
                 "args": ["sh", "-c", "echo hi"], "env": ["A=b"], "cwd": "/work",
                 "capabilities": {"bounding": ["CAP_KILL", "CAP_BOGUS"], "effective": ["CAP_KILL"]},
                 "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 64, "soft": 32}],
                 "noNewPrivileges": true, "apparmorProfile": "ignored"}"#,
            &mut warnings,
        )
        .unwrap();
        assert_eq!(p.args, vec!["sh", "-c", "echo hi"]);
        assert_eq!(p.env, vec!["A=b"]);
        assert_eq!(p.cwd, "/work");
        assert_eq!(
            (p.uid, p.gid, p.additional_gids.clone()),
            (1000, 100, vec![10, 20])
        );
        assert_eq!(p.umask, 0o77);
        assert!(p.terminal);
        assert!(p.no_new_privileges);
        assert_eq!(
            p.rlimits,
            vec![RlimitPlan {
                resource: libc::RLIMIT_NOFILE,
                soft: 32,
                hard: 64
            }]
        );
        let caps = p.capabilities.as_ref().unwrap();
        assert_eq!(
            (caps.bounding.clone(), caps.effective.clone()),
            (vec![5], vec![5])
        );
        assert!(
            warnings.iter().any(|w| w.contains("CAP_BOGUS")),
            "{warnings:?}"
        );
        // It survives the trip to container-exec.
        let cfg = ExecConfig {
            container_id: "c".into(),
            exec_id: "e".into(),
            process: p,
        };
        let json = serde_json::to_vec(&cfg).unwrap();
        assert_eq!(serde_json::from_slice::<ExecConfig>(&json).unwrap(), cfg);

        let p = parse_process(br#"{"args": ["true"]}"#, &mut warnings).unwrap();
        assert_eq!((p.cwd.as_str(), p.uid, p.umask), ("/", 0, 0o022));
        assert!(!p.terminal);
        assert_eq!(p.capabilities, Some(CapsPlan::default()));

        let bad = |json: &str| {
            format!(
                "{:#}",
                parse_process(json.as_bytes(), &mut Vec::new()).unwrap_err()
            )
        };
        assert!(bad(r#"{"args": []}"#).contains("process.args"));
        assert!(bad(r#"{}"#).contains("process.args"));
        assert!(bad(r#"{"args": ["x"], "cwd": "tmp"}"#).contains("process.cwd"));
        assert!(bad(
            r#"{"args": ["x"], "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1, "soft": 2}]}"#
        )
        .contains("soft limit"));
        assert!(bad("[1]").contains("parsing the OCI process"));
    }

    #[test]
    fn clean_paths() {
        assert_eq!(clean_path("/dev/"), "/dev");
        assert_eq!(clean_path("//a/./b//"), "/a/b");
        assert_eq!(clean_path("/"), "/");
    }
}
