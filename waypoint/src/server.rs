//! The waypoint's lifecycle around its data path:
//!
//! - **readiness**: `/healthz/ready` answers 200 only once addresses, routes and policies
//!   have each been received from the control plane at least once and the waypoint holds
//!   a certificate; 503 naming what is missing otherwise, and while draining;
//! - **accepting**: the HBONE listener is not even bound before that first sync, so
//!   nothing is served on a partial configuration (no policy yet must not mean "allow");
//! - **certificates** are fetched off the accept path: each connection waits for one at
//!   most `cert_wait` in its own task, so a slow CA never stalls the accept loop;
//! - **drain** (SIGTERM): readiness fails at once; for `drain_delay` the waypoint keeps
//!   accepting and serving as before (in a cluster, endpoints are removed while the pod is
//!   told to stop, not before: ztunnels may still send new connections for a moment);
//!   then the listener closes (connections already in its accept queue are taken and
//!   served, not reset), HBONE connections get a GOAWAY, HTTP connections finish the
//!   request in flight and close, and the waypoint exits once all are done or the drain
//!   deadline has passed.

use crate::proxy::{Handler, Waypoint};
use mesh_identity::SpiffeId;
use mesh_proto::type_url;
use mesh_threads::DataPlane;
use mesh_xds::certs::CertManager;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

/// What the waypoint is waiting for, and whether it is draining.
#[derive(Default)]
pub struct Lifecycle {
    addresses: AtomicBool,
    routes: AtomicBool,
    policies: AtomicBool,
    /// The manager the waypoint's connections take their certificate from, and its
    /// identity: readiness asks it, so it never says "no certificate" while connections
    /// are being served with one (or the reverse, once it expires).
    certificate: OnceLock<(Arc<CertManager>, SpiffeId)>,
    draining: AtomicBool,
    /// The configuration store failed closed (a panic while applying xDS).
    config_failed: AtomicBool,
    changed: tokio::sync::Notify,
}

impl Lifecycle {
    pub fn new() -> Arc<Self> {
        Arc::new(Lifecycle::default())
    }

    /// A response of `type_url` has been applied (whether or not all of it was valid).
    pub fn mark_synced(&self, type_url: &str) {
        let flag = match type_url {
            type_url::ADDRESS => &self.addresses,
            type_url::HTTP_ROUTE => &self.routes,
            type_url::L7_POLICY => &self.policies,
            _ => return,
        };
        if !flag.swap(true, Ordering::SeqCst) {
            tracing::info!(type_url, "first configuration received");
            self.changed.notify_waiters();
        }
    }

    /// Readiness from now on requires `certs` to hold a valid certificate for `id`.
    pub fn watch_certificate(&self, certs: Arc<CertManager>, id: SpiffeId) {
        if self.certificate.set((certs, id)).is_err() {
            tracing::warn!("readiness already watches a certificate; kept the first");
        }
    }

    fn holds_certificate(&self) -> bool {
        self.certificate
            .get()
            .is_some_and(|(certs, id)| certs.holds_valid(id))
    }

    /// The configuration failed closed: not ready until the waypoint is restarted.
    pub fn set_config_failed(&self) {
        self.config_failed.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Addresses, routes and policies have each been received once.
    pub fn synced(&self) -> bool {
        self.addresses.load(Ordering::SeqCst)
            && self.routes.load(Ordering::SeqCst)
            && self.policies.load(Ordering::SeqCst)
    }

    /// What keeps the waypoint from being ready (empty: ready).
    pub fn not_ready(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        for (flag, what) in [
            (&self.addresses, "addresses not synced"),
            (&self.routes, "routes not synced"),
            (&self.policies, "policies not synced"),
        ] {
            if !flag.load(Ordering::SeqCst) {
                missing.push(what);
            }
        }
        if !self.holds_certificate() {
            missing.push("no certificate");
        }
        if self.config_failed.load(Ordering::SeqCst) {
            missing.push("configuration failed closed (restart the waypoint)");
        }
        if self.draining.load(Ordering::SeqCst) {
            missing.push("draining");
        }
        missing
    }

    pub fn ready(&self) -> bool {
        self.not_ready().is_empty()
    }

    /// Returns once addresses, routes and policies have all synced.
    pub async fn wait_synced(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.synced() {
                return;
            }
            changed.await;
        }
    }
}

