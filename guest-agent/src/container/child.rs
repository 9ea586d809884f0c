//! container-init: the agent binary re-executed as PID 1 of a new container's namespaces
//! (`spinbox-agent __container-init`). It is a fresh single-threaded process, so it may do the
//! whole OCI setup in plain Rust: mounts inside the root, pivot_root, masked and read-only
//! paths, hostname, rlimits, user and groups, capabilities. Then it reports READY on the
//! status fd, waits for the start byte and execve()s the container's process.
//!
//! container-exec (`spinbox-agent __container-exec`): an exec process, born in the container's
//! pid namespace and cgroup. It joins the init's other namespaces through the init's pidfd
//! (fd 6), which also puts it in the container's root (the init pivot_root'ed there), then
//! does the process part of the setup (rlimits, cwd, user, capabilities) and the same
//! READY / start / execve dance.
//!
//! Both call setsid(2); with a terminal (fds 0-2 are a pty slave) they make it their
//! controlling terminal.
//!
//! Status protocol on fd 5 (close-on-exec): `READY\n` once set up; `ERROR <message>\n` on any
//! failure (then exit 127). EOF after READY with no ERROR means the execve succeeded.

use std::ffi::CString;
use std::fs::File;
use std::io::Read as _;
use std::os::fd::FromRawFd as _;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::unistd::{chdir, pivot_root, Gid, Uid};

use super::launch::{EXEC_JOIN_NAMESPACES, FD_CONFIG, FD_INIT_PIDFD, FD_START, FD_STATUS};
use super::resolve::Root;
use super::spec::{ExecConfig, InitConfig, ProcessConfig};
use super::{caps, mounts, seccomp};

/// PATH when the process environment has none (runc's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Entry point of container-init; never returns.
pub fn main() -> ! {
    run_main(run_init)
}

/// Entry point of container-exec; never returns.
pub fn exec_main() -> ! {
    run_main(run_exec)
}

fn run_main(run: fn() -> Result<()>) -> ! {
    std::panic::set_hook(Box::new(|info| {
        report_error(&format!("container process setup panicked: {info}"));
        // SAFETY: _exit ends the process without running anything else.
        unsafe { libc::_exit(127) }
    }));
    if let Err(e) = run() {
        report_error(&format!("{e:#}"));
        std::process::exit(127);
    }
    // run() only returns Ok when the start pipe closed without a start byte: the process
    // was removed before it started.
    std::process::exit(0)
}

fn report_error(msg: &str) {
    // Keep it under PIPE_BUF so the agent reads it in one piece.
    let mut msg = msg.replace('\n', " ");
    if msg.len() > 3800 {
        let mut cut = 3800;
        while !msg.is_char_boundary(cut) {
            cut -= 1;
        }
        msg.truncate(cut);
    }
    let _ = write_status(format!("ERROR {msg}\n").as_bytes());
}

/// What both modes do first: close every fd above `last_fd`, make the status fd close on
/// exec, reset signals and the umask, and read the config from fd 3.
fn prepare(last_fd: i32) -> Result<Vec<u8>> {
    // Nothing of the agent's beyond the handed fds may reach the container.
    // SAFETY: close_range on a range of fds this process does not use.
    if unsafe { libc::syscall(libc::SYS_close_range, last_fd + 1, u32::MAX, 0) } != 0 {
        close_fds_slowly(last_fd);
    }
    // SAFETY: setting FD_CLOEXEC on our status fd: it must close when the execve succeeds.
    unsafe { libc::fcntl(FD_STATUS, libc::F_SETFD, libc::FD_CLOEXEC) };
    reset_signals();
    // SAFETY: umask cannot fail; 0 so that modes we create are the modes we ask for.
    unsafe { libc::umask(0) };

    // SAFETY: fd 3 is the config memfd the agent handed over, ours alone.
    let mut config_file = unsafe { File::from_raw_fd(FD_CONFIG) };
    let mut json = Vec::new();
    config_file
        .read_to_end(&mut json)
        .context("reading the config")?;
    Ok(json)
}

