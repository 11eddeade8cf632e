//! The fail-closed guard in an enrolled pod's network namespace: a table of its own,
//! apart from the capture tables, that refuses new TCP connections the capture rules
//! should have sent through ztunnel.
//!
//! - Output: any new TCP connection leaving the pod except ztunnel's (socket mark 0x539)
//!   is refused. With the capture rules in place it never matches (captured connections
//!   are redirected to ztunnel, a local address).
//! - Input (unless the pod bypasses inbound capture): a new TCP connection is accepted
//!   only to ztunnel's ports (what the capture rules redirect to, and HBONE), over
//!   loopback (ztunnel's spoofed connections to the app) or from the kubelet's probe
//!   address; any other is refused, so a plaintext client cannot reach the app around
//!   ztunnel's inbound authorization.
//!
//! If the capture rules are removed or changed behind the agent's back, the pod's new
//! connections are refused instead of going around ztunnel. Connections established
//! before enrolment keep going, as with Istio. Invalid segments (say out of window) are
//! dropped, not answered with a reset that could kill a live connection.

use crate::rules::{MARK_MASK, PROBE_SNAT_V4, PROBE_SNAT_V6, ZTUNNEL_MARK, ZTUNNEL_PORTS};

pub const TABLE: &str = "ambient-guard";

/// The guard table, replaced as a whole (idempotent, one transaction).
pub fn table(bypass_inbound: bool) -> String {
    format!(
        "add table inet {TABLE}\ndelete table inet {TABLE}\n{}",
        definition(bypass_inbound)
    )
}

/// The table itself, without the replacement preamble.
pub fn definition(bypass_inbound: bool) -> String {
    let mut s = format!(
        "table inet {TABLE} {{\n  chain output {{\n    type filter hook output priority filter; policy accept;\n    \
         fib daddr type local accept\n    \
         ct state established,related accept\n    \
         meta mark & {MARK_MASK:#x} == {ZTUNNEL_MARK:#x} accept\n    \
         ct state invalid drop\n    \
         meta l4proto tcp reject with tcp reset\n  }}\n"
    );
    if !bypass_inbound {
        let ports = ZTUNNEL_PORTS.map(|p| p.to_string()).join(", ");
        s.push_str(&format!(
            "  chain input {{\n    type filter hook input priority filter; policy accept;\n    \
             ct state established,related accept\n    \
             iifname \"lo\" accept\n    \
             tcp dport {{ {ports} }} accept\n    \
             ip saddr {PROBE_SNAT_V4} accept\n    \
             ip6 saddr {PROBE_SNAT_V6} accept\n    \
             ct state invalid drop\n    \
             meta l4proto tcp reject with tcp reset\n  }}\n"
        ));
    }
    s.push_str("}\n");
    s
}

/// Removes the guard (idempotent).
pub fn removal() -> String {
    format!("add table inet {TABLE}\ndelete table inet {TABLE}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(t: &str, name: &str) -> Vec<String> {
        let start = format!("chain {name} {{");
        t.lines()
            .map(str::trim)
            .skip_while(|l| *l != start)
            .skip(1)
            .take_while(|l| *l != "}")
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn guard_lets_ztunnel_and_loopback_through_and_refuses_other_new_tcp() {
        let out = chain(&table(false), "output");
        let i = |needle: &str| out.iter().position(|l| l.starts_with(needle)).unwrap();
        // Order matters: the refusal comes last, invalid segments are dropped before it.
        assert_eq!(i("meta l4proto tcp reject"), out.len() - 1);
        assert!(i("fib daddr type local accept") < i("meta l4proto tcp reject"));
        assert!(i("ct state established,related accept") < i("meta l4proto tcp reject"));
        assert!(i("meta mark & 0xfff == 0x539 accept") < i("meta l4proto tcp reject"));
        assert_eq!(i("ct state invalid drop") + 1, i("meta l4proto tcp reject"));
        assert!(out[0].contains("hook output priority filter; policy accept;"));
        assert!(removal().ends_with("delete table inet ambient-guard\n"));
    }

    #[test]
    fn inbound_is_refused_except_to_ztunnel_loopback_and_probes() {
        let inp = chain(&table(false), "input");
        assert_eq!(
            inp,
            [
                "type filter hook input priority filter; policy accept;",
                "ct state established,related accept",
                "iifname \"lo\" accept",
                "tcp dport { 15001, 15006, 15008 } accept",
                "ip saddr 169.254.7.127 accept",
                "ip6 saddr fd16:9254:7127:1337:ffff:ffff:ffff:ffff accept",
                "ct state invalid drop",
                "meta l4proto tcp reject with tcp reset",
            ]
        );
        // A pod that bypasses inbound capture gets no inbound guard, the output one stays.
        let bypass = table(true);
        assert!(chain(&bypass, "input").is_empty());
        assert!(!bypass.contains("hook input"));
        assert_eq!(chain(&bypass, "output"), chain(&table(false), "output"));
    }
}
