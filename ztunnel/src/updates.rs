//! Notification of state changes: whoever applies an update (xDS, the local file) calls
//! [`StateChanged::notify`], and the data path waits for what it needs (a pod's own
//! workload, on its first connection) by being woken, never by polling.

use crate::state::State;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::watch;

#[derive(Clone, Debug)]
pub struct StateChanged(Arc<watch::Sender<u64>>);

impl Default for StateChanged {
    fn default() -> Self {
        StateChanged(Arc::new(watch::Sender::new(0)))
    }
}

impl StateChanged {
    pub fn new() -> Self {
        Self::default()
    }

    /// The state was updated: wakes every waiter to look again.
    pub fn notify(&self) {
        self.0.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// The current version (bumped by every [`StateChanged::notify`]).
    pub fn version(&self) -> u64 {
        *self.0.borrow()
    }

    /// A receiver that sees every later version.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }

    /// `find` on the state, now or after the next updates, for at most `timeout`.
    pub async fn wait_for<T>(
        &self,
        state: &RwLock<State>,
        timeout: Duration,
        find: impl Fn(&State) -> Option<T>,
    ) -> Option<T> {
        // Subscribed before looking, so an update between the look and the wait is seen.
        let mut changes = self.0.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(found) = find(&state.read().expect("state lock")) {
                return Some(found);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                _ => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Workload;
    use tokio::time::Instant;

    fn workload(name: &str) -> Workload {
        let w = mesh_proto::workload::Workload {
            uid: format!("c//Pod/ns/{name}"),
            name: name.into(),
            namespace: "ns".into(),
            addresses: vec![vec![10, 0, 0, 1]],
            ..Default::default()
        };
        Workload::from_proto(&w).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_wakes_when_the_workload_arrives_not_on_a_poll_tick() {
        let state = Arc::new(RwLock::new(State::default()));
        let changed = StateChanged::new();
        let start = Instant::now();
        let waiter = {
            let (state, changed) = (state.clone(), changed.clone());
            tokio::spawn(async move {
                let w = changed
                    .wait_for(&state, Duration::from_secs(5), |st| {
                        st.workload_by_pod("ns", "p").cloned()
                    })
                    .await;
                (w, start.elapsed())
            })
        };
        // Unrelated updates wake it, and it goes back to waiting.
        tokio::time::sleep(Duration::from_millis(300)).await;
        state.write().unwrap().insert_workload(workload("other"));
        changed.notify();
        // Its own workload arrives at an instant no poll period would land on.
        tokio::time::sleep(Duration::from_millis(733)).await;
        state.write().unwrap().insert_workload(workload("p"));
        changed.notify();
        let (w, at) = waiter.await.unwrap();
        assert_eq!(w.unwrap().name, "p");
        assert_eq!(at, Duration::from_millis(1033));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gives_up_at_its_timeout() {
        let state = RwLock::new(State::default());
        let changed = StateChanged::new();
        let start = Instant::now();
        let w = changed
            .wait_for(&state, Duration::from_secs(5), |st| {
                st.workload_by_pod("ns", "p").cloned()
            })
            .await;
        assert!(w.is_none());
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }
}