fn run_init() -> Result<()> {
    let json = prepare(FD_STATUS)?;
    let cfg: InitConfig = serde_json::from_slice(&json).context("decoding the init config")?;
    let what = format!("container {:?}", cfg.container_id);
    new_session(cfg.process.terminal).with_context(|| what.clone())?;
    setup(&cfg).with_context(|| what.clone())?;
    setup_process(&cfg.process).with_context(|| what.clone())?;
    start_and_exec(&cfg.process, &what)
}

fn run_exec() -> Result<()> {
    let json = prepare(FD_INIT_PIDFD)?;
    let cfg: ExecConfig = serde_json::from_slice(&json).context("decoding the exec config")?;
    // Not `exec "…"`: the agent reads that prefix as a failed execve.
    let what = format!(
        "container {:?}, exec process {:?}",
        cfg.container_id, cfg.exec_id
    );
    join_namespaces().with_context(|| what.clone())?;
    new_session(cfg.process.terminal).with_context(|| what.clone())?;
    setup_process(&cfg.process).with_context(|| what.clone())?;
    start_and_exec(&cfg.process, &what)
}

/// Enters the init's mount, uts, ipc, network and cgroup namespaces (we were born in its pid
/// namespace). Entering its mount namespace also sets our root and cwd to that namespace's
/// root, which is the container's root: the init's pivot_root mounted it there.
fn join_namespaces() -> Result<()> {
    // SAFETY: setns(2) on the init's pidfd, handed over as fd 6.
    if unsafe { libc::setns(FD_INIT_PIDFD, EXEC_JOIN_NAMESPACES) } != 0 {
        let e = std::io::Error::last_os_error();
        let hint = if e.raw_os_error() == Some(libc::ESRCH) {
            " (the container's init has exited)"
        } else {
            ""
        };
        return Err(e).with_context(|| format!("joining the container's namespaces{hint}"));
    }
    // SAFETY: closing the pidfd we no longer need.
    unsafe { libc::close(FD_INIT_PIDFD) };
    chdir("/").context("chdir / in the container")?;
    Ok(())
}

/// A new session (as runc does for every process); with a terminal, fd 0 (the pty slave)
/// becomes its controlling terminal.
fn new_session(terminal: bool) -> Result<()> {
    nix::unistd::setsid().context("setsid")?;
    if terminal {
        // SAFETY: TIOCSCTTY on fd 0 with arg 0 (do not steal another session's terminal).
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } != 0 {
            return Err(std::io::Error::last_os_error())
                .context("making the terminal the controlling terminal (TIOCSCTTY)");
        }
    }
    Ok(())
}

/// Resolves the program, reports READY, waits for the start byte and execs.
fn start_and_exec(p: &ProcessConfig, what: &str) -> Result<()> {
    let exe = resolve_exec(p).with_context(|| what.to_string())?;
    write_status(b"READY\n").context("reporting ready")?;
    // SAFETY: fd 4 is the start pipe's read end, ours alone.
    let mut start = unsafe { File::from_raw_fd(FD_START) };
    let mut byte = [0u8; 1];
    loop {
        match start.read(&mut byte) {
            Ok(0) => return Ok(()),
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("waiting for the start signal"),
        }
    }
    drop(start);
    exec(p, &exe).with_context(|| what.to_string())
}

