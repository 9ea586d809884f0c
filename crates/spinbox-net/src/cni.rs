//! CNI plugin invocation, as libcni does it: each plugin of a conflist in order for ADD with
//! the previous result chained in as `prevResult`, in reverse order for DEL, `CNI_*`
//! environment, the network configuration as JSON on stdin, the result or error as JSON on
//! stdout. A host-wide lock serialises spinbox's CNI calls; ADD is retried a bounded number of
//! times, with a DEL between attempts so a half-done ADD leaves nothing.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::NetError;

/// Most a plugin's stdout (its result or error JSON) may hold; a result is a few KiB.
pub const MAX_PLUGIN_STDOUT: usize = 1 << 20;
/// How much of a plugin's stderr is kept for the error message; the rest is read and dropped.
pub const MAX_PLUGIN_STDERR: usize = 16 << 10;
/// Most a conflist file may hold.
pub const MAX_CONFLIST: usize = 1 << 20;

/// What [`read_capped`] read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Capped {
    /// The first `max` bytes at most.
    pub bytes: Vec<u8>,
    /// More than `max` bytes came.
    pub over: bool,
}

/// Reads `r` to its end keeping at most `max` bytes. With `drain`, what comes past `max` is
/// read and dropped (so a writer is never blocked on a full pipe); without, reading stops at
/// the first byte past `max`.
pub(crate) async fn read_capped<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    drain: bool,
) -> std::io::Result<Capped> {
    let mut bytes = Vec::new();
    (&mut *r)
        .take(max as u64 + 1)
        .read_to_end(&mut bytes)
        .await?;
    let over = bytes.len() > max;
    bytes.truncate(max);
    if over && drain {
        tokio::io::copy(r, &mut tokio::io::sink()).await?;
    }
    Ok(Capped { bytes, over })
}

/// A parsed conflist: name, version and the plugins' configurations, in order.
#[derive(Debug, Clone)]
pub struct ConfList {
    pub path: PathBuf,
    pub name: String,
    pub cni_version: String,
    pub plugins: Vec<Map<String, Value>>,
}

impl ConfList {
    pub async fn load(path: &Path) -> Result<ConfList, NetError> {
        let fail = |reason: String| NetError::Cni {
            what: format!("reading conflist {}", path.display()),
            reason,
        };
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let read = read_capped(&mut file, MAX_CONFLIST, false)
            .await
            .map_err(|e| fail(e.to_string()))?;
        if read.over {
            return Err(fail(format!("larger than {MAX_CONFLIST} bytes")));
        }
        Self::parse(path, &read.bytes)
    }

    pub fn parse(path: &Path, bytes: &[u8]) -> Result<ConfList, NetError> {
        let bad = |reason: String| NetError::Cni {
            what: format!("conflist {}", path.display()),
            reason,
        };
        let v: Value = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        let obj = v
            .as_object()
            .ok_or_else(|| bad("not a JSON object".into()))?;
        let name = obj
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| bad("\"name\" missing or not a string".into()))?;
        if name.contains('/') || name.starts_with('.') {
            return Err(bad(format!(
                "\"name\" {name:?} is not a valid network name"
            )));
        }
        let cni_version = obj
            .get("cniVersion")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("\"cniVersion\" missing or not a string".into()))?;
        let plugins = obj
            .get("plugins")
            .and_then(Value::as_array)
            .filter(|p| !p.is_empty())
            .ok_or_else(|| bad("\"plugins\" missing or empty".into()))?;
        let mut out = Vec::new();
        for (i, p) in plugins.iter().enumerate() {
            let p = p
                .as_object()
                .ok_or_else(|| bad(format!("plugins[{i}] is not an object")))?;
            let ty = p.get("type").and_then(Value::as_str).unwrap_or("");
            if ty.is_empty() || ty.contains('/') || ty.starts_with('.') {
                return Err(bad(format!(
                    "plugins[{i}].type {ty:?} is not a plugin name"
                )));
            }
            out.push(p.clone());
        }
        Ok(ConfList {
            path: path.to_path_buf(),
            name: name.to_string(),
            cni_version: cni_version.to_string(),
            plugins: out,
        })
    }
}

