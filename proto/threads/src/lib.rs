//! The data path's threads, shared by ztunnel and the waypoint. Each data thread runs a
//! single-threaded Tokio runtime, and a connection with everything it needs (its
//! sockets, the HTTP/2 connection it rides, that connection's streams, the upstream
//! connections it uses) lives on one of them. Moving a byte then wakes no other thread:
//! with one multi-threaded runtime, a connection's tasks woke each other across threads
//! (over half of ztunnel's system-call time went to futex) and the waypoint spent a third
//! more CPU per request. Control work (xDS, admin, metrics) stays on the main runtime.
//!
//! State that must not be shared between threads (a pool of connections whose tasks run
//! on one thread) is kept once per thread in a [`PerThread`].

#![forbid(unsafe_code)]

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
    /// Starts `n` threads, `<name>-<i>`, each driving a runtime of its own for the life of
    /// the process.
    pub fn start(name: &str, n: usize) -> io::Result<Self> {
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            workers.push(rt.handle().clone());
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    WORKER.set(Some(i));
                    rt.block_on(std::future::pending::<()>());
                })?;
        }
        Ok(DataPlane {
            workers: workers.into(),
        })
    }

    /// No threads of its own: connections run on the runtime that accepted them.
    pub fn inline() -> Self {
        Self::default()
    }

    /// How many copies of per-thread state to keep: one per data thread.
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

/// One `T` per data thread; [`PerThread::get`] is the calling thread's (the first one's
/// off the data threads).
#[derive(Debug)]
pub struct PerThread<T> {
    items: Arc<[T]>,
}

impl<T> Clone for PerThread<T> {
    fn clone(&self) -> Self {
        PerThread {
            items: self.items.clone(),
        }
    }
}

/// A single default `T`, as [`PerThread::one`].
impl<T: Default> Default for PerThread<T> {
    fn default() -> Self {
        Self::one(T::default())
    }
}

impl<T> PerThread<T> {
    /// One `make()` per data thread of `plane` (one without data threads).
    pub fn new(plane: &DataPlane, make: impl FnMut() -> T) -> Self {
        PerThread {
            items: std::iter::repeat_with(make).take(plane.width()).collect(),
        }
    }

    /// A single `T`, for code that runs without data threads.
    pub fn one(item: T) -> Self {
        PerThread {
            items: Arc::new([item]),
        }
    }

    /// This data thread's `T`.
    pub fn get(&self) -> &T {
        &self.items[DataPlane::current() % self.items.len()]
    }

    /// Every thread's `T`.
    pub fn all(&self) -> &[T] {
        &self.items
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn each_data_thread_runs_its_own_task_and_finds_its_own_state() {
        let plane = DataPlane::start("test-data", 2).unwrap();
        assert_eq!((plane.width(), plane.handles().len()), (2, 2));
        let mut n = 0;
        let state = PerThread::new(&plane, || {
            n += 10;
            n
        });
        assert_eq!(state.all(), &[10, 20]);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        for (i, h) in plane.handles().iter().enumerate() {
            let (seen, tx, state) = (seen.clone(), tx.clone(), state.clone());
            h.spawn(async move {
                let name = std::thread::current().name().map(str::to_owned);
                // Still on the same thread after yielding: a single-threaded runtime.
                tokio::task::yield_now().await;
                let same = std::thread::current().name().map(str::to_owned) == name;
                seen.lock()
                    .unwrap()
                    .push((i, DataPlane::current(), *state.get(), name, same));
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
                (0, 0, 10, Some("test-data-0".into()), true),
                (1, 1, 20, Some("test-data-1".into()), true),
            ]
        );
        assert_eq!(DataPlane::current(), 0, "off the data path");
        assert_eq!(*state.get(), 10, "off the data path: the first thread's");
    }

    #[test]
    fn without_data_threads_there_is_one_of_everything_and_no_runtime() {
        let plane = DataPlane::inline();
        assert_eq!((plane.width(), plane.handles().len()), (1, 0));
        let state = PerThread::new(&plane, || 7);
        assert_eq!((state.all(), *state.get()), (&[7][..], 7));
        assert_eq!(*PerThread::one(3).get(), 3);
    }
}
