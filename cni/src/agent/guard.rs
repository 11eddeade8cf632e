//! The fail-closed guard in an enrolled pod's network namespace: a table of its own,
//! apart from the capture tables, that refuses any new TCP connection leaving the pod
//! except ztunnel's (socket mark 0x539). With the capture rules in place it never
//! matches (captured connections are redirected to ztunnel, a local address: the output
//! interface cannot tell, it is chosen before the redirect); if they are removed or
//! changed behind the agent's back, the pod's new connections are refused instead of
//! leaving the node in plaintext. Connections established before enrolment keep going,
//! as with Istio.

use crate::rules::{MARK_MASK, ZTUNNEL_MARK};

pub const TABLE: &str = "ambient-guard";

/// The guard table, replaced as a whole (idempotent, one transaction).
pub fn table() -> String {
    format!(
        "add table inet {TABLE}\ndelete table inet {TABLE}\n\
         table inet {TABLE} {{\n  chain output {{\n    type filter hook output priority filter; policy accept;\n    \
         fib daddr type local accept\n    \
         ct state established,related accept\n    \
         meta mark & {MARK_MASK:#x} == {ZTUNNEL_MARK:#x} accept\n    \
         meta l4proto tcp reject with tcp reset\n  }}\n}}\n"
    )
}

/// Removes the guard (idempotent).
pub fn removal() -> String {
    format!("add table inet {TABLE}\ndelete table inet {TABLE}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_lets_ztunnel_and_loopback_through_and_refuses_other_new_tcp() {
        let t = table();
        let lines: Vec<&str> = t.lines().map(str::trim).collect();
        let i = |needle: &str| lines.iter().position(|l| l.starts_with(needle)).unwrap();
        // Order matters: the refusal comes last.
        assert!(i("fib daddr type local accept") < i("meta l4proto tcp reject"));
        assert!(i("ct state established,related accept") < i("meta l4proto tcp reject"));
        assert!(i("meta mark & 0xfff == 0x539 accept") < i("meta l4proto tcp reject"));
        assert!(t.contains("hook output priority filter; policy accept;"));
        assert!(removal().ends_with("delete table inet ambient-guard\n"));
    }
}
