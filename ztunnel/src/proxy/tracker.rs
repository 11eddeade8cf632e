//! Open inbound connections, so a policy change closes those it no longer allows.
//!
//! The re-check runs in its own task, woken by the state's version channel
//! ([`StateChanged`]) after an update is applied, never under the state's write lock. It
//! holds the state's read lock while it runs, so a following update still waits for it.

use crate::rbac::{ConnectionInfo, Decision};
use crate::state::State;
use crate::updates::StateChanged;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
pub struct ConnTracker {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Tracked>>,
}

struct Tracked {
    dst_uid: String,
    info: ConnectionInfo,
    close: CancellationToken,
}

/// One tracked connection; dropping it stops tracking.
pub struct TrackedHandle {
    tracker: Arc<ConnTracker>,
    id: u64,
    /// Cancelled when policy no longer allows the connection.
    pub closed_by_policy: CancellationToken,
}

impl Drop for TrackedHandle {
    fn drop(&mut self) {
        self.tracker
            .conns
            .lock()
            .expect("tracker lock")
            .remove(&self.id);
    }
}

/// Why an open connection to `dst_uid` with `info` must close under `state`, if it must.
/// A destination gone from the state is left alone (its pod going away ends it).
fn denial(state: &State, dst_uid: &str, info: &ConnectionInfo) -> Option<(String, String)> {
    let dst = state.workload(dst_uid)?;
    match state.authorize(dst, info) {
        Decision::Allow => None,
        Decision::Deny { policy, reason } => Some((policy.unwrap_or_default(), reason)),
    }
}

impl ConnTracker {
    /// Tracks a connection allowed on the state of version `authorized_at`. If the state
    /// changed since, the re-check of that change may have run before this connection was
    /// tracked: it is re-checked here, so no update is missed.
    pub fn track(
        self: &Arc<Self>,
        dst_uid: &str,
        info: ConnectionInfo,
        authorized_at: u64,
        changed: &StateChanged,
        state: &RwLock<State>,
    ) -> TrackedHandle {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let close = CancellationToken::new();
        let tracked = Tracked {
            dst_uid: dst_uid.to_string(),
            info,
            close: close.clone(),
        };
        // Inserted first, version read after: either the version still reads
        // `authorized_at` (so the re-check of any later update runs after this insert and
        // sees the connection), or it moved and the connection is re-checked here. Reading
        // the version first would leave a gap where an update's re-check misses it.
        self.conns.lock().expect("tracker lock").insert(id, tracked);
        if changed.version() != authorized_at {
            // Lock order as in `recheck`: state, then connections.
            let st = state.read().expect("state lock");
            if let Some(t) = self.conns.lock().expect("tracker lock").get(&id) {
                close_if_denied(&st, t);
            }
        }
        TrackedHandle {
            tracker: self.clone(),
            id,
            closed_by_policy: close,
        }
    }

    /// Re-evaluates every open inbound connection; closes the ones now denied.
    pub fn recheck(&self, state: &State) -> usize {
        let conns = self.conns.lock().expect("tracker lock");
        conns.values().filter(|t| close_if_denied(state, t)).count()
    }

    /// Re-checks after every state version `changes` reports, until the sender is gone.
    /// Versions that arrive while a re-check runs are folded into the next one.
    pub async fn recheck_on_change(
        self: Arc<Self>,
        state: Arc<RwLock<State>>,
        mut changes: watch::Receiver<u64>,
    ) {
        while changes.changed().await.is_ok() {
            changes.borrow_and_update();
            let closed = self.recheck(&state.read().expect("state lock"));
            if closed > 0 {
                tracing::info!(closed, "policy update closed open connections");
            }
        }
    }

