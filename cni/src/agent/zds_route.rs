//! Which ztunnel connection gets what while several are connected (an upgrade surges a
//! second ztunnel next to the first). Pure: the ZDS server asks, then does the I/O.
//!
//! Connections are ordered by their ztunnel's process start time (read by the agent from
//! `/proc/<pid>/stat` of the SO_PEERCRED pid), then by connection order: after an agent
//! restart both ztunnels reconnect in any order, and the one started last must still be
//! the newest. A process whose start time cannot be read counts as the oldest: it never
//! takes the node from one that can be ordered.

use std::cmp::Ordering;
use std::collections::HashSet;

/// What the routing needs to know about one live connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnView {
    pub id: u64,
    /// The ztunnel process's start time (clock ticks since boot), when known.
    pub started: Option<u64>,
    /// Its snapshot was sent and acked; before that it only queues what happens meanwhile.
    pub serving: bool,
    /// Its hello listed `handover.v1`.
    pub handover_capable: bool,
    /// It has been sent a Handover already.
    pub handed_over: bool,
}

impl ConnView {
    fn age_key(&self) -> (u64, u64) {
        (self.started.unwrap_or(0), self.id)
    }
}

/// `a` is an older ztunnel than `b`.
pub fn older(a: &ConnView, b: &ConnView) -> bool {
    a.age_key().cmp(&b.age_key()) == Ordering::Less
}

/// The connections to send a Handover now that `ready` has taken its snapshot: every
/// older one (serving or still receiving its own snapshot) that understands it and has
/// not had one, so snapshots finishing out of order leave no middle one accepting. A
/// ztunnel without the capability (Istio's) never gets one: it keeps today's behaviour,
/// serving until SIGTERM. Nobody is handed over if the new ztunnel's snapshot is not
/// `complete` (an entry refused, or sent as Keep: a pod it has no proxy for would be
/// left with no listener at all), nor by a connection itself handed over or not newer.
pub fn hand_over_on_ready(conns: &[ConnView], ready: u64, complete: bool) -> Vec<u64> {
    let Some(r) = conns.iter().find(|c| c.id == ready) else {
        return Vec::new();
    };
    if !complete || r.handed_over || !r.serving {
        return Vec::new();
    }
    conns
        .iter()
        .filter(|c| older(c, r) && c.handover_capable && !c.handed_over)
        .map(|c| c.id)
        .collect()
}

/// Where a new pod goes: the newest serving connection not handed over. `None` means no
/// ztunnel can take it, and the pod's ADD fails (closed, never unproxied).
pub fn add_target(conns: &[ConnView]) -> Option<u64> {
    conns
        .iter()
        .filter(|c| c.serving && !c.handed_over)
        .max_by_key(|c| c.age_key())
        .map(|c| c.id)
}

/// Connections still receiving their snapshot: they are sent every Add and Del made
/// meanwhile, queued behind the snapshot (Istio's order), so nothing made during the
/// snapshot window is missing when they take over.
pub fn queue_targets(conns: &[ConnView]) -> Vec<u64> {
    conns.iter().filter(|c| !c.serving).map(|c| c.id).collect()
}

/// Connected ztunnels as (serving, handed over), for `mesh_cni_ztunnel_connections`.
/// Connections still receiving their snapshot are not counted yet.
pub fn census(conns: &[ConnView]) -> (u64, u64) {
    let serving = conns.iter().filter(|c| c.serving);
    let handed = serving.clone().filter(|c| c.handed_over).count() as u64;
    (serving.count() as u64 - handed, handed)
}