/// One write of a whole (short) status line; a pipe write of < PIPE_BUF bytes is atomic.
fn write_status(line: &[u8]) -> std::io::Result<()> {
    // SAFETY: writing a buffer to the inherited status fd.
    let n = unsafe { libc::write(FD_STATUS, line.as_ptr().cast(), line.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn close_fds_slowly(last_fd: i32) {
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    for fd in fds {
        if fd > last_fd {
            // SAFETY: closing fds inherited from the agent that nothing here uses.
            unsafe { libc::close(fd) };
        }
    }
}

/// Default dispositions and an empty mask: the agent ignores SIGPIPE (Rust does) and an
/// ignored signal would stay ignored across execve.
fn reset_signals() {
    for sig in 1..=libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: resetting a disposition to SIG_DFL.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
    // SAFETY: an empty, initialised sigset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

/// One step of container-init's setup of the container's root and namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// unshare(CLONE_NEWCGROUP): born in the container's cgroup (CLONE_INTO_CGROUP), so the
    /// new namespace is rooted there.
    NewCgroupNs,
    /// Make the whole (new) mount namespace private.
    PrivateMounts,
    /// Bind the root onto itself (pivot_root wants a mount point), writable as assembled.
    BindRoot,
    LoopbackUp,
    /// `mounts[i]`, its mount point created in the root as needed.
    Mount(usize),
    PopulateDev,
    /// `devices[i]`.
    Device(usize),
    PivotRoot,
    Sysctl(usize),
    MaskPath(usize),
    ReadonlyPath(usize),
    /// Bind-remount `/` read-only: last of the filesystem steps, once everything that may
    /// write to the root (mount points, device nodes) is done, as runc does.
    ReadonlyRoot,
    Hostname,
    Domainname,
}

/// The setup steps for `cfg`, in order.
fn setup_steps(cfg: &InitConfig) -> Vec<Step> {
    let mut steps = Vec::new();
    if cfg.new_cgroup_ns {
        steps.push(Step::NewCgroupNs);
    }
    steps.extend([Step::PrivateMounts, Step::BindRoot]);
    if cfg.new_net_ns {
        steps.push(Step::LoopbackUp);
    }
    steps.extend((0..cfg.mounts.len()).map(Step::Mount));
    if cfg.populate_dev {
        steps.push(Step::PopulateDev);
    }
    steps.extend((0..cfg.devices.len()).map(Step::Device));
    steps.push(Step::PivotRoot);
    steps.extend((0..cfg.sysctl.len()).map(Step::Sysctl));
    steps.extend((0..cfg.masked_paths.len()).map(Step::MaskPath));
    steps.extend((0..cfg.readonly_paths.len()).map(Step::ReadonlyPath));
    if cfg.readonly_root {
        steps.push(Step::ReadonlyRoot);
    }
    if cfg.hostname.is_some() {
        steps.push(Step::Hostname);
    }
    if cfg.domainname.is_some() {
        steps.push(Step::Domainname);
    }
    steps
}

/// Everything up to (not including) the wait for the start signal.
fn setup(cfg: &InitConfig) -> Result<()> {
    let root = Path::new(&cfg.rootfs);
    for step in setup_steps(cfg) {
        run_step(cfg, root, step)?;
    }
    Ok(())
}

fn run_step(cfg: &InitConfig, root: &Path, step: Step) -> Result<()> {
    match step {
        Step::NewCgroupNs => nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP)
            .context("unshare(CLONE_NEWCGROUP)")?,
        Step::PrivateMounts => mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .context("making / private")?,
        Step::BindRoot => mount(
            Some(root),
            root,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .with_context(|| format!("bind-mounting the rootfs {}", root.display()))?,
        Step::LoopbackUp => loopback_up().context("bringing up lo")?,
        Step::Mount(i) => {
            let m = &cfg.mounts[i];
            mounts::mount_one(&Root::open(root)?, m).with_context(|| {
                format!(
                    "mount {} ({}) on {}",
                    m.source,
                    mounts::display_type(m),
                    m.destination
                )
            })?;
        }
        Step::PopulateDev => {
            mounts::populate_dev(&Root::open(root)?).context("populating /dev")?;
        }
        Step::Device(i) => {
            let d = &cfg.devices[i];
            mounts::make_device(&Root::open(root)?, d)
                .with_context(|| format!("device {}", d.path))?;
        }
        Step::PivotRoot => {
            chdir(root).context("chdir to the rootfs")?;
            pivot_root(".", ".").context("pivot_root")?;
            // The old root is now stacked on "."; detach it.
            umount2(".", MntFlags::MNT_DETACH).context("detaching the old root")?;
            chdir("/").context("chdir /")?;
        }
        Step::Sysctl(i) => {
            let (key, value) = &cfg.sysctl[i];
            let path = format!("/proc/sys/{}", key.replace('.', "/"));
            std::fs::write(&path, value).with_context(|| format!("sysctl {key}={value}"))?;
        }
        Step::MaskPath(i) => {
            let p = &cfg.masked_paths[i];
            mask_path(p).with_context(|| format!("masking {p}"))?;
        }
        Step::ReadonlyPath(i) => {
            let p = &cfg.readonly_paths[i];
            readonly_path(p).with_context(|| format!("making {p} read-only"))?;
        }
        Step::ReadonlyRoot => readonly_root().context("root.readonly: remounting / read-only")?,
        Step::Hostname => {
            if let Some(h) = &cfg.hostname {
                nix::unistd::sethostname(h).with_context(|| format!("sethostname {h:?}"))?;
            }
        }
        Step::Domainname => {
            if let Some(d) = &cfg.domainname {
                // SAFETY: a buffer and its length.
                if unsafe { libc::setdomainname(d.as_ptr().cast(), d.len()) } != 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("setdomainname {d:?}"));
                }
            }
        }
    }
    Ok(())
}

/// Bind-remounts the (pivoted) root read-only, keeping the flags it has (nosuid, nodev,
/// noexec, atime), as runc does.
fn readonly_root() -> Result<()> {
    let keep = current_flags("/")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        keep | MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )?;
    Ok(())
}

