//! The pod tests' world: the runtime under test, its CRI connection, the suite's paths, and
//! the helpers every pod test uses (running pods and containers, the leak checks).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use spinbox_tests::cri::{self, api, eventually, Cri, CriEnv, Pod};

pub const MIB: i64 = 1 << 20;
/// An HTTP server in the pod, on port 8080 of the pod's network namespace.
pub const SERVER: &str = "mkdir -p /www && echo 'hello from the server' >/www/index.html && \
                      exec httpd -f -p 8080 -h /www";
pub const GREETING: &str = "hello from the server";
/// How long a server in a fresh container may take to answer (a VM under TCG is slow).
pub const SERVE_WITHIN: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    Runc,
    Spinbox,
}

impl Runtime {
    /// The runtime handler name in the suite's containerd CRI config.
    pub fn handler(self) -> &'static str {
        match self {
            Runtime::Runc => "runc",
            Runtime::Spinbox => "spinbox",
        }
    }
}

/// One test's world: the runtime under test, a CRI connection, the suite's paths, and a
/// directory for the pods' logs.
pub struct PodTest {
    pub runtime: Runtime,
    pub cri: Cri,
    pub env: CriEnv,
    pub logs: tempfile::TempDir,
}

/// Runs `test` for `runtime`, alone in this binary (pods of two tests would confuse each
/// other's VM counts and leak checks).
pub fn run<F, Fut>(runtime: Runtime, test: F)
where
    F: FnOnce(PodTest) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(env) = CriEnv::from_env() else {
        return;
    };
    if runtime == Runtime::Spinbox && spinbox_tests::guest_dir().is_none() {
        return;
    }
    spinbox_tests::run_vm_test(async move {
        let cri = Cri::connect(&env.address)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let logs = tempfile::tempdir().expect("a log directory");
        let mut t = PodTest {
            runtime,
            cri,
            env,
            logs,
        };
        t.assert_all_clean("before the test").await;
        test(t).await;
    });
}

impl PodTest {
    /// The pod's log directory (created with the pod).
    pub fn log_dir(&self, pod: &Pod) -> PathBuf {
        PathBuf::from(&pod.config.log_directory)
    }

    /// Runs a pod named `<name>-<handler>` (its hostname too).
    pub async fn run_pod(&mut self, name: &str, share_pid: bool) -> Pod {
        let name = format!("{name}-{}", self.runtime.handler());
        self.run_pod_with(&name, self.runtime.handler(), |c| {
            c.linux
                .get_or_insert_with(Default::default)
                .security_context
                .get_or_insert_with(Default::default)
                .namespace_options = Some(cri::namespaces(share_pid));
        })
        .await
    }

    /// Runs a pod named `name` with runtime handler `handler`, its config changed by `change`.
    pub async fn run_pod_with(
        &mut self,
        name: &str,
        handler: &str,
        change: impl FnOnce(&mut api::PodSandboxConfig),
    ) -> Pod {
        let log_dir = self.logs.path().join(name);
        std::fs::create_dir_all(&log_dir).expect("the pod's log directory");
        let mut config = cri::pod_config(name, name, &log_dir, false);
        change(&mut config);
        self.cri
            .run_pod(config, handler)
            .await
            .unwrap_or_else(|e| panic!("pod {name}: {e}"))
    }

    /// Creates and starts a busybox container running `sh -c script` in `pod`.
    pub async fn run_container(
        &mut self,
        pod: &Pod,
        name: &str,
        script: &str,
        share_pid: bool,
        memory_limit: Option<i64>,
    ) -> String {
        let config = cri::container_config(name, script, share_pid, memory_limit);
        self.cri
            .run_container(pod, config)
            .await
            .unwrap_or_else(|e| panic!("container {name} in pod {}: {e}", pod.id))
    }

    /// The kernel's boot id as container `id` reads it.
    pub async fn boot_id(&mut self, id: &str) -> String {
        let boot = self.cri.sh(id, "cat /proc/sys/kernel/random/boot_id").await;
        boot.trim().to_string()
    }

    /// A pod's kernel: the host's under runc, a guest's under spinbox.
    pub fn assert_kernel(&self, boot: &str, host_boot: &str, what: &str) {
        match self.runtime {
            Runtime::Runc => assert_eq!(boot, host_boot, "{what} runs on the host's kernel"),
            Runtime::Spinbox => assert_ne!(boot, host_boot, "{what} runs on a guest kernel"),
        }
    }

