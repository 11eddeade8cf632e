//! The requests in flight on one downstream HTTP connection, so that the drain knows
//! whether the connection is busy (finish that request, then close) or idle (a request
//! may be on its way: give it a moment to arrive rather than close under it).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

/// When the drain starts, how long an idle HTTP connection (a new one, or a keep-alive
/// one between requests) is given to send its next request. Closing it at once would
/// lose a request already in transit or partly read, and not every client retries that
/// (Node.js and Python clients do not).
pub const IDLE_GRACE: Duration = Duration::from_secs(2);

/// The idle grace a waypoint with drain deadline `drain_deadline` gives: never longer
/// than the deadline, which would then pass with the connection still open.
pub fn idle_grace(drain_deadline: Duration) -> Duration {
    IDLE_GRACE.min(drain_deadline)
}

/// What the drain does with a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AtDrain {
    /// A request is being served: close once it has been answered (`connection: close`).
    CloseAfterIt,
    /// Nothing is being served: wait (bounded) for the next request, or the end.
    AwaitNextRequest,
}

/// What the drain does with a connection that has `in_flight` requests being served.
pub fn at_drain(in_flight: usize) -> AtDrain {
    if in_flight > 0 {
        AtDrain::CloseAfterIt
    } else {
        AtDrain::AwaitNextRequest
    }
}

/// Requests in flight on one connection, and a signal when one arrives.
#[derive(Debug, Default)]
pub struct InFlight {
    count: AtomicUsize,
    arrived: Notify,
}

/// One request being served; it is done when this is dropped.
#[derive(Debug)]
pub struct Serving(Arc<InFlight>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::SeqCst);
    }
}

impl InFlight {
    /// A request has arrived: counted until the returned guard is dropped.
    pub fn start(self: &Arc<Self>) -> Serving {
        self.count.fetch_add(1, Ordering::SeqCst);
        // Only a drain waiting right now cares; no permit is stored for later (a stored
        // permit would make a connection look busy forever after its first request).
        self.arrived.notify_waiters();
        Serving(self.clone())
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// What the drain does now; with [`AtDrain::AwaitNextRequest`], a future that
    /// completes when the next request arrives (registered before the count is read, so
    /// an arrival in between is not missed).
    pub fn at_drain(
        &self,
    ) -> (
        AtDrain,
        std::pin::Pin<Box<tokio::sync::futures::Notified<'_>>>,
    ) {
        let mut arrived = Box::pin(self.arrived.notified());
        arrived.as_mut().enable();
        (at_drain(self.count()), arrived)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[test]
    fn a_busy_connection_closes_after_its_request_an_idle_one_waits() {
        assert_eq!(at_drain(1), AtDrain::CloseAfterIt);
        assert_eq!(at_drain(3), AtDrain::CloseAfterIt);
        assert_eq!(at_drain(0), AtDrain::AwaitNextRequest);
    }

    #[test]
    fn the_grace_never_outlasts_the_drain_deadline() {
        assert_eq!(idle_grace(Duration::from_secs(20)), IDLE_GRACE);
        assert_eq!(
            idle_grace(Duration::from_millis(500)),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn a_connection_is_busy_only_while_a_request_is_served() {
        let f = Arc::new(InFlight::default());
        assert_eq!(f.at_drain().0, AtDrain::AwaitNextRequest);
        let served = f.start();
        assert_eq!(f.at_drain().0, AtDrain::CloseAfterIt);
        drop(served);
        // Served once, idle again: not busy (the old stored-permit bug).
        assert_eq!(f.at_drain().0, AtDrain::AwaitNextRequest);
    }

    #[test]
    fn the_drain_hears_of_a_request_that_arrives_after_it_looked() {
        let f = Arc::new(InFlight::default());
        let (what, mut arrived) = f.at_drain();
        assert_eq!(what, AtDrain::AwaitNextRequest);
        assert!(arrived.as_mut().now_or_never().is_none());
        let _s = f.start();
        assert!(arrived.now_or_never().is_some());
        // An arrival before the drain looked leaves nothing behind for a later drain.
        let g = Arc::new(InFlight::default());
        drop(g.start());
        let (_, mut later) = g.at_drain();
        assert!(later.as_mut().now_or_never().is_none());
    }
}