/// A process's start time (field 22 of `/proc/<pid>/stat`, clock ticks since boot).
/// The command name (field 2) may hold spaces and parentheses: fields are counted after
/// its last `)`.
pub fn start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // Fields 3.. follow; starttime is field 22, the 20th after the name.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A message sent to one ztunnel, as far as its missing pods are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent<'a> {
    Add(&'a str),
    Keep(&'a str),
    Del(&'a str),
    Other,
}

/// Keeps a connection's missing pods (ones the agent has but it has no proxy for: an Add
/// it refused, or a Keep in its snapshot) up to date after `sent` was answered (`ok`).
/// While any are missing it takes over from nobody; the agent retries their Adds.
pub fn track_missing(missing: &mut HashSet<String>, sent: Sent, ok: bool) {
    match sent {
        Sent::Add(uid) if ok => {
            missing.remove(uid);
        }
        Sent::Add(uid) | Sent::Keep(uid) => {
            missing.insert(uid.to_string());
        }
        Sent::Del(uid) => {
            missing.remove(uid);
        }
        Sent::Other => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: u64, capable: bool, handed_over: bool) -> ConnView {
        ConnView {
            id,
            started: Some(1000 + id),
            serving: true,
            handover_capable: capable,
            handed_over,
        }
    }

    fn started(mut v: ConnView, at: Option<u64>) -> ConnView {
        v.started = at;
        v
    }

    fn pending(mut v: ConnView) -> ConnView {
        v.serving = false;
        v
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
    fn every_older_one_is_handed_over_even_when_snapshots_finish_out_of_order() {
        // 3 finished first; 2 (older, still receiving its snapshot) is handed over too.
        let conns = [
            c(1, true, false),
            pending(c(2, true, false)),
            c(3, true, false),
        ];
        assert_eq!(hand_over_on_ready(&conns, 3, true), vec![1, 2]);
        // When 2 then finishes, it hands over nobody: it was handed over itself.
        let conns = [c(1, true, true), c(2, true, true), c(3, true, false)];
        assert!(hand_over_on_ready(&conns, 2, true).is_empty());
    }

    #[test]
    fn process_start_time_orders_connections_not_their_order() {
        // After an agent restart the new ztunnel (started 2000) reconnected first (id 1),
        // the old one (started 1000) second (id 2): the old one never takes the node.
        let new = started(c(1, true, false), Some(2000));
        let old = started(c(2, true, false), Some(1000));
        assert!(hand_over_on_ready(&[new, old], 2, true).is_empty());
        assert_eq!(hand_over_on_ready(&[new, old], 1, true), vec![2]);
        assert_eq!(add_target(&[new, old]), Some(1));
        // Same start time (two connections of one process): connection order decides.
        let (a, b) = (
            started(c(1, true, false), Some(5)),
            started(c(2, true, false), Some(5)),
        );
        assert_eq!(add_target(&[a, b]), Some(2));
        // Unknown start time counts as the oldest.
        let unknown = started(c(9, true, false), None);
        assert_eq!(add_target(&[new, unknown]), Some(1));
        assert!(hand_over_on_ready(&[new, unknown], 9, true).is_empty());
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
    fn adds_go_to_the_newest_serving_connection_not_handed_over() {
        assert_eq!(add_target(&[c(1, true, false), c(2, true, false)]), Some(2));
        assert_eq!(add_target(&[c(1, true, false), c(2, true, true)]), Some(1));
        assert_eq!(add_target(&[c(1, true, true), c(2, false, false)]), Some(2));
        // Still receiving its snapshot: the older one takes it; the new one queues it.
        let conns = [c(1, true, false), pending(c(2, true, false))];
        assert_eq!(add_target(&conns), Some(1));
        assert_eq!(queue_targets(&conns), vec![2]);
        // Only handed-over ztunnels (the new one went away): fail closed.
        assert_eq!(add_target(&[c(1, true, true)]), None);
        assert_eq!(add_target(&[]), None);
    }

    #[test]
    fn census_counts_serving_connections_by_state() {
        assert_eq!(census(&[]), (0, 0));
        assert_eq!(census(&[c(1, true, true), c(2, true, false)]), (1, 1));
        assert_eq!(census(&[c(1, false, false), c(2, true, false)]), (2, 0));
        assert_eq!(
            census(&[c(1, true, false), pending(c(2, true, false))]),
            (1, 0)
        );
    }

    #[test]
    fn the_start_time_is_field_22_of_proc_stat() {
        let stat = "4242 (zt (new) x) S 1 4242 4242 0 -1 4194560 1200 0 0 0 5 3 0 0 20 0 4 0 \
                    987654 123456789 2000 18446744073709551615";
        assert_eq!(start_time(stat), Some(987654));
        assert_eq!(start_time("4242 (zt) S 1"), None);
        assert_eq!(start_time("garbage"), None);
    }

    #[test]
    fn refused_adds_and_keeps_are_missing_until_an_add_is_acked_or_the_pod_deleted() {
        let mut m = HashSet::new();
        track_missing(&mut m, Sent::Add("a"), true);
        assert!(m.is_empty());
        track_missing(&mut m, Sent::Add("a"), false);
        track_missing(&mut m, Sent::Keep("b"), true);
        track_missing(&mut m, Sent::Other, true);
        assert_eq!(m.len(), 2);
        track_missing(&mut m, Sent::Add("a"), true);
        track_missing(&mut m, Sent::Del("b"), true);
        assert!(m.is_empty());
    }
}