    /// The pod's IP from PodSandboxStatus, checked to be on the suite's CRI network.
    pub async fn pod_ip(&mut self, pod: &Pod) -> String {
        let ip = self
            .cri
            .pod_ip(&pod.id)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            ip.starts_with("10.87.251."),
            "the pod's IP {ip:?} is on the suite's CRI network 10.87.251.0/24"
        );
        ip
    }

    /// Waits until the pod's server answers container `id` on 127.0.0.1.
    pub async fn wait_served_in_pod(&mut self, id: &str) {
        let cri = self.cri.clone();
        eventually(
            &format!("the server answers {id} on 127.0.0.1:8080"),
            SERVE_WITHIN,
            || {
                let mut cri = cri.clone();
                async move {
                    let out = cri
                        .exec(id, &["wget", "-q", "-O-", "http://127.0.0.1:8080/"], 10)
                        .await
                        .map_err(|e| e.to_string())?;
                    let body = String::from_utf8_lossy(&out.stdout);
                    (out.exit_code == 0 && body.contains(GREETING))
                        .then_some(())
                        .ok_or_else(|| {
                            format!(
                                "exit {}: {body} {}",
                                out.exit_code,
                                String::from_utf8_lossy(&out.stderr)
                            )
                        })
                }
            },
        )
        .await
    }

    /// Whether the suite's CRI network has `ip` allocated (host-local keeps a file per IP).
    pub fn ip_allocated(&self, ip: &str) -> bool {
        std::fs::read_dir(&self.env.ipam_dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|net| net.path().join(ip).exists())
    }

    /// QEMU processes of the suite's spinbox (their command lines name its state root).
    pub fn qemus(&self) -> Vec<String> {
        spinbox_tests::processes_mentioning(&self.env.spinbox_root.display().to_string())
            .into_iter()
            .filter(|p| p.contains("qemu-system"))
            .collect()
    }

    /// Stops and removes `pod`, then checks that nothing of it is left (`removed` names
    /// containers of it already removed, for the process and mount checks).
    pub async fn remove_pod(&mut self, pod: Pod, removed: &[&str]) {
        let netns = pod
            .netns_path(&mut self.cri)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        self.remove_pod_known(pod, removed, netns).await
    }

    /// [`Self::remove_pod`] with the pod's network namespace path learnt earlier.
    pub async fn remove_pod_known(&mut self, pod: Pod, removed: &[&str], netns: Option<PathBuf>) {
        let id = pod.id.clone();
        let mut ids: Vec<String> = self
            .cri
            .list_containers(&id)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .map(|c| c.id)
            .collect();
        ids.extend(removed.iter().map(|s| s.to_string()));
        ids.push(id.clone());
        pod.stop_and_remove(&mut self.cri)
            .await
            .unwrap_or_else(|e| panic!("pod {id}: {e}"));
        self.assert_pod_gone(&id, &ids, netns.as_deref()).await;
    }

    /// Nothing of pod `id` (and its containers `ids`) is left.
    pub async fn assert_pod_gone(&mut self, id: &str, ids: &[String], netns: Option<&Path>) {
        let pods = self
            .cri
            .list_pods(id)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(pods.is_empty(), "CRI still lists pod {id}: {pods:?}");
        let containers = self
            .cri
            .list_containers(id)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            containers.is_empty(),
            "CRI still lists containers of pod {id}: {containers:?}"
        );
        if let Some(netns) = netns {
            assert!(
                !netns.exists(),
                "the pod's network namespace {} is left",
                netns.display()
            );
        }
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let address = self.env.address.clone();
        // Shims exit shortly after the last task is deleted.
        eventually(
            &format!("the processes of pod {id} gone"),
            Duration::from_secs(30),
            || {
                let mut left = spinbox_tests::processes_mentioning(id);
                left.extend(shims_of(id, &address));
                left.extend(processes_in_cgroups_of(&ids));
                async move { left.is_empty().then_some(()).ok_or(format!("{left:#?}")) }
            },
        )
        .await;
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let left: Vec<&str> = mounts
            .lines()
            .filter(|l| ids.iter().any(|i| l.contains(i)))
            .collect();
        assert!(left.is_empty(), "mounts of pod {id} left: {left:#?}");
    }

    /// Nothing of any pod is left: no pod known to CRI, no IP of the CRI network allocated,
    /// and nothing of spinbox's (VM processes, state, logs, container data, network state).
    pub async fn assert_all_clean(&mut self, when: &str) {
        let pods = self
            .cri
            .list_pods("")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(pods.is_empty(), "{when}: CRI lists pods: {pods:#?}");
        spinbox_tests::assert_no_network_leaks(&self.env.ipam_dir);
        let address = self.env.address.display().to_string();
        let ctr = spinbox_tests::ctr::Ctr {
            containerd_dir: self
                .env
                .address
                .parent()
                .map(PathBuf::from)
                .unwrap_or_default(),
            address,
            spinbox_root: self.env.spinbox_root.clone(),
        };
        ctr.assert_clean();
        spinbox_tests::assert_no_leaks(&self.env.spinbox_root);
    }
}

/// The host's boot id.
pub fn host_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .expect("the host's boot_id")
        .trim()
        .to_string()
}

/// Shim processes (any runtime's) serving sandbox or container `id` for this containerd.
pub fn shims_of(id: &str, address: &Path) -> Vec<String> {
    let address = address.display().to_string();
    spinbox_tests::processes_mentioning(&format!("-id {id} "))
        .into_iter()
        .filter(|p| p.contains("containerd-shim") && p.contains(&address))
        .collect()
}

/// Host processes in a cgroup named after any of `ids` (runc puts each container in
/// `/<container id>` of every hierarchy).
pub fn processes_in_cgroups_of(ids: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let Ok(cgroups) = std::fs::read_to_string(e.path().join("cgroup")) else {
            continue;
        };
        if ids.iter().any(|id| cgroups.contains(id)) {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            found.push(format!(
                "{name}: {}",
                String::from_utf8_lossy(&cmd).replace('\0', " ").trim()
            ));
        }
    }
    found
}

/// Waits until the pod's server answers the host at `addr`.
pub async fn wait_served_at(addr: &str) {
    eventually(
        &format!("the server answers the host at {addr}"),
        SERVE_WITHIN,
        || http_get(addr),
    )
    .await;
}

/// `GET /` from `addr`, which must answer with the server's greeting within 5 s.
pub async fn http_get(addr: &str) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let get = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
        let mut body = Vec::new();
        s.read_to_end(&mut body).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&body).into_owned())
    };
    match tokio::time::timeout(Duration::from_secs(5), get).await {
        Ok(Ok(body)) if body.contains(GREETING) => Ok(()),
        Ok(Ok(body)) => Err(format!("answered {body:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer in 5 s".into()),
    }
}
