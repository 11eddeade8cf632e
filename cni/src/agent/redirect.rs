//! Programs (and removes) a pod's redirection: the nftables ruleset in one transaction
//! (`nft -f`, atomic and idempotent) and the policy route for ztunnel's spoofed
//! connections. Also the node-side SNAT of kubelet probes to enrolled pods.

use super::netns::Netns;
use crate::rules;

/// An address family of the pod's policy routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    pub fn flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }

    fn any(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        }
    }
}

/// `ip rule <verb>` of the rule that sends replies of ztunnel's spoofed connections
/// (conn mark 0x111) to table 100.
pub fn rule_command(family: Family, verb: &'static str) -> Vec<&'static str> {
    vec![
        "ip",
        family.flag(),
        "rule",
        verb,
        "fwmark",
        "0x111/0xfff",
        "pref",
        "32764",
        "lookup",
        "100",
    ]
}

/// Table 100: everything is local (delivered to ztunnel's transparent socket).
pub fn local_route_command(family: Family) -> Vec<&'static str> {
    vec![
        "ip",
        family.flag(),
        "route",
        "replace",
        "local",
        family.any(),
        "dev",
        "lo",
        "table",
        "100",
    ]
}

pub fn flush_command(family: Family) -> Vec<&'static str> {
    vec!["ip", family.flag(), "route", "flush", "table", "100"]
}

/// The families the pod routes: IPv4 always, IPv6 when the pod has a global IPv6
/// address (its IPv6 traffic is redirected to ztunnel like its IPv4, so the replies of
/// ztunnel's spoofed IPv6 connections need the same policy route).
pub fn families(ns: &Netns) -> Vec<Family> {
    let out = ns
        .run(&["ip", "-6", "-o", "addr", "show", "scope", "global"], None)
        .unwrap_or_default();
    if has_global_v6(&out) {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    }
}

/// Whether `ip -6 -o addr show scope global` lists an address.
pub fn has_global_v6(out: &str) -> bool {
    out.lines().any(|l| l.contains(" inet6 "))
}

/// The capture alone, without the guard (the agent programs both with
/// `agent::program`; tests of ztunnel's data path use this).
pub fn apply(ns: &Netns, opts: &rules::PodRuleOptions) -> Result<(), String> {
    ns.run(&["nft", "-f", "-"], Some(&rules::pod_ruleset(opts)))?;
    apply_routes(ns)
}

/// The policy routing of the redirection (the nftables part is applied by the caller,
/// in one transaction with the guard).
pub fn apply_routes(ns: &Netns) -> Result<(), String> {
    for family in families(ns) {
        // Added only when missing, never deleted and re-added: in between, the app's
        // replies on ztunnel's spoofed connections would be routed out of the pod (and
        // reset), as when a restarted agent re-programs a running pod.
        let rules = ns.run(&["ip", family.flag(), "rule", "show"], None)?;
        if !rules.contains("fwmark 0x111/0xfff lookup 100") {
            ns.run(&rule_command(family, "add"), None)?;
        }
        ns.run(&local_route_command(family), None)?;
    }
    Ok(())
}

/// Removes the policy routing (the nftables part is removed by the caller, in one
/// transaction with the guard).
pub fn remove_routes(ns: &Netns) {
    // Both families whatever the pod has now: nothing of ours may stay behind.
    for family in [Family::V4, Family::V6] {
        let _ = ns.run(&rule_command(family, "del"), None);
        let _ = ns.run(&flush_command(family), None);
    }
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

/// The node-side tables that SNAT locally generated probes to enrolled pods, one per
/// family (IPv4 probes from 169.254.7.127, IPv6 from Istio's fd16:9254:7127:1337:...).
pub fn host_probe_table() -> String {
    let mut s = String::new();
    for (family, table, addr_type, daddr, snat) in [
        (
            "ip",
            "ambient-host",
            "ipv4_addr",
            "ip daddr",
            rules::PROBE_SNAT_V4,
        ),
        (
            "ip6",
            "ambient-host6",
            "ipv6_addr",
            "ip6 daddr",
            rules::PROBE_SNAT_V6,
        ),
    ] {
        s.push_str(&format!(
            "add table {family} {table}\ndelete table {family} {table}\n\
             table {family} {table} {{\n  set probes {{ type {addr_type}; }}\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    meta l4proto tcp {daddr} @probes meta skuid >= 0 snat to {snat}\n  }}\n}}\n"
        ));
    }
    s
}

/// The probe sets' contents: each pod IP in the set of its family.
pub fn host_probe_set(ips: &[String]) -> String {
    let mut s = String::new();
    for (family, table, v6) in [
        ("ip", "ambient-host", false),
        ("ip6", "ambient-host6", true),
    ] {
        s.push_str(&format!("flush set {family} {table} probes\n"));
        let of_family: Vec<&str> = ips
            .iter()
            .filter(|i| i.contains(':') == v6)
            .map(String::as_str)
            .collect();
        if !of_family.is_empty() {
            s.push_str(&format!(
                "add element {family} {table} probes {{ {} }}\n",
                of_family.join(", ")
            ));
        }
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
        assert!(!host_probe_set(&[]).contains("add element"));
        let s = host_probe_set(&["10.0.0.1".into(), "fd00::1".into(), "10.0.0.2".into()]);
        assert!(s.contains("add element ip ambient-host probes { 10.0.0.1, 10.0.0.2 }"));
        assert!(s.contains("add element ip6 ambient-host6 probes { fd00::1 }"));
    }

    #[test]
    fn probe_tables_for_both_families() {
        let t = host_probe_table();
        assert!(t.contains("ip daddr @probes meta skuid >= 0 snat to 169.254.7.127"));
        assert!(t.contains(
            "ip6 daddr @probes meta skuid >= 0 snat to fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
        ));
    }

    #[test]
    fn ipv6_only_with_a_global_address() {
        assert!(!has_global_v6(""));
        assert!(has_global_v6(
            "2: eth0    inet6 fd00:10::5/64 scope global nodad \\       valid_lft forever preferred_lft forever\n"
        ));
    }

    #[test]
    fn policy_routing_commands_per_family() {
        assert_eq!(
            rule_command(Family::V6, "add").join(" "),
            "ip -6 rule add fwmark 0x111/0xfff pref 32764 lookup 100"
        );
        assert_eq!(
            local_route_command(Family::V4).join(" "),
            "ip -4 route replace local 0.0.0.0/0 dev lo table 100"
        );
        assert_eq!(
            local_route_command(Family::V6).join(" "),
            "ip -6 route replace local ::/0 dev lo table 100"
        );
        assert_eq!(
            flush_command(Family::V6).join(" "),
            "ip -6 route flush table 100"
        );
    }
}