/// The process part of the setup, for the init and exec processes alike: rlimits,
/// oom_score_adj, working directory, capabilities, user and groups, no_new_privs.
fn setup_process(p: &ProcessConfig) -> Result<()> {
    for r in &p.rlimits {
        let lim = libc::rlimit {
            rlim_cur: r.soft,
            rlim_max: r.hard,
        };
        // SAFETY: a valid rlimit struct; the resource number was checked by the agent.
        if unsafe { libc::setrlimit(r.resource as _, &lim) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("setrlimit({}, {}, {})", r.resource, r.soft, r.hard));
        }
    }
    if let Some(adj) = p.oom_score_adj {
        std::fs::write("/proc/self/oom_score_adj", adj.to_string())
            .with_context(|| format!("oom_score_adj {adj}"))?;
    }

    if let Some(filter) = p.seccomp.as_ref().filter(|_| !p.no_new_privileges) {
        // Without no_new_privs seccomp(2) needs CAP_SYS_ADMIN: install while still root with
        // every capability, before the user switch and the capability drop (as runc does).
        seccomp::install(filter).context("installing linux.seccomp")?;
    }
    // Working directory: before the user switch (root can enter anything), and again after
    // when that failed (a path only the user may enter, e.g. on a root-squashed mount).
    let cwd_first = chdir(p.cwd.as_str());
    if let Some(c) = &p.capabilities {
        caps::apply_bounding(c)?;
    }
    switch_user(p)?;
    if let Err(first) = cwd_first {
        chdir(p.cwd.as_str())
            .map_err(|e| if e == Errno::ENOENT { first } else { e })
            .with_context(|| format!("chdir to process.cwd {:?}", p.cwd))?;
    }
    if p.no_new_privileges {
        caps::set_no_new_privs()?;
        if let Some(filter) = &p.seccomp {
            seccomp::install(filter).context("installing linux.seccomp")?;
        }
    }
    Ok(())
}

fn mask_path(p: &str) -> Result<()> {
    let meta = match std::fs::metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if meta.is_dir() {
        mount(
            Some("tmpfs"),
            p,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            Some("size=0k"),
        )?;
    } else {
        mount(
            Some("/dev/null"),
            p,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )?;
    }
    Ok(())
}

/// The MS_* flags a mount already has (a bind remount must keep the locked ones).
fn current_flags(p: &str) -> Result<MsFlags> {
    let st = nix::sys::statvfs::statvfs(p)?;
    let f = st.flags();
    use nix::sys::statvfs::FsFlags;
    let mut out = MsFlags::empty();
    for (fs, ms) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if f.contains(fs) {
            out |= ms;
        }
    }
    Ok(out)
}

fn readonly_path(p: &str) -> Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    mount(
        Some(p),
        p,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )?;
    let keep = current_flags(p)?;
    mount(
        None::<&str>,
        p,
        None::<&str>,
        keep | MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
        None::<&str>,
    )?;
    Ok(())
}

fn loopback_up() -> Result<()> {
    // SAFETY: socket(2) returns a new fd or -1.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: fresh fd.
    let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    use std::os::fd::AsRawFd as _;
    // SAFETY: ifreq is plain old data.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo".iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS / SIOCSIFFLAGS with a valid ifreq.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    Ok(())
}