#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    /// How long a new connection waits for the waypoint's certificate.
    pub cert_wait: Duration,
    /// How long a drain may take before the waypoint exits anyway.
    pub drain_deadline: Duration,
    /// After shutdown is asked, how long new connections are still accepted (readiness
    /// failing) before the drain starts.
    pub drain_delay: Duration,
    /// Where connections run: each on one data thread, or, with none, on the runtime that
    /// accepted it.
    pub data_plane: DataPlane,
}

/// How serving ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped {
    /// Shut down before the first sync: nothing was ever served.
    BeforeSync,
    /// Every connection finished within the drain deadline.
    Drained,
    /// The deadline passed with connections still open.
    DeadlineExceeded { open: usize },
}

/// Serves HBONE once the configuration has synced, until `shutdown` completes; then
/// drains within `drain_deadline`. A certificate is fetched in the background from the
/// start (so the waypoint turns ready without waiting for a connection), and again,
/// bounded, by any connection that finds none; readiness asks the manager either way.
pub async fn serve(
    wp: Arc<Waypoint>,
    lifecycle: Arc<Lifecycle>,
    cfg: ServeConfig,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<Stopped> {
    tokio::pin!(shutdown);
    let width = cfg.data_plane.width();
    if wp.pool.all().len() != width || wp.client.all().len() != width {
        // Pools shared between threads would wake each other's connections on every byte.
        return Err(std::io::Error::other(format!(
            "the waypoint's upstream pools ({}, {}) do not match its {width} data threads",
            wp.pool.all().len(),
            wp.client.all().len()
        )));
    }
    lifecycle.watch_certificate(wp.certs.clone(), wp.identity.clone());
    let prefetch = tokio::spawn(fetch_certificate(wp.clone(), cfg.cert_wait));
    tokio::select! {
        _ = lifecycle.wait_synced() => {}
        _ = &mut shutdown => {
            prefetch.abort();
            lifecycle.set_draining();
            return Ok(Stopped::BeforeSync);
        }
    }
    let listener = match TcpListener::bind(cfg.listen).await {
        // `[::]` on a host without IPv6: IPv4 only.
        Err(e) if cfg.listen.ip() == std::net::Ipv6Addr::UNSPECIFIED => {
            let v4 = SocketAddr::from(([0, 0, 0, 0], cfg.listen.port()));
            tracing::warn!(error = %e, listen = %v4, "no IPv6 listener; serving HBONE over IPv4 only");
            TcpListener::bind(v4).await?
        }
        other => other?,
    };
    let listen = listener.local_addr()?;
    tracing::info!(%listen, "waypoint serving HBONE");
    let handler = Arc::new(Handler(wp.clone()));
    let place = Placement {
        tracker: TaskTracker::new(),
        open: cfg
            .data_plane
            .handles()
            .iter()
            .map(|_| Default::default())
            .collect(),
        plane: cfg.data_plane.clone(),
        wp: wp.clone(),
        handler,
        cert_wait: cfg.cert_wait,
    };
    accept_until(&listener, &place, shutdown).await;
    // Not ready from now on; still accepting while the endpoints catch up.
    lifecycle.set_draining();
    if !cfg.drain_delay.is_zero() {
        tracing::info!(delay = ?cfg.drain_delay, "not ready; still serving new connections while endpoints are updated");
        let delay = tokio::time::sleep(cfg.drain_delay);
        tokio::pin!(delay);
        accept_until(&listener, &place, delay).await;
    }
    // Drain: refuse new connections, GOAWAY and graceful close on the open ones. The
    // connections the kernel has completed but nobody accepted yet would be reset with
    // the listener: they are served like the others.
    match listener.into_std() {
        Ok(l) => {
            for (tcp, peer) in accept_queued(&l, MAX_QUEUED) {
                place.spawn(tcp, peer);
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot take the queued connections"),
    }
    prefetch.abort();
    wp.shutdown.cancel();
    let tracker = place.tracker;
    tracker.close();
    tracing::info!(open = tracker.len(), deadline = ?cfg.drain_deadline, "draining");
    match tokio::time::timeout(cfg.drain_deadline, tracker.wait()).await {
        Ok(()) => {
            tracing::info!("drained");
            Ok(Stopped::Drained)
        }
        Err(_) => {
            let open = tracker.len();
            tracing::warn!(
                open,
                "drain deadline passed; closing the remaining connections"
            );
            Ok(Stopped::DeadlineExceeded { open })
        }
    }
}

/// At most this many connections are taken from the accept queue when the drain starts
/// (a listen backlog's worth).
const MAX_QUEUED: usize = 1024;

/// The connections waiting in `listener`'s accept queue (non-blocking), at most `max`,
/// as non-blocking sockets.
pub fn accept_queued(
    listener: &std::net::TcpListener,
    max: usize,
) -> Vec<(std::net::TcpStream, SocketAddr)> {
    let mut out = Vec::new();
    while out.len() < max {
        match listener.accept() {
            Ok((tcp, peer)) => {
                if tcp.set_nonblocking(true).is_ok() {
                    out.push((tcp, peer));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // WouldBlock: the queue is empty; anything else: nothing more to take.
            Err(_) => break,
        }
    }
    out
}

/// Accepts connections on `listener`, each served by `place`, until `until` completes.
async fn accept_until(
    listener: &TcpListener,
    place: &Placement,
    mut until: std::pin::Pin<&mut impl Future<Output = ()>>,
) {
    loop {
        tokio::select! {
            // Once told to stop, stop: what is queued then is taken by the drain.
            biased;
            _ = &mut until => return,
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                // Off this runtime's poller: the connection's thread registers it.
                match tcp.into_std() {
                    Ok(tcp) => place.spawn(tcp, peer),
                    Err(e) => tracing::warn!(%peer, error = %e, "cannot serve a connection"),
                }
            }
        }
    }
}

/// Where each accepted HBONE connection is served, in a task of `tracker`: the data thread
/// with the fewest open connections. The connection's streams, their requests and the
/// upstream connections those use then all run on that thread.
struct Placement {
    tracker: TaskTracker,
    plane: DataPlane,
    /// Open connections per data thread.
    open: Arc<[AtomicUsize]>,
    wp: Arc<Waypoint>,
    handler: Arc<Handler>,
    cert_wait: Duration,
}

impl Placement {
    fn spawn(&self, tcp: std::net::TcpStream, peer: SocketAddr) {
        let (wp, handler, cert_wait) = (self.wp.clone(), self.handler.clone(), self.cert_wait);
        let serve = async move {
            match tokio::net::TcpStream::from_std(tcp) {
                Ok(tcp) => connection(wp, handler, tcp, peer, cert_wait).await,
                Err(e) => tracing::warn!(%peer, error = %e, "cannot serve a connection"),
            }
        };
        if self.plane.handles().is_empty() {
            self.tracker.spawn(serve);
            return;
        }
        let counts: Vec<usize> = self
            .open
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect();
        let i = least_loaded(&counts);
        let open = OpenOn::new(self.open.clone(), i);
        self.tracker.spawn_on(
            async move {
                let _open = open;
                serve.await
            },
            &self.plane.handles()[i],
        );
    }
}

/// The data thread a new connection goes to: the one with the fewest open connections,
/// the first of those.
pub fn least_loaded(open: &[usize]) -> usize {
    (0..open.len()).min_by_key(|&i| open[i]).unwrap_or(0)
}

/// One open connection counted on its data thread while it lives.
struct OpenOn {
    open: Arc<[AtomicUsize]>,
    thread: usize,
}

impl OpenOn {
    fn new(open: Arc<[AtomicUsize]>, thread: usize) -> Self {
        open[thread].fetch_add(1, Ordering::Relaxed);
        OpenOn { open, thread }
    }
}

impl Drop for OpenOn {
    fn drop(&mut self) {
        self.open[self.thread].fetch_sub(1, Ordering::Relaxed);
    }
}

/// One HBONE connection: a certificate (waited for at most `cert_wait`), then HBONE.
async fn connection(
    wp: Arc<Waypoint>,
    handler: Arc<Handler>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    cert_wait: Duration,
) {
    let creds = match tokio::time::timeout(cert_wait, wp.certs.get(&wp.identity)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::warn!(%peer, error = %e, "no certificate; refusing the connection");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, wait = ?cert_wait, "no certificate in time (CA slow); refusing the connection");
            return;
        }
    };
    let settings = hbone::H2Settings::server();
    if let Err(e) = hbone::serve_connection(
        tcp,
        creds.server_config.clone(),
        handler,
        &settings,
        wp.shutdown.clone(),
    )
    .await
    {
        tracing::debug!(%peer, error = %e, "HBONE connection ended");
    }
}

/// Asks for the first certificate in the background, before any connection does, so the
/// waypoint turns ready without waiting for one; without a deadline of its own (a slow CA
/// answers eventually; cancelling it would only start over). One request is enough: the
/// certificate manager retries a failure on its own backoff and renews from then on, and
/// readiness asks the manager, not this task.
async fn fetch_certificate(wp: Arc<Waypoint>, wait: Duration) {
    let fetch = wp.certs.get(&wp.identity);
    tokio::pin!(fetch);
    let r = tokio::select! {
        r = &mut fetch => r,
        _ = tokio::time::sleep(wait) => {
            tracing::warn!(waited = ?wait, "the CA has not answered yet; still waiting");
            fetch.await
        }
    };
    if let Err(e) = r {
        tracing::warn!(error = %e, "no certificate yet; the certificate manager retries");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Readiness asks the manager the connections take their certificate from: one
    /// fetched by anyone (here directly, as a connection's `get` does) makes the waypoint
    /// ready at once, with no background fetch running to say so.
    #[tokio::test]
    async fn readiness_asks_the_certificate_manager_the_connections_use() {
        use mesh_identity::ca::CertificateAuthority;
        use mesh_xds::certs::CertSource;
        let day = Duration::from_secs(86_400);
        let ca = CertificateAuthority::new_root("cluster.local", day).unwrap();
        let certs = CertManager::new(CertSource::Local {
            ca: Box::new(ca),
            ttl: day,
        });
        let id = SpiffeId::new("cluster.local", "shop", "waypoint").unwrap();
        let lifecycle = Lifecycle::new();
        for t in [type_url::ADDRESS, type_url::HTTP_ROUTE, type_url::L7_POLICY] {
            lifecycle.mark_synced(t);
        }
        assert_eq!(lifecycle.not_ready(), ["no certificate"], "none watched");
        lifecycle.watch_certificate(certs.clone(), id.clone());
        assert_eq!(lifecycle.not_ready(), ["no certificate"], "none fetched");
        let other = SpiffeId::new("cluster.local", "shop", "other").unwrap();
        certs.get(&other).await.unwrap();
        assert_eq!(
            lifecycle.not_ready(),
            ["no certificate"],
            "another identity's"
        );
        certs.get(&id).await.unwrap();
        assert!(lifecycle.ready(), "{:?}", lifecycle.not_ready());
    }

    #[test]
    fn a_new_connection_goes_to_the_thread_with_the_fewest_open() {
        assert_eq!(least_loaded(&[0, 0]), 0, "ties: the first");
        assert_eq!(least_loaded(&[1, 0]), 1);
        assert_eq!(least_loaded(&[3, 1, 2]), 1);
        assert_eq!(least_loaded(&[2, 5, 2]), 0);
        assert_eq!(least_loaded(&[7]), 0);
    }

    #[test]
    fn a_connection_counts_on_its_thread_while_it_lives() {
        let open: Arc<[AtomicUsize]> = (0..2).map(|_| AtomicUsize::new(0)).collect();
        let count = || {
            open.iter()
                .map(|n| n.load(Ordering::Relaxed))
                .collect::<Vec<_>>()
        };
        let a = OpenOn::new(open.clone(), 1);
        let b = OpenOn::new(open.clone(), 1);
        assert_eq!(count(), [0, 2]);
        drop(a);
        assert_eq!(count(), [0, 1]);
        drop(b);
        assert_eq!(count(), [0, 0]);
    }

    #[test]
    fn the_accept_queue_is_taken_whole_without_blocking_and_bounded() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let at = l.local_addr().unwrap();
        // Handshakes the kernel completes with nobody accepting.
        let clients: Vec<_> = (0..5)
            .map(|_| std::net::TcpStream::connect(at).unwrap())
            .collect();
        let first = accept_queued(&l, 2);
        assert_eq!(first.len(), 2, "bounded");
        let rest = accept_queued(&l, 100);
        assert_eq!(rest.len(), 3, "the rest, then it stops at an empty queue");
        let mut peers: Vec<_> = first.iter().chain(&rest).map(|(_, p)| *p).collect();
        peers.sort();
        let mut expected: Vec<_> = clients.iter().map(|c| c.local_addr().unwrap()).collect();
        expected.sort();
        assert_eq!(peers, expected);
        assert!(accept_queued(&l, 100).is_empty());
    }
}
