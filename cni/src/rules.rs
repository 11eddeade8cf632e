//! The redirection rules inside an enrolled pod's network namespace, as one nftables
//! script applied in a single transaction (`nft -f`), and the policy routing that lets
//! ztunnel answer as the original source.
//!
//! Semantics follow Istio's in-pod mode:
//! - outbound TCP (not to localhost, not from ztunnel's own marked sockets) → 15001;
//! - inbound TCP other than 15008 → 15006;
//! - kubelet probes from 169.254.7.127 pass untouched;
//! - connections ztunnel makes to the app with a spoofed source get conn mark 0x111, and
//!   the app's replies carry it back, hit table 100 and are delivered locally to ztunnel.

use std::fmt::Write;

pub const ZTUNNEL_MARK: u32 = 0x539;
pub const CONN_MARK: u32 = 0x111;
pub const MARK_MASK: u32 = 0xfff;
pub const ROUTE_TABLE: u32 = 100;
pub const RULE_PRIORITY: u32 = 32764;
pub const PROBE_SNAT_V4: &str = "169.254.7.127";
pub const PROBE_SNAT_V6: &str = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff";
/// ztunnel's listeners in the pod: outbound capture, inbound plaintext capture, HBONE.
pub const ZTUNNEL_PORTS: [u16; 3] = [15001, 15006, 15008];

/// Tables we own in a pod netns (deleted and re-created as a whole).
pub const TABLES: [&str; 2] = ["ambient-nat", "ambient-mangle"];

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodRuleOptions {
    /// Also capture DNS (UDP/TCP 53) to ztunnel's 15053.
    pub dns_capture: bool,
    /// Capture outbound only (`ambient.istio.io/bypass-inbound-capture`).
    pub bypass_inbound: bool,
    /// Interfaces whose inbound traffic is treated as outbound (virtual interfaces).
    pub reroute_interfaces: Vec<String>,
}

/// The complete nftables script: removes our tables if present and re-creates them, so
/// applying it is idempotent and atomic.
pub fn pod_ruleset(opts: &PodRuleOptions) -> String {
    let mut s = String::new();
    let m = format!("meta mark & {MARK_MASK:#x}");
    // `add` then `delete` makes the delete succeed whether or not the table existed.
    for t in TABLES {
        let _ = writeln!(s, "add table inet {t}");
        let _ = writeln!(s, "delete table inet {t}");
    }
    let _ = writeln!(s, "table inet ambient-mangle {{");
    let _ = writeln!(s, "  chain prerouting {{");
    let _ = writeln!(
        s,
        "    type filter hook prerouting priority mangle; policy accept;"
    );
    let _ = writeln!(
        s,
        "    {m} == {ZTUNNEL_MARK:#x} ct mark set ct mark & 0xfffff000 | {CONN_MARK:#x}"
    );
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "  chain output {{");
    let _ = writeln!(
        s,
        "    type route hook output priority mangle; policy accept;"
    );
    let _ = writeln!(
        s,
        "    ct mark & {MARK_MASK:#x} == {CONN_MARK:#x} meta mark set ct mark"
    );
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "}}");

    let _ = writeln!(s, "table inet ambient-nat {{");
    let _ = writeln!(s, "  chain prerouting {{");
    let _ = writeln!(
        s,
        "    type nat hook prerouting priority dstnat; policy accept;"
    );
    for iface in &opts.reroute_interfaces {
        let _ = writeln!(
            s,
            "    iifname \"{iface}\" meta l4proto tcp redirect to :15001"
        );
    }
    if !opts.bypass_inbound {
        let _ = writeln!(s, "    ip saddr {PROBE_SNAT_V4} meta l4proto tcp accept");
        let _ = writeln!(s, "    ip6 saddr {PROBE_SNAT_V6} meta l4proto tcp accept");
        let _ = writeln!(
            s,
            "    meta l4proto tcp ip daddr != 127.0.0.1 tcp dport != 15008 {m} != {ZTUNNEL_MARK:#x} redirect to :15006"
        );
        let _ = writeln!(
            s,
            "    meta l4proto tcp ip6 daddr != ::1 tcp dport != 15008 {m} != {ZTUNNEL_MARK:#x} redirect to :15006"
        );
    }
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "  chain output {{");
    let _ = writeln!(s, "    type nat hook output priority -100; policy accept;");
    let _ = writeln!(s, "    ip daddr {PROBE_SNAT_V4} meta l4proto tcp accept");
    let _ = writeln!(s, "    ip6 daddr {PROBE_SNAT_V6} meta l4proto tcp accept");
    if opts.dns_capture {
        let _ = writeln!(
            s,
            "    oifname != \"lo\" udp dport 53 {m} != {ZTUNNEL_MARK:#x} redirect to :15053"
        );
        let _ = writeln!(
            s,
            "    ip daddr != 127.0.0.1 tcp dport 53 {m} != {ZTUNNEL_MARK:#x} redirect to :15053"
        );
        let _ = writeln!(
            s,
            "    ip6 daddr != ::1 tcp dport 53 {m} != {ZTUNNEL_MARK:#x} redirect to :15053"
        );
    }
    let _ = writeln!(s, "    meta l4proto tcp {m} == {CONN_MARK:#x} accept");
    let _ = writeln!(s, "    oifname \"lo\" ip daddr != 127.0.0.1 accept");
    let _ = writeln!(s, "    oifname \"lo\" ip6 daddr != ::1 accept");
    let _ = writeln!(
        s,
        "    meta l4proto tcp ip daddr != 127.0.0.1 {m} != {ZTUNNEL_MARK:#x} redirect to :15001"
    );
    let _ = writeln!(
        s,
        "    meta l4proto tcp ip6 daddr != ::1 {m} != {ZTUNNEL_MARK:#x} redirect to :15001"
    );
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "}}");
    s
}

/// Removes our tables (idempotent).
pub fn pod_ruleset_removal() -> String {
    let mut s = String::new();
    for t in TABLES {
        let _ = writeln!(s, "add table inet {t}");
        let _ = writeln!(s, "delete table inet {t}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_ruleset_has_the_capture_rules() {
        let r = pod_ruleset(&PodRuleOptions::default());
        assert!(r.contains("redirect to :15001"));
        assert!(r.contains("tcp dport != 15008 meta mark & 0xfff != 0x539 redirect to :15006"));
        assert!(r.contains("ip saddr 169.254.7.127 meta l4proto tcp accept"));
        assert!(r.contains("ct mark set ct mark & 0xfffff000 | 0x111"));
        assert!(r.contains("type route hook output"));
        assert!(
            !r.contains("15053"),
            "DNS capture is off unless the options ask for it"
        );
    }

    #[test]
    fn options_change_the_ruleset() {
        let r = pod_ruleset(&PodRuleOptions {
            dns_capture: true,
            bypass_inbound: true,
            reroute_interfaces: vec!["eth1".into()],
        });
        assert!(r.contains("redirect to :15053"));
        assert!(!r.contains("redirect to :15006"));
        assert!(r.contains("iifname \"eth1\" meta l4proto tcp redirect to :15001"));
    }
}
