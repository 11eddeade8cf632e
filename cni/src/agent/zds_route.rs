//! Which ztunnel connection gets what while several are connected (an upgrade surges a
//! second ztunnel next to the first). Pure: the ZDS server asks, then does the I/O.
//!
//! Connection ids grow with connection order, so a lower id is an older ztunnel.

/// What the routing needs to know about one live connection (snapshot sent and acked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnView {
    pub id: u64,
    /// Its hello listed `handover.v1`.
    pub handover_capable: bool,
    /// It has been sent a Handover already.
    pub handed_over: bool,
}

/// The connections to send a Handover now that `ready` has taken its snapshot: every
/// older one that understands it and has not had one. A ztunnel without the capability
/// (Istio's) never gets one: it keeps today's behaviour, serving until SIGTERM. If the
/// new ztunnel refused part of its snapshot (`complete` false), nobody is handed over: a
/// pod it could not start a proxy for would be left with no listener at all.
pub fn hand_over_on_ready(conns: &[ConnView], ready: u64, complete: bool) -> Vec<u64> {
    if !complete {
        return Vec::new();
    }
    conns
        .iter()
        .filter(|c| c.id < ready && c.handover_capable && !c.handed_over)
        .map(|c| c.id)
        .collect()
}

/// Where a new pod goes: the newest connection not handed over. `None` means no ztunnel
/// can take it, and the pod's ADD fails (closed, never unproxied).
pub fn add_target(conns: &[ConnView]) -> Option<u64> {
    conns.iter().filter(|c| !c.handed_over).map(|c| c.id).max()
}

/// Connected ztunnels as (serving, handed over), for `mesh_cni_ztunnel_connections`.
pub fn census(conns: &[ConnView]) -> (u64, u64) {
    let handed = conns.iter().filter(|c| c.handed_over).count() as u64;
    (conns.len() as u64 - handed, handed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: u64, capable: bool, handed_over: bool) -> ConnView {
        ConnView {
            id,
            handover_capable: capable,
            handed_over,
        }
    }

    #[test]
    fn a_new_ztunnel_takes_over_from_older_capable_ones_once() {
        let conns = [c(1, true, false), c(2, true, false)];
        assert_eq!(hand_over_on_ready(&conns, 2, true), vec![1]);
        // Already handed over: not again.
        let conns = [c(1, true, true), c(2, true, false), c(3, true, false)];
        assert_eq!(hand_over_on_ready(&conns, 3, true), vec![2]);
        // The ready connection itself and newer ones are left alone.
        let conns = [c(1, true, false), c(2, true, false)];
        assert!(hand_over_on_ready(&conns, 1, true).is_empty());
    }

    #[test]
    fn no_handover_when_the_new_ztunnel_refused_part_of_its_snapshot() {
        let conns = [c(1, true, false), c(2, true, false)];
        assert!(hand_over_on_ready(&conns, 2, false).is_empty());
    }

    #[test]
    fn a_ztunnel_without_the_capability_never_gets_a_handover() {
        let conns = [c(1, false, false), c(2, true, false)];
        assert!(hand_over_on_ready(&conns, 2, true).is_empty());
        let conns = [c(1, false, false), c(2, true, false), c(3, false, false)];
        assert_eq!(hand_over_on_ready(&conns, 3, true), vec![2]);
    }

    #[test]
    fn adds_go_to_the_newest_connection_not_handed_over() {
        assert_eq!(add_target(&[c(1, true, false), c(2, true, false)]), Some(2));
        assert_eq!(add_target(&[c(1, true, false), c(2, true, true)]), Some(1));
        assert_eq!(add_target(&[c(1, true, true), c(2, false, false)]), Some(2));
        // Only handed-over ztunnels (the new one went away): fail closed.
        assert_eq!(add_target(&[c(1, true, true)]), None);
        assert_eq!(add_target(&[]), None);
    }

    #[test]
    fn census_counts_by_state() {
        assert_eq!(census(&[]), (0, 0));
        assert_eq!(census(&[c(1, true, true), c(2, true, false)]), (1, 1));
        assert_eq!(census(&[c(1, false, false), c(2, true, false)]), (2, 0));
    }
}
