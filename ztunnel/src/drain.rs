//! Draining: stop accepting, let open connections finish until a deadline, then close
//! what is left. Used for the whole process (SIGTERM) and for one pod (ZDS Del).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug)]
pub struct Drain {
    stop_accepting: CancellationToken,
    force_close: CancellationToken,
    /// The counters a connection here counts in: the parents' first (a connection in a
    /// pod counts for the whole process too), this drain's own last, which also counts
    /// the child drains' connections. Shared by clones of this drain and by its guards, so
    /// a guard costs a reference, not a list of its own.
    counted: Arc<[Arc<AtomicUsize>]>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            stop_accepting: CancellationToken::new(),
            force_close: CancellationToken::new(),
            counted: Arc::new([Arc::default()]),
        }
    }
}

/// Held by each open connection; the drain (and its parents) wait for all of them.
#[derive(Debug)]
pub struct ConnGuard {
    counted: Arc<[Arc<AtomicUsize>]>,
    pub force_close: CancellationToken,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        for c in self.counted.iter() {
            c.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    /// A drain that also starts when `self` does, and whose connections `self` counts.
    pub fn child(&self) -> Drain {
        Drain {
            stop_accepting: self.stop_accepting.child_token(),
            force_close: self.force_close.child_token(),
            counted: self
                .counted
                .iter()
                .cloned()
                .chain([Arc::default()])
                .collect(),
        }
    }

    pub fn stop_accepting(&self) -> CancellationToken {
        self.stop_accepting.clone()
    }

    /// Stops accepting (listeners close, HBONE connections get GOAWAY) and leaves open
    /// connections running, with no deadline: a handover.
    pub fn stop_accepting_now(&self) {
        self.stop_accepting.cancel();
    }

    pub fn guard(&self) -> ConnGuard {
        for c in self.counted.iter() {
            c.fetch_add(1, Ordering::Relaxed);
        }
        ConnGuard {
            counted: self.counted.clone(),
            force_close: self.force_close.clone(),
        }
    }

    /// Connections open here and in every child drain.
    pub fn open_connections(&self) -> usize {
        let own = self
            .counted
            .last()
            .expect("a drain counts its own connections");
        own.load(Ordering::Relaxed)
    }

    /// Stops accepting, waits for open connections up to `deadline`, then force-closes.
    pub async fn run(&self, deadline: Duration) {
        self.stop_accepting.cancel();
        let wait = async {
            while self.open_connections() > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        if tokio::time::timeout(deadline, wait).await.is_err() {
            tracing::info!(
                remaining = self.open_connections(),
                "drain deadline reached, closing remaining connections"
            );
        }
        self.force_close.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_connections_then_forces() {
        let d = Drain::new();
        let g = d.guard();
        let force = g.force_close.clone();
        let start = tokio::time::Instant::now();
        d.run(Duration::from_millis(200)).await;
        assert!(start.elapsed() >= Duration::from_millis(200));
        assert!(force.is_cancelled());
        drop(g);
        let d = Drain::new();
        let g = d.guard();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(g);
        });
        let start = tokio::time::Instant::now();
        d.run(Duration::from_secs(5)).await;
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "finished once the connection ended"
        );
    }

    #[test]
    fn a_parent_counts_its_childrens_connections() {
        let parent = Drain::new();
        let (a, b) = (parent.child(), parent.child());
        let _clone = a.clone();
        assert_eq!(
            parent.open_connections(),
            0,
            "drains and clones are not connections"
        );
        let g1 = a.guard();
        let g2 = b.guard();
        let g3 = a.clone().guard();
        assert_eq!((parent.open_connections(), a.open_connections()), (3, 2));
        drop((g1, g3));
        assert_eq!((parent.open_connections(), a.open_connections()), (1, 0));
        drop(g2);
        assert_eq!(parent.open_connections(), 0);
        // Counted at every level up, and only there.
        let grandchild = a.child();
        let g4 = grandchild.guard();
        let counts = |ds: [&Drain; 4]| ds.map(|d| d.open_connections());
        assert_eq!(counts([&parent, &a, &b, &grandchild]), [1, 1, 0, 1]);
        drop(g4);
        assert_eq!(counts([&parent, &a, &b, &grandchild]), [0, 0, 0, 0]);
    }

    #[test]
    fn parent_drain_reaches_children() {
        let parent = Drain::new();
        let child = parent.child();
        parent.stop_accepting.cancel();
        assert!(child.stop_accepting().is_cancelled());
    }
}
