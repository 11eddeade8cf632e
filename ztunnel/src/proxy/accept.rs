//! The accept loop of one listener, with a cap on the connections it has open at once.
//! At the cap, a new connection is accepted and closed at once (the client sees the close
//! instead of waiting in the backlog), and the listener says so in the log once each time
//! it reaches the cap, not once per refused connection. When the listener closes (a
//! handover, a drain) the connections already queued on it are accepted and served
//! first: closing a listener resets what is still in its queue, unless the kernel can
//! migrate it (`net.ipv4.tcp_migrate_req`, which needs a writable /proc/sys).

use futures_util::FutureExt;
use mesh_threads::DataPlane;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// One listener's cap and what happened at it.
#[derive(Debug)]
pub struct ConnLimit {
    /// Which listener, for the log (`front/client outbound`).
    name: String,
    limit: usize,
    slots: Arc<Semaphore>,
    at_limit: AtomicBool,
    refused: AtomicU64,
    /// Also counts refusals here (a metric), if set.
    counter: Option<prometheus_client::metrics::counter::Counter>,
}

impl ConnLimit {
    pub fn new(name: impl Into<String>, limit: usize) -> Arc<Self> {
        Arc::new(ConnLimit {
            name: name.into(),
            limit,
            slots: Arc::new(Semaphore::new(limit)),
            at_limit: AtomicBool::new(false),
            refused: AtomicU64::new(0),
            counter: None,
        })
    }

    /// As [`ConnLimit::new`], counting refusals in `counter` too.
    pub fn counting(
        name: impl Into<String>,
        limit: usize,
        counter: prometheus_client::metrics::counter::Counter,
    ) -> Arc<Self> {
        let mut l = Arc::try_unwrap(Self::new(name, limit)).expect("fresh");
        l.counter = Some(counter);
        Arc::new(l)
    }

    /// Connections refused at the cap so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.limit - self.slots.available_permits()
    }

    /// A slot for a new connection, or `None` (logged on the first refusal of a run).
    fn admit(&self) -> Option<OwnedSemaphorePermit> {
        match self.slots.clone().try_acquire_owned() {
            Ok(permit) => {
                if self.at_limit.swap(false, Ordering::Relaxed) {
                    tracing::info!(listener = %self.name, limit = self.limit,
                        "listener below its connection limit again; accepting");
                }
                Some(permit)
            }
            Err(_) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                if let Some(c) = &self.counter {
                    c.inc();
                }
                if !self.at_limit.swap(true, Ordering::Relaxed) {
                    tracing::warn!(listener = %self.name, limit = self.limit,
                        "listener at its connection limit (--max-connections-per-listener): closing new connections until some end");
                }
                None
            }
        }
    }
}

/// At most this many connections queued on a closing listener are accepted and served.
const MAX_QUEUED_AT_CLOSE: usize = 4096;

/// A listener ready to accept on every data thread: a duplicate of its descriptor
/// registered with each thread's runtime, or, without data threads, the listener itself on
/// the current runtime. Made before anything is spawned, so a listener that cannot be set
/// up fails its pod's start while nothing runs yet.
pub struct ReadyListener {
    copies: Vec<(Option<Handle>, TcpListener)>,
}

impl ReadyListener {
    pub fn new(listener: TcpListener, plane: &DataPlane) -> io::Result<Self> {
        if plane.handles().is_empty() {
            return Ok(ReadyListener {
                copies: vec![(None, listener)],
            });
        }
        let listener = listener.into_std()?;
        let mut copies = Vec::with_capacity(plane.handles().len());
        for h in plane.handles() {
            let copy = listener.try_clone()?;
            // Registered with that thread's runtime: its readiness wakes that thread. Every
            // thread wakes for each new connection; one accepts it, the others find none.
            let _on = h.enter();
            copies.push((Some(h.clone()), TcpListener::from_std(copy)?));
        }
        Ok(ReadyListener { copies })
    }

    /// Accepts until `stop`, running `handle` for each admitted connection (the slot is
    /// held until `handle`'s future ends); at `stop`, serves what is queued, then closes.
    pub fn spawn<F, Fut>(self, limit: Arc<ConnLimit>, stop: CancellationToken, handle: F)
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let handle = Arc::new(handle);
        for (runtime, listener) in self.copies {
            let serving = accept_loop(listener, limit.clone(), stop.clone(), handle.clone());
            match runtime {
                Some(h) => drop(h.spawn(serving)),
                None => drop(tokio::spawn(serving)),
            }
        }
    }
}

/// [`ReadyListener::new`] then [`ReadyListener::spawn`].
pub fn spawn_accept_loop<F, Fut>(
    listener: TcpListener,
    limit: Arc<ConnLimit>,
    stop: CancellationToken,
    plane: &DataPlane,
    handle: F,
) -> io::Result<()>
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    ReadyListener::new(listener, plane)?.spawn(limit, stop, handle);
    Ok(())
}

