//! Programs (and removes) a pod's redirection: the nftables ruleset in one transaction
//! (`nft -f`, atomic and idempotent) and the policy route for ztunnel's spoofed
//! connections. Also the node-side SNAT of kubelet probes to enrolled pods.

use super::netns::Netns;
use crate::rules::{self, PodRuleOptions};

const RULE_ARGS: [&str; 7] = [
    "fwmark",
    "0x111/0xfff",
    "pref",
    "32764",
    "lookup",
    "100",
    "",
];

fn rule_args() -> Vec<&'static str> {
    RULE_ARGS
        .iter()
        .copied()
        .filter(|a| !a.is_empty())
        .collect()
}

pub fn apply(ns: &Netns, opts: &PodRuleOptions) -> Result<(), String> {
    ns.run(&["nft", "-f", "-"], Some(&rules::pod_ruleset(opts)))?;
    // Added only when missing, never deleted and re-added: in between, the app's replies
    // on ztunnel's spoofed connections would be routed out of the pod (and reset), as
    // when a restarted agent re-programs a running pod.
    if !ns
        .run(&["ip", "rule", "show"], None)?
        .contains("fwmark 0x111/0xfff lookup 100")
    {
        let mut add = vec!["ip", "rule", "add"];
        add.extend(rule_args());
        ns.run(&add, None)?;
    }
    ns.run(
        &[
            "ip",
            "route",
            "replace",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            "100",
        ],
        None,
    )?;
    Ok(())
}

pub fn remove(ns: &Netns) -> Result<(), String> {
    ns.run(&["nft", "-f", "-"], Some(&rules::pod_ruleset_removal()))?;
    let mut del = vec!["ip", "rule", "del"];
    del.extend(rule_args());
    let _ = ns.run(&del, None);
    let _ = ns.run(&["ip", "route", "flush", "table", "100"], None);
    Ok(())
}

/// Tables present in the namespace, read back as JSON (`nft -j list tables`).
pub fn tables(ns: &Netns) -> Result<Vec<String>, String> {
    let out = ns.run(&["nft", "-j", "list", "tables"], None)?;
    parse_tables_json(&out)
}

/// Parses `nft -j list tables`: `{"nftables": [{"metainfo": ...}, {"table": {"family",
/// "name", "handle"}}...]}` (the JSON schema of nftables 0.9.3 and later).
pub fn parse_tables_json(out: &str) -> Result<Vec<String>, String> {
    let v: serde_json::Value =
        serde_json::from_str(out).map_err(|e| format!("unexpected `nft -j` output: {e}"))?;
    let items = v["nftables"]
        .as_array()
        .ok_or("`nft -j` output has no nftables array")?;
    Ok(items
        .iter()
        .filter_map(|i| {
            let t = i.get("table")?;
            Some(format!("{} {}", t["family"].as_str()?, t["name"].as_str()?))
        })
        .collect())
}

/// Is the pod's redirection in place?
pub fn verify(ns: &Netns) -> Result<(), String> {
    let t = tables(ns)?;
    for want in rules::TABLES {
        if !t.iter().any(|x| x == &format!("inet {want}")) {
            return Err(format!("table inet {want} is missing in {}", ns.path));
        }
    }
    let r = ns.run(&["ip", "rule", "show"], None)?;
    if !r.contains("fwmark 0x111/0xfff lookup 100") {
        return Err(format!("the fwmark 0x111 rule is missing in {}", ns.path));
    }
    Ok(())
}

/// The node-side table that SNATs locally generated probes to enrolled pods.
pub fn host_probe_table() -> String {
    format!(
        "add table ip ambient-host\ndelete table ip ambient-host\n\
         table ip ambient-host {{\n  set probes {{ type ipv4_addr; }}\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    meta l4proto tcp ip daddr @probes meta skuid >= 0 snat to {}\n  }}\n}}\n",
        rules::PROBE_SNAT_V4
    )
}

pub fn host_probe_set(ips: &[String]) -> String {
    let v4: Vec<&String> = ips.iter().filter(|i| !i.contains(':')).collect();
    let mut s = String::from("flush set ip ambient-host probes\n");
    if !v4.is_empty() {
        s.push_str(&format!(
            "add element ip ambient-host probes {{ {} }}\n",
            v4.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nft_json_tables() {
        let out = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "inet", "name": "ambient-nat", "handle": 1}}, {"table": {"family": "inet", "name": "ambient-mangle", "handle": 2}}]}"#;
        assert_eq!(
            parse_tables_json(out).unwrap(),
            vec!["inet ambient-nat", "inet ambient-mangle"]
        );
        assert!(parse_tables_json("{}").is_err());
        assert!(parse_tables_json("x").is_err());
    }

    #[test]
    fn probe_set_contents() {
        assert!(host_probe_set(&[]).starts_with("flush set"));
        let s = host_probe_set(&["10.0.0.1".into(), "fd00::1".into(), "10.0.0.2".into()]);
        assert!(s.contains("{ 10.0.0.1, 10.0.0.2 }"));
    }
}