/// Groups, gid, uid, with capabilities carried over the uid change and then set as the spec
/// says. The supplementary groups are exactly `additionalGids`, as runc sets them (the primary
/// gid is not added).
fn switch_user(cfg: &ProcessConfig) -> Result<()> {
    let groups: Vec<Gid> = cfg
        .additional_gids
        .iter()
        .map(|g| Gid::from_raw(*g))
        .collect();
    if cfg.capabilities.is_some() {
        caps::set_keepcaps(true)?;
    }
    nix::unistd::setgroups(&groups).context("setgroups")?;
    nix::unistd::setresgid(
        Gid::from_raw(cfg.gid),
        Gid::from_raw(cfg.gid),
        Gid::from_raw(cfg.gid),
    )
    .with_context(|| format!("setgid {}", cfg.gid))?;
    nix::unistd::setresuid(
        Uid::from_raw(cfg.uid),
        Uid::from_raw(cfg.uid),
        Uid::from_raw(cfg.uid),
    )
    .with_context(|| format!("setuid {}", cfg.uid))?;
    if let Some(c) = &cfg.capabilities {
        caps::set_keepcaps(false)?;
        caps::apply_sets(c)?;
    }
    Ok(())
}

/// The value of `key` in an environment list.
fn env_get<'a>(env: &'a [String], key: &str) -> Option<&'a str> {
    env.iter()
        .rev()
        .find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// Resolves `program` the way execvp does: a name with a '/' is taken as is; otherwise the
/// first executable file in `path`. `is_exec` checks a candidate.
pub fn resolve_program(
    program: &str,
    path: &str,
    is_exec: &dyn Fn(&Path) -> std::io::Result<()>,
) -> Result<PathBuf> {
    if program.is_empty() {
        bail!("exec \"\": empty program name");
    }
    if program.contains('/') {
        let p = PathBuf::from(program);
        return match is_exec(&p) {
            Ok(()) => Ok(p),
            Err(e) => Err(anyhow::anyhow!("exec {program:?}: {}", io_text(&e))),
        };
    }
    let mut first_err = None;
    for dir in path.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = Path::new(dir).join(program);
        match is_exec(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                first_err.get_or_insert(e);
            }
            Err(_) => {}
        }
    }
    match first_err {
        Some(e) => bail!("exec {program:?}: {}", io_text(&e)),
        None => bail!("exec {program:?}: executable file not found in $PATH"),
    }
}

/// An io::Error's text without the " (os error N)" suffix.
fn io_text(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// A regular file we may execute.
fn is_executable(p: &Path) -> std::io::Result<()> {
    let meta = std::fs::metadata(p)?;
    if !meta.is_file() {
        return Err(std::io::Error::from_raw_os_error(libc::EACCES));
    }
    let c = CString::new(p.as_os_str().as_bytes())?;
    // SAFETY: a NUL-terminated path.
    if unsafe { libc::access(c.as_ptr(), libc::X_OK) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn resolve_exec(cfg: &ProcessConfig) -> Result<PathBuf> {
    let program = cfg.args.first().map(String::as_str).unwrap_or("");
    let path = env_get(&cfg.env, "PATH").unwrap_or(DEFAULT_PATH);
    resolve_program(program, path, &is_executable)
}

/// `HOME` from /etc/passwd when the environment has none (as runc does).
fn home_for(uid: u32) -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 6 && f[2].parse::<u32>().ok() == Some(uid) && !f[5].is_empty() {
            return f[5].to_string();
        }
    }
    "/".to_string()
}

fn exec(cfg: &ProcessConfig, exe: &Path) -> Result<()> {
    let mut env = cfg.env.clone();
    if env_get(&env, "HOME").is_none() {
        env.push(format!("HOME={}", home_for(cfg.uid)));
    }
    let path = CString::new(exe.as_os_str().as_bytes()).context("program path")?;
    let argv: Vec<CString> = cfg
        .args
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .context("process.args contains a NUL byte")?;
    let envp: Vec<CString> = env
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .context("process.env contains a NUL byte")?;
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(cfg.umask as libc::mode_t) };
    let err = match nix::unistd::execve(&path, &argv, &envp) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    bail!("exec {:?}: {}", cfg.args[0], err.desc())
}

#[cfg(test)]
mod tests {
    use super::super::spec::MountPlan;
    use super::*;

