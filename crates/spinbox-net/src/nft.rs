//! The host firewall, through `nft -j` (libnftables' JSON): an `inet spinbox` table with NAT
//! chains and, for isolation between containers, a `bridge spinbox` table filtering what the
//! bridge forwards; every rule for a container carries the comment `spinbox:<id>`, which is
//! how the rules of one container are found and removed together.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use ipnet::IpNet;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::publish::{PortMapping, Protocol};
use crate::NetError;

pub const TABLE: &str = "spinbox";
pub const FAMILY: &str = "inet";
/// The family of the table that filters bridged traffic (isolation).
pub const BRIDGE_FAMILY: &str = "bridge";
const FAMILIES: [&str; 2] = [FAMILY, BRIDGE_FAMILY];

/// The comment that tags every rule of container `id`.
pub fn tag(id: &str) -> String {
    format!("spinbox:{id}")
}

#[derive(Debug, Clone)]
pub struct Nft {
    pub binary: PathBuf,
    pub timeout: Duration,
}

fn bridge_chains() -> Vec<Value> {
    vec![
        json!({"add": {"table": {"family": BRIDGE_FAMILY, "name": TABLE}}}),
        json!({"add": {"chain": {"family": BRIDGE_FAMILY, "table": TABLE, "name": "forward",
            "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}}}),
    ]
}

fn base_chains() -> Vec<Value> {
    let chain = |name: &str, hook: &str, prio: i32| {
        json!({"add": {"chain": {"family": FAMILY, "table": TABLE, "name": name,
            "type": "nat", "hook": hook, "prio": prio, "policy": "accept"}}})
    };
    vec![
        json!({"add": {"table": {"family": FAMILY, "name": TABLE}}}),
        chain("prerouting", "prerouting", -100),
        chain("output", "output", -100),
        chain("postrouting", "postrouting", 100),
    ]
}

fn rule(chain: &str, id: &str, expr: Vec<Value>) -> Value {
    rule_in(FAMILY, chain, id, expr)
}

fn rule_in(family: &str, chain: &str, id: &str, expr: Vec<Value>) -> Value {
    json!({"add": {"rule": {"family": family, "table": TABLE, "chain": chain,
        "comment": tag(id), "expr": expr}}})
}

/// Isolation: the bridge drops what container `id` at `ip` sends to other addresses of
/// `subnet` (its gateway, the host, excepted). ARP passes; IP does not.
pub fn isolation_rules(
    id: &str,
    ip: Ipv4Addr,
    subnet: IpNet,
    gateway: Option<Ipv4Addr>,
) -> Vec<Value> {
    let IpNet::V4(net) = subnet else {
        return Vec::new();
    };
    let mut expr = vec![
        json!({"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
            "right": ip.to_string()}}),
        json!({"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
            "right": {"prefix": {"addr": net.network().to_string(), "len": net.prefix_len()}}}}),
    ];
    if let Some(gw) = gateway {
        expr.push(
            json!({"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
            "right": gw.to_string()}}),
        );
    }
    expr.push(json!({"drop": null}));
    let mut out = bridge_chains();
    out.push(rule_in(BRIDGE_FAMILY, "forward", id, expr));
    out
}

fn is_local() -> Value {
    json!({"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}},
        "right": "local"}})
}

