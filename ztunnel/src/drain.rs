//! Draining: stop accepting, let open connections finish until a deadline, then close
//! what is left. Used for the whole process (SIGTERM) and for one pod (ZDS Del).

use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Default)]
pub struct Drain {
    stop_accepting: CancellationToken,
    force_close: CancellationToken,
    active: Arc<()>,
}

/// Held by each open connection; the drain waits for all of them.
#[derive(Debug)]
pub struct ConnGuard {
    _active: Arc<()>,
    pub force_close: CancellationToken,
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    /// A drain that also starts when `self` does.
    pub fn child(&self) -> Drain {
        Drain {
            stop_accepting: self.stop_accepting.child_token(),
            force_close: self.force_close.child_token(),
            active: Arc::new(()),
        }
    }

    pub fn stop_accepting(&self) -> CancellationToken {
        self.stop_accepting.clone()
    }

    pub fn guard(&self) -> ConnGuard {
        ConnGuard {
            _active: self.active.clone(),
            force_close: self.force_close.clone(),
        }
    }

    pub fn open_connections(&self) -> usize {
        Arc::strong_count(&self.active) - 1
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
    fn parent_drain_reaches_children() {
        let parent = Drain::new();
        let child = parent.child();
        parent.stop_accepting.cancel();
        assert!(child.stop_accepting().is_cancelled());
    }
}