    fn fake_fs(p: &Path) -> std::io::Result<()> {
        match p.to_str().unwrap_or("") {
            "/bin/sh" | "/usr/bin/env" | "./local" => Ok(()),
            "/usr/bin/noexec" => Err(std::io::Error::from_raw_os_error(libc::EACCES)),
            _ => Err(std::io::Error::from_raw_os_error(libc::ENOENT)),
        }
    }

    #[test]
    fn path_resolution() {
        let path = "/usr/local/bin:/usr/bin:/bin";
        assert_eq!(
            resolve_program("sh", path, &fake_fs).unwrap(),
            Path::new("/bin/sh")
        );
        assert_eq!(
            resolve_program("env", path, &fake_fs).unwrap(),
            Path::new("/usr/bin/env")
        );
        assert_eq!(
            resolve_program("/bin/sh", "", &fake_fs).unwrap(),
            Path::new("/bin/sh")
        );
        assert_eq!(
            resolve_program("local", "", &fake_fs).unwrap(),
            Path::new("./local")
        );
        let e = resolve_program("/bin/nope", path, &fake_fs)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "exec \"/bin/nope\": No such file or directory");
        let e = resolve_program("nope", path, &fake_fs)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "exec \"nope\": executable file not found in $PATH");
        let e = resolve_program("noexec", path, &fake_fs)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "exec \"noexec\": Permission denied");
        assert!(resolve_program("", path, &fake_fs).is_err());
    }

    #[test]
    fn env_lookup() {
        let env = vec![
            "PATH=/a".to_string(),
            "PATHX=/b".to_string(),
            "HOME=/h".to_string(),
        ];
        assert_eq!(env_get(&env, "PATH"), Some("/a"));
        assert_eq!(env_get(&env, "HOME"), Some("/h"));
        assert_eq!(env_get(&env, "NOPE"), None);
    }

    fn init_config(readonly_root: bool) -> InitConfig {
        let mount = |destination: &str| MountPlan {
            destination: destination.into(),
            source: "/run/spinbox/containers/c/files/0".into(),
            fstype: String::new(),
            flags: libc::MS_BIND | libc::MS_RDONLY,
            propagation: 0,
            data: String::new(),
        };
        InitConfig {
            container_id: "c".into(),
            rootfs: "/run/spinbox/containers/c/rootfs".into(),
            readonly_root,
            new_cgroup_ns: true,
            new_net_ns: false,
            hostname: Some("pod".into()),
            domainname: None,
            mounts: vec![mount("/etc/resolv.conf"), mount("/etc/hosts")],
            populate_dev: true,
            devices: Vec::new(),
            masked_paths: vec!["/proc/kcore".into()],
            readonly_paths: vec!["/proc/sys".into()],
            sysctl: Vec::new(),
            process: ProcessConfig {
                args: vec!["/pause".into()],
                env: Vec::new(),
                cwd: "/".into(),
                uid: 0,
                gid: 0,
                additional_gids: Vec::new(),
                umask: 0o022,
                rlimits: Vec::new(),
                no_new_privileges: true,
                capabilities: None,
                oom_score_adj: None,
                terminal: false,
                seccomp: None,
            },
        }
    }

    #[test]
    fn a_read_only_root_is_made_read_only_after_everything_is_mounted_in_it() {
        let steps = setup_steps(&init_config(true));
        assert_eq!(
            steps,
            vec![
                Step::NewCgroupNs,
                Step::PrivateMounts,
                Step::BindRoot,
                Step::Mount(0),
                Step::Mount(1),
                Step::PopulateDev,
                Step::PivotRoot,
                Step::MaskPath(0),
                Step::ReadonlyPath(0),
                Step::ReadonlyRoot,
                Step::Hostname,
            ]
        );
        // Whatever writes to the root (mount points, nodes) comes before the remount.
        let at = |s: Step| steps.iter().position(|x| *x == s).unwrap();
        assert!(steps
            .iter()
            .filter(|s| matches!(s, Step::Mount(_) | Step::PopulateDev | Step::Device(_)))
            .all(|s| at(*s) < at(Step::ReadonlyRoot)));
        assert!(!setup_steps(&init_config(false)).contains(&Step::ReadonlyRoot));
    }
}
