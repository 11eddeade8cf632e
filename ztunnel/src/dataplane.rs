//! The data path's threads. Each runs a single-threaded Tokio runtime and accepts on every
//! pod listener, so everything one connection needs lives on the thread that accepted it:
//! its sockets, and, for an outbound connection, the HBONE connection it rides (one pool
//! per thread), whose TLS and HTTP/2 are driven there too; an inbound HBONE connection's
//! streams run where the connection was accepted. Moving a byte then wakes no other thread
//! (with one multi-threaded runtime, the HTTP/2 connection task and its stream tasks
//! woke each other across threads: over half the system-call time went to futex).
//! Control work (xDS, the policy re-check, DNS, admin, metrics) stays on the main runtime;
//! a certificate fetched for a connection is fetched where that connection runs.

use std::cell::Cell;
use std::io;
use std::sync::Arc;
use tokio::runtime::Handle;

thread_local! {
    /// The index of the data thread this is, if it is one.
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The data threads (none: everything runs on the caller's runtime).
#[derive(Clone, Default, Debug)]
pub struct DataPlane {
    workers: Arc<[Handle]>,
}

impl DataPlane {
    /// Starts `n` threads, `ztunnel-data-<i>`, each driving a runtime of its own for the
    /// life of the process.
    pub fn start(n: usize) -> io::Result<Self> {
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            workers.push(rt.handle().clone());
            std::thread::Builder::new()
                .name(format!("ztunnel-data-{i}"))
                .spawn(move || {
                    WORKER.set(Some(i));
                    rt.block_on(std::future::pending::<()>());
                })?;
        }
        Ok(DataPlane {
            workers: workers.into(),
        })
    }

    /// No threads of its own: connections run on the runtime that bound the listener.
    pub fn inline() -> Self {
        Self::default()
    }

    /// How many copies of per-thread state (an HBONE pool) to keep: one per data thread.
    pub fn width(&self) -> usize {
        self.workers.len().max(1)
    }

    /// The data thread this code runs on; 0 anywhere else.
    pub fn current() -> usize {
        WORKER.get().unwrap_or(0)
    }

    /// The data threads' runtimes (empty without data threads).
    pub fn handles(&self) -> &[Handle] {
        &self.workers
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn each_data_thread_runs_its_own_task_and_knows_its_index() {
        let plane = DataPlane::start(2).unwrap();
        assert_eq!((plane.width(), plane.handles().len()), (2, 2));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        for (i, h) in plane.handles().iter().enumerate() {
            let (seen, tx) = (seen.clone(), tx.clone());
            h.spawn(async move {
                let name = std::thread::current().name().map(str::to_owned);
                // Still on the same thread after yielding: a single-threaded runtime.
                tokio::task::yield_now().await;
                let same = std::thread::current().name().map(str::to_owned) == name;
                seen.lock()
                    .unwrap()
                    .push((i, DataPlane::current(), name, same));
                tx.send(()).unwrap();
            });
        }
        for _ in 0..2 {
            rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        }
        let mut seen = seen.lock().unwrap().clone();
        seen.sort();
        assert_eq!(
            seen,
            vec![
                (0, 0, Some("ztunnel-data-0".into()), true),
                (1, 1, Some("ztunnel-data-1".into()), true),
            ]
        );
        assert_eq!(DataPlane::current(), 0, "off the data path");
    }

    #[test]
    fn without_data_threads_there_is_one_of_everything_and_no_runtime() {
        let plane = DataPlane::inline();
        assert_eq!((plane.width(), plane.handles().len()), (1, 0));
    }
}