async fn accept_loop<F, Fut>(
    listener: TcpListener,
    limit: Arc<ConnLimit>,
    stop: CancellationToken,
    handle: Arc<F>,
) where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let name = limit.name.clone();
    let serve = move |s: TcpStream| {
        let Some(permit) = limit.admit() else {
            drop(s);
            return;
        };
        let _ = s.set_nodelay(true);
        // Made here, so whatever the handler takes at once (the drain's count of open
        // connections) is taken as the connection is accepted. Mapped rather than awaited
        // in an async block, which would keep the future twice in the task (once captured,
        // once awaited).
        let fut = handle(s);
        tokio::spawn(fut.map(move |()| drop(permit)));
    };
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => serve(s),
                Err(e) => {
                    tracing::warn!(listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    let served = accept_queued(listener, MAX_QUEUED_AT_CLOSE, serve);
    if served > 0 {
        tracing::info!(listener = %name, served, "listener closing: served the connections queued on it");
    }
}

/// Accepts (without waiting) what is queued on `listener`, at most `max`, passing each to
/// `serve`; then the listener closes. How many were accepted.
fn accept_queued(listener: TcpListener, max: usize, serve: impl Fn(TcpStream)) -> usize {
    let Ok(listener) = listener.into_std() else {
        return 0;
    };
    let mut served = 0;
    while served < max {
        // The listener is non-blocking: WouldBlock once the queue is empty.
        let Ok((s, _)) = listener.accept() else { break };
        served += 1;
        let tokio_stream = s
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(s));
        if let Ok(s) = tokio_stream {
            serve(s);
        }
    }
    served
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Holds each connection open until the client closes it, answering one byte first.
    async fn hold(mut s: TcpStream) {
        let _ = s.write_all(b"+").await;
        let mut b = [0u8; 1];
        let _ = s.read(&mut b).await;
    }

    /// What the server does with a fresh connection: `Some(b'+')` if served, `None` if
    /// it was closed without a word.
    async fn greeting(s: &mut TcpStream) -> Option<u8> {
        let mut b = [0u8; 1];
        match s.read(&mut b).await {
            Ok(1) => Some(b[0]),
            _ => None,
        }
    }

    #[tokio::test]
    async fn connections_queued_when_the_listener_closes_are_served_not_reset() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Connected (the kernel completed each handshake) but not accepted yet.
        let mut queued = Vec::new();
        for _ in 0..3 {
            queued.push(TcpStream::connect(addr).await.unwrap());
        }
        let stop = CancellationToken::new();
        stop.cancel();
        let limit = ConnLimit::new("test", 8);
        spawn_accept_loop(listener, limit, stop, &DataPlane::inline(), hold).unwrap();
        for s in &mut queued {
            assert_eq!(greeting(s).await, Some(b'+'), "served, not reset");
        }
        // Closed for anything new.
        let late = TcpStream::connect(addr).await;
        assert!(late.is_err(), "{late:?}");
    }

    /// Answers with the name of the thread serving the connection, checked again after a
    /// wait (a connection never moves between threads), then holds it like [`hold`].
    async fn name_thread(mut s: TcpStream) {
        let name = std::thread::current().name().unwrap_or("?").to_owned();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let again = std::thread::current().name().unwrap_or("?").to_owned();
        let said = if name == again {
            name
        } else {
            format!("moved {name} -> {again}")
        };
        let _ = s.write_all(format!("{said}\n").as_bytes()).await;
        let mut b = [0u8; 1];
        let _ = s.read(&mut b).await;
    }

    #[tokio::test]
    async fn with_data_threads_connections_are_served_on_them_and_stop_closes_every_copy() {
        let plane = DataPlane::start("ztunnel-data", 2).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let limit = ConnLimit::new("test", 64);
        spawn_accept_loop(listener, limit.clone(), stop.clone(), &plane, name_thread).unwrap();
        let mut open = Vec::new();
        for _ in 0..20 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut said = Vec::new();
            while !said.ends_with(b"\n") {
                let mut b = [0u8; 1];
                assert_eq!(s.read(&mut b).await.unwrap(), 1, "served");
                said.push(b[0]);
            }
            let said = String::from_utf8(said).unwrap();
            assert!(said.starts_with("ztunnel-data-"), "{said}");
            open.push(s);
        }
        assert_eq!(limit.open(), 20);
        // Every thread's copy of the listener closes at stop: nothing new is accepted.
        stop.cancel();
        let refused = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match TcpStream::connect(addr).await {
                    Err(_) => break,
                    Ok(mut late) => {
                        // Queued before the last copy closed: served, then the next try.
                        let _ = greeting(&mut late).await;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        })
        .await;
        assert!(refused.is_ok(), "the listener stayed open after stop");
        drop(open);
    }

    #[tokio::test]
    async fn connections_past_the_cap_are_closed_and_others_keep_being_served() {
        let log = mesh_log::Captured::default();
        let writer = log.clone();
        let _logging = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .finish(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limit = ConnLimit::new("test", 2);
        spawn_accept_loop(
            listener,
            limit.clone(),
            CancellationToken::new(),
            &DataPlane::inline(),
            hold,
        )
        .unwrap();
        let mut first = TcpStream::connect(addr).await.unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        assert_eq!(greeting(&mut first).await, Some(b'+'));
        assert_eq!(greeting(&mut second).await, Some(b'+'));
        for _ in 0..3 {
            let mut over = TcpStream::connect(addr).await.unwrap();
            assert_eq!(greeting(&mut over).await, None, "closed at the cap");
        }
        assert_eq!((limit.open(), limit.refused()), (2, 3));
        // Said once, clearly, not once per refused connection.
        let said = log.text();
        assert_eq!(
            said.matches("listener at its connection limit").count(),
            1,
            "{said}"
        );
        assert!(said.contains("listener=test limit=2"), "{said}");
        // The two admitted connections are unaffected.
        first.write_all(b"x").await.unwrap();
        drop(first);
        // A slot frees up once a connection ends: new connections are served again.
        let mut again = loop {
            let mut s = TcpStream::connect(addr).await.unwrap();
            if greeting(&mut s).await.is_some() {
                break s;
            }
            tokio::task::yield_now().await;
        };
        again.write_all(b"x").await.unwrap();
        assert!(log.text().contains("below its connection limit again"));
        second.write_all(b"x").await.unwrap();
        assert_eq!(greeting(&mut second).await, None, "ended by the server");
    }
}
