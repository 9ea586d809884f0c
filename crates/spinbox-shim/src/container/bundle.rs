//! What the shim reads from a bundle: the spec, the rootfs source, the network it asks for,
//! the host files it binds, and its place in a Kubernetes pod (CRI's annotations).

use spinbox_agent_api::agent::{FileCopy, Share};

use super::error::ContainerError;
use super::CreateOpts;

/// CRI's annotation naming a container's kind: `sandbox` (the pod's pause container) or
/// `container` (an application container of the pod).
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI's annotation naming the pod's sandbox (the pause container's id).
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// The pod's resources, on the sandbox container (bytes; CFS quota and period in µs).
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// A container's place in a pod, from CRI's annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodRole {
    /// No pod (`ctr run`, nerdctl): a pod of one, its own VM.
    Single,
    /// The pod's sandbox (pause) container: it boots the pod's VM.
    Sandbox { resources: PodResources },
    /// An application container of the pod whose sandbox is `sandbox_id`: it joins that VM.
    Member { sandbox_id: String },
}

/// What CRI says the whole pod may use (the sum of its containers' limits).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodResources {
    pub memory_bytes: Option<u64>,
    pub cpu_quota: Option<i64>,
    pub cpu_period: Option<u64>,
}

impl PodRole {
    /// Reads the CRI annotations of a spec (its `annotations` object).
    pub fn from_annotations(annotations: &serde_json::Value) -> PodRole {
        let get = |key: &str| annotations[key].as_str().filter(|v| !v.is_empty());
        match (get(CONTAINER_TYPE), get(SANDBOX_ID)) {
            (Some("container"), Some(sandbox)) => PodRole::Member {
                sandbox_id: sandbox.to_owned(),
            },
            (Some("sandbox"), _) => PodRole::Sandbox {
                resources: PodResources {
                    memory_bytes: get(SANDBOX_MEMORY)
                        .and_then(|v| v.parse().ok())
                        .filter(|&b| b > 0),
                    cpu_quota: get(SANDBOX_CPU_QUOTA)
                        .and_then(|v| v.parse().ok())
                        .filter(|&q| q > 0),
                    cpu_period: get(SANDBOX_CPU_PERIOD)
                        .and_then(|v| v.parse().ok())
                        .filter(|&p| p > 0),
                },
            },
            _ => PodRole::Single,
        }
    }

    /// The id of the shim a container belongs with: its pod's sandbox for a member, else
    /// its own (what `start` derives the socket address from).
    pub fn grouping<'a>(&'a self, own_id: &'a str) -> &'a str {
        match self {
            PodRole::Member { sandbox_id } => sandbox_id,
            _ => own_id,
        }
    }
}

/// What the shim takes from the bundle.
pub struct Bundle {
    pub spec: Vec<u8>,
    pub source: spinbox_storage::RootfsSource,
    pub read_only: bool,
    pub netns: spinbox_net::SpecNetns,
    pub publish: Vec<spinbox_net::PortMapping>,
    pub files: Vec<FileCopy>,
    pub shares: Vec<Share>,
    pub pod: PodRole,
    /// The spec's own CPU and memory limits (what a pod of one's VM is sized by).
    pub limits: PodResources,
}

/// The network namespace `linux.namespaces` asks for.
fn spec_netns(spec: &serde_json::Value) -> spinbox_net::SpecNetns {
    let entry = spec["linux"]["namespaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|ns| ns["type"] == "network");
    match entry {
        None => spinbox_net::SpecNetns::Host,
        Some(ns) => match ns["path"].as_str() {
            Some(p) if !p.is_empty() => spinbox_net::SpecNetns::Path(p.into()),
            _ => spinbox_net::SpecNetns::New,
        },
    }
}

/// Reads the bundle's spec and finds the rootfs source, the network and the file copies.
pub async fn load_bundle(opts: &CreateOpts) -> Result<Bundle, ContainerError> {
    let spec_path = opts.bundle.join("config.json");
    let spec = tokio::fs::read(&spec_path)
        .await
        .map_err(|e| ContainerError::Bundle {
            path: spec_path.clone(),
            reason: e.to_string(),
        })?;
    let parsed: serde_json::Value =
        serde_json::from_slice(&spec).map_err(|e| ContainerError::Bundle {
            path: spec_path.clone(),
            reason: format!("not valid JSON: {e}"),
        })?;
    let read_only = parsed["root"]["readonly"].as_bool().unwrap_or(false);
    let source = if opts.rootfs.is_empty() {
        // No snapshot mounts (`ctr run --config`, a pre-made bundle): the spec's root.path,
        // relative to the bundle, is the rootfs directory.
        let root = parsed["root"]["path"].as_str().unwrap_or("rootfs");
        let path = opts.bundle.join(root);
        if !path.is_dir() {
            return Err(ContainerError::Bundle {
                path: spec_path.clone(),
                reason: format!(
                    "root.path {} is not a directory and containerd gave no rootfs mounts",
                    path.display()
                ),
            });
        }
        spinbox_storage::RootfsSource::Dir { path, read_only }
    } else {
        spinbox_storage::parse_rootfs(&opts.rootfs)?
    };
    let netns = spec_netns(&parsed);
    let publish = match parsed["annotations"][spinbox_net::publish::ANNOTATION].as_str() {
        Some(v) => spinbox_net::publish::parse(v)?,
        None => Vec::new(),
    };
    let (files, shares) = crate::copies::plan(&parsed).await;
    let pod = PodRole::from_annotations(&parsed["annotations"]);
    let limits = super::sizing::spec_limits(&parsed);
    Ok(Bundle {
        pod,
        limits,
        spec,
        source,
        read_only,
        netns,
        publish,
        files,
        shares,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pod_roles_from_cri_annotations() {
        assert_eq!(PodRole::from_annotations(&json!(null)), PodRole::Single);
        assert_eq!(
            PodRole::from_annotations(&json!({CONTAINER_TYPE: "container", SANDBOX_ID: "p1"})),
            PodRole::Member {
                sandbox_id: "p1".into()
            }
        );
        // A member without its sandbox's id cannot join anything: on its own.
        assert_eq!(
            PodRole::from_annotations(&json!({CONTAINER_TYPE: "container"})),
            PodRole::Single
        );
        let sandbox = PodRole::from_annotations(&json!({
            CONTAINER_TYPE: "sandbox", SANDBOX_ID: "p1",
            SANDBOX_MEMORY: "268435456", SANDBOX_CPU_QUOTA: "150000", SANDBOX_CPU_PERIOD: "100000"
        }));
        assert_eq!(
            sandbox,
            PodRole::Sandbox {
                resources: PodResources {
                    memory_bytes: Some(268435456),
                    cpu_quota: Some(150000),
                    cpu_period: Some(100000),
                }
            }
        );
        assert_eq!(sandbox.grouping("p1"), "p1");
        let unlimited = PodRole::from_annotations(&json!({
            CONTAINER_TYPE: "sandbox", SANDBOX_MEMORY: "0", SANDBOX_CPU_QUOTA: "-1"
        }));
        assert_eq!(
            unlimited,
            PodRole::Sandbox {
                resources: PodResources::default()
            }
        );
        assert_eq!(
            PodRole::Member {
                sandbox_id: "p1".into()
            }
            .grouping("c1"),
            "p1"
        );
    }
}
