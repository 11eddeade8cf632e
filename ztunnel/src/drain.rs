//! Draining: stop accepting, let open connections finish until a deadline, then close
//! what is left. Used for the whole process (SIGTERM) and for one pod (ZDS Del).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Default)]
pub struct Drain {
    stop_accepting: CancellationToken,
    force_close: CancellationToken,
    /// Open connections here and in child drains (shared by clones of this drain).
    active: Arc<AtomicUsize>,
    /// The parents' counters: a connection in a pod counts for the whole process too.
    ancestors: Vec<Arc<AtomicUsize>>,
}

/// Held by each open connection; the drain (and its parents) wait for all of them.
#[derive(Debug)]
pub struct ConnGuard {
    counted: Vec<Arc<AtomicUsize>>,
    pub force_close: CancellationToken,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        for c in &self.counted {
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
        let mut ancestors = self.ancestors.clone();
        ancestors.push(self.active.clone());
        Drain {
            stop_accepting: self.stop_accepting.child_token(),
            force_close: self.force_close.child_token(),
            active: Arc::default(),
            ancestors,
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
        let mut counted = self.ancestors.clone();
        counted.push(self.active.clone());
        for c in &counted {
            c.fetch_add(1, Ordering::Relaxed);
        }
        ConnGuard {
            counted,
            force_close: self.force_close.clone(),
        }
    }

    /// Connections open here and in every child drain.
    pub fn open_connections(&self) -> usize {
        self.active.load(Ordering::Relaxed)
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
    }

    #[test]
    fn parent_drain_reaches_children() {
        let parent = Drain::new();
        let child = parent.child();
        parent.stop_accepting.cancel();
        assert!(child.stop_accepting().is_cancelled());
    }
}