/// The rules for container `id` at `ip`: masquerade of its traffic leaving `subnet` (when
/// given: spinbox runs the network) and a DNAT per published port, for traffic arriving at
/// any local address from outside (prerouting) and from the host itself (output).
pub fn container_rules(
    id: &str,
    ip: Ipv4Addr,
    masquerade_subnet: Option<IpNet>,
    publish: &[PortMapping],
) -> Vec<Value> {
    let mut out = Vec::new();
    if let Some(IpNet::V4(net)) = masquerade_subnet {
        out.push(rule(
            "postrouting",
            id,
            vec![
                json!({"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                    "right": ip.to_string()}}),
                json!({"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                    "right": {"prefix": {"addr": net.network().to_string(), "len": net.prefix_len()}}}}),
                json!({"masquerade": null}),
            ],
        ));
    }
    for p in publish {
        let proto = match p.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        for chain in ["prerouting", "output"] {
            out.push(rule(
                chain,
                id,
                vec![
                    is_local(),
                    json!({"match": {"op": "==", "left": {"payload": {"protocol": proto, "field": "dport"}},
                        "right": p.host_port}}),
                    json!({"dnat": {"family": "ip", "addr": ip.to_string(), "port": p.container_port}}),
                ],
            ));
        }
    }
    out
}

/// One rule of a spinbox table as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedRule {
    pub family: String,
    pub chain: String,
    pub handle: u64,
    pub comment: String,
}

impl Nft {
    async fn run(&self, args: &[&str], input: Option<&[u8]>) -> Result<Vec<u8>, NetError> {
        let fail = |reason: String| NetError::Nft {
            what: format!("{} {}", self.binary.display(), args.join(" ")),
            reason,
        };
        let mut child = tokio::process::Command::new(&self.binary)
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| fail(format!("spawn: {e} (install nftables, or set network.nft)")))?;
        if let (Some(bytes), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin
                .write_all(bytes)
                .await
                .map_err(|e| fail(format!("writing the ruleset: {e}")))?;
        }
        let out = tokio::time::timeout(self.timeout, child.wait_with_output())
            .await
            .map_err(|_| fail(format!("no answer within {:?}", self.timeout)))?
            .map_err(|e| fail(e.to_string()))?;
        if !out.status.success() {
            return Err(fail(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(out.stdout)
    }

    async fn apply(&self, commands: Vec<Value>) -> Result<(), NetError> {
        if commands.is_empty() {
            return Ok(());
        }
        let doc = json!({"nftables": commands});
        let bytes = serde_json::to_vec(&doc).map_err(|e| NetError::Other(e.to_string()))?;
        self.run(&["-j", "-f", "-"], Some(&bytes)).await.map(|_| ())
    }

    /// Adds the table and chains if missing, then `rules`, in one transaction.
    pub async fn add_rules(&self, rules: Vec<Value>) -> Result<(), NetError> {
        if rules.is_empty() {
            return Ok(());
        }
        let mut cmds = base_chains();
        cmds.extend(rules);
        self.apply(cmds).await
    }

    /// Every rule of the spinbox tables; an absent table has none.
    pub async fn list(&self) -> Result<Vec<ListedRule>, NetError> {
        Ok(self.list_with_tables().await?.0)
    }

    /// The spinbox table of `family` as `nft -j list` gives it; None when it does not exist.
    async fn list_table(&self, family: &str) -> Result<Option<Value>, NetError> {
        let out = match self
            .run(&["-j", "list", "table", family, TABLE], None)
            .await
        {
            Ok(o) => o,
            Err(NetError::Nft { reason, .. }) if reason.contains("No such file or directory") => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        serde_json::from_slice(&out)
            .map(Some)
            .map_err(|e| NetError::Nft {
                what: "parsing nft -j list output".into(),
                reason: e.to_string(),
            })
    }

    /// The rules, and the families whose spinbox table exists.
    async fn list_with_tables(&self) -> Result<(Vec<ListedRule>, Vec<&'static str>), NetError> {
        let mut rules = Vec::new();
        let mut tables = Vec::new();
        for family in FAMILIES {
            if let Some(v) = self.list_table(family).await? {
                tables.push(family);
                rules.extend(parse_rules(&v));
            }
        }
        Ok((rules, tables))
    }

    /// The host ports the NAT table publishes now, whoever's rules they are.
    pub async fn published(&self) -> Result<Vec<PublishedPort>, NetError> {
        Ok(self
            .list_table(FAMILY)
            .await?
            .map(|v| published_ports(&v))
            .unwrap_or_default())
    }

    /// Removes every rule tagged for container `id`; none is not an error.
    /// A table left without rules goes too: a host without spinbox containers has no spinbox
    /// tables. (Callers hold the host lock, so no other container's rules arrive meanwhile.)
    pub async fn remove_container(&self, id: &str) -> Result<usize, NetError> {
        let (rules, tables) = self.list_with_tables().await?;
        let (cmds, removed) = removal_commands(&rules, &tables, id);
        self.apply(cmds).await?;
        Ok(removed)
    }
}

/// The nft commands that remove container `id`'s rules, and the tables that are then empty;
/// with the number of rules removed.
fn removal_commands(rules: &[ListedRule], tables: &[&str], id: &str) -> (Vec<Value>, usize) {
    let want = tag(id);
    let (doomed, kept): (Vec<&ListedRule>, Vec<&ListedRule>) =
        rules.iter().partition(|r| r.comment == want);
    let mut cmds: Vec<Value> = doomed
        .iter()
        .map(|r| {
            json!({"delete": {"rule": {"family": r.family, "table": TABLE,
                "chain": r.chain, "handle": r.handle}}})
        })
        .collect();
    for family in tables {
        if !kept.iter().any(|r| r.family == *family) {
            cmds.push(json!({"delete": {"table": {"family": family, "name": TABLE}}}));
        }
    }
    (cmds, doomed.len())
}

pub fn parse_rules(v: &Value) -> Vec<ListedRule> {
    let mut out = Vec::new();
    for item in v
        .get("nftables")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(r) = item.get("rule") else { continue };
        let (Some(chain), Some(handle)) = (
            r.get("chain").and_then(Value::as_str),
            r.get("handle").and_then(Value::as_u64),
        ) else {
            continue;
        };
        out.push(ListedRule {
            family: r
                .get("family")
                .and_then(Value::as_str)
                .unwrap_or(FAMILY)
                .to_string(),
            chain: chain.to_string(),
            handle,
            comment: r
                .get("comment")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        });
    }
    out
}

/// A host port a rule of the NAT table publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedPort {
    /// The container the rule is tagged for (its comment without `spinbox:`), or the whole
    /// comment of a rule spinbox did not tag.
    pub owner: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// The (protocol, destination port) matches of the DNAT rules in a listed `inet spinbox`
/// table: the host ports published, deduplicated (prerouting and output carry each one).
pub fn published_ports(v: &Value) -> Vec<PublishedPort> {
    let mut out: Vec<PublishedPort> = Vec::new();
    for item in v
        .get("nftables")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(r) = item.get("rule") else { continue };
        let Some(expr) = r.get("expr").and_then(Value::as_array) else {
            continue;
        };
        if !expr.iter().any(|e| e.get("dnat").is_some()) {
            continue;
        }
        let comment = r.get("comment").and_then(Value::as_str).unwrap_or_default();
        let owner = comment
            .strip_prefix("spinbox:")
            .unwrap_or(comment)
            .to_string();
        for m in expr.iter().filter_map(|e| e.get("match")) {
            let Some(payload) = m.get("left").and_then(|l| l.get("payload")) else {
                continue;
            };
            if m.get("op").and_then(Value::as_str) != Some("==")
                || payload.get("field").and_then(Value::as_str) != Some("dport")
            {
                continue;
            }
            let protocol = match payload.get("protocol").and_then(Value::as_str) {
                Some("tcp") => Protocol::Tcp,
                Some("udp") => Protocol::Udp,
                _ => continue,
            };
            let Some(port) = m
                .get("right")
                .and_then(Value::as_u64)
                .and_then(|p| u16::try_from(p).ok())
            else {
                continue;
            };
            let p = PublishedPort {
                owner: owner.clone(),
                protocol,
                port,
            };
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// The first IPv4 address of a list, which the NAT rules target.
pub fn first_v4(addrs: &[IpNet]) -> Option<Ipv4Addr> {
    addrs.iter().find_map(|a| match a.addr() {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_carry_the_tag_and_targets() {
        let publish = [PortMapping {
            host_port: 8080,
            container_port: 80,
            protocol: Protocol::Tcp,
        }];
        let rules = container_rules(
            "c1",
            "10.87.0.5".parse().unwrap(),
            Some("10.87.0.0/16".parse().unwrap()),
            &publish,
        );
        assert_eq!(rules.len(), 3);
        for r in &rules {
            assert_eq!(r["add"]["rule"]["comment"], "spinbox:c1");
        }
        let text = serde_json::to_string(&rules).unwrap();
        assert!(
            text.contains(r#""dnat":{"addr":"10.87.0.5","family":"ip","port":80}"#),
            "{text}"
        );
        assert!(text.contains(r#""right":8080"#));
        assert!(container_rules("c", "10.0.0.1".parse().unwrap(), None, &[]).is_empty());
        let iso = isolation_rules(
            "c1",
            "10.87.0.5".parse().unwrap(),
            "10.87.0.0/16".parse().unwrap(),
            Some("10.87.0.1".parse().unwrap()),
        );
        let rule = &iso.last().unwrap()["add"]["rule"];
        assert_eq!(rule["family"], "bridge");
        assert_eq!(rule["comment"], "spinbox:c1");
        let text = serde_json::to_string(rule).unwrap();
        assert!(
            text.contains(r#""op":"!=""#)
                && text.contains("10.87.0.1")
                && text.contains(r#""drop":null"#),
            "{text}"
        );
    }

    #[test]
    fn removal_drops_the_rules_and_tables_left_empty() {
        let rule = |family: &str, handle, comment: &str| ListedRule {
            family: family.into(),
            chain: "output".into(),
            handle,
            comment: comment.into(),
        };
        let rules = [
            rule("inet", 1, "spinbox:a"),
            rule("inet", 2, "spinbox:b"),
            rule("bridge", 3, "spinbox:a"),
        ];
        let (cmds, n) = removal_commands(&rules, &["inet", "bridge"], "a");
        assert_eq!(n, 2);
        let text = serde_json::to_string(&cmds).unwrap();
        assert!(
            text.contains(r#""handle":1"#) && text.contains(r#""handle":3"#),
            "{text}"
        );
        assert!(!text.contains(r#""handle":2"#));
        // inet still holds b's rule; bridge is empty afterwards.
        assert_eq!(cmds.len(), 3, "{text}");
        assert!(
            text.contains(r#"{"delete":{"table":{"family":"bridge","name":"spinbox"}}}"#),
            "{text}"
        );
        // The last container: both tables go.
        let (cmds, _) = removal_commands(&rules[1..2], &["inet"], "b");
        assert_eq!(cmds.len(), 2);
    }

    #[test]
    fn listed_rules_parse() {
        let v: Value = serde_json::from_str(
            r#"{"nftables":[{"metainfo":{}},{"table":{"family":"inet","name":"spinbox","handle":1}},
            {"rule":{"family":"inet","table":"spinbox","chain":"output","handle":7,"comment":"spinbox:a","expr":[]}},
            {"rule":{"family":"inet","table":"spinbox","chain":"output","handle":8,"expr":[]}}]}"#,
        )
        .unwrap();
        let r = parse_rules(&v);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].handle, 7);
        assert_eq!(r[0].comment, "spinbox:a");
        assert_eq!(r[1].comment, "");
    }

    #[test]
    fn published_ports_come_from_the_dnat_rules() {
        // As nft 1.0.6 lists what container_rules adds (plus a masquerade rule, no port).
        let v: Value = serde_json::from_str(
            r#"{"nftables":[{"metainfo":{}},
            {"rule":{"family":"inet","table":"spinbox","chain":"prerouting","handle":2,"comment":"spinbox:a","expr":[
              {"match":{"op":"==","left":{"fib":{"result":"type","flags":["daddr"]}},"right":"local"}},
              {"match":{"op":"==","left":{"payload":{"protocol":"tcp","field":"dport"}},"right":18080}},
              {"dnat":{"family":"ip","addr":"10.87.250.5","port":80}}]}},
            {"rule":{"family":"inet","table":"spinbox","chain":"output","handle":3,"comment":"spinbox:a","expr":[
              {"match":{"op":"==","left":{"fib":{"result":"type","flags":["daddr"]}},"right":"local"}},
              {"match":{"op":"==","left":{"payload":{"protocol":"tcp","field":"dport"}},"right":18080}},
              {"dnat":{"family":"ip","addr":"10.87.250.5","port":80}}]}},
            {"rule":{"family":"inet","table":"spinbox","chain":"prerouting","handle":4,"comment":"spinbox:b","expr":[
              {"match":{"op":"==","left":{"payload":{"protocol":"udp","field":"dport"}},"right":5353}},
              {"dnat":{"family":"ip","addr":"10.87.250.6","port":53}}]}},
            {"rule":{"family":"inet","table":"spinbox","chain":"postrouting","handle":5,"comment":"spinbox:a","expr":[
              {"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"saddr"}},"right":"10.87.250.5"}},
              {"masquerade":null}]}}]}"#,
        )
        .unwrap();
        let p = published_ports(&v);
        assert_eq!(
            p,
            vec![
                PublishedPort {
                    owner: "a".into(),
                    protocol: Protocol::Tcp,
                    port: 18080
                },
                PublishedPort {
                    owner: "b".into(),
                    protocol: Protocol::Udp,
                    port: 5353
                },
            ]
        );
        assert!(published_ports(&serde_json::json!({})).is_empty());
        // What container_rules makes is what the parser finds (the JSON nft takes and gives).
        let rules = container_rules(
            "c",
            "10.0.0.2".parse().unwrap(),
            None,
            &[PortMapping {
                host_port: 8443,
                container_port: 443,
                protocol: Protocol::Tcp,
            }],
        );
        let listed = json!({"nftables": rules.iter().map(|r| json!({"rule": r["add"]["rule"]})).collect::<Vec<_>>()});
        assert_eq!(
            published_ports(&listed),
            vec![PublishedPort {
                owner: "c".into(),
                protocol: Protocol::Tcp,
                port: 8443
            }]
        );
    }
}