    pub fn len(&self) -> usize {
        self.conns.lock().expect("tracker lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Closes `t` if `state` denies it now; whether this call closed it.
fn close_if_denied(state: &State, t: &Tracked) -> bool {
    if t.close.is_cancelled() {
        return false;
    }
    let Some((policy, reason)) = denial(state, &t.dst_uid, &t.info) else {
        return false;
    };
    let (src_ip, dst_port) = (t.info.src_ip, t.info.dst_port);
    tracing::info!(target: "access", direction = "inbound", src.addr = %src_ip, dst.port = dst_port,
        policy = %policy, reason = %reason,
        "closing open connection no longer allowed by policy");
    t.close.cancel();
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::plan::fixtures::{deny_port, wl};
    use std::net::IpAddr;
    use std::time::Duration;

    fn conn(port: u16) -> ConnectionInfo {
        ConnectionInfo {
            src_identity: None,
            src_ip: IpAddr::from([10, 0, 1, 4]),
            dst_ip: IpAddr::from([10, 0, 1, 5]),
            dst_port: port,
        }
    }

    fn node() -> State {
        let mut st = State::default();
        st.insert_workload(wl("b", [10, 0, 1, 5], true, "b"));
        st
    }

    #[test]
    fn recheck_closes_only_what_the_new_policy_denies() {
        let tracker = Arc::new(ConnTracker::default());
        let (changed, state) = (StateChanged::new(), RwLock::new(node()));
        let v = changed.version();
        let denied = tracker.track("b", conn(8080), v, &changed, &state);
        let allowed = tracker.track("b", conn(9090), v, &changed, &state);
        let gone = tracker.track("gone", conn(8080), v, &changed, &state);
        assert_eq!(tracker.recheck(&state.read().unwrap()), 0);
        let mut st = node();
        st.insert_policy(deny_port(8080));
        assert_eq!(tracker.recheck(&st), 1);
        assert!(denied.closed_by_policy.is_cancelled());
        assert!(!allowed.closed_by_policy.is_cancelled());
        // A destination no longer in the state is left to its pod's end.
        assert!(!gone.closed_by_policy.is_cancelled());
        // Closed once: a later re-check does not count it again.
        assert_eq!(tracker.recheck(&st), 0);
        assert_eq!(tracker.len(), 3);
        drop((denied, allowed, gone));
        assert!(tracker.is_empty());
    }

    /// A connection allowed on an older state is re-checked as it is tracked: the
    /// re-check of the newer state may have run before it was tracked.
    #[test]
    fn a_connection_planned_on_an_older_state_is_rechecked_when_tracked() {
        let tracker = Arc::new(ConnTracker::default());
        let changed = StateChanged::new();
        let planned_at = changed.version();
        let mut st = node();
        st.insert_policy(deny_port(8080));
        let state = RwLock::new(st);
        // Planned on this version: the state is not looked at again here.
        let current = tracker.track("b", conn(8080), planned_at, &changed, &state);
        assert!(!current.closed_by_policy.is_cancelled());
        changed.notify();
        let stale = tracker.track("b", conn(8080), planned_at, &changed, &state);
        assert!(stale.closed_by_policy.is_cancelled());
        let other_port = tracker.track("b", conn(9090), planned_at, &changed, &state);
        assert!(!other_port.closed_by_policy.is_cancelled());
    }

    /// The re-check runs on the version channel, after the writer has released the lock.
    #[tokio::test]
    async fn a_policy_update_closes_open_connections_through_the_version_channel() {
        let tracker = Arc::new(ConnTracker::default());
        let state = Arc::new(RwLock::new(node()));
        let changed = StateChanged::new();
        let task = tokio::spawn(
            tracker
                .clone()
                .recheck_on_change(state.clone(), changed.subscribe()),
        );
        let v = changed.version();
        let open = tracker.track("b", conn(8080), v, &changed, &state);
        state.write().unwrap().insert_policy(deny_port(8080));
        changed.notify();
        tokio::time::timeout(Duration::from_secs(30), open.closed_by_policy.cancelled())
            .await
            .expect("the re-check closed the connection");
        task.abort();
    }
}