/// The parts of a CNI result spinbox uses (0.3.x, 0.4.0 and 1.0.0 share this shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default)]
    pub interfaces: Vec<CniInterface>,
    #[serde(default)]
    pub ips: Vec<CniIp>,
    #[serde(default)]
    pub routes: Vec<CniRoute>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CniInterface {
    pub name: String,
    #[serde(default)]
    pub mac: String,
    #[serde(default)]
    pub sandbox: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CniIp {
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CniRoute {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

#[derive(Debug, Deserialize)]
struct CniErrorReply {
    #[serde(default)]
    code: u32,
    #[serde(default)]
    msg: String,
    #[serde(default)]
    details: String,
}

/// Where and how plugins run.
#[derive(Debug, Clone)]
pub struct Invoker {
    pub bin_dirs: Vec<PathBuf>,
    /// Bound on one plugin execution.
    pub timeout: Duration,
}

/// What one attachment is: the container, its namespace and interface name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attachment {
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
}

impl Invoker {
    fn find(&self, ty: &str) -> Result<PathBuf, NetError> {
        for dir in &self.bin_dirs {
            let p = dir.join(ty);
            if p.is_file() {
                return Ok(p);
            }
        }
        Err(NetError::Cni {
            what: format!("plugin {ty:?}"),
            reason: format!(
                "not found in network.cni_bin_dirs ({}); install containernetworking-plugins",
                self.bin_dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
    }

    fn cni_path(&self) -> String {
        self.bin_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    }

    async fn exec(
        &self,
        command: &str,
        conf: &Value,
        att: &Attachment,
    ) -> Result<Option<Value>, NetError> {
        let ty = conf.get("type").and_then(Value::as_str).unwrap_or_default();
        let plugin = self.find(ty)?;
        let fail = |reason: String| NetError::Cni {
            what: format!("{command} {ty} for {}", att.container_id),
            reason,
        };
        let stdin = serde_json::to_vec(conf).map_err(|e| fail(e.to_string()))?;
        let mut child = tokio::process::Command::new(&plugin)
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &att.container_id)
            .env("CNI_NETNS", &att.netns)
            .env("CNI_IFNAME", &att.ifname)
            .env("CNI_PATH", self.cni_path())
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| fail(format!("spawning {}: {e}", plugin.display())))?;
        let (Some(mut input), Some(mut stdout), Some(mut stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(fail("the plugin's pipes were not set up".into()));
        };
        // Its output is read as it comes, bounded: a plugin writing without end is cut off at
        // MAX_PLUGIN_STDOUT (and killed on drop), its stderr is kept to MAX_PLUGIN_STDERR.
        let run = async {
            let feed = async {
                input
                    .write_all(&stdin)
                    .await
                    .map_err(|e| fail(format!("writing the config: {e}")))?;
                drop(input);
                Ok::<_, NetError>(())
            };
            let out = async {
                let read = read_capped(&mut stdout, MAX_PLUGIN_STDOUT, false)
                    .await
                    .map_err(|e| fail(format!("reading its output: {e}")))?;
                if read.over {
                    return Err(fail(format!(
                        "its output is larger than {MAX_PLUGIN_STDOUT} bytes"
                    )));
                }
                Ok(read.bytes)
            };
            let err = async {
                read_capped(&mut stderr, MAX_PLUGIN_STDERR, true)
                    .await
                    .map(|r| r.bytes)
                    .map_err(|e| fail(format!("reading its stderr: {e}")))
            };
            let ((), stdout, stderr) = tokio::try_join!(feed, out, err)?;
            let status = child.wait().await.map_err(|e| fail(e.to_string()))?;
            Ok::<_, NetError>(std::process::Output {
                status,
                stdout,
                stderr,
            })
        };
        let out = tokio::time::timeout(self.timeout, run)
            .await
            .map_err(|_| {
                fail(format!(
                    "no answer within timeouts.cni_plugin ({:?})",
                    self.timeout
                ))
            })??;
        if !out.status.success() {
            let reason = match serde_json::from_slice::<CniErrorReply>(&out.stdout) {
                Ok(e) if !e.msg.is_empty() => {
                    let mut r = format!("error {}: {}", e.code, e.msg);
                    if !e.details.is_empty() {
                        r.push_str(&format!(" ({})", e.details));
                    }
                    r
                }
                _ => format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            };
            return Err(fail(reason));
        }
        if out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        let v: Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| fail(format!("result is not JSON: {e}")))?;
        Ok(Some(v))
    }

    fn plugin_conf(
        list: &ConfList,
        plugin: &Map<String, Value>,
        prev: Option<&Value>,
        runtime: &Map<String, Value>,
    ) -> Value {
        let mut conf = plugin.clone();
        conf.insert("name".into(), Value::String(list.name.clone()));
        conf.insert("cniVersion".into(), Value::String(list.cni_version.clone()));
        if let Some(prev) = prev {
            conf.insert("prevResult".into(), prev.clone());
        }
        // Only the runtime config keys this plugin declared as capabilities, as libcni does.
        if let Some(caps) = plugin.get("capabilities").and_then(Value::as_object) {
            let mut rc = Map::new();
            for (k, v) in runtime {
                if caps.get(k).and_then(Value::as_bool) == Some(true) {
                    rc.insert(k.clone(), v.clone());
                }
            }
            if !rc.is_empty() {
                conf.insert("runtimeConfig".into(), Value::Object(rc));
            }
        }
        Value::Object(conf)
    }

    /// ADD through every plugin; returns the last plugin's result (raw and parsed).
    pub async fn add(
        &self,
        list: &ConfList,
        att: &Attachment,
        runtime: &Map<String, Value>,
    ) -> Result<(Value, CniResult), NetError> {
        let mut prev: Option<Value> = None;
        for plugin in &list.plugins {
            let conf = Self::plugin_conf(list, plugin, prev.as_ref(), runtime);
            if let Some(result) = self.exec("ADD", &conf, att).await? {
                prev = Some(result);
            }
        }
        let raw = prev.ok_or_else(|| NetError::Cni {
            what: format!("ADD {} for {}", list.name, att.container_id),
            reason: "no plugin returned a result".into(),
        })?;
        let parsed: CniResult = serde_json::from_value(raw.clone()).map_err(|e| NetError::Cni {
            what: format!("result of {} for {}", list.name, att.container_id),
            reason: e.to_string(),
        })?;
        Ok((raw, parsed))
    }

    /// DEL through every plugin in reverse order; every plugin runs, the first error is
    /// returned after all ran.
    pub async fn del(
        &self,
        list: &ConfList,
        att: &Attachment,
        prev: Option<&Value>,
        runtime: &Map<String, Value>,
    ) -> Result<(), NetError> {
        let mut first_err = None;
        for plugin in list.plugins.iter().rev() {
            let conf = Self::plugin_conf(list, plugin, prev, runtime);
            if let Err(e) = self.exec("DEL", &conf, att).await {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// The host-wide lock around spinbox's CNI calls (an flock on `path`); released on drop.
pub struct HostLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl HostLock {
    pub async fn acquire(path: &Path) -> Result<HostLock, NetError> {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::OpenOptionsExt;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| NetError::io(format!("creating {}", dir.display()), e))?;
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| NetError::io(format!("opening lock {}", path.display()), e))?;
            nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
                .map(|lock| HostLock { _lock: lock })
                .map_err(|(_, e)| NetError::io(format!("locking {}", path.display()), e.into()))
        })
        .await
        .map_err(|e| NetError::Other(format!("lock task: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = r#"{"cniVersion":"1.0.0","name":"spinbox","plugins":[
        {"type":"bridge","bridge":"spinbox0"},
        {"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    #[test]
    fn conflist_parses_and_plugin_conf_chains() {
        let l = ConfList::parse(Path::new("x"), LIST.as_bytes()).unwrap();
        assert_eq!(l.name, "spinbox");
        assert_eq!(l.plugins.len(), 2);
        let mut rc = Map::new();
        rc.insert(
            "portMappings".into(),
            serde_json::json!([{"hostPort": 8080}]),
        );
        rc.insert("bandwidth".into(), serde_json::json!({}));
        let prev = serde_json::json!({"cniVersion": "1.0.0", "ips": []});
        let c0 = Invoker::plugin_conf(&l, &l.plugins[0], None, &rc);
        assert!(c0.get("runtimeConfig").is_none());
        assert!(c0.get("prevResult").is_none());
        assert_eq!(c0["name"], "spinbox");
        let c1 = Invoker::plugin_conf(&l, &l.plugins[1], Some(&prev), &rc);
        assert_eq!(c1["prevResult"], prev);
        assert_eq!(c1["runtimeConfig"]["portMappings"][0]["hostPort"], 8080);
        assert!(c1["runtimeConfig"].get("bandwidth").is_none());
    }

    #[test]
    fn bad_conflists_name_the_field() {
        for (text, want) in [
            (
                r#"{"cniVersion":"1.0.0","plugins":[{"type":"x"}]}"#,
                "\"name\"",
            ),
            (r#"{"name":"n","plugins":[{"type":"x"}]}"#, "cniVersion"),
            (
                r#"{"name":"n","cniVersion":"1.0.0","plugins":[]}"#,
                "plugins",
            ),
            (
                r#"{"name":"n","cniVersion":"1.0.0","plugins":[{"type":"../x"}]}"#,
                "plugins[0].type",
            ),
        ] {
            let e = ConfList::parse(Path::new("c"), text.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e} should name {want}");
        }
    }

    #[test]
    fn result_parses() {
        let r: CniResult = serde_json::from_str(
            r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","mac":"aa:bb:cc:dd:ee:ff","sandbox":"/run/netns/x"}],
               "ips":[{"address":"10.87.0.5/16","gateway":"10.87.0.1","interface":0}],
               "routes":[{"dst":"0.0.0.0/0"}],"dns":{}}"#,
        )
        .unwrap();
        assert_eq!(r.ips[0].address.to_string(), "10.87.0.5/16");
        assert_eq!(r.ips[0].gateway.unwrap().to_string(), "10.87.0.1");
        assert_eq!(r.routes[0].dst.prefix_len(), 0);
    }
}

#[cfg(test)]
mod proptests;
